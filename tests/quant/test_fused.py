"""quant.fused: the compiled one-loop kernels of the PA and ABC training path.

The kernels must compute what the eager path computes: the same bucket, level and slope of
every element (exactly, for the same edges and tables), the same per-bucket counts (exactly)
and sums (blocked: within ``68 eps_32`` of the sum of absolute values), on odd shapes, ties, values on an edge, NaN and
non-contiguous inputs; and the quantizers built on them must match their eager forward and
every gradient.  Tests lower ``MIN_NUMEL`` so that small tensors take the fused path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from binarize_cli.quant import fused, get_scheme
from binarize_cli.quant.abc import ABCActivationQuantizer, ABCWeightQuantizer
from binarize_cli.quant.base import take, threshold_scan
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.pa import PAActivationQuantizer, PAWeightQuantizer


@pytest.fixture
def fused_everywhere(monkeypatch):
    """The fused path for every float32 CPU tensor, whatever its size, and no earlier
    compile failure in this process."""
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_FAILED", [])
    monkeypatch.delenv(fused.ENV, raising=False)


@pytest.fixture
def eager_only(monkeypatch):
    monkeypatch.setenv(fused.ENV, "0")


SIZES = [1, 7, 1000, 70_001]
EPS32 = torch.finfo(torch.float32).eps


def assert_blocked_sum(got: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor) -> None:
    """``got`` (float64) within the blocked sums' bound of the float64 reference: 16 lanes of
    64 float32 additions per block of 1024, then float64 (fused.blocked_sums)."""
    bound = (fused.BLOCK // 16 + 4) * EPS32 * ref_abs
    assert got.dtype == torch.float64
    assert bool(((got - ref).abs() <= bound).all()), (got - ref).abs().max()


EDGES = torch.tensor([-1.0, -0.25, -0.25, 0.0, 0.5, 1.5])  # sorted, with a tie


def inputs(n: int) -> torch.Tensor:
    torch.manual_seed(n)
    x = torch.randn(n)
    special = torch.tensor([0.5, -0.25, float("nan"), 1.5, -1.0, 0.0])  # on edges, NaN
    x[: min(n, 6)] = special[: min(n, 6)]
    return x


@pytest.mark.parametrize("n", SIZES)
def test_lookup_kernels_equal_the_eager_scan(fused_everywhere, n):
    x = inputs(n)
    g = torch.randn(n)
    table = torch.randn(EDGES.numel() + 1)
    j = threshold_scan(x, EDGES).int_index()
    expected = take(table, j)
    assert torch.equal(fused.Kernel(fused.select)(x, EDGES, table), expected)
    assert torch.equal(fused.lookup_grad(x, EDGES, table, g), take(table, j, g))
    sums = fused.Kernel(fused.bucket_sums)(x, EDGES, g)
    zeros = torch.zeros(table.numel(), dtype=torch.float64)
    ref = zeros.index_add(0, j.long(), g.double())
    assert_blocked_sum(sums, ref, zeros.index_add(0, j.long(), g.double().abs()))


@pytest.mark.parametrize("n", SIZES)
def test_bucket_counts_and_sums_equal_the_eager_scan(fused_everywhere, n):
    x = inputs(n)
    kernel = fused.Kernel(fused.bucket_counts_sums)
    counts, sums = kernel(x, EDGES, x)
    j = threshold_scan(x, EDGES).int_index().long()
    want = torch.bincount(j, minlength=EDGES.numel() + 1).double()
    assert torch.equal(counts, want)  # exact: summed as integers
    finite = torch.where(torch.isnan(x), 0.0, x).double()
    zeros = torch.zeros(EDGES.numel() + 1, dtype=torch.float64)
    ref = zeros.index_add(0, j, finite)
    ok = ~torch.isnan(sums)
    assert_blocked_sum(sums[ok], ref[ok], zeros.index_add(0, j, finite.abs())[ok])
    assert bool(torch.isnan(sums[0])) == bool(torch.isnan(x).any())  # NaN is in bucket 0


def test_blocked_sums_stay_near_float64_over_millions_of_elements(fused_everywhere):
    # 2M values near 0.1: one float32 accumulator per vector lane drifts (1.2e-7 relative
    # measured, compiled), eager's float32 sum 2.4e-8; float32 blocks of 1024 summed in
    # float64 stay at 1.6e-9
    torch.manual_seed(0)
    x = 0.1 + 0.01 * torch.randn(1 << 21)
    sums = fused.Kernel(fused.bucket_sums)(x, torch.tensor([0.1]), x)
    ref = torch.zeros(2, dtype=torch.float64).index_add(0, (x >= 0.1).long(), x.double())
    assert float(((sums - ref).abs() / ref).max()) < 1e-8
    shift = torch.tensor(0.05)  # the shifted form (ABC's weights) counts the same
    counts, _ = fused.Kernel(fused.bucket_counts_sums)(x, torch.tensor([0.05]), x, shift)
    assert int(counts[1]) == int((x - shift >= 0.05).sum()) and counts.sum() == x.numel()


def test_mean_std_is_the_population_statistics_even_far_from_zero(fused_everywhere):
    torch.manual_seed(0)
    x = 1000.0 + 1e-3 * torch.randn(50_001)  # E[x^2] - E[x]^2 would cancel in float32
    mean, std = fused.Kernel(fused.mean_std)(x)
    ref_std, ref_mean = torch.std_mean(x.double(), correction=0)
    assert math.isclose(float(mean), float(ref_mean), rel_tol=1e-7)
    assert math.isclose(float(std), float(ref_std), rel_tol=1e-4)


def test_non_contiguous_input_is_read_in_logical_order(fused_everywhere):
    torch.manual_seed(1)
    x = torch.randn(6, 5, 7).transpose(0, 2)  # not contiguous
    table = torch.randn(EDGES.numel() + 1)
    out = fused.Kernel(fused.select)(fused.flat(x), EDGES, table).view(x.shape)
    assert out.shape == x.shape
    assert torch.equal(out, take(table, threshold_scan(x, EDGES).int_index()).reshape(x.shape))


def test_when_the_kernels_run(monkeypatch):
    monkeypatch.delenv(fused.ENV, raising=False)
    monkeypatch.setattr(fused, "_FAILED", [])
    big = torch.zeros(fused.MIN_NUMEL)
    assert fused.enabled(big)
    assert not fused.enabled(torch.zeros(fused.MIN_NUMEL - 1))  # small: eager is cheaper
    assert not fused.enabled(big.double())  # float64: the exact reference path
    assert not fused.enabled(big.half())
    monkeypatch.setenv(fused.ENV, "0")
    assert not fused.enabled(big)


def _grads(quantizer: nn.Module, x: torch.Tensor, seed: int):
    quantizer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = quantizer(x)
    torch.manual_seed(seed)
    (out * torch.randn_like(out)).sum().backward()
    params = {k: p.grad.clone() for k, p in quantizer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, params


def _compare(quantizer: nn.Module, x: torch.Tensor, monkeypatch) -> None:
    """Fused against eager on the same quantizer and input: forward and every gradient."""
    monkeypatch.setenv(fused.ENV, "0")
    ref = _grads(quantizer, x, 5)
    monkeypatch.delenv(fused.ENV)
    got = _grads(quantizer, x, 5)
    scale = float(x.abs().max())
    # levels and endpoints come from sums accumulated in another order: equal to rounding
    assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-6 * scale)
    assert torch.allclose(got[1], ref[1], rtol=1e-4, atol=1e-6)
    assert got[2].keys() == ref[2].keys()
    for k in ref[2]:
        assert torch.allclose(got[2][k], ref[2][k], rtol=1e-4, atol=1e-5), k


WEIGHT_SHAPES = [(5, 3, 3, 3), (33, 17, 3, 3), (7, 1, 1, 1), (16, 8)]


PA_WEIGHT_CASES = [(shape, 4, None) for shape in WEIGHT_SHAPES] + [
    ((33, 17, 3, 3), 2, 7.5),
    ((33, 17, 3, 3), 8, None),
]


@pytest.mark.parametrize(("shape", "m", "lambda_w"), PA_WEIGHT_CASES)
def test_pa_weights_fused_match_eager(fused_everywhere, monkeypatch, shape, m, lambda_w):
    torch.manual_seed(m)
    w = 0.05 * torch.randn(shape) + 0.01
    _compare(PAWeightQuantizer(m, lambda_w=lambda_w), w, monkeypatch)


PA_ACTIVATION_CASES = [(shape, 5, False) for shape in [(3, 4, 5, 7), (2, 1, 1, 1), (64, 3)]]
PA_ACTIVATION_CASES += [((3, 4, 5, 7), n, True) for n in (1, 3, 5)]  # the signed layout


@pytest.mark.parametrize(("shape", "n", "signed"), PA_ACTIVATION_CASES)
def test_pa_activations_fused_match_eager(fused_everywhere, monkeypatch, signed, n, shape):
    torch.manual_seed(n)
    q = PAActivationQuantizer(n, signed=signed)
    samples = torch.randn(4096)
    q.calibrate(samples if signed else torch.relu(samples))
    if signed and n > 1:
        assert q.zero_level_piece > 0
    x = torch.randn(shape)
    _compare(q, x if signed else torch.relu(x), monkeypatch)


ABC_WEIGHT_CASES = [(shape, 5, 3.0) for shape in WEIGHT_SHAPES] + [
    ((33, 17, 3, 3), 1, 3.0),
    ((33, 17, 3, 3), 3, math.inf),
]


@pytest.mark.parametrize(("shape", "m", "clip_std"), ABC_WEIGHT_CASES)
def test_abc_weights_fused_match_eager(fused_everywhere, monkeypatch, shape, m, clip_std):
    torch.manual_seed(m)
    w = 0.05 * torch.randn(shape) - 0.02
    _compare(ABCWeightQuantizer(m, clip_std=clip_std), w, monkeypatch)


ABC_ACTIVATION_CASES = [((3, 4, 5, 7), n) for n in (1, 3, 5)] + [((2, 1, 1, 1), 5)]


@pytest.mark.parametrize(("shape", "n"), ABC_ACTIVATION_CASES)
def test_abc_activations_fused_match_eager(fused_everywhere, monkeypatch, n, shape):
    torch.manual_seed(n)
    q = ABCActivationQuantizer(n)
    q.calibrate(torch.relu(torch.randn(4096)))
    _compare(q, torch.relu(torch.randn(shape)), monkeypatch)


def test_activation_parameters_get_gradients_when_the_input_needs_none(fused_everywhere):
    torch.manual_seed(0)
    q = PAActivationQuantizer(3)
    x = torch.relu(torch.randn(4, 3, 5, 5))
    q.calibrate(x)
    q(x).sum().backward()  # x does not require grad
    assert q.v.grad is not None and q.beta.grad is not None
    assert float(q.beta.grad.abs().sum()) > 0


def test_one_compile_serves_every_layer_shape(fused_everywhere):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q = PAWeightQuantizer(4)
    for shape in [(64, 64, 3, 3), (128, 64, 3, 3), (128, 64, 1, 1), (256, 128, 3, 3)]:
        w = torch.randn(shape, requires_grad=True)
        q(w).sum().backward()
    assert not counters["recompiles"]
    # the forward (statistics, per-piece sums and lookup in one graph) and the backward
    # lookup: one graph each for all four shapes
    assert counters["stats"]["unique_graphs"] == 2


def test_many_table_sizes_do_not_exhaust_the_recompile_limit(fused_everywhere):
    """A mixed-precision model has a dozen table sizes; dynamo allows 8 graphs per code
    object before it silently runs the body eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kernel = fused.Kernel(fused.select)
    x = torch.randn(1000)
    for k in range(1, 13):
        edges = torch.linspace(-1.0, 1.0, k)
        table = torch.randn(k + 1)
        expected = take(table, threshold_scan(x, edges).int_index())
        assert torch.equal(kernel(x, edges, table), expected)
    assert len(kernel.compiled) == 12
    assert not counters["recompiles"]
    assert counters["stats"]["unique_graphs"] == 12


