"""Packed export: a safetensors file the torch-free bitwise runtime runs (``docs/format.md``).

:func:`export_packed_model` writes, for a model with :class:`BinarizedConv2d` layers in place:

* per binarized layer: the weight bit planes packed into ``uint8`` (:mod:`binarize_cli.runtime.bits`:
  C-order over ``[O, C/groups, kh, kw]``, LSB-first), the per-plane scales (``alpha``,
  ``[M]`` or ``[M, O]``), the bias, and the activation quantizer as a *step function*:
  ``thresholds`` (float32, ascending), ``codes`` (``uint8 [L, ceil(N/8)]``: which planes
  are 1 in each of the ``L`` pieces, bit ``j`` LSB-first) and the plane scales ``beta``.
  The runtime recomputes the activation planes from these (PA eq. 18: piece indicators of
  ``v``; ABC: ``R + v_n >= 0.5``; sign; DoReFa's rounding), exactly as the PyTorch
  quantizer does for every float32 input;
* full-precision layers as float32 (convolution and linear weights and biases); batch norm
  folded to a per-channel ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean *
  scale`` (2 values per channel: exactly the two affine parameters the memory report counts;
  the running statistics are buffers it does not count);
* metadata (str -> str): format name and version, bit order, scheme, M, N, the source
  model, input size, normalisation, the data spec, ``preprocessing`` (the run's
  :class:`~binarize_cli.core.preprocess.Preprocessing` as JSON, class names included; ``null``
  when the run has none) and ``graph``: the network as a JSON op list (traced with
  ``torch.fx``), so a reader needs neither torch nor timm.

Size: the file holds M bits per binarized weight (each plane padded to a whole byte),
32 bits per real parameter the report counts, and small per-layer extras (the ``L - 1``
thresholds and ``L x ceil(N/8)`` code bytes of each activation), so it stays
within 1% (plus the JSON header) of ``report``'s ``memory_bits / 8``; ``tests/export/test_packed.py``
checks it on ResNet-18, MobileNetV2 and ABC/XNOR/DoReFa models. Single-plane per-channel
weight scales (XNOR-Net, Bi-Real) are folded into the batch norm that follows, as the
report assumes.

How the activation step function is found (:func:`activation_code`): the quantizer's own
``bit_planes`` is evaluated on float32 values and every change of the plane pattern is
located to one ulp by bisection over the ordered float32 line (the quantizers' piece index
grows with ``x``, so each pattern occupies one interval). The result is then checked
against the quantizer on the thresholds, their float neighbours and random points.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from binarize_cli.core.errors import (
    BadInputError,
    BinarizeError,
    DataError,
    FormatError,
    PreprocessingError,
)
from binarize_cli.core.modes import evaluating
from binarize_cli.core.preprocess import Preprocessing
from binarize_cli.core.version import __version__
from binarize_cli.export.steps import (
    LOWEST,
    TooManyPieces,
    check_points,
    find_jumps,
    ordinal_to_float,
)
from binarize_cli.quant.base import ActivationQuantizer, Domain
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.runtime.bits import BIT_ORDER, pack_bits, pack_planes
from binarize_cli.runtime.evaluate import Accuracy
from binarize_cli.runtime.format import FORMAT_NAME, FORMAT_VERSION
from binarize_cli.runtime.model import PackedModel
from binarize_cli.runtime.optable import node_problem
from binarize_cli.runtime.staircase import Staircase

DEFAULT_FILE = "model.packed.safetensors"
#: Most pieces an activation step function may have (DoReFa with 16 bits has 65536).
MAX_PIECES = 1 << 16
INPUT_NAME = "input"


class PackedExportError(BinarizeError):
    """The model cannot be written in the packed format (exit code 1)."""


# --------------------------------------------------------------------------------------
# Activation quantizers as step functions
# --------------------------------------------------------------------------------------


def _planes_at(q: ActivationQuantizer, xs: np.ndarray) -> tuple[np.ndarray, torch.Tensor, Domain]:
    x = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32)).reshape(1, 1, 1, -1)
    with torch.no_grad():
        bp = q.bit_planes(x)
    planes = bp.planes.detach().reshape(bp.planes.shape[0], -1).cpu().numpy().astype(bool)
    if planes.shape[1] != xs.size:
        raise PackedExportError("activation bit planes do not have the input's shape")
    return planes.T, bp.scales.detach().cpu(), bp.domain


def _keys(planes: np.ndarray) -> np.ndarray:
    """One hashable row per point: the plane pattern as bytes."""
    return pack_bits(planes, axis=1)


def activation_code(
    q: ActivationQuantizer, *, name: str = "", max_pieces: int = MAX_PIECES
) -> Staircase:
    """The step function of an element-wise activation quantizer, read off ``bit_planes``:
    its thresholds and bit-plane code (no ``levels``: the runtime recomputes the value).

    Bisection over the float32 line: an interval whose ends have different plane patterns is
    halved until it is one ulp wide; its right end is the first float of a new piece.
    Raises :class:`PackedExportError` if the quantizer is not such a function (data-dependent
    scales, more than ``max_pieces`` pieces, or a mismatch in the final check).
    """
    what = f"activation quantizer of {name or 'a layer'}"
    q = q.eval()
    _, scales, domain = _planes_at(q, ordinal_to_float(np.array([LOWEST])))

    def keys_at(xs: np.ndarray) -> list[bytes]:
        planes, other_scales, _ = _planes_at(q, xs)
        if not torch.equal(other_scales.to(scales.dtype), scales):
            raise PackedExportError(
                f"{what} has input-dependent scales; the packed runtime cannot run it"
            )
        return [k.tobytes() for k in _keys(planes)]

    try:
        jumps, _ = find_jumps(keys_at, max_pieces=max_pieces)
    except TooManyPieces:
        raise PackedExportError(f"{what} has more than {max_pieces} pieces") from None
    thresholds = ordinal_to_float(np.array(jumps, dtype=np.int64)).astype(np.float32)
    probe = np.concatenate([ordinal_to_float(np.array([LOWEST])), thresholds])
    codes, _, _ = _planes_at(q, probe)
    scales_np = scales.to(torch.float32).numpy().reshape(-1)
    if codes.shape[1] != scales_np.size:
        raise PackedExportError(f"{what}: {codes.shape[1]} planes but {scales_np.size} scales")
    step = Staircase(
        thresholds=thresholds,
        codes=codes.astype(np.uint8),
        scales=scales_np,
        domain=Domain(domain).value,
    )
    _check_step(q, step, what)
    return step


def _check_step(q: ActivationQuantizer, step: Staircase, what: str) -> None:
    xs = check_points(step.thresholds)
    planes, _, _ = _planes_at(q, xs)
    if not np.array_equal(planes.T, step.planes(xs)):
        raise PackedExportError(
            f"{what} is not an element-wise step function; the packed runtime cannot run it"
        )


# --------------------------------------------------------------------------------------
# Graph serialisation
# --------------------------------------------------------------------------------------


def _ints(v: Any) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    return [int(x) for x in v]


def _same_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    return type(module).forward is base.forward


def _conv_padding(conv: nn.Conv2d, name: str) -> list[int]:
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return [0, 0]
        # 'same' (stride 1): symmetric only for odd effective kernels.
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise BadInputError(
                    f"layer {name}: padding='same' with an even kernel is not supported by the packed format"
                )
            out.append(total // 2)
        return out
    return _ints(pad)


class _Writer:
    """Turns a traced graph into the JSON node list and the tensor dict."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.nodes: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.value: dict[str, str] = {}  # fx node name -> value name in the packed graph
        self.names: set[str] = {INPUT_NAME}

    # -- helpers ---------------------------------------------------------------------
    def _tensor(self, name: str, array: np.ndarray | torch.Tensor) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array)
        if name in self.tensors:
            # A module called twice (e.g. a shared layer) stores its tensors once.
            if not np.array_equal(self.tensors[name], array):
                raise PackedExportError(f"tensor name {name!r} used for two different tensors")
            return name
        self.tensors[name] = array
        return name

    def _f32(self, name: str, t: torch.Tensor | np.ndarray) -> str:
        arr = (
            t.detach().cpu().to(torch.float32).numpy()
            if isinstance(t, torch.Tensor)
            else np.asarray(t, np.float32)
        )
        return self._tensor(name, arr)

    def _new_name(self, base: str) -> str:
        name = base
        k = 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def _emit(
        self,
        fx_name: str,
        op: str,
        inputs: list[str],
        attrs: dict[str, Any] | None = None,
        tensors: dict[str, str] | None = None,
    ) -> str:
        name = self._new_name(fx_name)
        node: dict[str, Any] = {"name": name, "op": op, "inputs": inputs, "attrs": attrs or {}}
        if tensors:
            node["tensors"] = tensors
        problem = node_problem(node)  # the writer emits only what the op table allows
        if problem:
            raise PackedExportError(f"the packed writer made an invalid node: {problem}")
        self.nodes.append(node)
        return name

    def _in(self, arg: Any, where: str) -> str:
        if not isinstance(arg, fx.Node):
            raise BadInputError(f"{where}: expected a tensor input, got {type(arg).__name__}")
        return self.value[arg.name]

    # -- modules ---------------------------------------------------------------------
    def module(self, node: fx.Node) -> str:
        target = str(node.target)
        m = self.modules[target]
        x = self._in(node.args[0], target) if node.args else None
        if len(node.args) != 1 or node.kwargs:
            raise BadInputError(
                f"module {target} ({type(m).__name__}) is called with {len(node.args)} inputs; the packed format supports single-input modules"
            )
        assert x is not None
        base = node.name
        if isinstance(m, BinarizedConv2d):
            return self._bconv(base, target, m, x)
        if isinstance(m, nn.Conv2d):
            if not _same_forward(m, nn.Conv2d) or m.padding_mode != "zeros":
                raise BadInputError(
                    f"layer {target} ({type(m).__name__}) computes something other than nn.Conv2d; the packed format cannot store it"
                )
            t = {"weight": self._f32(f"{target}.weight", m.weight)}
            if m.bias is not None:
                t["bias"] = self._f32(f"{target}.bias", m.bias)
            attrs = {
                "stride": _ints(m.stride),
                "padding": _conv_padding(m, target),
                "dilation": _ints(m.dilation),
                "groups": m.groups,
            }
            return self._emit(base, "conv2d", [x], attrs, t)
        if isinstance(m, nn.Linear):
            if not _same_forward(m, nn.Linear):
                raise BadInputError(f"layer {target} ({type(m).__name__}) is not a plain nn.Linear")
            t = {"weight": self._f32(f"{target}.weight", m.weight)}
            if m.bias is not None:
                t["bias"] = self._f32(f"{target}.bias", m.bias)
            return self._emit(base, "linear", [x], {}, t)
        if isinstance(m, nn.BatchNorm2d):
            y = self._batchnorm(base, target, m, x)
            act, drop = getattr(m, "act", None), getattr(m, "drop", None)
            if act is not None or drop is not None:  # timm BatchNormAct2d: bn -> drop -> act
                if drop is not None and not isinstance(drop, (nn.Identity, nn.Dropout)):
                    raise BadInputError(
                        f"module {target}.drop ({type(drop).__name__}) is not supported by the packed format"
                    )
                if act is not None:
                    y = self._simple(f"{base}_act", f"{target}.act", act, y)
            return y
        return self._simple(base, target, m, x)

    def _simple(self, base: str, target: str, m: nn.Module, x: str) -> str:
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
            return x
        if isinstance(m, nn.ReLU):
            return self._emit(base, "relu", [x])
        if isinstance(m, nn.Hardtanh):  # includes ReLU6
            return self._emit(base, "clip", [x], {"min": float(m.min_val), "max": float(m.max_val)})
        if isinstance(m, nn.LeakyReLU):
            return self._emit(base, "leaky_relu", [x], {"negative_slope": float(m.negative_slope)})
        simple = {
            nn.Sigmoid: "sigmoid",
            nn.Tanh: "tanh",
            nn.SiLU: "silu",
            nn.Hardswish: "hardswish",
            nn.Hardsigmoid: "hardsigmoid",
        }
        for cls, op in simple.items():
            if isinstance(m, cls):
                return self._emit(base, op, [x])
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise BadInputError(
                    f"module {target}: MaxPool2d(return_indices=True) is not supported"
                )
            attrs = {
                "kernel_size": _ints(m.kernel_size),
                "stride": _ints(m.stride or m.kernel_size),
                "padding": _ints(m.padding),
                "dilation": _ints(m.dilation),
                "ceil_mode": bool(m.ceil_mode),
            }
            return self._emit(base, "maxpool2d", [x], attrs)
        if isinstance(m, nn.AvgPool2d):
            attrs = {
                "kernel_size": _ints(m.kernel_size),
                "stride": _ints(m.stride or m.kernel_size),
                "padding": _ints(m.padding),
                "ceil_mode": bool(m.ceil_mode),
                "count_include_pad": bool(m.count_include_pad),
                "divisor_override": m.divisor_override,
            }
            return self._emit(base, "avgpool2d", [x], attrs)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            op = (
                "adaptive_avgpool2d"
                if isinstance(m, nn.AdaptiveAvgPool2d)
                else "adaptive_maxpool2d"
            )
            if getattr(m, "return_indices", False):
                raise BadInputError(f"module {target}: return_indices is not supported")
            return self._emit(base, op, [x], {"output_size": _size2(m.output_size)})
        if isinstance(m, nn.Flatten):
            return self._emit(
                base, "flatten", [x], {"start_dim": int(m.start_dim), "end_dim": int(m.end_dim)}
            )
        raise BadInputError(
            f"module {target} ({type(m).__name__}) is not supported by the packed format; keep it out of the model or open an issue"
        )

    def _batchnorm(self, base: str, target: str, m: nn.BatchNorm2d, x: str) -> str:
        if m.running_mean is None or m.running_var is None:
            raise BadInputError(
                f"batch norm {target} has no running statistics (track_running_stats=False); the packed format needs eval-mode statistics"
            )
        var = m.running_var.detach().double()
        mean = m.running_mean.detach().double()
        gamma = m.weight.detach().double() if m.weight is not None else torch.ones_like(var)
        beta = m.bias.detach().double() if m.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + m.eps)
        shift = beta - mean * scale
        t = {
            "scale": self._f32(f"{target}.scale", scale),
            "shift": self._f32(f"{target}.shift", shift),
        }
        return self._emit(base, "batchnorm", [x], {}, t)

    def _bconv(self, base: str, target: str, m: BinarizedConv2d, x: str) -> str:
        if m.padding_mode != "zeros":
            raise BadInputError(f"layer {target}: padding_mode={m.padding_mode!r} is not supported")
        weight = m.weight.detach()
        with torch.no_grad():
            # The scheme contract guarantees bit_planes(W).reconstruct() == forward(W).
            bp = m.weight_quantizer.bit_planes(weight)
        planes = bp.planes.detach().cpu().numpy().astype(bool)
        if tuple(planes.shape[1:]) != tuple(weight.shape):
            raise PackedExportError(
                f"layer {target}: weight planes of shape {tuple(planes.shape)} do not match the weight {tuple(weight.shape)}"
            )
        scales = bp.scales.detach().cpu().to(torch.float32)
        o = weight.shape[0]
        if scales.dim() == 2 and scales.shape[1] != o:
            raise PackedExportError(
                f"layer {target}: per-channel scales of shape {tuple(scales.shape)} for {o} output channels"
            )
        t = {
            "weight_planes": self._tensor(f"{target}.weight_planes", pack_planes(planes)),
            "weight_scales": self._f32(f"{target}.weight_scales", scales),
        }
        if m.bias is not None:
            t["bias"] = self._f32(f"{target}.bias", m.bias)
        attrs: dict[str, Any] = {
            "stride": _ints(m.stride),
            "padding": _conv_padding(m, target),
            "dilation": _ints(m.dilation),
            "groups": int(m.groups),
            "in_channels": int(m.in_channels),
            "out_channels": int(m.out_channels),
            "kernel_size": _ints(m.kernel_size),
            "weight_bases": int(planes.shape[0]),
            "weight_domain": Domain(bp.domain).value,
            "activation_bases": int(m.activation_bases),
            "scheme": str(m.scheme_name),
        }
        if m.activation_bases > 0:
            step = activation_code(m.activation_quantizer, name=target)
            t["act_thresholds"] = self._tensor(f"{target}.act_thresholds", step.thresholds)
            # One row per piece, the N plane bits packed LSB-first: uint8 [L, ceil(N/8)].
            codes = pack_bits(step.codes, axis=1)  # type: ignore[arg-type]
            t["act_codes"] = self._tensor(f"{target}.act_codes", codes)
            t["act_scales"] = self._tensor(f"{target}.act_scales", step.scales)  # type: ignore[arg-type]
            attrs["activation_domain"] = step.domain
            attrs["activation_pieces"] = step.num_pieces
        return self._emit(base, "bconv2d", [x], attrs, t)

    # -- functions and methods -------------------------------------------------------
    def function(self, node: fx.Node) -> str:
        f = node.target
        args, kwargs = list(node.args), dict(node.kwargs)
        fname = getattr(f, "__name__", str(f))
        where = f"function {fname} ({node.name})"
        if f in (operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul):
            op = "add" if f in (operator.add, operator.iadd, torch.add) else "mul"
            if kwargs.get("alpha", 1) != 1:
                raise BadInputError(f"{where}: add with alpha is not supported")
            return self._binary(node.name, op, args[0], args[1], where)
        if f is torch.cat:
            seq = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return self._emit(
                node.name, "cat", [self._in(a, where) for a in seq], {"dim": int(dim)}
            )
        if f is torch.flatten:
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self._emit(
                node.name,
                "flatten",
                [self._in(args[0], where)],
                {"start_dim": int(start), "end_dim": int(end)},
            )
        x = self._in(args[0], where) if args else None
        if f in (F.dropout, F.dropout2d, F.alpha_dropout):
            assert x is not None
            return x
        if f in (F.relu, torch.relu):
            return self._emit(node.name, "relu", [x])  # type: ignore[list-item]
        if f is F.relu6:
            return self._emit(node.name, "clip", [x], {"min": 0.0, "max": 6.0})  # type: ignore[list-item]
        if f is F.hardtanh:
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            return self._emit(node.name, "clip", [x], {"min": float(lo), "max": float(hi)})  # type: ignore[list-item]
        simple = {
            torch.sigmoid: "sigmoid",
            F.sigmoid: "sigmoid",
            torch.tanh: "tanh",
            F.silu: "silu",
            F.hardswish: "hardswish",
            F.hardsigmoid: "hardsigmoid",
        }
        if f in simple:
            return self._emit(node.name, simple[f], [x])  # type: ignore[list-item,index]
        if f in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            op = "adaptive_avgpool2d" if f is F.adaptive_avg_pool2d else "adaptive_maxpool2d"
            return self._emit(node.name, op, [x], {"output_size": _size2(size)})  # type: ignore[list-item]
        if f is torch.mean:
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            return self._mean(node.name, x, dims, keep, where)  # type: ignore[arg-type]
        raise BadInputError(f"{where} is not supported by the packed format")

    def method(self, node: fx.Node) -> str:
        name = str(node.target)
        args, kwargs = list(node.args), dict(node.kwargs)
        where = f"method Tensor.{name} ({node.name})"
        x = self._in(args[0], where)
        if name in ("contiguous",):
            return x
        if name in ("relu", "relu_"):
            return self._emit(node.name, "relu", [x])
        if name in ("sigmoid", "tanh"):
            return self._emit(node.name, name, [x])
        if name in ("add", "add_", "mul", "mul_"):
            if kwargs.get("alpha", 1) != 1:
                raise BadInputError(f"{where}: add with alpha is not supported")
            return self._binary(node.name, name.rstrip("_"), args[0], args[1], where)
        if name == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self._emit(
                node.name, "flatten", [x], {"start_dim": int(start), "end_dim": int(end)}
            )
        if name == "mean":
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            return self._mean(node.name, x, dims, keep, where)
        raise BadInputError(f"{where} is not supported by the packed format")

    def _mean(self, name: str, x: str, dims: Any, keep: Any, where: str) -> str:
        if dims is None:
            raise BadInputError(f"{where}: mean over all dimensions is not supported")
        dl = [int(dims)] if isinstance(dims, int) else [int(d) for d in dims]
        return self._emit(name, "mean", [x], {"dims": dl, "keepdim": bool(keep)})

    def _binary(self, name: str, op: str, a: Any, b: Any, where: str) -> str:
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return self._emit(name, op, [self._in(a, where), self._in(b, where)])
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            return self._emit(name, op, [self._in(a, where)], {"scalar": float(b)})
        if isinstance(b, fx.Node) and isinstance(a, (int, float)):
            return self._emit(name, op, [self._in(b, where)], {"scalar": float(a)})
        raise BadInputError(
            f"{where}: operands {type(a).__name__}, {type(b).__name__} are not supported"
        )

    def get_attr(self, node: fx.Node) -> str:
        obj: Any = self.model
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor) or not obj.is_floating_point():
            raise BadInputError(
                f"attribute {node.target} is not a float tensor; the packed format cannot store it"
            )
        t = {"value": self._f32(f"const.{node.target}", obj)}
        return self._emit(node.name, "constant", [], {}, t)

    # -- driver ----------------------------------------------------------------------
    def run(self, gm: fx.GraphModule) -> dict[str, Any]:
        outputs: list[str] = []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise BadInputError(
                f"the model takes {len(placeholders)} inputs; the packed format supports one image input"
            )
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                self.value[node.name] = INPUT_NAME
            elif node.op == "call_module":
                self.value[node.name] = self.module(node)
            elif node.op == "call_function":
                self.value[node.name] = self.function(node)
            elif node.op == "call_method":
                self.value[node.name] = self.method(node)
            elif node.op == "get_attr":
                self.value[node.name] = self.get_attr(node)
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    raise BadInputError(
                        "the model returns several values; the packed format supports one logits tensor"
                    )
                outputs.append(self.value[out.name])
        if not outputs:
            raise BadInputError("the traced model has no output")
        if outputs[0] == INPUT_NAME:
            raise BadInputError("the model returns its input unchanged")
        nodes = self._prune(outputs)
        self._fold_channel_scales(nodes, outputs)
        return {"inputs": [INPUT_NAME], "outputs": outputs, "nodes": nodes}

    def _fold_channel_scales(self, nodes: list[dict[str, Any]], outputs: list[str]) -> None:
        """Fold single-plane per-output-channel weight scales (XNOR-Net, Bi-Real: ``[1, O]``)
        into the batch norm that alone consumes the convolution: ``bn(alpha_o y) = (scale_o
        alpha_o) y + shift_o``. The weight scales become ``[1.0]``. This is the fold the memory
        report assumes when it does not count those scales (profile.py)."""
        users: dict[str, list[dict[str, Any]]] = {}
        tensor_uses: dict[str, int] = {}
        for n in nodes:
            for i in n["inputs"]:
                users.setdefault(i, []).append(n)
            for t in n.get("tensors", {}).values():
                tensor_uses[t] = tensor_uses.get(t, 0) + 1
        for n in nodes:
            t = n.get("tensors", {})
            if n["op"] != "bconv2d" or n["attrs"]["weight_bases"] != 1 or "bias" in t:
                continue
            scales = self.tensors[t["weight_scales"]]
            consumers = users.get(n["name"], [])
            if scales.ndim != 2 or n["name"] in outputs or len(consumers) != 1:
                continue
            bn = consumers[0]
            if (
                bn["op"] != "batchnorm"
                or tensor_uses[t["weight_scales"]] != 1
                or tensor_uses[bn["tensors"]["scale"]] != 1
            ):
                continue
            alpha = scales[0].astype(np.float64)
            bn_scale = self.tensors[bn["tensors"]["scale"]].astype(np.float64)
            self.tensors[bn["tensors"]["scale"]] = (bn_scale * alpha).astype(np.float32)
            self.tensors[t["weight_scales"]] = np.ones(1, dtype=np.float32)
            n["attrs"]["scales_folded_into"] = bn["name"]

    def _prune(self, outputs: list[str]) -> list[dict[str, Any]]:
        """Drop nodes the output does not depend on (and their tensors)."""
        needed = set(outputs)
        keep: list[dict[str, Any]] = []
        for node in reversed(self.nodes):
            if node["name"] in needed:
                keep.append(node)
                needed.update(node["inputs"])
            else:
                for t in node.get("tensors", {}).values():
                    self.tensors.pop(t, None)
        return list(reversed(keep))


