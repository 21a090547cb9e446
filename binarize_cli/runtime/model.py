"""Load a packed file and run its graph: :func:`load_packed` -> :class:`PackedModel`.

The graph (``docs/format.md``) is an ordered list of nodes; each node reads named values
(the graph input or earlier nodes' outputs) and tensors of the file, and produces one value
named after itself. :class:`PackedModel` compiles every node into a callable once, then runs
them in order, dropping each value after its last use.

Precision: ``"float32"`` (default; what a deployment runs) or ``"float64"`` (every float op
in double precision and the binary layers' integer counts combined in double; ``verify``
uses it to separate real disagreements from float32 rounding). The binary parts — plane
packing, AND/XNOR, popcounts — are exact integers either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from binarize_cli.core.errors import BadInputError, FormatError
from binarize_cli.runtime import ops
from binarize_cli.runtime.bitconv import BinaryConv2d, from_tensors
from binarize_cli.runtime.bits import packed_length, unpack_bits
from binarize_cli.runtime.format import check_header
from binarize_cli.runtime.kernels import CBackend, NumpyBackend, get_backend
from binarize_cli.runtime.ops import pair
from binarize_cli.runtime.optable import OPS
from binarize_cli.runtime.staircase import Staircase

PRECISIONS = {"float32": np.float32, "float64": np.float64}

Fn = Callable[[list[np.ndarray]], np.ndarray]


def _meta(key: str, default: str, parse: Callable[[str], Any]) -> Any:
    """A read-only attribute: metadata ``key`` (``default`` when absent) through ``parse``."""
    return property(lambda self: parse(self.metadata.get(key, default)), doc=f"``{key}``")


@dataclass
class _Node:
    name: str
    op: str
    inputs: list[str]
    fn: Fn
    layer: BinaryConv2d | None = None


@dataclass
class PackedModel:
    """A packed network ready to run with NumPy and the bitwise kernels (no torch).

    Attributes: ``metadata`` (the file's str->str metadata), ``graph`` (parsed JSON),
    ``scheme``, ``m``, ``n``, ``source_model``, ``num_classes``, ``input_size`` (C, H, W),
    ``mean``/``std`` (the normalisation the images must already have), ``data`` (the data
    spec converted on), ``preprocessing`` (the JSON record of docs/format.md's
    "Preprocessing", or None: absent in older files), ``backend``.
    """

    path: Path
    metadata: dict[str, str]
    graph: dict[str, Any]
    backend: NumpyBackend | CBackend
    precision: str = "float32"
    nodes: list[_Node] = field(default_factory=list)
    last_use: dict[str, int] = field(default_factory=dict)

    scheme = _meta("scheme", "", str)
    m = _meta("M", "0", int)
    n = _meta("N", "0", int)
    source_model = _meta("source_model", "", str)
    num_classes = _meta("num_classes", "0", int)
    input_size = _meta("input_size", "[]", lambda v: tuple(json.loads(v)))
    mean = _meta("mean", "null", json.loads)
    std = _meta("std", "null", json.loads)
    data = _meta("data", "", str)
    preprocessing = _meta("preprocessing", "null", json.loads)

    @property
    def binary_layers(self) -> dict[str, BinaryConv2d]:
        return {n.name: n.layer for n in self.nodes if n.layer is not None}

    def __call__(self, images: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """Logits for normalised ``images [B, C, H, W]`` (any float dtype, cast to the
        model's precision); ``batch_size`` splits a large batch."""
        x = np.asarray(images)
        if x.ndim != 4:
            raise BadInputError(f"images must be [batch, C, H, W], got shape {tuple(x.shape)}")
        size = self.input_size
        if size and x.shape[1] != size[0]:
            raise BadInputError(f"images have {x.shape[1]} channels; the model expects {size[0]}")
        dtype = PRECISIONS[self.precision]
        x = np.ascontiguousarray(x, dtype=dtype)
        if batch_size is None or x.shape[0] <= batch_size:
            return self._forward(x)
        return np.concatenate(
            [self._forward(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        )

    def _forward(self, x: np.ndarray) -> np.ndarray:
        values: dict[str, np.ndarray] = {self.graph["inputs"][0]: x}
        for idx, node in enumerate(self.nodes):
            args = [values[i] for i in node.inputs]
            values[node.name] = node.fn(args)
            for i in node.inputs:
                if self.last_use.get(i) == idx:
                    del values[i]
        return values[self.graph["outputs"][0]]

    def trace(self, images: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """Every node's output, in order (debugging; keeps all values alive)."""
        x = np.ascontiguousarray(images, dtype=PRECISIONS[self.precision])
        values: dict[str, np.ndarray] = {self.graph["inputs"][0]: x}
        for node in self.nodes:
            values[node.name] = node.fn([values[i] for i in node.inputs])
            yield node.name, values[node.name]


# --------------------------------------------------------------------------------------
# Node compilation
# --------------------------------------------------------------------------------------


@dataclass
class _Source:
    """One graph node as its builder sees it: attributes, the file's tensors, the model."""

    node: dict[str, Any]
    tensors: dict[str, np.ndarray]
    model: PackedModel

    @property
    def attrs(self) -> dict[str, Any]:
        return self.node.get("attrs", {})

    def tensor(self, role: str, required: bool = True) -> np.ndarray | None:
        node = self.node
        name = node.get("tensors", {}).get(role)
        if name is None:
            if required:
                raise FormatError(f"node {node['name']!r} ({node['op']}) lacks its {role!r} tensor")
            return None
        if name not in self.tensors:
            raise FormatError(f"node {node['name']!r} names tensor {name!r}, which the file lacks")
        return self.tensors[name]


class _BinaryFn:
    """A ``bconv2d`` node's callable: the layer run on the model's backend."""

    def __init__(self, layer: BinaryConv2d, backend: NumpyBackend | CBackend) -> None:
        self.layer, self.backend = layer, backend

    def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
        return self.layer(xs[0], self.backend)


_BUILDERS: dict[str, Callable[[_Source], Fn]] = {}


def _builds(*names: str) -> Callable[[Callable[[_Source], Fn]], Callable[[_Source], Fn]]:
    def register(builder: Callable[[_Source], Fn]) -> Callable[[_Source], Fn]:
        for name in names:
            _BUILDERS[name] = builder
        return builder

    return register


@_builds("conv2d")
def _conv2d(src: _Source) -> Fn:
    a, w, bias = src.attrs, src.tensor("weight"), src.tensor("bias", required=False)
    st, pa, di = pair(a["stride"]), pair(a["padding"]), pair(a["dilation"])
    g = int(a["groups"])
    return lambda xs: ops.conv2d(xs[0], w, bias, st, pa, di, g)  # type: ignore[arg-type]


@_builds("bconv2d")
def _bconv2d(src: _Source) -> Fn:
    return _BinaryFn(_binary_layer(src), src.model.backend)


@_builds("batchnorm")
def _batchnorm(src: _Source) -> Fn:
    sc, sh = src.tensor("scale"), src.tensor("shift")
    return lambda xs: ops.affine_channels(xs[0], sc, sh)  # type: ignore[arg-type]


@_builds("linear")
def _linear(src: _Source) -> Fn:
    w, bias = src.tensor("weight"), src.tensor("bias", required=False)
    return lambda xs: ops.linear(xs[0], w, bias)  # type: ignore[arg-type]


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": ops.relu,
    "sigmoid": ops.sigmoid,
    "tanh": np.tanh,
    "silu": ops.silu,
    "hardswish": ops.hardswish,
    "hardsigmoid": ops.hardsigmoid,
}


@_builds(*_UNARY)
def _unary(src: _Source) -> Fn:
    f = _UNARY[src.node["op"]]
    return lambda xs: f(xs[0])


@_builds("clip")
def _clip(src: _Source) -> Fn:
    lo, hi = src.attrs["min"], src.attrs["max"]
    return lambda xs: ops.clip(xs[0], lo, hi)


#: Element-wise ops of one attribute: ``fn(x, parse(attrs[name]))``.
_ONE_ATTR: dict[str, tuple[Callable[[np.ndarray, Any], np.ndarray], str, Callable[[Any], Any]]] = {
    "leaky_relu": (ops.leaky_relu, "negative_slope", float),
    "gelu": (ops.gelu, "approximate", str),
    "softmax": (ops.softmax, "dim", int),
}


@_builds(*_ONE_ATTR)
def _one_attr(src: _Source) -> Fn:
    f, name, parse = _ONE_ATTR[src.node["op"]]
    value = parse(src.attrs[name])
    return lambda xs: f(xs[0], value)


@_builds("maxpool2d")
def _maxpool2d(src: _Source) -> Fn:
    a = src.attrs
    k, s, p, d = a["kernel_size"], a["stride"], a["padding"], a["dilation"]
    c = bool(a["ceil_mode"])
    return lambda xs: ops.maxpool2d(xs[0], k, s, p, d, c)


@_builds("avgpool2d")
def _avgpool2d(src: _Source) -> Fn:
    a = src.attrs
    k, s, p, c = a["kernel_size"], a["stride"], a["padding"], bool(a["ceil_mode"])
    cip, div = bool(a["count_include_pad"]), a.get("divisor_override")
    return lambda xs: ops.avgpool2d(xs[0], k, s, p, c, cip, div)


@_builds("adaptive_avgpool2d", "adaptive_maxpool2d")
def _adaptive_pool2d(src: _Source) -> Fn:
    size = src.attrs["output_size"]
    mode = "avg" if src.node["op"] == "adaptive_avgpool2d" else "max"
    return lambda xs: ops.adaptive_pool2d(xs[0], size, mode)


@_builds("flatten")
def _flatten(src: _Source) -> Fn:
    s0, e0 = int(src.attrs["start_dim"]), int(src.attrs["end_dim"])
    return lambda xs: ops.flatten(xs[0], s0, e0)


@_builds("mean", "sum")
def _reduce(src: _Source) -> Fn:
    dims, keep = tuple(src.attrs["dims"]), bool(src.attrs["keepdim"])
    reduce = np.mean if src.node["op"] == "mean" else np.sum
    return lambda xs: reduce(xs[0], axis=dims, keepdims=keep)


_ELEMENTWISE = {"add": np.add, "mul": np.multiply, "sub": np.subtract, "div": np.divide}


@_builds(*_ELEMENTWISE)
def _elementwise(src: _Source) -> Fn:
    scalar = src.attrs.get("scalar")
    ufunc = _ELEMENTWISE[src.node["op"]]
    if scalar is None:
        return lambda xs: ufunc(xs[0], xs[1])
    if src.attrs.get("reverse", False):
        return lambda xs: ufunc(xs[0].dtype.type(scalar), xs[0])
    return lambda xs: ufunc(xs[0], xs[0].dtype.type(scalar))


@_builds("cat")
def _cat(src: _Source) -> Fn:
    dim = int(src.attrs["dim"])
    return lambda xs: np.concatenate(xs, axis=dim)


@_builds("prelu")
def _prelu(src: _Source) -> Fn:
    weight = src.tensor("weight")
    return lambda xs: ops.prelu(xs[0], weight)  # type: ignore[arg-type]


@_builds("slice")
def _slice(src: _Source) -> Fn:
    a = src.attrs
    dims, starts, stops, steps = a["dims"], a["starts"], a["stops"], a["steps"]
    return lambda xs: ops.slice_dims(xs[0], dims, starts, stops, steps)


@_builds("reshape")
def _reshape(src: _Source) -> Fn:
    shape = tuple(int(d) for d in src.attrs["shape"])
    return lambda xs: xs[0].reshape((xs[0].shape[0], *shape))


@_builds("transpose")
def _transpose(src: _Source) -> Fn:
    perm = tuple(int(d) for d in src.attrs["perm"])
    return lambda xs: np.ascontiguousarray(xs[0].transpose(perm))


@_builds("pad")
def _pad(src: _Source) -> Fn:
    pads, value = [int(p) for p in src.attrs["pads"]], float(src.attrs["value"])
    return lambda xs: ops.pad(xs[0], pads, value)


@_builds("resize")
def _resize(src: _Source) -> Fn:
    a = src.attrs
    size, mode, corners = a["size"], str(a["mode"]), bool(a["align_corners"])
    factor = a.get("scale_factor")
    if mode not in ("nearest", "bilinear"):
        raise FormatError(f"node {src.node['name']!r}: resize mode {mode!r} is not supported")
    return lambda xs: ops.resize(xs[0], size, mode, corners, factor)


@_builds("constant")
def _constant(src: _Source) -> Fn:
    value, dtype = src.tensor("value"), PRECISIONS[src.model.precision]
    return lambda xs: value.astype(dtype)  # type: ignore[union-attr]


#: The runtime's dispatch, built from the op table: one builder per table op (a table op
#: without a builder fails here, at import).
DISPATCH: dict[str, Callable[[_Source], Fn]] = {op: _BUILDERS[op] for op in OPS}


def _compile(node: dict[str, Any], tensors: dict[str, np.ndarray], model: PackedModel) -> _Node:
    fn = DISPATCH[node["op"]](_Source(node, tensors, model))
    return _Node(
        name=node["name"],
        op=node["op"],
        inputs=list(node.get("inputs", [])),
        fn=fn,
        layer=fn.layer if isinstance(fn, _BinaryFn) else None,
    )


def _binary_layer(src: _Source) -> BinaryConv2d:
    node, a = src.node, src.attrs
    n = int(a["activation_bases"])
    act = None
    if n > 0:
        packed = np.asarray(src.tensor("act_codes"), dtype=np.uint8)
        if packed.ndim != 2 or packed.shape[1] != packed_length(n):
            raise FormatError(
                f"node {node['name']!r}: act_codes of shape {packed.shape} do not hold {n} planes"
            )
        try:
            act = Staircase(
                thresholds=src.tensor("act_thresholds"),  # type: ignore[arg-type]
                codes=unpack_bits(packed, n, axis=1),
                scales=src.tensor("act_scales"),
                domain=str(a["activation_domain"]),
            )
        except ValueError as exc:
            raise FormatError(f"node {node['name']!r}: {exc}") from None
    o, cin, groups = int(a["out_channels"]), int(a["in_channels"]), int(a["groups"])
    kh, kw = pair(a["kernel_size"])
    try:
        return from_tensors(
            weight_planes=src.tensor("weight_planes"),  # type: ignore[arg-type]
            weight_scales=src.tensor("weight_scales"),  # type: ignore[arg-type]
            weight_shape=(o, cin // groups, kh, kw),
            weight_domain=str(a["weight_domain"]),
            bias=src.tensor("bias", required=False),
            act=act,
            stride=pair(a["stride"]),
            padding=pair(a["padding"]),
            dilation=pair(a["dilation"]),
            groups=groups,
        )
    except ValueError as exc:
        raise FormatError(f"node {node['name']!r}: {exc}") from None


def _last_uses(nodes: Iterable[_Node], outputs: list[str]) -> dict[str, int]:
    last: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for i in node.inputs:
            last[i] = idx
    for o in outputs:
        last.pop(o, None)
    return last


def read_packed(path: str | Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and tensors of a packed file (NumPy arrays)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise BadInputError(
            f"packed file {p} does not exist; create it with `binarize export --target packed`"
        )
    try:
        with safe_open(str(p), framework="numpy") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise FormatError(
            f"{p} is not a readable safetensors file ({exc.__class__.__name__}); re-export it"
        ) from None
    return meta, tensors


def load_packed(
    path: str | Path,
    *,
    backend: str | None = None,
    threads: int | None = None,
    precision: str = "float32",
) -> PackedModel:
    """Load a packed file written by ``binarize export --target packed``.

    Args:
        backend: ``"auto"`` (default: the C kernel if it builds, else NumPy), ``"c"`` or
            ``"numpy"``; ``BINARIZE_KERNEL`` sets the default.
        threads: kernel threads (default ``BINARIZE_THREADS`` or the usable CPUs).
        precision: ``"float32"`` or ``"float64"``.
    """
    if precision not in PRECISIONS:
        raise BadInputError(f"precision must be float32 or float64, got {precision!r}")
    meta, tensors = read_packed(path)
    graph = check_header(meta, str(path))
    try:
        be = get_backend(backend, threads=threads)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    model = PackedModel(
        path=Path(path), metadata=meta, graph=graph, backend=be, precision=precision
    )
    model.nodes = [_compile(n, tensors, model) for n in graph["nodes"]]
    known = set(graph["inputs"])
    for node in model.nodes:
        missing = [i for i in node.inputs if i not in known]
        if missing:
            raise FormatError(f"{path}: node {node.name!r} reads {missing}, not produced before it")
        known.add(node.name)
    if graph["outputs"][0] not in known:
        raise FormatError(f"{path}: the graph output {graph['outputs'][0]!r} is never produced")
    model.last_use = _last_uses(model.nodes, graph["outputs"])
    return model