def _select_reference(x: torch.Tensor, edges: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return take(table, threshold_scan(x, edges).int_index())


def test_a_kernel_calls_its_graph_directly_once_dynamo_has_run_it(fused_everywhere, monkeypatch):
    """After dynamo has run a kernel's one graph for a size, later calls of that size call
    inductor's compiled code themselves (no frame evaluation, no guards, no AOT autograd
    runtime wrapper), with the same results; a ``torch._dynamo.reset()`` sends the next call
    through dynamo again, and a graph from inductor's cache is called directly too."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kernel = fused.Kernel(fused.select)
    edges, table = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.5, 1.5, 2.5, 3.5])
    x = torch.randn(5000)
    assert torch.equal(kernel(x, edges, table), _select_reference(x, edges, table))
    (graph,) = kernel.compiled.values()
    assert len(graph.direct) == 1  # this torch's dynamo records where each input came from
    ((_, _, boxed),) = graph.direct.values()
    assert boxed  # inductor's own call, without AOT autograd's runtime wrapper

    def no_dynamo(*args):
        raise AssertionError("dynamo entered")

    through_dynamo = graph.dynamo
    monkeypatch.setattr(graph, "dynamo", no_dynamo)
    for _ in range(2):
        y = torch.randn(5000)
        assert torch.equal(kernel(y, edges, table), _select_reference(y, edges, table))
    with pytest.raises(AssertionError, match="dynamo entered"):
        kernel(torch.randn(6000), edges, table)  # a new size: dynamo checks its guards first
    monkeypatch.setattr(graph, "dynamo", through_dynamo)
    z = torch.randn(5000)
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(kernel(z, edges, table), _select_reference(z, edges, table))
    assert counters["stats"]["unique_graphs"] == 1  # compiled again after the reset
    # from inductor's cache this time, and still called directly, without the wrapper
    assert counters["inductor"]["fxgraph_cache_hit"] == 1
    assert [boxed for _, _, boxed in graph.direct.values()] == [True]


def test_a_kernel_that_needs_two_graphs_for_one_key_keeps_every_result(fused_everywhere):
    """1000 elements (no full block of the blocked sums) and 70,001 share a key but not a
    graph: once dynamo holds two, every call goes through its guards."""
    kernel = fused.Kernel(fused.mean_std)
    for n in (1000, 70_001, 1000, 70_001):
        x = torch.randn(n) + 3.0
        mean, std = kernel(x)
        assert torch.allclose(mean, x.double().mean().float())
        assert torch.allclose(std, x.double().std(correction=0).float())
    (graph,) = kernel.compiled.values()
    assert fused._cache_entries(graph.code) == 2


def test_a_kernel_given_one_tensor_twice_and_then_two_keeps_them_apart(fused_everywhere):
    """Dynamo merges an input passed twice into one graph input: that call has its own key."""
    kernel = fused.Kernel(fused._lookup_grad_body)
    edges, table = torch.tensor([0.0]), torch.tensor([1.0, 2.0])
    x, g = torch.randn(5000), torch.randn(5000)
    for _ in range(2):
        assert torch.equal(kernel(x, edges, table, x), _select_reference(x, edges, table) * x)
        assert torch.equal(kernel(x, edges, table, g), _select_reference(x, edges, table) * g)
    assert len(kernel.compiled) == 2


def test_a_failed_compile_falls_back_to_eager_with_one_warning(fused_everywhere, monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    def broken(*args):
        raise TorchDynamoException("no C++ compiler")

    kernel = fused.Kernel(fused.mean_std)
    kernel._compiled = lambda key: broken  # type: ignore[method-assign]
    x = torch.randn(100)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        mean, std = kernel(x)
    assert torch.allclose(mean, x.mean()) and torch.allclose(std, x.std(correction=0))
    assert not fused.enabled(x)  # the rest of the process stays on the eager path


def test_a_bug_in_a_body_is_not_swallowed(fused_everywhere):
    kernel = fused.Kernel(lambda x: x[10])
    with pytest.raises(Exception, match="10"):  # noqa: B017 - dynamo may wrap it
        kernel(torch.zeros(3))


def test_modifying_a_saved_input_in_place_is_an_error_not_a_wrong_gradient(fused_everywhere):
    torch.manual_seed(0)
    q = PAActivationQuantizer(3)
    x = torch.relu(torch.randn(2, 3, 4, 4)).requires_grad_(True)
    q.calibrate(x.detach())
    h = x * 1.0
    out = q(h)
    h.add_(1.0)  # the backward would recompute buckets from a changed input
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("scheme", ["pa", "abc"])
def test_training_steps_fused_match_eager(fused_everywhere, monkeypatch, scheme):
    """A small binarized network trained three SGD steps each way ends at the same loss."""
    torch.manual_seed(0)
    s = get_scheme(scheme)
    m, n = (4, 3) if scheme == "pa" else (3, 3)
    convs = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)]
    layers = [BinarizedConv2d.from_conv(c, s, m, n) for c in convs]
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        layers[0].activation_quantizer.calibrate(x.flatten())
        layers[1].activation_quantizer.calibrate(torch.relu(torch.randn(8, 8, 8, 8)).flatten())
    net = nn.Sequential(layers[0], nn.BatchNorm2d(8), nn.ReLU(), layers[1], nn.Flatten())
    net = nn.Sequential(net, nn.LazyLinear(3))
    net(x)  # materialise the lazy layer
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def train(model: nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses, model.state_dict()

    monkeypatch.setenv(fused.ENV, "0")
    eager, _ = train(copy.deepcopy(net))
    monkeypatch.delenv(fused.ENV)
    got, weights = train(copy.deepcopy(net))
    assert got == pytest.approx(eager, rel=1e-4)
    again, weights_again = train(copy.deepcopy(net))  # the fused path is deterministic
    assert again == got
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
