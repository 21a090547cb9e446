"""torch.fx tracing and graph analysis used by graph surgery.

Three jobs, each a pure function of a model:

* :func:`trace_model` / :func:`try_trace`: ``symbolic_trace`` with a tracer that treats as
  leaves every convolution and linear layer (so they appear as ``call_module`` nodes, whatever
  their ``forward``), :class:`~binarize_cli.quant.layers.BinarizedConv2d`, and every module timm
  registered as untraceable (``timm.layers.register_notrace_module``: ``Conv2dSame``,
  ``BatchNormAct2d``, VGG's ``ConvMlp`` with its shape-dependent branch, ...); timm's
  ``register_notrace_function`` functions are auto-wrapped. This is exactly the tracer setup
  timm's own ``create_feature_extractor`` uses. Failure returns ``None`` (never raises):
  models with data-dependent control flow fall back to name heuristics in surgery.
* :func:`shortcut_convs`: the structural definition of a downsample convolution (below).
* :func:`execution_order` (forward hooks; any model) and :func:`graph_order` (a traced graph):
  the order weight layers run in, to find the first convolution and the classifier when no
  ``pretrained_cfg`` names them.

Downsample (shortcut) convolutions, structurally. A weight layer ``c`` is on the shortcut of a
residual addition ``add(a, b)`` when

1. ``c``'s output reaches the addition through single-use, single-input ops only (batch norm,
   activation, pooling, identity): nothing else consumes it;
2. walking back from ``c``'s input through single-input ops (e.g. the average pool of a
   ResNet-D shortcut) reaches a *fork* ``F`` (a node with two or more users) before any
   weight layer; and
3. the addition's other operand depends on ``F`` through at least one weight layer: the
   main branch, which starts at the same fork and does the block's real work.

The third condition tells the shortcut (``downsample.0``) from the main branch's last
convolution (``conv2``, which fails the second: ``conv1`` precedes it), and from a convolution
whose output also feeds the next block (MobileNetV2's projection, which fails the first).
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable

import torch
from torch import fx, nn

from binarize_cli.core.modes import evaluating

#: Functions and methods that merge two branches of a residual block.
_ADD_FUNCTIONS: frozenset[Callable[..., object]] = frozenset(
    {operator.add, operator.iadd, torch.add}
)
_ADD_METHODS = frozenset({"add", "add_"})
_WEIGHT_FUNCTIONS: frozenset[Callable[..., object]] = frozenset(
    {
        torch.nn.functional.conv1d,
        torch.nn.functional.conv2d,
        torch.nn.functional.conv3d,
        torch.nn.functional.conv_transpose1d,
        torch.nn.functional.conv_transpose2d,
        torch.nn.functional.conv_transpose3d,
        torch.nn.functional.linear,
        torch.conv2d,
    }
)


def _timm_notrace() -> tuple[tuple[type[nn.Module], ...], tuple[Callable[..., object], ...]]:
    """timm's registered untraceable modules and functions (empty without timm)."""
    try:
        import timm.models  # noqa: F401  (importing the models registers their leaves)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency
        return (), ()
    modules = tuple(m for m in get_notrace_modules() if isinstance(m, type))
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return modules, functions