def _size2(size: Any) -> list[int | None]:
    if size is None or isinstance(size, int):
        return [size, size]
    return [None if s is None else int(s) for s in size]


def trace_for_export(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace with the packed writer's leaves (binarized convs, timm's notrace
    modules such as ``BatchNormAct2d``, every ``torch.nn`` module)."""
    from binarize_cli.convert.graph import LayerTracer

    tracer = LayerTracer((BinarizedConv2d,))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(
            f"the model does not trace with torch.fx ({first[:160]}); the packed format needs a traceable model"
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def build_packed(
    model: nn.Module, meta: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of the packed file for ``model`` (eval mode is used)."""
    with evaluating(model):
        gm = trace_for_export(model)
        writer = _Writer(model)
        graph = writer.run(gm)
    input_size = meta.get("input_size")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "bit_order": BIT_ORDER,
        "producer": f"binarize {__version__}",
        "scheme": str(meta.get("scheme", "")),
        "M": str(int(meta.get("M", 0))),
        "N": str(int(meta.get("N", 0))),
        "source_model": str(meta.get("model", "")),
        "num_classes": str(int(meta.get("num_classes", 0))),
        "input_size": _json(list(input_size) if input_size is not None else None),
        "mean": _json(meta.get("mean")),
        "std": _json(meta.get("std")),
        "data": str(meta.get("data", "")),
        "preprocessing": _json(meta.get("preprocessing")),
        "graph": _json(graph),
    }
    return writer.tensors, metadata


