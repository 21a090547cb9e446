"""Budgeted allocation: the greedy choice on synthetic tables, and its memory prediction equal
to what `report` counts on the converted model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from binarize_cli.analyze.profile import profile_model
from binarize_cli.convert.allocate import allocate, candidate_ops, fixed_bits
from binarize_cli.convert.sensitivity import (
    Candidate,
    LayerSensitivity,
    SensitivityTable,
    measure_sensitivity,
)
from binarize_cli.convert.surgery import binarize_model
from binarize_cli.core.errors import BadInputError
from binarize_cli.quant import get_scheme


def layer(name: str, weights: int, macs: int, errors: dict) -> LayerSensitivity:
    """A synthetic layer: bits as PA counts them (M per weight, M scales, 2N act params)."""
    rows = [Candidate(None, None, 0.0, 0.0, 32 * weights, 0)]
    for (m, n), err in errors.items():
        rows.append(Candidate(m, n, err, err, m * weights + 32 * (m + 2 * n), m * n * macs))
    return LayerSensitivity(name, macs, rows)


GRID = [(2, 3), (2, 5), (4, 3), (4, 5), (8, 5), (4, 0)]


def table() -> SensitivityTable:
    # "big": a large, insensitive layer; "shortcut": a small layer that amplifies its error
    big = layer("big", 100_000, 1_000_000, {b: 0.01 / b[0] for b in GRID})
    shortcut = layer("shortcut", 2_000, 50_000, {b: 2.0 / b[0] for b in GRID})
    mid = layer("mid", 20_000, 400_000, {b: 0.2 / (b[0] * max(b[1], 1)) for b in GRID})
    return SensitivityTable("pa", 64, 2.0, 1.0, [big, shortcut, mid])


UNIFORM = {"big": [4, 5], "shortcut": [4, 5], "mid": [4, 5]}


def uniform_bits(t: SensitivityTable) -> int:
    return sum(t.layer(n).at(b).bits for n, b in UNIFORM.items())


def test_memory_budget_spends_bits_where_the_error_is() -> None:
    t = table()
    budget = uniform_bits(t)
    result = allocate(t, UNIFORM, fixed_bits=0, budget_mbit=budget / 1e6, uniform_n=5)
    assert result.memory_bits <= budget
    assert result.layer_bases["shortcut"] is None  # full precision: 64 kbit buys 1.0 -> 0
    assert result.layer_bases["big"][0] == 2  # paid for by the insensitive layer
    assert result.error < result.uniform_error
    # a memory budget alone keeps binarized activations at 1 <= N <= -N
    assert all(b is None or 1 <= b[1] <= 5 for b in result.layer_bases.values())
    assert result.budget_ops is None and result.method == "greedy"


def test_compute_budget_allows_real_activations_at_64_ops_per_mac() -> None:
    t = table()
    mid = t.layer("mid")
    assert candidate_ops(mid, mid.at((4, 0))) == 64 * mid.macs == candidate_ops(mid, mid.at(None))
    assert candidate_ops(mid, mid.at((4, 5))) == 20 * mid.macs
    ops_cap = 21 * sum(r.macs for r in t.layers)
    result = allocate(t, UNIFORM, fixed_bits=0, budget_bops=ops_cap, uniform_n=5)
    assert result.ops <= ops_cap and result.budget_bits is None
    # no memory limit: the sensitive small layer goes full precision (3.2e6 ops), the big
    # insensitive one pays for it
    assert result.layer_bases["shortcut"] is None and result.layer_bases["big"][0] == 2
    assert result.error < result.uniform_error


def test_auto_without_budget_spends_at_most_the_uniform_memory_and_ops() -> None:
    t = table()
    result = allocate(t, UNIFORM, fixed_bits=1000, uniform_n=5)
    assert result.budget_bits == result.uniform_bits == 1000 + uniform_bits(t)
    assert result.memory_bits <= result.uniform_bits and result.ops <= result.uniform_ops
    assert result.error <= result.uniform_error


def test_pins_and_budget_errors() -> None:
    t = table()
    pinned = {"shortcut": [2, 3]}
    result = allocate(t, UNIFORM, fixed_bits=0, budget_mbit=1.0, uniform_n=5, pinned=pinned)
    assert result.layer_bases["shortcut"] == [2, 3]
    with pytest.raises(BadInputError, match="below the cheapest configuration"):
        allocate(t, UNIFORM, fixed_bits=0, budget_mbit=0.01, uniform_n=5)


def test_predicted_memory_is_what_report_counts() -> None:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 16, 16), num_classes=10).eval()
    names = {"first_conv": "conv1", "classifier": "fc"}
    uniform = binarize_model(copy.deepcopy(model), "pa", 4, 5, **names).layer_bases
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]
    t = measure_sensitivity(model, list(uniform), get_scheme("pa"), 4, 5, data)
    base = fixed_bits(model, t, list(uniform))
    budget = base + sum(t.layer(n).at(b).bits for n, b in uniform.items())
    result = allocate(t, uniform, fixed_bits=base, budget_mbit=budget / 1e6, uniform_n=5)
    assert result.memory_bits <= budget
    converted = binarize_model(model, "pa", 4, 5, layer_bases=result.layer_bases, **names)
    profile = profile_model(converted.model, (3, 16, 16))
    assert profile.memory_bits == result.memory_bits <= result.uniform_bits == budget
    assert result.layer_bases != uniform  # it moved bases around
    real = sum(t.layer(n).macs for n, b in result.layer_bases.items() if b is None or b[1] == 0)
    assert result.ops == profile.bops + 64 * real
    assert isinstance(converted.model.fc, nn.Linear)


def test_predicted_memory_counts_realtobin_gates() -> None:
    """A Real-to-Bin layer's gate is stored too: the allocation's predicted memory is what
    ``report`` counts (gate rows included), so an ``auto`` run stays within its budget."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 16, 16), num_classes=10).eval()
    names = {"first_conv": "conv1", "classifier": "fc"}
    uniform_model = binarize_model(copy.deepcopy(model), "realtobin", 1, 1, **names)
    uniform = uniform_model.layer_bases
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]
    t = measure_sensitivity(model, list(uniform), get_scheme("realtobin"), 1, 1, data)
    base = fixed_bits(model, t, list(uniform))
    budget = base + sum(t.layer(n).at(b).bits for n, b in uniform.items())
    assert budget == profile_model(uniform_model.model, (3, 16, 16)).memory_bits
    result = allocate(t, uniform, fixed_bits=base, budget_mbit=budget / 1e6, uniform_n=1)
    converted = binarize_model(model, "realtobin", 1, 1, layer_bases=result.layer_bases, **names)
    profile = profile_model(converted.model, (3, 16, 16))
    assert profile.memory_bits == result.memory_bits <= budget
    gates = sum(m.gate_values() for m in converted.model.modules() if hasattr(m, "gate_values"))
    assert gates > 0