class LayerTracer(fx.Tracer):
    """An fx tracer whose leaves are the layers surgery cares about plus timm's untraceables.

    Leaves: ``leaf_types`` (default :class:`BinarizedConv2d`), every ``_ConvNd`` and
    ``nn.Linear`` (subclasses included, e.g. timm's ``StdConv2d``), timm's
    ``register_notrace_module`` classes, and torch's own ``torch.nn`` modules (fx's default).
    """

    def __init__(self, leaf_types: tuple[type[nn.Module], ...] = ()) -> None:
        timm_modules, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types: tuple[type[nn.Module], ...] = (
            *leaf_types,
            *timm_modules,
            nn.modules.conv._ConvNd,
            nn.Linear,
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _default_leaf_types() -> tuple[type[nn.Module], ...]:
    from binarize_cli.quant.layers import BinarizedConv2d

    return (BinarizedConv2d,)


def try_trace(
    model: nn.Module, leaf_types: tuple[type[nn.Module], ...] | None = None
) -> tuple[fx.GraphModule | None, str | None]:
    """Trace ``model``; returns ``(graph_module, None)`` or ``(None, one-line reason)``.

    The model is not modified. Tracing is symbolic: no forward pass runs.
    """
    tracer = LayerTracer(_default_leaf_types() if leaf_types is None else leaf_types)
    try:
        graph = tracer.trace(model)
        name = type(model).__name__
        return fx.GraphModule(tracer.root, graph, name), None
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return None, f"{type(exc).__name__}: {first_line}"[:200]


def trace_model(
    model: nn.Module, leaf_types: tuple[type[nn.Module], ...] | None = None
) -> fx.GraphModule | None:
    """``torch.fx`` trace of ``model`` with :class:`LayerTracer`, or ``None`` if it does not
    trace (data-dependent control flow, unsupported ops). Never raises."""
    return try_trace(model, leaf_types)[0]


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """A node's tensor-ish inputs: graph nodes other than attribute fetches."""
    return [n for n in node.all_input_nodes if n.op != "get_attr"]


def _is_weight_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A node that multiplies by a learned weight matrix or kernel (conv, linear, ...)."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return module is not None and any(p.dim() >= 2 for p in module.parameters())
    if node.op == "call_function":
        return node.target in _WEIGHT_FUNCTIONS
    return False


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(_data_inputs(node)) >= 2
    if node.op == "call_method" and node.target in _ADD_METHODS:
        return len(_data_inputs(node)) >= 2
    return False


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A single-input op that is not a weight layer (norm, activation, pool, identity...)."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    return len(_data_inputs(node)) == 1 and not _is_weight_layer(node, modules)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen = {node}
    todo = deque([node])
    while todo:
        for parent in todo.popleft().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _descendants_within(node: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
    seen = {node}
    todo = deque([node])
    while todo:
        for child in todo.popleft().users:
            if child in allowed and child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _shortcut_target(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """Condition 1: the addition ``node``'s output reaches through an exclusive path."""
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None
        user = users[0]
        if _is_add(user):
            return user
        if not _is_passthrough(user, modules):
            return None
        current = user


def _fork_before(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """Condition 2: the fork reached walking back from the weight layer's input."""
    inputs = _data_inputs(node)
    if len(inputs) != 1:
        return None
    current = inputs[0]
    while True:
        if len(current.users) >= 2:
            return current
        if not _is_passthrough(current, modules):
            return None
        current = _data_inputs(current)[0]


def shortcut_convs(gm: fx.GraphModule) -> set[str]:
    """Qualified names of the weight layers on the shortcut branch of a residual addition.

    See the module docstring for the three conditions. Only ``call_module`` nodes are named
    (a functional ``F.conv2d`` has no module to swap).
    """
    modules = dict(gm.named_modules())
    found: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_weight_layer(node, modules):
            continue
        add = _shortcut_target(node, modules)
        if add is None:
            continue
        fork = _fork_before(node, modules)
        if fork is None:
            continue
        own_branch = _ancestors(node)
        for other in _data_inputs(add):
            if other in own_branch or node in _ancestors(other):
                continue
            main = _descendants_within(fork, _ancestors(other))
            if any(_is_weight_layer(n, modules) for n in main if n is not fork):
                found.add(str(node.target))
                break
    return found


def graph_order(gm: fx.GraphModule) -> list[str]:
    """Qualified names of ``call_module`` nodes in graph (execution) order, first use only."""
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            seen.setdefault(str(node.target), None)
    return list(seen)


def _has_own_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def execution_order(
    model: nn.Module,
    example_input: torch.Tensor,
    types: tuple[type[nn.Module], ...] | None = None,
) -> list[str]:
    """Qualified names of modules in the order their ``forward`` first ran on ``example_input``.

    Works for any model (forward hooks, no tracing). By default it records every module that
    owns a weight of rank >= 2 (convolutions, linear layers, ...); ``types`` restricts it. The
    forward runs in eval mode under ``torch.no_grad``; the training flag is restored and the
    hooks are removed afterwards, also when the forward raises (the exception propagates).
    """
    order: dict[str, None] = {}
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, _output: object) -> None:
            order.setdefault(name, None)

        return hook

    for name, module in model.named_modules():
        wanted = isinstance(module, types) if types is not None else _has_own_weight(module)
        if wanted and name:
            handles.append(module.register_forward_hook(make_hook(name)))
    with evaluating(model, hooks=handles):
        model(example_input)
    return list(order)
