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
  ``torch.fx``), so a reader needs neither torch nor timm. Shapes are static: the traced
  model is run at batch 2 and 3 (:mod:`binarize_cli.export.record`), sizes that fx recorded
  as ``x.size()`` arithmetic become constants, and the batch stays dimension 0
  (``docs/format.md``, "Static shapes"). Anything the op table cannot express is refused
  with one line naming the op, the layer and the model.

Size: the file holds M bits per binarized weight (each plane padded to a whole byte),
32 bits per real parameter the report counts, and small per-layer extras (the ``L - 1``
thresholds and ``L x ceil(N/8)`` code bytes of each activation), so it stays
within 1% (plus the JSON header) of ``report``'s ``memory_bits / 8``; ``tests/export/test_packed.py``
checks it on ResNet-18, MobileNetV2 and ABC/XNOR/DoReFa models. Single-plane per-channel
weight scales (XNOR-Net, Bi-Real) are folded into the batch norm that follows, as the
report assumes.

A gated binarized convolution (Real-to-Bin's channel gate,
:class:`~binarize_cli.quant.realtobin.ChannelGate`) is written as its ``bconv2d`` node followed
by the gate on the same input, in table ops: ``mean`` over the positions, ``linear``
(``W_1``), ``relu``, ``linear`` (``W_2``), ``sigmoid``, ``mul`` by the gain 2, ``reshape`` to
``[C_out, 1, 1]`` and the ``mul`` of the convolution by it (the gate's tensors are
``<layer>.gate.reduce_weight`` and ``<layer>.gate.expand_weight``, float32). The per-channel
weight scales still fold into the batch norm after that product: the gate's factor is
per-channel too, so ``bn(alpha_o y G_o) = (scale_o alpha_o) (y G_o) + shift_o``.

How the activation step function is found (:func:`activation_code`): the quantizer's own
``bit_planes`` is evaluated on float32 values and every change of the plane pattern is
located to one ulp by bisection over the ordered float32 line (the quantizers' piece index
grows with ``x``, so each pattern occupies one interval). The result is then checked
against the quantizer on the thresholds, their float neighbours and random points.
"""

from __future__ import annotations

import json
import math
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
from binarize_cli.export.record import BATCHES, Recording, TensorInfo, record_graph
from binarize_cli.export.steps import (
    LOWEST,
    TooManyPieces,
    check_points,
    find_jumps,
    ordinal_to_float,
)
from binarize_cli.quant.base import ActivationQuantizer, Domain
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.realtobin import GATE_GAIN, ChannelGate
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


#: A value of the packed graph: one value name, or the parts of a split (``chunk``/``split``).
_Value = str | list[str]

_DROPOUT_FUNCTIONS = (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout, torch.dropout,
)  # fmt: skip
_BINARY_FUNCTIONS = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
    torch.true_divide: "div", torch.divide: "div",
}  # fmt: skip
_BINARY_METHODS = {
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "subtract": "sub",
    "mul": "mul", "mul_": "mul", "multiply": "mul", "div": "div", "div_": "div",
    "true_divide": "div", "divide": "div",
}  # fmt: skip
_UNARY_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
    F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
}  # fmt: skip
_UNARY_METHODS = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "tanh_": "tanh",
}  # fmt: skip
_UNARY_MODULES = {
    nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SiLU: "silu",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
}  # fmt: skip
#: Methods that only change the view of a tensor: a ``reshape`` to the recorded shape.
_RESHAPE_METHODS = {"view", "reshape", "view_as", "reshape_as", "squeeze", "unsqueeze", "unflatten"}
_RESHAPE_FUNCTIONS = (torch.reshape, torch.squeeze, torch.unsqueeze)
#: Methods that return their input's values (checked: same shape, float32).
_SAME_METHODS = {"contiguous", "clone", "detach", "float", "to", "type_as"}


def _layer(node: fx.Node) -> str:
    """The module path a node belongs to (fx records the stack of modules it traced)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else "the model's own forward"


def _describe(node: fx.Node) -> str:
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', str(node.target))}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"{node.op} {node.target}"


def _kind(value: Any) -> str:
    return type(value).__name__


def _bind(
    args: list[Any], kwargs: dict[str, Any], names: tuple[str, ...], **defaults: Any
) -> dict[str, Any]:
    """The arguments after the input by name: ``args[1:]`` in ``names`` order, then
    ``kwargs``, over ``defaults``."""
    bound = dict(defaults)
    bound.update(zip(names, args[1:], strict=False))
    bound.update(kwargs)
    return bound


def _floats2(v: Any) -> list[float]:
    if isinstance(v, (int, float)):
        return [float(v), float(v)]
    return [float(x) for x in v]


