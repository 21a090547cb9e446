"""ONNX export of a binarized model: packed bit-planes unpacked in-graph, or plain float.

Weights (PA eq. 15-16, ABC eq. 1). Every :class:`~binarize_cli.quant.layers.BinarizedConv2d` weight is
stored as its bit-planes ``T_i`` packed into ``uint8`` (the one representation shared with the
packed export: :mod:`binarize_cli.runtime.bits`, LSB-first, C-order) plus the plane scales ``alpha``
(``[P]`` or per output channel ``[P, C_out]``). A small subgraph of standard operators
rebuilds ``W_hat = sum_i alpha_i read(T_i)`` (``read`` = ``b`` in {0,1}, or ``2b - 1`` in
{-1,+1})::

    packed uint8 [P, B] -> Unsqueeze -> BitShift(RIGHT, [0..7]) -> BitwiseAnd(1)
      -> Reshape [P, 8B] -> Slice [:, :n] -> Cast(float) -> Reshape [P, *shape]
      -> (2b - 1) -> Mul(alpha) -> ReduceSum(axis 0) -> W_hat -> Conv

All inputs of that subgraph are initializers, so onnxruntime folds it into a float weight when
the session loads (graph optimisation level basic or higher); inference then costs what a
float convolution costs, while the file holds M bits per weight instead of 32.

Activations (PA eq. 10/17-18, ABC eq. 2-3, sign, DoReFa). Every activation quantizer of the
built-in schemes is an element-wise *step function* of its input with per-layer parameters.
The exporter reads that function off the quantizer itself (:func:`activation_staircase`):
it bisects the ordered float32 line and finds every float ``t_k`` where the quantizer's output
or bit-planes change, so ``A_hat = levels[#{k : x >= t_k}]`` for *every* float32 ``x``. Ties
are therefore exact whatever the scheme uses (``x >= v`` or ``x > v``: the latter becomes
``x >= nextafter(v)``), and the levels are the quantizer's own output values, bit for bit.
In the graph this is a chain of ``GreaterOrEqual`` + ``Where`` (faster in onnxruntime than a
count + ``Gather``). A quantizer that is not such a function (the check evaluates it on the
thresholds, their neighbours and random points) is exported by tracing its own ``forward``.
``N = 0`` (full-precision activations) exports no activation ops.

Everything else (batch norm in eval mode, ReLU, pooling, the full-precision first convolution
and classifier) is exported by ``torch.onnx.export`` (the dynamo exporter; it emits opset 18
or later, so ``opset >= 18``). The batch dimension is dynamic (input ``"input"``, output
``"logits"``); height and width are fixed to the run's ``input_size``. The input is the
*normalised* image (mean/std are recorded in the metadata, not in the graph).

``--target onnx-float`` writes the same graph with ``W_hat`` as float initializers (the
exporter's optimiser may then fold batch norm into them).

Model metadata (``metadata_props``): ``binarize.format`` (``ONNX_FORMAT``),
``binarize.weights`` (``packed``/``float``), ``binarize.model``, ``binarize.scheme``,
``binarize.M``, ``binarize.N``, ``binarize.num_classes``, ``binarize.input_size``,
``binarize.mean``, ``binarize.std`` (JSON values), ``binarize.data`` (the data spec) and
``binarize.preprocessing`` (JSON: the run's preprocessing record, docs/format.md
"Preprocessing"); a key the run does not have is left out.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from binarize_cli.core.errors import BadInputError, BinarizeError, SchemeError
from binarize_cli.export.steps import (
    LOWEST,
    TooManyPieces,
    check_points,
    find_jumps,
    ordinal_to_float,
)
from binarize_cli.quant.base import ActivationQuantizer, Domain
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.runtime.bits import byte_shifts, pack_planes
from binarize_cli.runtime.staircase import Staircase

ONNX_FORMAT = "binarize-onnx/1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 18
DEFAULT_OPSET = 18
DEFAULT_FILE = "model.onnx"
DEFAULT_FLOAT_FILE = "model-float.onnx"
#: Most pieces an activation step function may have before the exporter refuses it.
MAX_PIECES = 1024
#: Prefix of the weight-unpacking nodes (kept out of the exporter's constant folding).
UNPACK_PREFIX = "binarize_unpack/"
_PROTOBUF_LIMIT = 2**31 - 1


class OnnxExportError(BinarizeError):
    """The model could not be exported to, or checked as, ONNX (exit code 1)."""


# --------------------------------------------------------------------------------------------
# Activation step functions
# --------------------------------------------------------------------------------------------


def _probe(q: ActivationQuantizer, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The quantizer's output on float32 points ``xs`` and a per-point key (output bits, planes)."""
    x = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32)).reshape(1, 1, 1, -1)
    with torch.no_grad():
        values = q(x).detach().reshape(-1).to(torch.float32).cpu().numpy()
        try:
            planes = q.bit_planes(x).planes.detach().reshape(-1, xs.size).cpu().numpy()
        except (NotImplementedError, SchemeError):
            planes = np.zeros((0, xs.size), dtype=bool)
    if values.shape != xs.shape:
        raise ValueError("the quantizer is not element-wise")
    # -0.0 and +0.0 are one piece: compare values numerically, not by sign bit.
    value_bits = np.where(values == 0, np.float32(0), values).view(np.int32).astype(np.int64)
    keys = np.concatenate([value_bits[:, None], planes.T.astype(np.int64)], axis=1)
    return values, keys


