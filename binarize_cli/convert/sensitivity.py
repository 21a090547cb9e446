"""Per-layer sensitivity: how much the network's output moves when one layer alone is binarized.

Definitions (docs/sensitivity.md). ``x`` are the calibration images (their first
:data:`MAX_IMAGES`), ``y`` their labels, ``z_fp`` the full-precision model's logits on them.
For a binarizable layer ``L`` and a candidate ``c = (M, N)``, ``z_{L,c}`` are the logits of the
model in which ``L`` alone is binarized at ``c``, calibrated as ``convert`` calibrates it:

* weight endpoints from ``L``'s weights (built with :meth:`BinarizedConv2d.from_conv`);
* activation endpoints and levels fitted (``activation_quantizer.calibrate``) on a uniform
  sample of ``L``'s full-precision input (:data:`SAMPLES_PER_LAYER` values, a seeded
  generator; ``convert``'s refinement round changes nothing here: with ``L`` alone binarized,
  its input is the full-precision one);
* the running statistics of every batch norm *downstream* of ``L`` re-estimated on the
  calibration images, as :func:`binarize_cli.convert.calibrate.reestimate_batchnorm` does
  (here in graph order, all images in one batch: each norm takes the mean and unbiased
  variance of the input the already re-estimated model gives it).

``z_fp`` are the logits of the full-precision model with *all* its batch norms re-estimated
the same way, i.e. the model ``convert``'s calibration would give if no layer were
binarized: a candidate's measure then holds ``L``'s effect only, and the full-precision
candidate has error 0 exactly. (The trained model's own logits differ from ``z_fp`` by the
re-estimation alone, the same for every layer and candidate.)

Then, summed over every image and class / averaged over the images::

    output_error(L, c)  = ||z_{L,c} - z_fp||^2 / ||z_fp||^2
    loss_increase(L, c) = CE(z_{L,c}, y) - CE(z_fp, y)

A layer kept full precision (``c = fp``) has both 0. The candidates are
:func:`candidates_for` the scheme (PA: M in {2, 4, 6, 8} x N in {3, 5, 7, 0}; ABC: M in
{1, 3, 5} x N in {1, 3, 5, 0}; single-binary schemes: their default and its N = 0 form), plus
the run's own (M, N). Each candidate also records what it costs, counted by the accounting's
rules (:meth:`BinarizedConv2d.stored_values`, :func:`~binarize_cli.quant.layers.layer_macs`):
its stored ``bits`` (``32 * real + binary``) and ``bops`` (``M * N * MACs``; 0 when N = 0 or
full precision).

Speed: the model is traced once with ``torch.fx`` and every node's full-precision value on the
calibration images is kept; a candidate re-runs only the nodes downstream of ``L`` (twice: the
batch-norm re-estimation, then the measure). The activation quantizer is fitted once per
(L, N) and the weight quantizer built once per (L, M). A model that does not trace is a
one-line :class:`~binarize_cli.core.errors.BadInputError`.

The table is stored with the run as ``sensitivity.json`` (:data:`SENSITIVITY_FILE`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from binarize_cli.convert.graph import try_trace
from binarize_cli.core.errors import BadInputError, BinarizeError, RunDirError
from binarize_cli.core.files import atomic_write_json
from binarize_cli.core.modes import evaluating
from binarize_cli.quant.base import Scheme
from binarize_cli.quant.layers import BinarizedConv2d, layer_macs

#: The file a run keeps its sensitivity table in.
SENSITIVITY_FILE = "sensitivity.json"
SENSITIVITY_FORMAT = "binarize-sensitivity"
SENSITIVITY_VERSION = 1
#: Calibration images the measure uses at most (the first ones).
MAX_IMAGES = 256
#: Input values sampled per layer to fit its activation quantizer (as calibration does).
SAMPLES_PER_LAYER = 200_000
#: Candidate bases per scheme (``M`` values, ``N`` values); 0 = full-precision activations.
CANDIDATE_GRID: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "pa": ((2, 4, 6, 8), (3, 5, 7, 0)),
    "abc": ((1, 3, 5), (1, 3, 5, 0)),
}


def candidates_for(scheme: Scheme, m: int, n: int) -> list[tuple[int, int]]:
    """The candidate (M, N) of ``scheme``: its grid (:data:`CANDIDATE_GRID`; other schemes:
    their default and its N = 0 form) plus the run's ``(m, n)``, each valid for the scheme,
    sorted."""
    ms, ns = CANDIDATE_GRID.get(scheme.name, ((scheme.default_m,), (scheme.default_n, 0)))
    out = {(m, n)}
    for cm in ms:
        for cn in ns:
            try:
                scheme.check(cm, cn)
            except BinarizeError:
                continue
            out.add((cm, cn))
    return sorted(out)


@dataclass
class Candidate:
    """One measured choice for a layer: ``M``/``N`` (both None: full precision), the output
    error and loss increase (module docstring), and its cost: stored ``bits``, ``bops``."""

    M: int | None
    N: int | None
    output_error: float
    loss_increase: float
    bits: int
    bops: int

    @property
    def bases(self) -> tuple[int, int] | None:
        return None if self.M is None or self.N is None else (self.M, self.N)


@dataclass
class LayerSensitivity:
    """A layer's candidates, full precision first; ``macs`` per image (the accounting's)."""

    name: str
    macs: int
    candidates: list[Candidate]

    def at(self, bases: Sequence[int] | None) -> Candidate | None:
        """The candidate at ``bases`` (``None``: full precision), if measured."""
        key = None if bases is None else tuple(bases)
        return next((c for c in self.candidates if c.bases == key), None)


@dataclass
class SensitivityTable:
    """The measured table of a model (module docstring); ``fp_loss``: the full-precision
    cross entropy on the images; ``seconds``: how long the measure took."""

    scheme: str
    images: int
    fp_loss: float
    seconds: float
    layers: list[LayerSensitivity] = field(default_factory=list)

    def layer(self, name: str) -> LayerSensitivity | None:
        return next((r for r in self.layers if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The ``sensitivity.json`` mapping."""
        return {
            "format": SENSITIVITY_FORMAT,
            "format_version": SENSITIVITY_VERSION,
            "scheme": self.scheme,
            "images": self.images,
            "fp_loss": self.fp_loss,
            "seconds": self.seconds,
            "layers": {
                r.name: {"macs": r.macs, "candidates": [asdict(c) for c in r.candidates]}
                for r in self.layers
            },
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = SENSITIVITY_FILE) -> SensitivityTable:
        try:
            if data.get("format") != SENSITIVITY_FORMAT:
                raise ValueError("not a sensitivity table")
            return cls(
                scheme=str(data["scheme"]),
                images=int(data["images"]),
                fp_loss=float(data["fp_loss"]),
                seconds=float(data["seconds"]),
                layers=[
                    LayerSensitivity(
                        name, int(r["macs"]), [Candidate(**c) for c in r["candidates"]]
                    )
                    for name, r in data["layers"].items()
                ],
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise RunDirError(
                f"{source} is not a sensitivity table ({type(exc).__name__}); rerun `binarize convert`"
            ) from None

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    def save(self, path: str | Path) -> Path:
        """Write atomically into a run directory (or to the file path given)."""
        p = Path(path)
        target = p / SENSITIVITY_FILE if p.is_dir() else p
        atomic_write_json(target, self.to_dict())
        return target

    @classmethod
    def load(cls, run_dir: str | Path) -> SensitivityTable | None:
        """A run's table, or ``None`` when the run has none."""
        path = Path(run_dir) / SENSITIVITY_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunDirError(
                f"{path} is unreadable or not JSON ({type(exc).__name__}); rerun `binarize convert`"
            ) from None
        return cls.from_dict(data, str(path))


# --------------------------------------------------------------------------- measuring


def _node_values(node_args: Any, env: Mapping[fx.Node, Any]) -> Any:
    return fx.node.map_arg(node_args, lambda n: env[n])


def _run_node(gm: fx.GraphModule, node: fx.Node, env: Mapping[fx.Node, Any], swap: Any) -> Any:
    """One node of ``gm`` on the values in ``env`` (``swap``: the module called instead of the
    node's own, or None)."""
    args = _node_values(node.args, env)
    kwargs = _node_values(node.kwargs, env)
    if node.op == "call_module":
        module = swap if swap is not None else gm.get_submodule(str(node.target))
        return module(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        obj, *rest = args
        return getattr(obj, str(node.target))(*rest, **kwargs)
    if node.op == "get_attr":
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    if node.op == "output":
        return args[0]
    raise ValueError(f"unexpected fx node {node.op}")


class _Graph:
    """The traced model, its full-precision node values per batch, and suffix replays."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        gm, error = try_trace(model)
        if gm is None:
            raise BadInputError(
                f"per-layer sensitivity needs a model that traces with torch.fx ({error}); "
                "use --policy uniform"
            )
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.output = next(n for n in self.nodes if n.op == "output")
        self.env: dict[fx.Node, Any] = {}
        handles = _reestimating(_norms_in(gm, self.nodes))
        try:
            for node in self.nodes:
                self.env[node] = (
                    images if node.op == "placeholder" else _run_node(gm, node, self.env, None)
                )
        finally:
            for handle in handles:
                handle.remove()

    def calls(self, name: str) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "call_module" and str(n.target) == name]

    def downstream(self, starts: list[fx.Node]) -> list[fx.Node]:
        """``starts`` and every node that depends on them, in graph order."""
        hit = set(starts)
        for node in self.nodes:
            if node not in hit and any(a in hit for a in node.all_input_nodes):
                hit.add(node)
        return [n for n in self.nodes if n in hit]

    def replay(self, suffix: list[fx.Node], layer: str, module: nn.Module) -> torch.Tensor:
        """The logits with ``suffix`` re-run (``layer`` calls ``module``)."""
        local = dict(self.env)
        for node in suffix:
            swap = module if node.op == "call_module" and str(node.target) == layer else None
            local[node] = _run_node(self.gm, node, local, swap)
        return local[self.output]


def _norms_in(gm: fx.GraphModule, suffix: list[fx.Node]) -> list[nn.Module]:
    """The batch norms the suffix runs (inside called modules too), each once."""
    found: dict[int, nn.Module] = {}
    for node in suffix:
        if node.op == "call_module":
            for m in gm.get_submodule(str(node.target)).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    found.setdefault(id(m), m)
    return list(found.values())


def _reestimating(norms: list[nn.Module]) -> list[Any]:
    """Forward pre-hooks that set each batch norm's running statistics to those of its
    input (the cumulative average over the calibration images, all in one batch) before it
    normalises in eval mode."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        module.running_mean.copy_(x.mean(dims))  # type: ignore[operator]
        module.running_var.copy_(x.var(dims, unbiased=True))  # type: ignore[operator]

    return [m.register_forward_pre_hook(hook) for m in norms]


def _measure(
    graph: _Graph,
    suffix: list[fx.Node],
    layer: str,
    module: nn.Module,
    norms: list[nn.Module],
) -> torch.Tensor:
    """The logits with ``module`` in place of ``layer`` and the suffix's batch norms
    re-estimated in graph order; their statistics are restored afterwards."""
    saved = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    handles = _reestimating(norms)
    with _restoring(saved):
        try:
            return graph.replay(suffix, layer, module)
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _restoring(saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> Iterator[None]:
    """Put each module's saved state back on exit."""
    try:
        yield
    finally:
        for m, state in saved:
            m.load_state_dict(state)


def _input_sample(graph: _Graph, calls: list[fx.Node], count: int, seed: int) -> torch.Tensor:
    """A uniform sample of the layer's full-precision inputs over all batches."""
    generator = torch.Generator().manual_seed(seed)
    per_call = max(1, count // len(calls))
    parts: list[torch.Tensor] = []
    for call in calls:
        flat = _node_values(call.args, graph.env)[0].detach().reshape(-1).float().cpu()
        if flat.numel() > per_call:
            flat = flat[torch.randint(flat.numel(), (per_call,), generator=generator)]
        parts.append(flat)
    return torch.cat(parts)


def _errors(
    z: torch.Tensor, z_fp: torch.Tensor, labels: torch.Tensor, fp_loss: float
) -> tuple[float, float]:
    z, z_fp = z.double(), z_fp.double()
    denom = float((z_fp**2).sum()) or 1.0
    error = float(((z - z_fp) ** 2).sum()) / denom
    loss = float(F.cross_entropy(z, labels))
    return error, loss - fp_loss


def measure_sensitivity(
    model: nn.Module,
    layers: Iterable[str],
    scheme: Scheme,
    m: int,
    n: int,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    max_images: int = MAX_IMAGES,
    progress: Callable[[int, int, str], None] | None = None,
) -> SensitivityTable:
    """Measure every named layer of the full-precision ``model`` at every candidate
    (:func:`candidates_for` ``scheme``, ``(m, n)``) on ``batches`` of ``(images, labels)``
    (their first ``max_images`` images); see the module docstring for the definitions.

    ``model`` is left as it was (its batch-norm statistics are restored after each
    candidate); the global torch RNG is not consumed. ``progress(done, total, layer)`` is
    called after each layer.

    Raises:
        BadInputError: a model that does not trace, a name that is no ``nn.Conv2d`` the graph
            calls, no images.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    left = max_images
    for x, y in batches:
        if left <= 0:
            break
        images.append(x[:left].to(device))
        labels.append(y[:left])
        left -= int(images[-1].shape[0])
    if not images:
        raise BadInputError("per-layer sensitivity needs at least one calibration batch")
    names = list(layers)
    grid = candidates_for(scheme, m, n)
    opts = dict(options or {})
    table = SensitivityTable(scheme.name, sum(int(x.shape[0]) for x in images), 0.0, 0.0)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    with torch.random.fork_rng(devices=[]), evaluating(model), _restoring(saved):
        graph = _Graph(model, torch.cat(images))
        fp_out = graph.env[graph.output]
        target = torch.cat(labels).to(device)
        table.fp_loss = float(F.cross_entropy(fp_out.double(), target))
        for index, name in enumerate(names):
            table.layers.append(
                _layer_table(graph, name, grid, scheme, opts, seed, fp_out, target, table.fp_loss)
            )
            if progress is not None:
                progress(index + 1, len(names), name)
    table.seconds = time.perf_counter() - start
    return table


def _layer_table(
    graph: _Graph,
    name: str,
    grid: list[tuple[int, int]],
    scheme: Scheme,
    options: dict[str, Any],
    seed: int,
    fp_out: torch.Tensor,
    labels: torch.Tensor,
    fp_loss: float,
) -> LayerSensitivity:
    """One layer's candidates (full precision first, then ``grid``)."""
    calls = graph.calls(name)
    conv = graph.gm.get_submodule(name) if calls else None
    if not isinstance(conv, nn.Conv2d) or isinstance(conv, BinarizedConv2d):
        raise BadInputError(f"layer {name!r} is no full-precision nn.Conv2d the model calls")
    env = graph.env
    macs = sum(layer_macs(conv, _node_values(c.args, env)[0], env[c]) for c in calls)
    fp_params = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    rows = [Candidate(None, None, 0.0, 0.0, 32 * fp_params, 0)]
    suffix = graph.downstream(calls)
    norms = _norms_in(graph.gm, suffix)
    sample = _input_sample(graph, calls, SAMPLES_PER_LAYER, seed)
    acts: dict[int, nn.Module] = {}
    weights: dict[int, BinarizedConv2d] = {}
    for cm, cn in grid:
        if cn not in acts:
            act = scheme.activation_quantizer(cn, options)
            if cn > 0:
                act.calibrate(sample.to(conv.weight.device))
            acts[cn] = act.to(conv.weight.device).eval()
        if cm not in weights:
            weights[cm] = BinarizedConv2d.from_conv(conv, scheme, cm, 0, options).eval()
        layer = weights[cm]
        layer.activation_quantizer = acts[cn]
        error, loss = _errors(_measure(graph, suffix, name, layer, norms), fp_out, labels, fp_loss)
        real, binary = layer.stored_values()
        bits = 32 * (real + layer.gate_values()) + binary  # a gate is the layer's memory too
        rows.append(Candidate(cm, cn, error, loss, bits, cm * cn * macs))
        if not math.isfinite(error):
            raise BadInputError(f"the sensitivity of {name!r} at M={cm} N={cn} is not finite")
    return LayerSensitivity(name, macs, rows)