def export_packed_model(model: nn.Module, meta: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``model`` (``BinarizedConv2d`` layers in place) as a packed safetensors file.

    ``meta`` is the run's ``binarize.json`` content (``scheme``, ``M``, ``N``, ``model``,
    ``num_classes``, ``input_size``, ``mean``, ``std``, ``data``, ``preprocessing``). Written atomically (a temporary file
    in the same directory, then ``os.replace``): on any error nothing is left behind.
    """
    from safetensors.numpy import save

    from binarize_cli.core.files import atomic_write_bytes, check_output_file

    out = Path(path)
    check_output_file(out, f"a file name (e.g. {DEFAULT_FILE})")
    tensors, metadata = build_packed(model, meta)
    atomic_write_bytes(out, save(tensors, metadata=metadata))
    return out


def export_packed(run_dir: str | Path | None, output: str | Path | None = None) -> Path:
    """``binarize export [RUN_DIR] --target packed [-o FILE]``; default ``RUN_DIR/model.packed.safetensors``
    (an existing directory as ``output`` receives that file name)."""
    from binarize_cli.convert.rebuild import load_run

    run = load_run(run_dir)
    out = run.path / DEFAULT_FILE if output is None else Path(output)
    if out.is_dir():
        out = out / DEFAULT_FILE
    return export_packed_model(run.model, run.meta.to_dict(), out)


@dataclass
class RunResult:
    """What ``binarize run`` measured on a packed file. :meth:`to_dict` is its ``--json``
    output, in this order:

    * ``file``: the packed file;
    * ``data``: the canonical data spec evaluated on; ``data_from``: where that spec came from,
      ``"file"`` (the file's recorded data), ``"--data"`` (the option) or ``"default"``
      (``digits``: a file that records no data);
    * ``preprocessing``: the :class:`~binarize_cli.core.preprocess.Preprocessing` the images
      were made with, as JSON (docs/format.md, "Preprocessing"): the file's record applied to
      the data (its model side: channels, resize, interpolation, crop, crop_pct, mean, std;
      the data's side: decoding, pixel scale, resampler, classes); for a file without a record,
      what the data set made at the file's input size, mean and std;
    * ``recorded_preprocessing``: whether the file records its preprocessing (false: files
      exported before it was recorded; ``notes`` then says what was assumed);
    * the accuracy over the first ``samples`` validation images, in the data's order:
      ``top1``, ``top5`` (percent), ``samples``, ``seconds`` (runtime time), ``images_per_s``;
    * ``backend`` (the bitwise kernel) and ``precision`` (``float32``);
    * ``logits_file``: where ``--save-logits`` wrote the logits (float32 ``[samples,
      classes]``, in the validation order), or null;
    * ``notes``: one-line remarks (a list, usually empty).
    """

    file: str
    data: str
    data_from: str
    preprocessing: Preprocessing
    recorded_preprocessing: bool
    accuracy: Accuracy
    backend: str
    precision: str
    logits_file: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        head = {
            "file": self.file,
            "data": self.data,
            "data_from": self.data_from,
            "preprocessing": self.preprocessing.to_dict(),
            "recorded_preprocessing": self.recorded_preprocessing,
        }
        tail = {
            "backend": self.backend,
            "precision": self.precision,
            "logits_file": self.logits_file,
            "notes": list(self.notes),
        }
        return {**head, **self.accuracy.to_dict(), **tail}

    def input_line(self) -> str:
        """One line: the data evaluated on and how its images were made."""
        origin = {"file": "recorded in the file", "--data": "--data", "default": "default"}
        return (
            f"data {self.data} ({origin.get(self.data_from, self.data_from)}): "
            f"{self.preprocessing.describe()}"
        )


#: The note for a file without a preprocessing record (version-1 files).
NO_RECORD_NOTE = (
    "{file} records no preprocessing (exported before binarize recorded it): the images are "
    "made the data set's default way at the file's input size, mean and std; re-export the "
    "run to record it"
)


def _run_data(model: PackedModel, data: str | None) -> tuple[str, str]:
    """The data spec ``run`` evaluates on and where it came from (see :class:`RunResult`);
    a recorded spec whose path is gone is a one-line DataError naming ``--data``."""
    if data:
        return data, "--data"
    recorded = str(model.metadata.get("data", "") or "")
    if not recorded:
        return "digits", "default"
    name, _, path = recorded.partition(":")
    if path and not Path(path).exists():
        raise DataError(
            f"{model.path} was converted on {recorded}, but {path} no longer exists; "
            f"pass --data {name}:PATH to evaluate it on that data where it is now"
        )
    return recorded, "file"


def _file_record(model: PackedModel) -> Preprocessing | None:
    """The file's preprocessing record (None when it has none); a malformed one is a
    one-line FormatError."""
    raw = model.preprocessing
    if raw is None:
        return None
    try:
        return Preprocessing.from_dict(raw)
    except PreprocessingError as exc:
        raise FormatError(f"{model.path}: {exc}; re-export it") from None


def save_logits(path: str | Path, logits: np.ndarray) -> Path:
    """Write ``logits`` as float32 ``.npy`` to ``path``, atomically (an existing file is
    replaced only once the new one is whole, as ``export -o`` does)."""
    import io

    from binarize_cli.core.files import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(logits, dtype=np.float32))
    atomic_write_bytes(path, buf.getvalue(), flag="--save-logits")
    return Path(path)


def evaluate_packed_file(
    path: str | Path,
    data: str | None = None,
    *,
    batch_size: int = 64,
    samples: int | None = None,
    backend: str | None = None,
    logits_file: str | Path | None = None,
) -> RunResult:
    """``binarize run FILE [--data SPEC]``: top-1/top-5 of a packed file, computed by the
    runtime (the images are handed to it as NumPy arrays: the model runs without torch).

    ``data`` None evaluates on the data the file records (``digits`` when it records none).
    The images are made with the file's preprocessing record applied to that data (so the
    file's own data gives exactly the images ``convert`` evaluated); a file without one (older
    files) is evaluated as before, at its input size, mean and std, with a note.
    ``logits_file``: also write the logits there (:func:`save_logits`; the location is
    checked before evaluating). See :class:`RunResult` for what is returned.
    """
    from binarize_cli.core.files import check_writable_file
    from binarize_cli.load.data import load_data, make_loader
    from binarize_cli.runtime import evaluate_packed, load_packed

    if batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1 (got {batch_size})")
    if samples is not None and samples < 1:
        raise BadInputError(f"--samples must be >= 1 (got {samples})")
    if logits_file is not None:
        check_writable_file(logits_file, "--save-logits")
    model = load_packed(path, backend=None if backend in (None, "auto") else backend)
    spec, data_from = _run_data(model, data)
    record = _file_record(model)
    kwargs: dict[str, Any] = {}
    notes: list[str] = []
    if record is not None:
        kwargs["preprocessing"] = record
    else:
        notes.append(NO_RECORD_NOTE.format(file=path))
        if model.input_size:
            kwargs["input_size"] = tuple(model.input_size)
        if model.mean is not None and model.std is not None:
            kwargs["mean"], kwargs["std"] = tuple(model.mean), tuple(model.std)
    bundle = load_data(spec, **kwargs)
    if model.num_classes and bundle.num_classes > model.num_classes:
        raise BadInputError(
            f"{spec} has {bundle.num_classes} classes but the packed model predicts {model.num_classes}; "
            "evaluate it on the data it was converted with"
        )
    loader = make_loader(bundle.val, batch_size=batch_size, shuffle=False, seed=0)
    batches = ((x.numpy(), y.numpy()) for x, y in loader)
    kept: list[np.ndarray] | None = [] if logits_file is not None else None
    acc = evaluate_packed(model, batches, max_samples=samples, logits=kept)
    written = None
    if kept is not None and logits_file is not None:
        classes = int(model.num_classes or 0)
        stacked = np.concatenate(kept) if kept else np.zeros((0, classes), np.float32)
        written = str(save_logits(logits_file, stacked))
    be = model.backend
    return RunResult(
        file=str(path),
        data=bundle.spec,
        data_from=data_from,
        preprocessing=bundle.preprocessing,
        recorded_preprocessing=record is not None,
        accuracy=acc,
        backend=be.name if be.name == "numpy" else f"{be.name} ({be.simd})",
        precision=model.precision,
        logits_file=written,
        notes=notes,
    )


def header_bytes(path: str | Path) -> int:
    """Size of a safetensors file's header (8-byte length + JSON): the non-payload bytes."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
    return 8 + n


def payload_bits(path: str | Path) -> int:
    """Bits of tensor data in a safetensors file (its size minus the header)."""
    return 8 * (Path(path).stat().st_size - header_bytes(path))


__all__ = [
    "DEFAULT_FILE",
    "PackedExportError",
    "RunResult",
    "activation_code",
    "build_packed",
    "evaluate_packed_file",
    "export_packed",
    "export_packed_model",
    "header_bytes",
    "save_logits",
    "payload_bits",
    "trace_for_export",
]