def activation_staircase(q: ActivationQuantizer, *, max_pieces: int = MAX_PIECES) -> Staircase:
    """Read the step function of an element-wise activation quantizer off its forward.

    :func:`binarize_cli.export.steps.find_jumps` with the output value and the bit planes as the
    key, so pieces with equal output but different planes are still told apart. Adjacent
    pieces with the same output are then merged.

    Raises:
        ValueError: the quantizer is not element-wise or has more than ``max_pieces`` pieces.
    """
    values: dict[bytes, float] = {}

    def keys_at(xs: np.ndarray) -> list[bytes]:
        out, keys = _probe(q, xs)
        result = []
        for v, k in zip(out, keys, strict=True):
            key = k.tobytes()
            values[key] = float(v)
            result.append(key)
        return result

    try:
        jumps, cache = find_jumps(keys_at, max_pieces=max_pieces + 1)
    except TooManyPieces:
        raise ValueError(f"more than {max_pieces} pieces: not a step function") from None
    thresholds: list[int] = []
    levels = [values[cache[LOWEST]]]
    for j in jumps:
        value = values[cache[j]]
        same = value == levels[-1] or (math.isnan(value) and math.isnan(levels[-1]))
        if not same:
            thresholds.append(j)
            levels.append(value)
    return Staircase(
        thresholds=ordinal_to_float(np.array(thresholds, dtype=np.int64)).copy(),
        levels=np.array(levels, dtype=np.float32),
    )  # no plane code: merged pieces may differ in their planes


def check_staircase(q: ActivationQuantizer, stair: Staircase, *, seed: int = 0) -> bool:
    """Whether ``stair`` reproduces ``q`` exactly on the thresholds, their float neighbours,
    points between them and random points around them."""
    xs = check_points(stair.thresholds, seed=seed)
    values, _ = _probe(q, xs)
    expected = stair(xs)
    return bool(np.all((values == expected) | (np.isnan(values) & np.isnan(expected))))