def _tf_same_pads(m: nn.Conv2d, in_shape: tuple[int, ...]) -> list[int]:
    """TensorFlow's "same" padding for input ``in_shape`` (``F.pad`` order: left, right,
    top, bottom): total ``max((ceil(i / s) - 1) s + (k - 1) d + 1 - i, 0)``, the odd one after."""
    totals = [
        max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        for i, k, s, d in zip(in_shape[2:], m.kernel_size, m.stride, m.dilation, strict=True)
    ]
    (th, tw) = totals
    return [tw // 2, tw - tw // 2, th // 2, th - th // 2]


def _conv_pads(m: nn.Conv2d, in_shape: tuple[int, ...]) -> list[int] | None:
    """The explicit padding before ``m``'s zero-padded convolution: none (``[0, 0, 0, 0]``)
    for ``nn.Conv2d`` itself, or, for a subclass, whichever of none and TensorFlow's "same"
    padding its forward computes (checked on a random input of ``in_shape``); ``None`` when
    it computes neither."""
    if m.padding_mode != "zeros":
        return None
    if _same_forward(m, nn.Conv2d):
        return [0, 0, 0, 0]
    x = torch.randn(in_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = m(x)
        for pads in ([0, 0, 0, 0], _tf_same_pads(m, in_shape)):
            try:  # unpadded, a kernel larger than a small feature map does not run at all
                want = m._conv_forward(F.pad(x, pads), m.weight, m.bias)
            except RuntimeError:
                continue
            if isinstance(got, torch.Tensor) and got.shape == want.shape and _close(got, want):
                return pads
    return None


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    scale = float(want.abs().max()) or 1.0
    return bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6 * scale))


