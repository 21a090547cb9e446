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
from binarize_cli.runtime.bitconv import ActivationCode, BinaryConv2d, from_tensors
from binarize_cli.runtime.format import check_header
from binarize_cli.runtime.kernels import CBackend, NumpyBackend, get_backend

PRECISIONS = {"float32": np.float32, "float64": np.float64}

Fn = Callable[[list[np.ndarray]], np.ndarray]


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


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
    ``mean``/``std`` (the normalisation the images must already have), ``backend``.
    """

    path: Path
    metadata: dict[str, str]
    graph: dict[str, Any]
    backend: NumpyBackend | CBackend
    precision: str = "float32"
    nodes: list[_Node] = field(default_factory=list)
    last_use: dict[str, int] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return self.metadata.get("scheme", "")

    @property
    def m(self) -> int:
        return int(self.metadata.get("M", "0"))

    @property
    def n(self) -> int:
        return int(self.metadata.get("N", "0"))

    @property
    def source_model(self) -> str:
        return self.metadata.get("source_model", "")

    @property
    def num_classes(self) -> int:
        return int(self.metadata.get("num_classes", "0"))

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(json.loads(self.metadata.get("input_size", "[]")))

    @property
    def mean(self) -> list[float] | None:
        return json.loads(self.metadata.get("mean", "null"))

    @property
    def std(self) -> list[float] | None:
        return json.loads(self.metadata.get("std", "null"))

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


def _tensor(
    tensors: dict[str, np.ndarray], node: dict[str, Any], role: str, required: bool = True
) -> np.ndarray | None:
    name = node.get("tensors", {}).get(role)
    if name is None:
        if required:
            raise FormatError(f"node {node['name']!r} ({node['op']}) lacks its {role!r} tensor")
        return None
    if name not in tensors:
        raise FormatError(f"node {node['name']!r} names tensor {name!r}, which the file lacks")
    return tensors[name]


def _compile(node: dict[str, Any], tensors: dict[str, np.ndarray], model: PackedModel) -> _Node:
    op = node["op"]
    a = node.get("attrs", {})
    name = node["name"]
    inputs = list(node.get("inputs", []))
    layer: BinaryConv2d | None = None
    fn: Fn
    if op == "conv2d":
        w = _tensor(tensors, node, "weight")
        bias = _tensor(tensors, node, "bias", required=False)
        st, pa, di, g = (
            _pair(a["stride"]),
            _pair(a["padding"]),
            _pair(a["dilation"]),
            int(a["groups"]),
        )
        fn = lambda xs: ops.conv2d(xs[0], w, bias, st, pa, di, g)  # noqa: E731
    elif op == "bconv2d":
        layer = _binary_layer(node, tensors)
        be = model.backend
        bl = layer
        fn = lambda xs: bl(xs[0], be)  # noqa: E731
    elif op == "batchnorm":
        sc, sh = _tensor(tensors, node, "scale"), _tensor(tensors, node, "shift")
        fn = lambda xs: ops.affine_channels(xs[0], sc, sh)  # noqa: E731
    elif op == "linear":
        w = _tensor(tensors, node, "weight")
        bias = _tensor(tensors, node, "bias", required=False)
        fn = lambda xs: ops.linear(xs[0], w, bias)  # noqa: E731
    elif op == "relu":
        fn = lambda xs: ops.relu(xs[0])  # noqa: E731
    elif op == "clip":
        lo, hi = a["min"], a["max"]
        fn = lambda xs: ops.clip(xs[0], lo, hi)  # noqa: E731
    elif op == "leaky_relu":
        slope = float(a["negative_slope"])
        fn = lambda xs: ops.leaky_relu(xs[0], slope)  # noqa: E731
    elif op in ("sigmoid", "tanh", "silu", "hardswish", "hardsigmoid"):
        f = {
            "sigmoid": ops.sigmoid,
            "tanh": np.tanh,
            "silu": ops.silu,
            "hardswish": ops.hardswish,
            "hardsigmoid": ops.hardsigmoid,
        }[op]
        fn = lambda xs: f(xs[0])  # noqa: E731
    elif op == "maxpool2d":
        k, s, p, d, c = (
            a["kernel_size"],
            a["stride"],
            a["padding"],
            a["dilation"],
            bool(a["ceil_mode"]),
        )
        fn = lambda xs: ops.maxpool2d(xs[0], k, s, p, d, c)  # noqa: E731
    elif op == "avgpool2d":
        k, s, p, c, cip = (
            a["kernel_size"],
            a["stride"],
            a["padding"],
            bool(a["ceil_mode"]),
            bool(a["count_include_pad"]),
        )
        div = a.get("divisor_override")
        fn = lambda xs: ops.avgpool2d(xs[0], k, s, p, c, cip, div)  # noqa: E731
    elif op in ("adaptive_avgpool2d", "adaptive_maxpool2d"):
        size = a["output_size"]
        mode = "avg" if op == "adaptive_avgpool2d" else "max"
        fn = lambda xs: ops.adaptive_pool2d(xs[0], size, mode)  # noqa: E731
    elif op == "flatten":
        s0, e0 = int(a["start_dim"]), int(a["end_dim"])
        fn = lambda xs: ops.flatten(xs[0], s0, e0)  # noqa: E731
    elif op == "mean":
        dims, keep = tuple(a["dims"]), bool(a["keepdim"])
        fn = lambda xs: xs[0].mean(axis=dims, keepdims=keep)  # noqa: E731
    elif op in ("add", "mul"):
        scalar = a.get("scalar")
        ufunc = np.add if op == "add" else np.multiply
        if scalar is None:
            fn = lambda xs: ufunc(xs[0], xs[1])  # noqa: E731
        else:
            fn = lambda xs: ufunc(xs[0], xs[0].dtype.type(scalar))  # noqa: E731
    elif op == "cat":
        dim = int(a["dim"])
        fn = lambda xs: np.concatenate(xs, axis=dim)  # noqa: E731
    elif op == "constant":
        value = _tensor(tensors, node, "value")
        dtype = PRECISIONS[model.precision]
        fn = lambda xs: value.astype(dtype)  # noqa: E731
    else:  # pragma: no cover - check_header rejects unknown ops
        raise FormatError(f"unsupported op {op!r}")
    return _Node(name=name, op=op, inputs=inputs, fn=fn, layer=layer)


def _binary_layer(node: dict[str, Any], tensors: dict[str, np.ndarray]) -> BinaryConv2d:
    a = node["attrs"]
    n = int(a["activation_bases"])
    act = None
    if n > 0:
        packed = np.asarray(_tensor(tensors, node, "act_codes"), dtype=np.uint8)
        if packed.ndim != 2 or packed.shape[1] != (n + 7) // 8:
            raise FormatError(
                f"node {node['name']!r}: act_codes of shape {packed.shape} do not hold {n} planes"
            )
        act = ActivationCode(
            thresholds=_tensor(tensors, node, "act_thresholds"),  # type: ignore[arg-type]
            codes=np.unpackbits(packed, axis=1, count=n, bitorder="little"),
            scales=_tensor(tensors, node, "act_scales"),  # type: ignore[arg-type]
            domain=str(a["activation_domain"]),
        )
    o, cin, groups = int(a["out_channels"]), int(a["in_channels"]), int(a["groups"])
    kh, kw = _pair(a["kernel_size"])
    try:
        return from_tensors(
            weight_planes=_tensor(tensors, node, "weight_planes"),  # type: ignore[arg-type]
            weight_scales=_tensor(tensors, node, "weight_scales"),  # type: ignore[arg-type]
            weight_shape=(o, cin // groups, kh, kw),
            weight_domain=str(a["weight_domain"]),
            bias=_tensor(tensors, node, "bias", required=False),
            act=act,
            stride=_pair(a["stride"]),
            padding=_pair(a["padding"]),
            dilation=_pair(a["dilation"]),
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