class StaircaseActivation(nn.Module):
    """ONNX-friendly step function: a ``GreaterOrEqual`` + ``Where`` chain (thresholds ascending)."""

    def __init__(self, stair: Staircase) -> None:
        super().__init__()
        if stair.levels is None:
            raise ValueError("the ONNX step function needs the levels of its pieces")
        self.register_buffer("thresholds", torch.from_numpy(stair.thresholds.copy()))
        self.register_buffer("levels", torch.from_numpy(stair.levels.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(self.thresholds.numel())
        if k == 0:
            return torch.zeros_like(x) + self.levels[0]
        out = torch.where(x >= self.thresholds[0], self.levels[1], self.levels[0])
        for i in range(1, k):
            out = torch.where(x >= self.thresholds[i], self.levels[i + 1], out)
        return out


def export_activation(q: ActivationQuantizer) -> tuple[nn.Module, str]:
    """The module that computes ``q`` in the exported graph, and how (``identity``,
    ``staircase`` or ``traced``)."""
    q = copy.deepcopy(q).eval()
    if int(getattr(q, "num_bases", 0)) == 0:
        return nn.Identity(), "identity"
    try:
        stair = activation_staircase(q)
        if check_staircase(q, stair):
            return StaircaseActivation(stair), "staircase"
    except Exception:  # noqa: BLE001 - any failure to probe means: not an element-wise step function
        pass  # fall through to tracing the quantizer's own forward
    return q, "traced"


# --------------------------------------------------------------------------------------------
# The export copy of the model
# --------------------------------------------------------------------------------------------


@dataclass
class PackedWeight:
    """One binarized convolution's weight in packed form (see the module docstring)."""

    name: str  # initializer name of W_hat in the exported graph
    packed: np.ndarray  # uint8 [P, ceil(n / 8)]
    shape: tuple[int, ...]  # W_hat shape [C_out, C_in / groups, kh, kw]
    scales: np.ndarray  # float32 [P] or [P, C_out]
    domain: Domain


class ExportConv(nn.Module):
    """A binarized convolution for export: ``conv(act(x), W_hat) + bias``, times the layer's
    channel gate ``gate(x)`` when it has one (Real-to-Bin; exported by ``torch.onnx`` as
    ``ReduceMean``, ``MatMul``/``Gemm``, ``Relu``, ``Sigmoid``, ``Mul``, ``Unsqueeze``).

    ``w_hat`` is a buffer holding the quantizer's ``W_hat``; in the packed export its
    initializer (``<layer>.w_hat``) is replaced by the unpacking subgraph.
    """

    def __init__(self, conv: BinarizedConv2d, activation: nn.Module, w_hat: torch.Tensor) -> None:
        super().__init__()
        self.act = activation
        self.register_buffer("w_hat", w_hat)
        if conv.bias is not None:
            self.register_buffer("bias", conv.bias.detach().clone())
        else:
            self.bias = None
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.gate = conv.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(
            self.act(x),
            self.w_hat,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        return y if self.gate is None else y * self.gate(x)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


@torch.no_grad()
def build_export_model(
    model: nn.Module, *, float_weights: bool = False
) -> tuple[nn.Module, list[PackedWeight], dict[str, str]]:
    """An eval-mode float32 CPU copy of ``model`` with every ``BinarizedConv2d`` replaced by an
    :class:`ExportConv`; the packed weights (empty when ``float_weights``); and how each
    layer's activation is exported."""
    export_model = copy.deepcopy(model).cpu().float().eval()
    packed: list[PackedWeight] = []
    activation_kinds: dict[str, str] = {}
    layers = [(n, m) for n, m in export_model.named_modules() if isinstance(m, BinarizedConv2d)]
    if not layers:
        raise BadInputError(
            "the model has no binarized convolutions; export a model converted by `binarize convert`"
        )
    for name, conv in layers:
        weight = conv.weight.detach()
        w_hat = conv.weight_quantizer(weight).detach().to(torch.float32).contiguous()
        if not float_weights:
            planes = conv.weight_quantizer.bit_planes(weight)
            rebuilt = planes.reconstruct().to(torch.float32)
            tol = 1e-5 * float(w_hat.abs().max()) + 1e-12
            if rebuilt.shape != w_hat.shape or float((rebuilt - w_hat).abs().max()) > tol:
                raise OnnxExportError(
                    f"layer {name}: the weight quantizer's bit-planes do not reconstruct its "
                    "output; fix the scheme's bit_planes or export with --target onnx-float"
                )
            scales = planes.scales.detach().to(torch.float32).cpu().numpy()
            packed.append(
                PackedWeight(
                    name=f"{name}.w_hat",
                    packed=pack_planes(planes.planes.detach().cpu().numpy()),
                    shape=tuple(w_hat.shape),
                    scales=np.ascontiguousarray(scales),
                    domain=Domain(planes.domain),
                )
            )
        activation, kind = export_activation(conv.activation_quantizer)
        activation_kinds[name] = kind
        _set_submodule(export_model, name, ExportConv(conv, activation, w_hat))
    return export_model, packed, activation_kinds


# --------------------------------------------------------------------------------------------
# Graph building
# --------------------------------------------------------------------------------------------


def _torch_export(module: nn.Module, dummy: torch.Tensor, opset: int) -> onnx.ModelProto:
    """``torch.onnx.export`` (dynamo) without optimisation, dynamic batch, quietly."""
    batch = torch.export.Dim("batch")
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (dummy,),
                None,
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                optimize=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; report one line
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise OnnxExportError(f"torch.onnx could not export the model: {first[:300]}") from exc
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise OnnxExportError("torch.onnx returned no program")
    return program.model_proto


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def _shared_inits() -> list[TensorProto]:
    """Constants every unpacking subgraph reads (stored once per model)."""
    return [
        _const("binarize.unsqueeze_axes", np.array([2], np.int64)),
        _const("binarize.bit_shifts", byte_shifts()),
        _const("binarize.bit_mask", np.array(1, np.uint8)),
        _const("binarize.plane_axis", np.array([0], np.int64)),
        _const("binarize.two", np.array(2.0, np.float32)),
        _const("binarize.one", np.array(1.0, np.float32)),
        _const("binarize.slice_start", np.array([0], np.int64)),
        _const("binarize.slice_axis", np.array([1], np.int64)),
    ]


class _Unpack:
    """Builds the subgraph that rebuilds one ``W_hat`` from its packed planes: its names
    (``<layer>.w_*`` values, ``binarize_unpack/<layer>/*`` nodes), nodes and initializers."""

    def __init__(self, pw: PackedWeight) -> None:
        self.pw = pw
        self.base = pw.name[: -len(".w_hat")]
        self.nodes: list[onnx.NodeProto] = []
        p, nbytes = pw.packed.shape
        shape = pw.shape
        scales = (
            pw.scales.reshape(p, *([1] * len(shape)))
            if pw.scales.ndim == 1
            else pw.scales.reshape(p, shape[0], *([1] * (len(shape) - 1)))
        )
        self.inits = [
            _const(self.t("w_packed"), pw.packed.astype(np.uint8)),
            _const(self.t("w_scales"), scales.astype(np.float32)),
            _const(self.t("w_bits_shape"), np.array([p, nbytes * 8], np.int64)),
            _const(self.t("w_planes_shape"), np.array([p, *shape], np.int64)),
        ]

    def t(self, s: str) -> str:
        return f"{self.base}.{s}"

    def node(self, op: str, inputs: list[str], output: str, step: str, **attrs: Any) -> str:
        name = f"{UNPACK_PREFIX}{self.base}/{step}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def bits(self) -> str:
        """``uint8 [P, n]``: every plane's bits, in the file's bit order (``(byte >> s) & 1``)."""
        pw, t = self.pw, self.t
        nbytes = pw.packed.shape[1]
        n = math.prod(pw.shape)
        b = self.node(
            "Unsqueeze", [t("w_packed"), "binarize.unsqueeze_axes"], t("w_bytes"), "unsqueeze"
        )
        b = self.node(
            "BitShift", [b, "binarize.bit_shifts"], t("w_shifted"), "shift", direction="RIGHT"
        )
        b = self.node("BitwiseAnd", [b, "binarize.bit_mask"], t("w_bits8"), "and")
        b = self.node("Reshape", [b, t("w_bits_shape")], t("w_bits"), "flatten")
        if n != nbytes * 8:
            self.inits.append(_const(t("w_numel"), np.array([n], np.int64)))
            ins = [b, "binarize.slice_start", t("w_numel"), "binarize.slice_axis"]
            b = self.node("Slice", ins, t("w_bits_n"), "slice")
        return b

    def w_hat(self, bits: str) -> None:
        """``W_hat = sum_i alpha_i read(T_i)`` from the bits, into ``pw.name``."""
        pw, t = self.pw, self.t
        f = self.node("Cast", [bits], t("w_bits_f"), "cast", to=TensorProto.FLOAT)
        planes = self.node("Reshape", [f, t("w_planes_shape")], t("w_planes"), "reshape")
        if pw.domain is Domain.PLUS_MINUS_ONE:
            planes = self.node("Mul", [planes, "binarize.two"], t("w_planes_2"), "double")
            planes = self.node("Sub", [planes, "binarize.one"], t("w_planes_pm"), "to_pm1")
        scaled = self.node("Mul", [planes, t("w_scales")], t("w_scaled"), "scale")
        self.node("ReduceSum", [scaled, "binarize.plane_axis"], pw.name, "sum", keepdims=0)


def _unpack_nodes(pw: PackedWeight) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers that rebuild ``pw.name`` (W_hat) from its packed planes."""
    unpack = _Unpack(pw)
    unpack.w_hat(unpack.bits())
    return unpack.nodes, unpack.inits + _shared_inits()


def _insert_unpacking(model: onnx.ModelProto, packed: list[PackedWeight]) -> None:
    """Replace each W_hat initializer by its packed planes and the unpacking subgraph."""
    graph = model.graph
    by_name = {init.name: i for i, init in enumerate(graph.initializer)}
    missing = [pw.name for pw in packed if pw.name not in by_name]
    if missing:
        raise OnnxExportError(
            f"exported graph lacks the weight initializer {missing[0]}; export with --target onnx-float"
        )
    drop = {by_name[pw.name] for pw in packed}
    kept = [init for i, init in enumerate(graph.initializer) if i not in drop]
    new_nodes: list[onnx.NodeProto] = []
    new_inits: dict[str, TensorProto] = {}
    for pw in packed:
        nodes, inits = _unpack_nodes(pw)
        new_nodes += nodes
        for init in inits:
            new_inits.setdefault(init.name, init)
    del graph.initializer[:]
    graph.initializer.extend(kept + list(new_inits.values()))
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + old_nodes)


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter's own optimiser (constant folding, fusions, clean-up), except that the
    unpacking subgraph is never folded (that would store the float weights)."""
    import onnxscript.optimizer
    from onnxscript import ir

    ir_model = ir.serde.deserialize_model(model)

    def should_fold(node: ir.Node) -> bool | None:
        return False if (node.name or "").startswith(UNPACK_PREFIX) else None

    onnxscript.optimizer.optimize_ir(ir_model, should_fold=should_fold)
    return ir.serde.serialize_model(ir_model)


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and names of Python scopes
    (``metadata_props``, a third of a small model's file) and the intermediate ``value_info``
    (``onnx.shape_inference.infer_shapes`` recreates it)."""
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*graph.input, *graph.output]:
        del value.metadata_props[:]
        value.doc_string = ""
    for init in graph.initializer:
        del init.metadata_props[:]
    del graph.value_info[:]


def _metadata(meta: Mapping[str, Any], float_weights: bool) -> dict[str, str]:
    props = {
        "binarize.format": ONNX_FORMAT,
        "binarize.weights": "float" if float_weights else "packed",
    }
    keys = ("model", "scheme", "M", "N", "num_classes", "input_size", "mean", "std")
    for key in (*keys, "data", "preprocessing"):
        if key in meta and meta[key] is not None and meta[key] != "":
            value = meta[key]
            props[f"binarize.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return props


def _input_size(meta: Mapping[str, Any]) -> tuple[int, int, int]:
    size = meta.get("input_size")
    try:
        c, h, w = (int(v) for v in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise BadInputError(
            f"metadata input_size must be [C, H, W], got {size!r}; rerun `binarize convert`"
        ) from None
    if min(c, h, w) < 1:
        raise BadInputError(f"metadata input_size must be positive, got {size!r}")
    return c, h, w


def build_onnx_model(
    model: nn.Module,
    meta: Mapping[str, Any],
    *,
    float_weights: bool = False,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """The checked ONNX model of ``model`` (see the module docstring); nothing is written."""
    if opset < MIN_OPSET:
        raise BadInputError(
            f"opset {opset} is too old: the exporter emits opset {MIN_OPSET} or later"
        )
    c, h, w = _input_size(meta)
    export_model, packed, _ = build_export_model(model, float_weights=float_weights)
    dummy = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    proto = _torch_export(export_model, dummy, opset)
    if packed:
        _insert_unpacking(proto, packed)
    proto = _optimize(proto)
    _strip_debug_info(proto)
    proto.producer_name = "binarize"
    proto.doc_string = (
        "Binarized CNN exported by binarize; input: normalised images [batch, C, H, W]."
    )
    onnx.helper.set_model_props(proto, _metadata(meta, float_weights))
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise OnnxExportError(
            "the ONNX model exceeds protobuf's 2 GB limit; export a smaller model"
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = (str(exc).strip().splitlines() or ["invalid model"])[0]
        raise OnnxExportError(f"the exported ONNX model fails onnx.checker: {first[:300]}") from exc
    return proto


def export_onnx_model(
    model: nn.Module,
    meta: Mapping[str, Any],
    path: str | Path,
    *,
    float_weights: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (an ``nn.Module`` with ``BinarizedConv2d`` layers in place) to ``path``.

    ``meta`` is the run's ``binarize.json`` content (``input_size`` is required; ``model``,
    ``scheme``, ``M``, ``N``, ``num_classes``, ``mean``, ``std`` go into the metadata). The file
    is written atomically: on any error no file is left behind.
    """
    from binarize_cli.core.files import atomic_write_bytes, check_output_file

    out = Path(path)
    check_output_file(out, "a file name ending in .onnx")
    proto = build_onnx_model(model, meta, float_weights=float_weights, opset=opset)
    atomic_write_bytes(out, proto.SerializeToString())
    return out


def export_onnx(
    run_dir: str | Path | None, output: str | Path | None = None, *, float_weights: bool = False
) -> Path:
    """``binarize export [RUN_DIR] --target onnx|onnx-float [-o FILE]``.

    Default output: ``RUN_DIR/model.onnx`` (packed) or ``RUN_DIR/model-float.onnx``; an
    existing directory as ``output`` receives the file under that default name.
    """
    from binarize_cli.convert.rebuild import load_run

    run = load_run(run_dir)
    default = DEFAULT_FLOAT_FILE if float_weights else DEFAULT_FILE
    out = run.path / default if output is None else Path(output)
    if out.is_dir():
        out = out / default
    return export_onnx_model(run.model, run.meta.to_dict(), out, float_weights=float_weights)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def onnx_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with full graph optimisation (the unpacking folds at load)."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"ONNX file {p} does not exist; run `binarize export --target onnx`")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise BadInputError(f"{p} is not a loadable ONNX model: {first[:300]}") from None


def onnx_logits(
    path: str | Path, images: np.ndarray, *, batch_size: int = 64, session: Any = None
) -> np.ndarray:
    """Run the ONNX model at ``path`` on normalised ``images`` ``[B, C, H, W]`` with
    onnxruntime's CPU provider; returns float32 logits ``[B, classes]``."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise BadInputError(f"images must be [batch, C, H, W], got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
    sess = session if session is not None else onnx_session(path)
    expected = sess.get_inputs()[0].shape
    if any(isinstance(e, int) and e != s for e, s in zip(expected[1:], x.shape[1:], strict=False)):
        raise BadInputError(
            f"images of shape {tuple(x.shape[1:])} do not fit the model's input {tuple(expected[1:])}"
        )
    name = sess.get_inputs()[0].name
    outs = [
        sess.run(None, {name: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)})[0]
        for i in range(0, x.shape[0], batch_size)
    ]
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outs, axis=0).astype(np.float32, copy=False)