def _linear_map(m: nn.Linear, in_shape: tuple[int, ...]) -> bool:
    """Whether ``m``'s forward computes ``F.linear(x, m.weight, m.bias)`` (checked on a random
    input of the shape it is called with)."""
    x = torch.randn(in_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = m(x), F.linear(x, m.weight, m.bias)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and _close(got, want)


class _Writer:
    """Turns a traced graph into the JSON node list and the tensor dict.

    Shapes are static (:mod:`binarize_cli.export.record`): values without tensors are
    substituted into their users, tensors computed from parameters alone become ``constant``
    nodes, and the batch (dim 0) stays apart: no op may index, move or merge it.
    """

    def __init__(self, model: nn.Module, rec: Recording, model_name: str = "") -> None:
        self.model = model
        self.rec = rec
        self.model_name = model_name or type(model).__name__
        self.modules = dict(model.named_modules())
        self.nodes: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.value: dict[str, _Value] = {}  # fx node name -> value(s) in the packed graph
        self.names: set[str] = {INPUT_NAME}
        self.gated: set[str] = set()  # the ``mul`` nodes applying a channel gate

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
        value = self.value.get(arg.name) if isinstance(arg, fx.Node) else None
        if not isinstance(value, str):
            raise BadInputError(f"{where}: expected a tensor input, got {_kind(arg)}")
        return value

    def _ins(self, seq: Any, where: str) -> list[str]:
        """The tensors of a list argument; a split's parts count one by one."""
        if isinstance(seq, fx.Node) and isinstance(self.value.get(seq.name), list):
            return list(self.value[seq.name])
        if not isinstance(seq, (list, tuple)):
            raise BadInputError(f"{where}: expected a list of tensors, got {_kind(seq)}")
        out: list[str] = []
        for a in seq:
            parts = self.value.get(a.name) if isinstance(a, fx.Node) else None
            out += parts if isinstance(parts, list) else [self._in(a, where)]
        return out

    def _info(self, node: Any) -> TensorInfo:
        """The recorded shape and dtype (at the first batch size) of a tensor node."""
        value = self.rec.values[node.name] if isinstance(node, fx.Node) else None
        if not isinstance(value, TensorInfo):
            raise BadInputError(f"expected a tensor computed from the input, got {_kind(node)}")
        return value

    @staticmethod
    def _dim(d: Any, rank: int, where: str) -> int:
        """``d`` as a non-negative dimension of a rank-``rank`` tensor, never the batch."""
        if not isinstance(d, int) or not -rank <= d < rank:
            raise BadInputError(f"{where}: dimension {d!r} does not fit a rank-{rank} tensor")
        d %= rank
        if d == 0:
            raise BadInputError(
                f"{where} works along dimension 0, the batch; the packed format keeps the batch apart"
            )
        return d

    def _resolve(self, a: Any) -> Any:
        """``a`` with every static node replaced by its recorded value."""
        if isinstance(a, fx.Node):
            return self.rec.values[a.name] if self.rec.is_static(a.name) else a
        if isinstance(a, slice):
            return slice(self._resolve(a.start), self._resolve(a.stop), self._resolve(a.step))
        if isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
            return type(a)(self._resolve(v) for v in a)
        if isinstance(a, dict):
            return {k: self._resolve(v) for k, v in a.items()}
        return a

    def _check(self, node: fx.Node, where: str) -> None:
        """The node keeps the batch as dim 0 and the other dims fixed at both recorded batch
        sizes, computes float32, and reads batch-dependent static values only as a reshape's
        leading dimension."""
        for value, batch in (
            (self.rec.values[node.name], BATCHES[0]),
            (self.rec.other[node.name], BATCHES[1]),
        ):
            for info in value if isinstance(value, list) else [value]:
                if not isinstance(info, TensorInfo):
                    raise BadInputError(f"{where} returns {_kind(info)} along with tensors")
                if info.dtype != torch.float32:
                    raise BadInputError(
                        f"{where} computes a {info.dtype} tensor; the packed format is float"
                    )
                if not info.shape or info.shape[0] != batch:
                    raise BadInputError(
                        f"{where} changes the batch dimension (shape {list(info.shape)} at batch "
                        f"{batch}); the packed format keeps the batch as dimension 0"
                    )
        first, second = self.rec.values[node.name], self.rec.other[node.name]
        shapes = [i.shape[1:] for i in (first if isinstance(first, list) else [first])]
        if shapes != [i.shape[1:] for i in (second if isinstance(second, list) else [second])]:
            raise BadInputError(
                f"{where}: the dimensions after the batch change with the batch size; the "
                "packed format resolves shapes statically"
            )
        reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
            node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
        )
        for arg in node.all_input_nodes:
            if arg.name in self.rec.batch_dependent and not reshape:
                raise BadInputError(
                    f"{where} reads {arg.name} = {self.rec.values[arg.name]} at batch "
                    f"{BATCHES[0]} but {self.rec.other[arg.name]} at batch {BATCHES[1]}; the "
                    "packed format resolves shapes statically and lets only a reshape's "
                    "leading dimension follow the batch"
                )

    # -- driver ----------------------------------------------------------------------
    def run(self, gm: fx.GraphModule) -> dict[str, Any]:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise BadInputError(
                f"the model takes {len(placeholders)} inputs; the packed format supports one image input"
            )
        outputs: list[str] = []
        for node in gm.graph.nodes:
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or not isinstance(self.value.get(out.name), str):
                    raise BadInputError(
                        "the model returns several values; the packed format supports one logits tensor"
                    )
                outputs.append(self.value[out.name])  # type: ignore[arg-type]
                continue
            try:
                self._node(node)
            except BadInputError as exc:
                raise BadInputError(
                    f"{exc} [model {self.model_name}, layer {_layer(node)}, fx node {node.name}]"
                ) from None
        if not outputs:
            raise BadInputError("the traced model has no output")
        if outputs[0] == INPUT_NAME:
            raise BadInputError("the model returns its input unchanged")
        nodes = self._prune(outputs)
        self._fold_channel_scales(nodes, outputs)
        return {"inputs": [INPUT_NAME], "outputs": outputs, "nodes": nodes}

    def _node(self, node: fx.Node) -> None:
        name = node.name
        if node.op == "placeholder":
            self.value[name] = INPUT_NAME
            return
        if self.rec.is_static(name):  # ints, sizes: substituted into the users
            return
        if name not in self.rec.dependent:  # a tensor computed from parameters alone
            self.value[name] = self._constant(node)
            return
        where = _describe(node) if node.op != "call_module" else f"module {node.target}"
        self._check(node, where)
        args = list(self._resolve(tuple(node.args)))
        kwargs = self._resolve(dict(node.kwargs))
        if node.op == "call_module":
            self.value[name] = self.module(node, args, kwargs, where)
        elif node.op == "call_function":
            self.value[name] = self.function(node, args, kwargs, where)
        elif node.op == "call_method":
            self.value[name] = self.method(node, args, kwargs, where)
        else:
            raise BadInputError(f"{where} is not supported by the packed format")

    def _constant(self, node: fx.Node) -> str:
        value = self.rec.values[node.name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise BadInputError(
                f"{_describe(node)} ({node.name}) is not a float tensor; the packed format cannot store it"
                f" [model {self.model_name}, layer {_layer(node)}]"
            )
        base = str(node.target) if node.op == "get_attr" else node.name
        return self._emit(
            node.name, "constant", [], {}, {"value": self._f32(f"const.{base}", value)}
        )

    # -- modules ---------------------------------------------------------------------
    def module(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any], where: str) -> _Value:
        target = str(node.target)
        m = self.modules[target]
        if len(args) != 1 or kwargs:
            raise BadInputError(
                f"module {target} ({type(m).__name__}) is called with {len(args)} inputs; the packed format supports single-input modules"
            )
        x = self._in(args[0], where)
        base = node.name
        if isinstance(m, BinarizedConv2d):
            return self._bconv(base, target, m, x)
        if isinstance(m, nn.Conv2d):
            pads = _conv_pads(m, self._info(args[0]).shape)
            if pads is None:
                raise BadInputError(
                    f"layer {target} ({type(m).__name__}) computes something other than nn.Conv2d; the packed format cannot store it"
                )
            if any(pads):  # TensorFlow's "same" padding, as timm's Conv2dSame computes it
                x = self._pad(f"{base}_pad", x, pads, 0.0)
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
            if not _same_forward(m, nn.Linear) and not _linear_map(m, self._info(args[0]).shape):
                raise BadInputError(
                    f"layer {target} ({type(m).__name__}) does not compute F.linear(x, weight, bias); the packed format cannot store it"
                )
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
                    y = self._simple(f"{base}_act", f"{target}.act", act, y, node)
            return y
        return self._simple(base, target, m, x, node)

    def _simple(self, base: str, target: str, m: nn.Module, x: str, node: fx.Node) -> str:
        """A single-input ``torch.nn`` module that is not a weight layer."""
        if isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)):
            return x
        for cls, op in _UNARY_MODULES.items():
            if isinstance(m, cls):
                return self._emit(base, op, [x])
        if isinstance(m, nn.Hardtanh):  # includes ReLU6
            return self._emit(base, "clip", [x], {"min": float(m.min_val), "max": float(m.max_val)})
        if isinstance(m, nn.LeakyReLU):
            return self._emit(base, "leaky_relu", [x], {"negative_slope": float(m.negative_slope)})
        if isinstance(m, nn.GELU):
            return self._emit(base, "gelu", [x], {"approximate": str(m.approximate)})
        if isinstance(m, nn.PReLU):
            return self._emit(
                base, "prelu", [x], {}, {"weight": self._f32(f"{target}.weight", m.weight)}
            )
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise BadInputError(
                    f"module {target}: MaxPool2d(return_indices=True) is not supported"
                )
            return self._maxpool(
                base, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
            )
        if isinstance(m, nn.AvgPool2d):
            return self._avgpool(
                base, x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                m.count_include_pad, m.divisor_override,
            )  # fmt: skip
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
            return self._flatten(base, x, m.start_dim, m.end_dim, node, f"module {target}")
        if isinstance(m, nn.Unflatten):
            return self._reshape(base, x, node)
        if isinstance(m, nn.ChannelShuffle):
            _, c, *rest = self._info(node).shape
            g = int(m.groups)
            y = self._emit(f"{base}_split", "reshape", [x], {"shape": [g, c // g, *rest]})
            perm = [0, 2, 1, *range(3, 3 + len(rest))]
            y = self._emit(f"{base}_swap", "transpose", [y], {"perm": perm})
            return self._emit(base, "reshape", [y], {"shape": [c, *rest]})
        if isinstance(m, nn.modules.padding._ConstantPadNd):
            return self._pad(base, x, m.padding, m.value)
        if isinstance(m, nn.Upsample):
            factor = None if m.size is not None or m.recompute_scale_factor else m.scale_factor
            return self._resize(base, x, node, m.mode, m.align_corners, factor, f"module {target}")
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
        y = self._emit(base, "bconv2d", [x], attrs, t)
        if m.gate is None:
            return y
        if not isinstance(m.gate, ChannelGate):
            raise BadInputError(
                f"layer {target}: gate {type(m.gate).__name__} is not supported by the packed format"
            )
        gated = self._emit(f"{base}_gated", "mul", [y, self._gate(base, target, m.gate, x)])
        self.gated.add(gated)
        return gated

    def _gate(self, base: str, target: str, gate: ChannelGate, x: str) -> str:
        """``2 sigmoid(W_2 relu(W_1 mean_hw x))`` as ``[C_out, 1, 1]`` per sample."""
        z = self._emit(f"{base}_gate_pool", "mean", [x], {"dims": [2, 3], "keepdim": False})
        w1 = self._f32(f"{target}.gate.reduce_weight", gate.reduce_weight)
        u = self._emit(f"{base}_gate_reduce", "linear", [z], {}, {"weight": w1})
        u = self._emit(f"{base}_gate_relu", "relu", [u])
        w2 = self._f32(f"{target}.gate.expand_weight", gate.expand_weight)
        v = self._emit(f"{base}_gate_expand", "linear", [u], {}, {"weight": w2})
        v = self._emit(f"{base}_gate_sigmoid", "sigmoid", [v])
        v = self._emit(f"{base}_gate_gain", "mul", [v], {"scalar": GATE_GAIN})
        return self._emit(f"{base}_gate", "reshape", [v], {"shape": [gate.out_channels, 1, 1]})

    # -- ops shared by modules, functions and methods ---------------------------------
    def _maxpool(self, base: str, x: str, k: Any, s: Any, p: Any, d: Any, ceil: Any) -> str:
        attrs = {
            "kernel_size": _ints(k),
            "stride": _ints(s or k),
            "padding": _ints(p),
            "dilation": _ints(d),
            "ceil_mode": bool(ceil),
        }
        return self._emit(base, "maxpool2d", [x], attrs)

    def _avgpool(
        self, base: str, x: str, k: Any, s: Any, p: Any, ceil: Any, include_pad: Any, divisor: Any
    ) -> str:
        attrs = {
            "kernel_size": _ints(k),
            "stride": _ints(s or k),
            "padding": _ints(p),
            "ceil_mode": bool(ceil),
            "count_include_pad": bool(include_pad),
            "divisor_override": None if divisor is None else int(divisor),
        }
        return self._emit(base, "avgpool2d", [x], attrs)

    def _flatten(self, base: str, x: str, start: Any, end: Any, node: fx.Node, where: str) -> str:
        rank = len(self._info(node.all_input_nodes[0]).shape)
        attrs = {"start_dim": self._dim(start, rank, where), "end_dim": int(end) % rank}
        return self._emit(base, "flatten", [x], attrs)

    def _reshape(self, base: str, x: str, node: fx.Node, *, check: bool = True) -> str:
        """A view change: ``reshape`` to the recorded output shape (none when ``check`` finds
        it equal to the input's)."""
        shape = list(self._info(node).shape[1:])
        if check and shape == list(self._info(node.all_input_nodes[0]).shape[1:]):
            return x
        return self._emit(base, "reshape", [x], {"shape": shape})

    def _transpose(self, base: str, x: str, perm: list[int], where: str) -> str:
        rank = len(perm)
        perm = [int(d) % rank for d in perm]
        if sorted(perm) != list(range(rank)) or perm[0] != 0:
            raise BadInputError(
                f"{where} permutes dimensions {perm}; the packed format keeps the batch as dimension 0"
            )
        return (
            x if perm == list(range(rank)) else self._emit(base, "transpose", [x], {"perm": perm})
        )

    def _pad(self, base: str, x: str, pads: Any, value: Any) -> str:
        attrs = {"pads": [int(p) for p in pads], "value": float(value or 0.0)}
        return self._emit(base, "pad", [x], attrs)

    def _resize(
        self, base: str, x: str, node: fx.Node, mode: Any, corners: Any, factor: Any, where: str
    ) -> str:
        shape = self._info(node).shape
        if mode not in ("nearest", "bilinear") or len(shape) != 4:
            raise BadInputError(
                f"{where}: {mode} interpolation of a rank-{len(shape)} tensor is not supported (nearest, bilinear on [B, C, H, W])"
            )
        attrs: dict[str, Any] = {
            "size": [int(shape[2]), int(shape[3])],
            "mode": mode,
            "align_corners": bool(corners),
        }
        if factor is not None:  # PyTorch then maps pixels with 1 / scale_factor
            attrs["scale_factor"] = _floats2(factor)
        return self._emit(base, "resize", [x], attrs)

    def _reduce(
        self, base: str, op: str, x: str, dims: Any, keep: Any, node: fx.Node, where: str
    ) -> str:
        """``mean``/``sum`` over ``dims`` (never the batch)."""
        if dims is None:
            raise BadInputError(f"{where}: {op} over all dimensions is not supported")
        rank = len(self._info(node.all_input_nodes[0]).shape)
        dl = [self._dim(d, rank, where) for d in ([dims] if isinstance(dims, int) else dims)]
        return self._emit(base, op, [x], {"dims": dl, "keepdim": bool(keep)})

    def _softmax(self, base: str, x: str, b: dict[str, Any], node: fx.Node, where: str) -> str:
        if b.get("dtype") is not None:
            raise BadInputError(f"{where}: softmax with a dtype is not supported")
        rank = len(self._info(node).shape)
        return self._emit(base, "softmax", [x], {"dim": self._dim(b["dim"], rank, where)})

    def _stack(self, base: str, ins: list[str], dim: Any, node: fx.Node, where: str) -> str:
        """``torch.stack``: each input reshaped with a 1 at ``dim``, then ``cat``."""
        shape = list(self._info(node).shape)
        d = self._dim(dim, len(shape), where)
        part = [*shape[1:d], 1, *shape[d + 1 :]]
        parts = [
            self._emit(f"{base}_{i}", "reshape", [x], {"shape": part}) for i, x in enumerate(ins)
        ]
        return self._emit(base, "cat", parts, {"dim": d})

    def _binary(self, base: str, op: str, a: Any, b: Any, where: str) -> str:
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return self._emit(base, op, [self._in(a, where), self._in(b, where)])
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            return self._emit(base, op, [self._in(a, where)], {"scalar": float(b)})
        if isinstance(b, fx.Node) and isinstance(a, (int, float)):
            attrs: dict[str, Any] = {"scalar": float(a)}
            if op in ("sub", "div"):
                attrs["reverse"] = True
            return self._emit(base, op, [self._in(b, where)], attrs)
        raise BadInputError(f"{where}: operands {_kind(a)}, {_kind(b)} are not supported")

    def _parts(self, base: str, x: str, node: fx.Node, dim: Any, where: str) -> list[str]:
        """``chunk``/``split``: one ``slice`` per part, sized as recorded."""
        parts = self.rec.values[node.name]
        rank = len(parts[0].shape)
        d = self._dim(dim, rank, where)
        names, start = [], 0
        for i, info in enumerate(parts):
            stop = start + info.shape[d]
            attrs = {"dims": [d], "starts": [start], "stops": [stop], "steps": [1]}
            names.append(self._emit(f"{base}_{i}", "slice", [x], attrs))
            start = stop
        return names

    def _index(self, base: str, x: str, node: fx.Node, index: Any, where: str) -> str:
        """``x[index]`` with ints, slices, ``None`` and ``...``: a ``slice`` of the
        non-trivial dims, then a ``reshape`` when ints drop dims or ``None`` adds them."""
        shape = self._info(node.all_input_nodes[0]).shape
        items = list(index) if isinstance(index, tuple) else [index]
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            raise BadInputError(f"{where}: indexing with a tensor or list is not supported")
        if any(i is Ellipsis for i in items):
            k = next(j for j, i in enumerate(items) if i is Ellipsis)
            real = sum(1 for i in items if i is not None and i is not Ellipsis)
            items[k : k + 1] = [slice(None)] * (len(shape) - real)
        dims: list[int] = []
        starts: list[int] = []
        stops: list[int] = []
        steps: list[int] = []
        d, reshape = 0, False
        for item in items:
            if item is None:
                reshape = True
                continue
            if isinstance(item, slice):
                start, stop, step = item.indices(shape[d])
            else:
                start, stop, step = int(item) % shape[d], int(item) % shape[d] + 1, 1
                reshape = True
            if isinstance(item, int) or (start, stop, step) != (0, shape[d], 1):
                if d == 0:
                    raise BadInputError(
                        f"{where} indexes dimension 0, the batch; the packed format keeps the batch apart"
                    )
                dims.append(d)
                starts.append(start)
                stops.append(stop)
                steps.append(step)
            d += 1
        y = x
        if dims:
            attrs = {"dims": dims, "starts": starts, "stops": stops, "steps": steps}
            y = self._emit(base, "slice", [x], attrs)
        return self._reshape(f"{base}_reshape", y, node, check=False) if reshape else y

    # -- functions and methods -------------------------------------------------------
    def function(
        self, node: fx.Node, args: list[Any], kwargs: dict[str, Any], where: str
    ) -> _Value:
        f, base = node.target, node.name
        if f in _BINARY_FUNCTIONS:
            return self._arith(base, _BINARY_FUNCTIONS[f], args, kwargs, where)  # type: ignore[index]
        if f is torch.rsub:
            return self._arith(base, "sub", [args[1], args[0]], kwargs, where)
        if f in (operator.neg, torch.neg):
            return self._binary(base, "mul", args[0], -1.0, where)
        if f is operator.getitem:
            parts = self.value.get(args[0].name) if isinstance(args[0], fx.Node) else None
            if isinstance(parts, list):  # a part of a split
                return parts[args[1]]
            return self._index(base, self._in(args[0], where), node, args[1], where)
        if f in (torch.cat, torch.concat, torch.concatenate):
            b = _bind(args, kwargs, ("dim",), dim=0)
            ins = self._ins(args[0] if args else kwargs["tensors"], where)
            rank = len(self._info(node).shape)
            return self._emit(base, "cat", ins, {"dim": self._dim(b["dim"], rank, where)})
        if f is torch.stack:
            b = _bind(args, kwargs, ("dim",), dim=0)
            ins = self._ins(args[0] if args else kwargs["tensors"], where)
            return self._stack(base, ins, b["dim"], node, where)
        if f in (torch.chunk, torch.split):
            b = _bind(args, kwargs, ("_", "dim"), dim=0)
            return self._parts(base, self._in(args[0], where), node, b["dim"], where)
        x = self._in(args[0] if args else kwargs.get("input"), where)
        if f in _UNARY_FUNCTIONS:
            return self._emit(base, _UNARY_FUNCTIONS[f], [x])  # type: ignore[index]
        if f in _DROPOUT_FUNCTIONS or _is_stochastic_depth(f, args, kwargs):
            return x
        if f is torch.flatten:
            b = _bind(args, kwargs, ("start_dim", "end_dim"), start_dim=0, end_dim=-1)
            return self._flatten(base, x, b["start_dim"], b["end_dim"], node, where)
        if f in _RESHAPE_FUNCTIONS:
            return self._reshape(base, x, node)
        if f in (torch.transpose, torch.swapaxes):
            return self._transpose(
                base, x, _swap(len(self._info(node).shape), args[1], args[2]), where
            )
        if f is torch.permute:
            return self._transpose(base, x, list(_bind(args, kwargs, ("dims",))["dims"]), where)
        if f is F.relu6:
            return self._emit(base, "clip", [x], {"min": 0.0, "max": 6.0})
        if f is F.hardtanh:
            b = _bind(args, kwargs, ("min_val", "max_val"), min_val=-1.0, max_val=1.0)
            return self._emit(
                base, "clip", [x], {"min": float(b["min_val"]), "max": float(b["max_val"])}
            )
        if f in (torch.clamp, torch.clip):
            return self._clamp(
                base, x, _bind(args, kwargs, ("min", "max"), min=None, max=None), where
            )
        if f is F.leaky_relu:
            b = _bind(args, kwargs, ("negative_slope",), negative_slope=0.01)
            return self._emit(
                base, "leaky_relu", [x], {"negative_slope": float(b["negative_slope"])}
            )
        if f is F.gelu:
            b = _bind(args, kwargs, (), approximate="none")
            return self._emit(base, "gelu", [x], {"approximate": str(b["approximate"])})
        if f is F.prelu:
            weight = self.rec.values[args[1].name] if isinstance(args[1], fx.Node) else None
            if not isinstance(weight, torch.Tensor):
                raise BadInputError(f"{where}: the weight must be a parameter of the model")
            return self._emit(
                base, "prelu", [x], {}, {"weight": self._f32(f"{base}.weight", weight)}
            )
        if f is F.linear:
            return self._linear(base, x, args, kwargs, where)
        if f in (F.max_pool2d, torch.max_pool2d):
            b = _bind(args, kwargs, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                      stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)  # fmt: skip
            if b["return_indices"]:
                raise BadInputError(f"{where}: return_indices is not supported")
            return self._maxpool(
                base, x, b["kernel_size"], b["stride"], b["padding"], b["dilation"], b["ceil_mode"]
            )
        if f is F.avg_pool2d:
            b = _bind(args, kwargs, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                      stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None)  # fmt: skip
            return self._avgpool(base, x, b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"],
                                 b["count_include_pad"], b["divisor_override"])  # fmt: skip
        if f in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            b = _bind(args, kwargs, ("output_size", "return_indices"), return_indices=False)
            if b["return_indices"]:
                raise BadInputError(f"{where}: return_indices is not supported")
            op = "adaptive_avgpool2d" if f is F.adaptive_avg_pool2d else "adaptive_maxpool2d"
            return self._emit(base, op, [x], {"output_size": _size2(b["output_size"])})
        if f in (torch.mean, torch.sum):
            b = _bind(args, kwargs, ("dim", "keepdim"), dim=None, keepdim=False)
            op = "mean" if f is torch.mean else "sum"
            return self._reduce(base, op, x, b["dim"], b["keepdim"], node, where)
        if f in (F.softmax, torch.softmax):
            return self._softmax(base, x, _bind(args, kwargs, ("dim",), dtype=None), node, where)
        if f is F.pad:
            b = _bind(args, kwargs, ("pad", "mode", "value"), mode="constant", value=None)
            if b["mode"] != "constant":
                raise BadInputError(
                    f"{where}: {b['mode']} padding is not supported (constant only)"
                )
            return self._pad(base, x, b["pad"], b["value"])
        if f in (F.interpolate, F.upsample):
            b = _bind(args, kwargs, ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"),
                      size=None, scale_factor=None, mode="nearest", align_corners=None,
                      recompute_scale_factor=None, antialias=False)  # fmt: skip
            if b["antialias"]:
                raise BadInputError(f"{where}: antialias is not supported")
            factor = None if b["recompute_scale_factor"] else b["scale_factor"]
            return self._resize(base, x, node, b["mode"], b["align_corners"], factor, where)
        raise BadInputError(f"{where} is not supported by the packed format")

    def _arith(
        self, base: str, op: str, args: list[Any], kwargs: dict[str, Any], where: str
    ) -> str:
        b = _bind(args, kwargs, ("other",), alpha=1, rounding_mode=None)
        if b["alpha"] != 1 or b["rounding_mode"] is not None:
            raise BadInputError(f"{where}: alpha and rounding_mode are not supported")
        return self._binary(base, op, args[0], b["other"], where)

    def _clamp(self, base: str, x: str, b: dict[str, Any], where: str) -> str:
        lo, hi = b["min"], b["max"]
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            raise BadInputError(f"{where}: clamp bounds must be numbers")
        attrs = {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)}
        return self._emit(base, "clip", [x], attrs)

    def _linear(
        self, base: str, x: str, args: list[Any], kwargs: dict[str, Any], where: str
    ) -> str:
        b = _bind(args, kwargs, ("weight", "bias"), bias=None)
        t: dict[str, str] = {}
        for role in ("weight", "bias"):
            arg = b[role]
            value = self.rec.values[arg.name] if isinstance(arg, fx.Node) else arg
            if value is None and role == "bias":
                continue
            if not isinstance(value, torch.Tensor):
                raise BadInputError(f"{where}: the {role} must be a parameter of the model")
            t[role] = self._f32(f"{base}.{role}", value)
        return self._emit(base, "linear", [x], {}, t)

    def method(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any], where: str) -> _Value:
        name, base = str(node.target), node.name
        if name in _BINARY_METHODS:
            return self._arith(base, _BINARY_METHODS[name], args, kwargs, where)
        if name == "rsub":
            return self._arith(base, "sub", [args[1], args[0]], kwargs, where)
        x = self._in(args[0], where)
        if name in _SAME_METHODS:
            if self._info(node) != self._info(node.all_input_nodes[0]):
                raise BadInputError(
                    f"{where} changes the shape or dtype; the packed format cannot store it"
                )
            return x
        if name in _UNARY_METHODS:
            return self._emit(base, _UNARY_METHODS[name], [x])
        if name == "neg":
            return self._binary(base, "mul", args[0], -1.0, where)
        if name == "flatten":
            b = _bind(args, kwargs, ("start_dim", "end_dim"), start_dim=0, end_dim=-1)
            return self._flatten(base, x, b["start_dim"], b["end_dim"], node, where)
        if name in _RESHAPE_METHODS:
            return self._reshape(base, x, node)
        if name == "transpose":
            return self._transpose(
                base, x, _swap(len(self._info(node).shape), args[1], args[2]), where
            )
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            return self._transpose(base, x, list(kwargs.get("dims", dims)), where)
        if name in ("chunk", "split"):
            b = _bind(args, kwargs, ("_", "dim"), dim=0)
            return self._parts(base, x, node, b["dim"], where)
        if name in ("clamp", "clamp_", "clip", "clip_"):
            return self._clamp(
                base, x, _bind(args, kwargs, ("min", "max"), min=None, max=None), where
            )
        if name in ("mean", "sum"):
            b = _bind(args, kwargs, ("dim", "keepdim"), dim=None, keepdim=False)
            return self._reduce(base, name, x, b["dim"], b["keepdim"], node, where)
        if name == "softmax":
            return self._softmax(base, x, _bind(args, kwargs, ("dim",), dtype=None), node, where)
        raise BadInputError(f"{where} is not supported by the packed format")

    def _fold_channel_scales(self, nodes: list[dict[str, Any]], outputs: list[str]) -> None:
        """Fold single-plane per-output-channel weight scales (XNOR-Net, Bi-Real: ``[1, O]``)
        into the batch norm that alone consumes the convolution: ``bn(alpha_o y) = (scale_o
        alpha_o) y + shift_o``. The weight scales become ``[1.0]``. This is the fold the memory
        report assumes when it does not count those scales (profile.py). A channel gate's
        product between the convolution and the batch norm is passed through (both factors
        are per channel)."""
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
            if consumers[0]["name"] in self.gated:  # bconv -> gate mul -> bn
                if consumers[0]["name"] in outputs:
                    continue
                consumers = users.get(consumers[0]["name"], [])
                if len(consumers) != 1:
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


def _swap(rank: int, d0: Any, d1: Any) -> list[int]:
    """The permutation of ``transpose(d0, d1)`` on a rank-``rank`` tensor."""
    perm = list(range(rank))
    a, b = int(d0) % rank, int(d1) % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _is_stochastic_depth(f: Any, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """torchvision's ``stochastic_depth`` (an fx-wrapped function) in eval mode: the identity."""
    if getattr(f, "__name__", "") != "stochastic_depth":
        return False
    if not str(getattr(f, "__module__", "")).startswith("torchvision."):
        return False
    return not _bind(args, kwargs, ("p", "mode", "training"), training=True)["training"]


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
    input_size = meta.get("input_size")
    if input_size is None or len(input_size) != 3:
        raise BadInputError(f"the run's input_size must be [C, H, W], got {input_size!r}")
    with evaluating(model):
        gm = trace_for_export(model)
        rec = record_graph(gm, tuple(int(v) for v in input_size))  # type: ignore[arg-type]
        writer = _Writer(model, rec, str(meta.get("model", "")))
        graph = writer.run(gm)
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
        "input_size": _json(list(input_size)),
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
