"""What a traced model computes at two batch sizes: the packed writer's static shapes.

``torch.fx`` records ``x.size()``, ``x.shape``, ``x.dim()`` and the arithmetic on them as graph
nodes. The packed format has no shape arithmetic: :func:`record_graph` runs the traced
:class:`~torch.fx.GraphModule` with :class:`torch.fx.Interpreter` on random inputs of the
recorded input size at batch 2 and at batch 3 and keeps, for every node:

* a tensor that depends on the input: its shape and dtype (:class:`TensorInfo`), at both
  batch sizes (the writer reads output shapes, e.g. a reshape's, from them);
* a value without tensors (ints, ``torch.Size``, tuples): the value itself, a *static*
  constant the writer substitutes into the node's users; :attr:`Recording.batch_dependent`
  names those that differ between the two batch sizes (the writer allows them only as a
  reshape's leading dimension);
* a tensor that does not depend on the input (a parameter read with ``get_attr`` and what is
  computed from it alone): the tensor, which the writer stores as a ``constant``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from binarize_cli.core.errors import BadInputError

#: The two batch sizes the graph is run at (dim 0 must follow them).
BATCHES = (2, 3)


@dataclass(frozen=True)
class TensorInfo:
    """The shape and dtype of an input-dependent tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _summary(value: Any) -> Any:
    """``value`` with every tensor replaced by its :class:`TensorInfo`."""
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return [_summary(v) for v in value]
    return value


def has_tensor(value: Any) -> bool:
    """Whether ``value`` is or contains a tensor (or a :class:`TensorInfo`)."""
    if isinstance(value, (torch.Tensor, TensorInfo)):
        return True
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return any(has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(has_tensor(v) for v in value.values())
    return False


@dataclass
class Recording:
    """Every node's value at the two batch sizes (see the module docstring)."""

    #: Nodes whose value depends on the graph input.
    dependent: set[str]
    #: Node name -> value at batch ``BATCHES[0]`` (summaries for dependent tensors).
    values: dict[str, Any]
    #: Node name -> value at batch ``BATCHES[1]``.
    other: dict[str, Any]
    batch_dependent: set[str] = field(default_factory=set)

    def is_static(self, name: str) -> bool:
        """A value without tensors: substituted into its users."""
        return not has_tensor(self.values[name])


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, dependent: set[str]) -> None:
        super().__init__(gm)
        self.dependent = dependent
        self.seen: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.dependent or not isinstance(out, torch.Tensor):
            self.seen[n.name] = _summary(out)
        else:
            self.seen[n.name] = out.detach().clone()
        return out


def _dependent_nodes(gm: fx.GraphModule) -> set[str]:
    dependent: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(i.name in dependent for i in node.all_input_nodes):
            dependent.add(node.name)
    return dependent


def record_graph(gm: fx.GraphModule, input_size: tuple[int, int, int]) -> Recording:
    """Run ``gm`` (eval mode, no grad) on ``N(0, 1)`` inputs ``[b, *input_size]`` for each of
    :data:`BATCHES`; raises :class:`BadInputError` when the model does not run on them."""
    dependent = _dependent_nodes(gm)
    runs = []
    for b in BATCHES:
        x = torch.randn(b, *input_size, generator=torch.Generator().manual_seed(b))
        recorder = _Recorder(gm, dependent)
        try:
            with torch.no_grad():
                recorder.run(x)
        except Exception as exc:  # the model's own code raises anything
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BadInputError(
                f"the model does not run on a [{b}, {', '.join(map(str, input_size))}] input "
                f"({type(exc).__name__}: {first[:160]}); the packed writer runs it to read shapes"
            ) from None
        runs.append(recorder.seen)
    rec = Recording(dependent=dependent, values=runs[0], other=runs[1])
    for name, value in rec.values.items():
        if rec.is_static(name) and value != rec.other[name]:
            rec.batch_dependent.add(name)
    return rec


__all__ = ["BATCHES", "Recording", "TensorInfo", "has_tensor", "record_graph"]
