"""Every scheme's quantizers on the training path: one whole-model ``torch.compile`` graph
(no graph break, no recompile per layer) that matches eager, and no host read of a tensor
(the host-device synchronisation of ``.item()``/``int()``/``float()``) in forward or backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from binarize_cli.quant import fused, get_scheme
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.pa import PAActivationQuantizer

SCHEMES = [("pa", 4, 3), ("abc", 3, 3), ("bnn", 1, 1), ("xnor", 1, 1), ("bireal", 1, 1)]
SCHEMES += [("dorefa", 2, 2)]


def tiny_net(scheme: str, m: int, n: int) -> nn.Module:
    """Two binarized convolutions of different shapes (so a per-shape recompile would show),
    calibrated on random inputs; PA's second layer uses the signed layout (zero piece 1)."""
    torch.manual_seed(0)
    s = get_scheme(scheme)
    convs = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)]
    layers = [BinarizedConv2d.from_conv(c, s, m, n) for c in convs]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        layers[0].activation_quantizer.calibrate(x.flatten())
        mid = torch.randn(4, 8, 8, 8)  # signed: PA picks a layout with negative levels
        layers[1].activation_quantizer.calibrate(mid.flatten())
    second = layers[1].activation_quantizer
    if isinstance(second, PAActivationQuantizer):
        assert second.zero_level_piece > 0
    return nn.Sequential(
        layers[0],
        nn.BatchNorm2d(8),
        layers[1],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).train()


def training_grads(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.arange(1.0, 4.0)).sum().backward()
    grads = {k.removeprefix("_orig_mod."): p.grad for k, p in model.named_parameters()}
    return out.detach(), {k: g.clone() for k, g in grads.items() if g is not None}


@pytest.mark.parametrize(("scheme", "m", "n"), SCHEMES)
def test_whole_model_compiles_to_one_graph_that_matches_eager(scheme, m, n):
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    eager = tiny_net(scheme, m, n)
    model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    counters.clear()
    graphs = []  # the graphs dynamo hands the backend

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    for _ in range(2):  # a second call must reuse the graph (guards do not read tensor values)
        out, grads = training_grads(compiled, x)
    assert len(graphs) == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    if scheme in ("pa", "abc"):  # their fused bodies, tables materialised once
        assert "torch.ops.binarize.materialize" in graphs[0].print_readable(print_output=False)
    ref_out, ref_grads = training_grads(eager, x)
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == grads.keys()
    assert any(k.endswith("quantizer.v") for k in grads) or scheme not in ("pa", "abc")
    for k, g in ref_grads.items():
        assert torch.allclose(grads[k], g, rtol=1e-4, atol=1e-6), k


class _HostReads(TorchDispatchMode):
    """Records the ops that copy a tensor's value to the host (``item``/``int``/``float``),
    and the linear-algebra ops that do so inside on a CUDA device (their error checks read
    the solver's status on the host; the ``_ex`` variants do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name
        if func is torch.ops.aten._local_scalar_dense.default or (
            "linalg" in name and not name.endswith("_ex")
        ):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", ["eager", "fused"])
@pytest.mark.parametrize(("scheme", "m", "n"), SCHEMES)
def test_training_step_reads_no_tensor_on_the_host(scheme, m, n, kernels, monkeypatch):
    """Eager quantizers and the fused kernels (forced for these small tensors, called
    directly after a first step) alike; ABC's weight scales included (closed form, no
    ``torch.linalg.eigh``)."""
    if kernels == "fused":
        monkeypatch.setattr(fused, "MIN_NUMEL", 0)
        monkeypatch.setattr(fused, "_FAILED", [])
        monkeypatch.delenv(fused.ENV, raising=False)
    else:
        monkeypatch.setenv(fused.ENV, "0")
    model = tiny_net(scheme, m, n)
    x = torch.randn(4, 3, 8, 8)
    if kernels == "fused":  # compile outside the probe (dynamo does not run under a mode)
        training_grads(model, x)
    with _HostReads() as mode:
        training_grads(model, x)
    assert mode.reads == []
    # the probe sees a host read when there is one, and an eigendecomposition
    with _HostReads() as mode:
        int(model[2].activation_quantizer.num_bases * torch.ones(()))
        torch.linalg.eigh(torch.eye(2))
    assert len(mode.reads) >= 2


def test_pa_layout_follows_its_buffer_without_a_host_read():
    q = PAActivationQuantizer(2).double()
    with torch.no_grad():
        q.v.copy_(torch.tensor([-0.4, 0.5], dtype=torch.float64))
        q.beta.copy_(torch.tensor([-0.8, 1.0], dtype=torch.float64))
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.equal(q(x), torch.tensor([0.0, -0.8, 1.0], dtype=torch.float64))  # eq. 10
    q.zero_piece.fill_(1)
    with _HostReads() as mode:
        y = q(x.requires_grad_(True))
        y.sum().backward()
    assert mode.reads == []
    assert torch.equal(y.detach(), torch.tensor([-0.8, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(("scheme", "m", "n"), [("pa", 4, 3), ("abc", 3, 3)])
def test_a_large_weight_forward_runs_its_own_graph_inside_a_compiled_model(scheme, m, n):
    """On the CPU a weight of at least ``MIN_NUMEL`` elements goes through the opaque
    ``binarize::kernel`` op (the kernel's own compiled graph, as in eager mode): the model
    still compiles to one graph, matches eager, and the kernel's graph serves both eager and
    compiled calls without a recompile."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    from binarize_cli.quant import fused

    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    assert conv.weight.numel() >= fused.MIN_NUMEL
    layer = BinarizedConv2d.from_conv(conv, get_scheme(scheme), m, n)
    x = torch.rand(2, 64, 6, 6)
    with torch.no_grad():
        layer.activation_quantizer.calibrate(x.flatten())
    eager = nn.Sequential(layer, nn.Flatten(), nn.Linear(64 * 36, 3)).train()
    model = copy.deepcopy(eager)
    ref_out, ref_grads = training_grads(eager, x)  # compiles the kernels eagerly first
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return compile_fx(gm, example_inputs)  # inductor: the op runs from its generated code

    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    for _ in range(2):
        out, grads = training_grads(compiled, x)
    training_grads(eager, x)  # eager again: its kernel graph still serves it
    assert len(graphs) == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    code = graphs[0].print_readable(print_output=False)
    assert code.count("torch.ops.binarize.kernel") == 1
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == grads.keys()
    for k, g in ref_grads.items():
        scale = float(g.abs().max())  # inductor's convolutions round in another order
        assert torch.allclose(grads[k], g, rtol=1e-4, atol=1e-5 * scale), k


def test_a_kernel_compiles_once_for_an_autograd_function_and_for_the_op():
    """The op ``binarize::kernel`` runs under another dispatch state than an autograd
    function's forward (no autograd keys, grad mode on); the kernel's graph guards on both,
    so the kernel sets one state for every call: no second graph."""
    from torch._dynamo.utils import counters

    from binarize_cli.quant import fused, pa

    w = torch.randn(64 * 64 * 9, requires_grad=True)
    multipliers = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    kernel = pa._WEIGHT_FORWARD

    class Through(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):  # type: ignore[no-untyped-def]
            return kernel(fused.flat(w), multipliers, None)[0]

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            return g

    first = Through.apply(w)  # compiles the kernel's graph, or finds it
    graphs = counters["stats"]["unique_graphs"]
    via_op = torch.ops.binarize.kernel(kernel.name, [w.detach(), multipliers], [], "ttn")[0]
    again = Through.apply(w)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(first, via_op) and torch.equal(first, again)
