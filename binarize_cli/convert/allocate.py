"""Budgeted allocation (``convert --policy auto``): per-layer bases from the measured sensitivity.

Given a :class:`~binarize_cli.convert.sensitivity.SensitivityTable` (for every layer the
policy binarizes, each candidate's measured output error and its cost), choose one candidate
per layer, ``(M, N)`` or full precision, to

    minimise   sum_L output_error(L, c_L)
    subject to memory(c) <= budget_bits   and/or   ops(c) <= budget_ops

The summed single-layer errors stand for the error of the whole choice (errors of
independent perturbations add to first order; docs/sensitivity.md).

Costs are the accounting's (:mod:`binarize_cli.analyze.profile`, paper 4.6.1), from the
candidates' own counts (:meth:`BinarizedConv2d.stored_values`):

* ``memory(c) = fixed_bits + sum_L bits(L, c_L)``: ``fixed_bits`` is everything else the
  model stores (32 bits per parameter of the layers not allocated), so ``memory`` is exactly
  the ``memory_bits`` that ``binarize report`` prints for the converted model;
* ``ops(c) = sum_L ops(L, c_L)`` with ``ops = M * N * MACs`` (the BOPs) for a binarized layer
  and ``64 * MACs`` for a layer whose activations stay real (``N = 0``, or full precision):
  one real MAC costs what 64 bitwise operations do (the FLOPs rule, ``flops = real_macs +
  bops / 64``), so a compute budget cannot be met by making activations real. ``ops / 64``
  is the allocated layers' share of ``report``'s FLOPs, except a channel gate's (Real-to-Bin)
  real MACs, which ``ops`` leaves out (a gate's parameters are in ``bits``).

The rule is a greedy ascent on the multiple-choice knapsack: every layer starts at its
cheapest allowed candidate (normalised cost ``bits / budget_bits + ops / budget_ops``, then
the smaller error); then, while some move lowers the summed error and keeps every budget, the
move with the largest error decrease per normalised cost increase is made (a move that costs
nothing is taken first). Which candidates are allowed:

* with only a memory budget, a binarized layer keeps ``1 <= N <= -N`` (a memory budget alone
  does not make activations real: they cost no memory); a layer may still be kept full
  precision, since its 32-bit weights are charged to the memory budget;
* with a compute budget (alone or with the memory one), every candidate;
* ``auto`` without a budget: both budgets set to the uniform configuration's memory and ops.

Layers the recipe's ``[layers]`` table pins keep their pinned choice (their cost counts).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from binarize_cli.convert.sensitivity import Candidate, LayerSensitivity, SensitivityTable
from binarize_cli.core.errors import BadInputError
from binarize_cli.quant.base import Scheme

#: Real MACs count this many bitwise operations each (64-bit words, paper 4.6.1).
OPS_PER_REAL_MAC = 64
METHOD = "greedy"


def candidate_ops(layer: LayerSensitivity, c: Candidate) -> int:
    """``M * N * MACs`` for a binarized candidate with ``N >= 1``, else ``64 * MACs``."""
    if c.M is None or not c.N:
        return OPS_PER_REAL_MAC * layer.macs
    return c.bops


@dataclass
class Allocation:
    """The chosen table and what it costs (``binarize.json``'s ``allocation`` record).

    Attributes:
        layer_bases: each allocated layer's ``[M, N]``, or ``None`` for full precision.
        memory_bits: predicted ``report`` memory of the converted model.
        ops: the allocated layers' ops (module docstring).
        error: the summed measured output error of the choice.
        budget_bits, budget_ops: the budgets applied (``None``: not constrained).
        uniform_bits, uniform_ops, uniform_error: the same for the uniform configuration.
    """

    layer_bases: dict[str, list[int] | None]
    memory_bits: int
    ops: int
    error: float
    budget_bits: float | None
    budget_ops: float | None
    uniform_bits: int
    uniform_ops: int
    uniform_error: float
    method: str = METHOD

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["layer_bases"]  # binarize.json has them as ``layer_bases``
        return {"policy": "auto", **d}


def _allowed(
    c: Candidate, only_memory: bool, uniform_n: int, pinned: tuple[bool, list[int] | None]
) -> bool:
    is_pinned, choice = pinned
    if is_pinned:
        return (c.bases is None and choice is None) or (
            choice is not None and c.bases == tuple(choice)
        )
    if c.M is None or not only_memory or uniform_n == 0:
        return True
    return c.N is not None and 1 <= c.N <= uniform_n


def allocate(
    table: SensitivityTable,
    uniform: Mapping[str, list[int] | None],
    *,
    fixed_bits: int,
    budget_mbit: float | None = None,
    budget_bops: float | None = None,
    uniform_n: int,
    pinned: Mapping[str, list[int] | None] | None = None,
) -> Allocation:
    """Choose per-layer bases within the budgets (module docstring).

    Args:
        table: the measured candidates of every allocated layer.
        uniform: the uniform configuration's table (surgery's ``layer_bases`` at ``-M``,
            ``-N`` with the recipe's pins): the reference for ``auto`` without a budget.
        fixed_bits: the memory of everything not allocated (module docstring).
        budget_mbit, budget_bops: the budgets (megabits, bitwise operations per image).
        uniform_n: ``-N``, the cap on a binarized layer's N under a memory budget alone.
        pinned: layers the recipe pins, with their choice.

    Raises:
        BadInputError: a budget below the cheapest allowed configuration, or a uniform
            choice the table did not measure.
    """
    pinned = dict(pinned or {})
    layers = [table.layer(name) for name in uniform]
    if any(r is None for r in layers):
        missing = [n for n, r in zip(uniform, layers, strict=True) if r is None]
        raise BadInputError(f"no sensitivity measured for {missing[0]!r}")
    rows: list[LayerSensitivity] = [r for r in layers if r is not None]
    start: list[Candidate] = []
    for row in rows:
        c = row.at(uniform[row.name])
        if c is None:
            raise BadInputError(f"no sensitivity measured for {row.name!r} at its uniform bases")
        start.append(c)
    uniform_bits = fixed_bits + sum(c.bits for c in start)
    uniform_ops = sum(candidate_ops(r, c) for r, c in zip(rows, start, strict=True))
    uniform_error = sum(c.output_error for c in start)
    if budget_mbit is None and budget_bops is None:
        budget_bits: float | None = float(uniform_bits)
        budget_ops: float | None = float(uniform_ops)
    else:
        budget_bits = None if budget_mbit is None else budget_mbit * 1e6
        budget_ops = budget_bops
    only_memory = budget_ops is None

    def norm(r: LayerSensitivity, c: Candidate) -> float:
        total = 0.0
        if budget_bits is not None:
            total += c.bits / max(budget_bits, 1.0)
        if budget_ops is not None:
            total += candidate_ops(r, c) / max(budget_ops, 1.0)
        return total

    options = [
        [
            c
            for c in r.candidates
            if _allowed(c, only_memory, uniform_n, (r.name in pinned, pinned.get(r.name)))
        ]
        for r in rows
    ]
    choice = [
        min(opts, key=lambda c, r=r: (norm(r, c), c.output_error))
        for r, opts in zip(rows, options, strict=True)
    ]

    def totals(chosen: list[Candidate]) -> tuple[int, int]:
        bits = fixed_bits + sum(c.bits for c in chosen)
        ops = sum(candidate_ops(r, c) for r, c in zip(rows, chosen, strict=True))
        return bits, ops

    def fits(bits: int, ops: int) -> bool:
        return (budget_bits is None or bits <= budget_bits) and (
            budget_ops is None or ops <= budget_ops
        )

    bits, ops = totals(choice)
    if not fits(bits, ops):
        raise BadInputError(
            f"the budget ({_budget_text(budget_bits, budget_ops)}) is below the cheapest "
            f"configuration ({bits / 1e6:.4g} Mbit, {ops:.3g} ops); raise it"
        )
    while True:
        best: tuple[float, int, Candidate] | None = None
        for i, (r, opts) in enumerate(zip(rows, options, strict=True)):
            current = choice[i]
            for c in opts:
                gain = current.output_error - c.output_error
                if gain <= 0:
                    continue
                new_bits = bits - current.bits + c.bits
                new_ops = ops - candidate_ops(r, current) + candidate_ops(r, c)
                if not fits(new_bits, new_ops):
                    continue
                extra = norm(r, c) - norm(r, current)
                ratio = math.inf if extra <= 0 else gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, i, c)
        if best is None:
            break
        _, i, c = best
        r = rows[i]
        bits += c.bits - choice[i].bits
        ops += candidate_ops(r, c) - candidate_ops(r, choice[i])
        choice[i] = c
    return Allocation(
        layer_bases={
            r.name: None if c.bases is None else list(c.bases)
            for r, c in zip(rows, choice, strict=True)
        },
        memory_bits=bits,
        ops=ops,
        error=sum(c.output_error for c in choice),
        budget_bits=budget_bits,
        budget_ops=budget_ops,
        uniform_bits=uniform_bits,
        uniform_ops=uniform_ops,
        uniform_error=uniform_error,
    )


def choose_bases(
    model: nn.Module,
    scheme: Scheme,
    m: int,
    n: int,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    auto: bool = True,
    keep: Sequence[str] = (),
    first_conv: str | Sequence[str] | None = None,
    classifier: str | Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
    layer_rules: Mapping[str, Any] | None = None,
    budget_mbit: float | None = None,
    budget_bops: float | None = None,
    seed: int = 0,
    on_measured: Callable[[SensitivityTable], None] | None = None,
) -> tuple[SensitivityTable, Allocation | None]:
    """Measure the sensitivity of every layer the policy binarizes in the full-precision
    ``model`` (at ``-M m -N n`` with ``keep`` and the ``layer_rules`` pins) on ``batches`` of
    ``(images, labels)``, then, with ``auto``, :func:`allocate` their bases. The one path
    ``convert --policy auto`` and :func:`binarize_cli.api.binarize` share; ``model`` is
    left as it was and no global RNG is consumed. ``on_measured`` is called with the table
    before the allocation (progress reporting)."""
    from binarize_cli.convert.sensitivity import measure_sensitivity
    from binarize_cli.convert.surgery import binarize_model, compiled_rules

    with torch.random.fork_rng(devices=[]):
        uniform = binarize_model(
            copy.deepcopy(model),
            scheme,
            m,
            n,
            keep=tuple(keep),
            first_conv=first_conv,
            classifier=classifier,
            options=dict(options or {}),
            layer_rules=dict(layer_rules or {}),
        ).layer_bases
    names = list(uniform)
    table = measure_sensitivity(
        model, names, scheme, m, n, batches, options=dict(options or {}), seed=seed
    )
    if on_measured is not None:
        on_measured(table)
    if not auto:
        return table, None
    rules = compiled_rules(dict(layer_rules or {}), scheme)
    pinned = {name: uniform[name] for name in names if any(r[1].search(name) for r in rules)}
    allocation = allocate(
        table,
        uniform,
        fixed_bits=fixed_bits(model, table, names),
        budget_mbit=budget_mbit,
        budget_bops=budget_bops,
        uniform_n=n,
        pinned=pinned,
    )
    return table, allocation


def fixed_bits(model: Any, table: SensitivityTable, names: list[str]) -> int:
    """The memory of everything ``names`` leaves out: 32 bits per parameter of the
    full-precision ``model`` (as ``report`` counts a full-precision layer) minus the named
    layers' own full-precision bits (their full-precision candidate)."""
    total = 32 * sum(p.numel() for p in model.parameters())
    for name in names:
        row = table.layer(name)
        fp = None if row is None else row.at(None)
        if fp is None:
            raise BadInputError(f"no sensitivity measured for {name!r}")
        total -= fp.bits
    return total


def _budget_text(bits: float | None, ops: float | None) -> str:
    parts = []
    if bits is not None:
        parts.append(f"{bits / 1e6:.4g} Mbit")
    if ops is not None:
        parts.append(f"{ops:.3g} ops")
    return ", ".join(parts)
