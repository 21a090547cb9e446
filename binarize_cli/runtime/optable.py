"""The op table of the packed format (version 2): the one list of ops, as data.

Read by the writer (:mod:`binarize_cli.export.packed` checks every node it emits), the
reader (:func:`binarize_cli.runtime.format.check_header` validates every node, and
:mod:`binarize_cli.runtime.model` builds its dispatch from it: one builder per table op,
no other) and ``docs/format.md`` (its op list is :func:`markdown_table`, pasted between
the ``optable`` marker comments; ``tests/runtime/test_optable.py`` fails when they differ and
:func:`sync_doc` rewrites it). Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OpSpec:
    """One op: its name, input count, attributes, tensors and what it computes.

    ``attrs``/``optional_attrs`` and ``tensors``/``optional_tensors`` are ``(name, meaning)``
    pairs; a node must carry every required attribute, and its ``inputs`` must number between
    ``min_inputs`` and ``max_inputs`` (``None``: any number). ``since`` is the first format
    version with the op: a file of an older version must not use it.
    """

    name: str
    min_inputs: int
    max_inputs: int | None
    computes: str
    attrs: tuple[tuple[str, str], ...] = ()
    optional_attrs: tuple[tuple[str, str], ...] = ()
    tensors: tuple[tuple[str, str], ...] = ()
    optional_tensors: tuple[tuple[str, str], ...] = ()
    since: int = 1

    @property
    def required_attrs(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.attrs)

    def inputs_text(self) -> str:
        if self.max_inputs is None:
            return f"{self.min_inputs} or more"
        if self.min_inputs == self.max_inputs:
            return str(self.min_inputs)
        return f"{self.min_inputs} to {self.max_inputs}"


_STRIDE_PAD = (("stride", "[sh, sw]"), ("padding", "[ph, pw]"))
_CONV = (*_STRIDE_PAD, ("dilation", "[dh, dw]"), ("groups", "channel groups"))
_POOL = (("kernel_size", "[kh, kw]"), *_STRIDE_PAD)
_F32_BIAS = (("bias", "F32 [O]"),)
_SCALAR = (
    ("scalar", "number, with one input"),
    ("reverse", "boolean, with `scalar`: `scalar op a` (default false: `a op scalar`)"),
)
_SLICE = "`x[..., start:stop:step, ...]` on each of `dims` (NumPy basic slicing)"
_RESIZE = (
    "`F.interpolate` to `size`, per axis of input size `in` and output size `out`. nearest, "
    "all in float32 (even in a float64 reader): `r = float32(in) / float32(out)` or "
    "`float32(1 / scale_factor)`, source `min(floor(i * r), in - 1)`. bilinear, in the "
    "value's precision (float32 for float32 values): `r` is `1 / scale_factor` if given else "
    "`in / out` (`align_corners` true: `(in - 1) / (out - 1)`, 0 when `out` is 1), computed "
    "in float64 and then rounded to that precision; source `s = max((i + 0.5) * r - 0.5, 0)` "
    "(`align_corners` false) or `s = i * r` (true), `i0 = floor(s)`, `i1 = min(i0 + 1, in - 1)`, "
    "`l = s - i0`; rows first: `t = (1 - lh) x[i0h] + lh x[i1h]`, then columns: "
    "`y = (1 - lw) t[i0w] + lw t[i1w]`"
)
_REDUCE = (("dims", "list of int"), ("keepdim", "boolean"))
_OUTPUT_SIZE = (("output_size", "[h or null, w or null]"),)
_BCONV_ATTRS = (
    *_CONV,
    ("in_channels", "C"),
    ("out_channels", "O"),
    ("kernel_size", "[kh, kw]"),
    ("weight_bases", "M, the number of weight planes"),
    ("weight_domain", "`zero_one` or `plus_minus_one`"),
    ("activation_bases", "N; 0: the activation stays real"),
)
_BCONV_OPTIONAL_ATTRS = (
    ("activation_domain", "when N > 0"), ("activation_pieces", "L, when N > 0"),
    ("scheme", "informative"), ("scales_folded_into", "the batchnorm holding the channel scales"),
)  # fmt: skip
_BCONV_TENSORS = (
    ("weight_planes", "U8 [M, ceil(O*C/groups*kh*kw / 8)]"),
    ("weight_scales", "F32 [M], [M, O] or [1]"),
)
_BCONV_OPTIONAL_TENSORS = (
    *_F32_BIAS,
    ("act_thresholds", "F32 [L-1]"),
    ("act_codes", "U8 [L, ceil(N/8)]"),
    ("act_scales", "F32 [N]"),
)
_BN = "`y[:, c] = x[:, c] * scale[c] + shift[c]` (eval-mode batch norm, folded: " + (
    "`scale = gamma / sqrt(var + eps)`, `shift = beta - mean * scale`)"
)
_BINS = (
    "bin `i` of `n` over size `s` is `[floor(i s / n), ceil((i+1) s / n))`; a null "
    "`output_size` entry keeps that axis's input size"
)
_POOL_SIZE = (
    "output size per axis: `o = (in + 2p - d(k-1) - 1) / s + 1`, rounded down, or up with "
    "`ceil_mode`; with `ceil_mode`, `o` drops by 1 when the last window's start `(o - 1) s` "
    "(in padded coordinates, the input at `[p, in + p)`) is at or past `in + p`: a window must "
    "start inside the left padding or the input"
)
_DIMS = "negative dims count from the end (`-1`: the last)"


def _op(name: str, computes: str, inputs: tuple[int, int | None] = (1, 1), **kw: Any) -> OpSpec:
    """An :class:`OpSpec` with ``inputs`` as ``(min, max)`` (default: exactly one)."""
    return OpSpec(name, inputs[0], inputs[1], computes, **kw)


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        _op("conv2d", "`F.conv2d`, zero padding", attrs=_CONV,
            tensors=(("weight", "F32 [O, C/groups, kh, kw]"),), optional_tensors=_F32_BIAS),
        _op("bconv2d", "binarized convolution `conv(W_hat, A_hat) + bias` (section 5)",
            attrs=_BCONV_ATTRS, optional_attrs=_BCONV_OPTIONAL_ATTRS, tensors=_BCONV_TENSORS,
            optional_tensors=_BCONV_OPTIONAL_TENSORS),
        _op("batchnorm", _BN, tensors=(("scale", "F32 [C]"), ("shift", "F32 [C]"))),
        _op("linear", "`x W^T + b` on the last axis (x `[B, ..., K]` -> `[B, ..., O]`)", tensors=(("weight", "F32 [O, K]"),),
            optional_tensors=_F32_BIAS),
        _op("relu", "`max(x, 0)`"),
        _op("clip", "`min(max(x, min), max)` (ReLU6, Hardtanh, clamp; null: no bound)",
            attrs=(("min", "number or null"), ("max", "number or null"))),
        _op("leaky_relu", "`x` if `x >= 0` else `negative_slope * x`",
            attrs=(("negative_slope", "number"),)),
        _op("sigmoid", "`1 / (1 + exp(-x))`"),
        _op("tanh", "`tanh(x)`"),
        _op("silu", "`x * sigmoid(x)`"),
        _op("hardswish", "`x * clip(x + 3, 0, 6) / 6`"),
        _op("hardsigmoid", "`clip(x / 6 + 1/2, 0, 1)`"),
        _op("gelu", "`x * (1 + erf(x / sqrt(2))) / 2`; `approximate` `tanh`: "
            "`x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2`",
            attrs=(("approximate", "`none` or `tanh`"),), since=2),
        _op("prelu", "`x` if `x >= 0` else `weight[c] * x` (channel axis 1; `[1]`: all channels)",
            tensors=(("weight", "F32 [C] or [1]"),), since=2),
        _op("maxpool2d", f"`F.max_pool2d`: the max over each window (padding is -inf); {_POOL_SIZE}",
            attrs=(*_POOL, ("dilation", "[dh, dw]"), ("ceil_mode", "boolean"))),
        _op("avgpool2d", "`F.avg_pool2d`: window sum (padding is 0) / divisor; divisor: "
            "`divisor_override` if given, else the window's rows times columns counted "
            "inside `[-p, in + p)` (`count_include_pad` true) or inside `[0, in)` (false); "
            f"{_POOL_SIZE} (d = 1)",
            attrs=(*_POOL, ("ceil_mode", "boolean"), ("count_include_pad", "boolean")),
            optional_attrs=(("divisor_override", "null or int"),)),
        _op("adaptive_avgpool2d", f"`F.adaptive_avg_pool2d`; {_BINS}", attrs=_OUTPUT_SIZE),
        _op("adaptive_maxpool2d", f"`F.adaptive_max_pool2d`; {_BINS}", attrs=_OUTPUT_SIZE),
        _op("flatten", f"`torch.flatten`: dims `start_dim..end_dim` merged (C order); {_DIMS}", attrs=(("start_dim", "int"), ("end_dim", "int"))),
        _op("mean", f"mean over `dims`; {_DIMS}", attrs=_REDUCE),
        _op("sum", f"sum over `dims`; {_DIMS}", attrs=_REDUCE, since=2),
        _op("softmax", f"`exp(x - max) / sum(exp(x - max))` along `dim`; {_DIMS}",
            attrs=(("dim", "int"),), since=2),
        _op("add", "`a + b`, NumPy broadcasting; one input: `a + scalar`", (1, 2),
            optional_attrs=_SCALAR),
        _op("mul", "`a * b`, NumPy broadcasting; one input: `a * scalar`", (1, 2),
            optional_attrs=_SCALAR),
        _op("sub", "`a - b`, NumPy broadcasting; one input: `a - scalar` (`reverse`: "
            "`scalar - a`)", (1, 2), optional_attrs=_SCALAR, since=2),
        _op("div", "`a / b`, NumPy broadcasting; one input: `a / scalar` (`reverse`: "
            "`scalar / a`)", (1, 2), optional_attrs=_SCALAR, since=2),
        _op("cat", f"concatenation along `dim` (DenseNet); {_DIMS}", (1, None), attrs=(("dim", "int"),)),
        _op("constant", "the stored tensor as it is (no batch dimension added: readers combine it "
            "by NumPy broadcasting)", (0, 0), tensors=(("value", "F32"),)),
        _op("slice", _SLICE, attrs=(("dims", "list of int >= 1"), ("starts", "list of int"),
            ("stops", "list of int"), ("steps", "list of int >= 1")), since=2),
        _op("reshape", "`x.reshape(B, *shape)` (C order; the batch `B` is kept)",
            attrs=(("shape", "list of int: the dims after the batch"),), since=2),
        _op("transpose", "`x.transpose(perm)` (`perm[0] = 0`: the batch stays first)",
            attrs=(("perm", "list of int"),), since=2),
        _op("pad", "constant padding as `F.pad`: `pads` pairs `[before, after]` from the last "
            "dim backwards (negative: crop)",
            attrs=(("pads", "list of int"), ("value", "number")), since=2),
        _op("resize", _RESIZE, attrs=(("size", "[oh, ow]"), ("mode", "`nearest` or `bilinear`"),
            ("align_corners", "boolean")), optional_attrs=(("scale_factor", "[fh, fw]"),),
            since=2),
    )
}  # fmt: skip


def node_problem(node: object, version: int | None = None) -> str | None:
    """What makes ``node`` (one entry of the graph's ``nodes``) invalid for this table, or
    ``None``: an unknown op, an op newer than the file's format ``version`` (``None``: not
    checked), a missing required attribute, a wrong number of inputs (a missing tensor is
    reported when the reader looks it up)."""
    op = node.get("op") if isinstance(node, dict) else None
    spec = OPS.get(op) if isinstance(op, str) else None
    if spec is None:
        return f"uses op {op!r}, unknown to this runtime"
    assert isinstance(node, dict)
    if version is not None and spec.since > version:
        return (
            f"node {node.get('name')!r} uses op {op!r}, new in format version {spec.since}, "
            f"in a version {version} file"
        )
    attrs = node.get("attrs", {})
    missing = [a for a in spec.required_attrs if a not in attrs]
    if (
        op == "bconv2d"
        and attrs.get("activation_bases", 0) > 0
        and "activation_domain" not in attrs
    ):
        missing.append("activation_domain")  # required when the activation is binarized (N > 0)
    if missing:
        return f"node {node.get('name')!r} ({op}) lacks attributes {missing}"
    n = len(node.get("inputs", []))
    if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs):
        return f"node {node.get('name')!r} ({op}) has {n} inputs, expected {spec.inputs_text()}"
    return None


def _pairs(pairs: tuple[tuple[str, str], ...], optional: tuple[tuple[str, str], ...]) -> str:
    parts = [f"`{n}` {m}" for n, m in pairs] + [f"`{n}` {m} (optional)" for n, m in optional]
    return "; ".join(parts) or "—"


def markdown_table() -> str:
    """``docs/format.md``'s op list, generated from :data:`OPS`."""
    rows = [
        "| op | since | inputs | attrs | tensors | computes |",
        "|---|---|---|---|---|---|",
    ]
    for spec in OPS.values():
        attrs = (
            "see section 5" if spec.name == "bconv2d" else _pairs(spec.attrs, spec.optional_attrs)
        )
        tensors = (
            "see section 5"
            if spec.name == "bconv2d"
            else _pairs(spec.tensors, spec.optional_tensors)
        )
        rows.append(
            f"| `{spec.name}` | {spec.since} | {spec.inputs_text()} | {attrs} | {tensors} "
            f"| {spec.computes} |"
        )
    return "\n".join(rows) + "\n"


BEGIN = "<!-- optable: begin (generated by binarize_cli.runtime.optable.markdown_table) -->"
END = "<!-- optable: end -->"


def sync_doc(text: str) -> str:
    """``text`` (``docs/format.md``) with the block between the markers replaced by
    :func:`markdown_table`; raises ``ValueError`` when the markers are missing."""
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError("the optable markers are missing")
    return pattern.sub(lambda _: f"{BEGIN}\n{markdown_table()}{END}", text, count=1)


__all__ = ["BEGIN", "END", "OPS", "OpSpec", "markdown_table", "node_problem", "sync_doc"]
