"""`realtobin` (Real-to-Bin): registration, the gate's forward and initialisation, and every
backward against central finite differences in float64 (docs/schemes-abc-baselines.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.core.errors import SchemeError
from binarize_cli.quant.base import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.realtobin import GATE_REDUCTION, ChannelGate, gate_hidden
from binarize_cli.quant.single import SignActivationQuantizer, SignWeightQuantizer, approx_sign

#: (C_in, C_out, kernel, stride, padding, groups, bias): plain, grouped, depthwise, odd shapes.
CONVS = [
    (16, 24, 3, 1, 1, 1, False),
    (16, 24, (3, 2), 2, (1, 0), 4, True),
    (12, 12, 3, 2, 1, 12, False),
    (5, 7, 1, 1, 0, 1, False),
]


def _layer(c_in, c_out, k, s, p, g, bias, *, n: int = 1, seed: int = 0) -> BinarizedConv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, groups=g, bias=bias)
    layer = BinarizedConv2d.from_conv(conv, get_scheme("realtobin"), 1, n).double()
    if n:
        with torch.no_grad():
            layer.activation_quantizer.threshold.fill_(0.1)
    return layer


def _randomise_gate(layer: BinarizedConv2d, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_registration_and_validation() -> None:
    scheme = get_scheme("realtobin")
    assert (scheme.default_m, scheme.default_n) == (1, 1)
    assert scheme.binarize_downsample is False and scheme.make_gate is not None
    assert isinstance(scheme.weight_quantizer(1), SignWeightQuantizer)
    assert scheme.weight_quantizer(1).scaled is True
    act = scheme.activation_quantizer(1)
    assert isinstance(act, SignActivationQuantizer) and act.backward_kind == "approx"
    scheme.check(1, 0)
    for m, n in ((2, 1), (1, 2)):
        with pytest.raises(SchemeError, match="realtobin"):
            scheme.check(m, n)
    # Only this scheme gates its layers.
    assert get_scheme("bireal").make_gate is None


def test_gate_shapes_and_reduction() -> None:
    gate = ChannelGate(64, 128)
    assert GATE_REDUCTION == 8 and gate.hidden == 8 == gate_hidden(64)
    assert gate.reduce_weight.shape == (8, 64) and gate.expand_weight.shape == (128, 8)
    assert gate.macs() == 8 * 64 + 8 * 128
    assert ChannelGate(5, 7).hidden == 1  # at least one hidden unit
    assert gate(torch.randn(3, 64, 5, 7)).shape == (3, 128, 1, 1)
    with pytest.raises(ValueError, match="positive"):
        ChannelGate(0, 4)


@pytest.mark.parametrize("spec", CONVS)
def test_converted_layer_computes_the_bireal_layer(spec) -> None:
    """W_2 = 0 at conversion: 2 sigmoid(0) = 1, so the gated layer is exactly bireal's."""
    layer = _layer(*spec)
    torch.manual_seed(0)
    conv = nn.Conv2d(
        *spec[:2], spec[2], stride=spec[3], padding=spec[4], groups=spec[5], bias=spec[6]
    )
    plain = BinarizedConv2d.from_conv(conv, get_scheme("bireal"), 1, 1).double()
    plain.activation_quantizer.threshold.fill_(0.1)
    assert torch.equal(plain.weight, layer.weight)
    x = torch.randn(2, spec[0], 11, 9, dtype=torch.float64)
    assert torch.equal(layer.gate(x), torch.ones(2, spec[1], 1, 1, dtype=torch.float64))
    assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("spec", CONVS)
def test_forward_is_the_stated_formula(spec) -> None:
    layer = _layer(*spec)
    _randomise_gate(layer)
    x = torch.randn(2, spec[0], 11, 9, dtype=torch.float64)
    w = layer.weight.detach()
    alpha = w.abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    a_hat = torch.where(x >= 0.1, 1.0, -1.0).double()
    conv = F.conv2d(a_hat, alpha * torch.where(w >= 0, 1.0, -1.0).double(), layer.bias,
                    layer.stride, layer.padding, layer.dilation, layer.groups)  # fmt: skip
    z = x.mean(dim=(2, 3))
    hidden = torch.relu(z @ layer.gate.reduce_weight.detach().T)
    g = 2 * torch.sigmoid(hidden @ layer.gate.expand_weight.detach().T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv * g[:, :, None, None], rtol=1e-12, atol=1e-12)


def test_full_precision_activations_keep_the_gate() -> None:
    layer = _layer(16, 24, 3, 1, 1, 1, False, n=0)
    _randomise_gate(layer)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        w_hat = layer.weight_quantizer(layer.weight)
        expected = F.conv2d(x, w_hat, None, 1, 1) * layer.gate(x)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("spec", CONVS)
def test_gate_parameter_gradients_match_finite_differences(spec, numeric_grad) -> None:
    layer = _layer(*spec)
    _randomise_gate(layer)
    x = torch.randn(2, spec[0], 5, 4, dtype=torch.float64)
    r = torch.randn_like(layer(x))
    layer.zero_grad()
    (layer(x) * r).sum().backward()
    for name in ("reduce_weight", "expand_weight"):
        param = getattr(layer.gate, name)
        start = param.detach().clone()

        def loss(t: torch.Tensor, param=param) -> torch.Tensor:
            with torch.no_grad():
                param.copy_(t)
                return (layer(x) * r).sum()

        expected = numeric_grad(loss, start.clone())
        with torch.no_grad():
            param.copy_(start)
        assert expected.abs().max() > 0
        torch.testing.assert_close(param.grad, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("spec", CONVS)
def test_input_gradient_is_approxsign_plus_the_exact_gate_path(spec, numeric_grad) -> None:
    """dL/dA = the product rule on ``conv(sign(A - t), W_hat) * G(A)`` with sign's derivative
    replaced by ApproxSign's: finite differences of ``conv(approx_sign(A - t), W_hat) * G(A_0)``
    (gate held) plus those of ``conv(sign(A_0 - t), W_hat) * G(A)`` (binary input held)."""
    layer = _layer(*spec)
    _randomise_gate(layer)
    x = torch.randn(1, spec[0], 5, 4, dtype=torch.float64) * 0.7
    with torch.no_grad():  # every hidden unit active (W_1 z > 0): the gate path is not 0
        w1 = layer.gate.reduce_weight
        w1.copy_(w1.abs() * x.mean(dim=(2, 3)).sign())
    r = torch.randn_like(layer(x))
    xr = x.clone().requires_grad_(True)
    (layer(xr) * r).sum().backward()
    with torch.no_grad():
        w_hat = layer.weight_quantizer(layer.weight)
        a_hat = layer.activation_quantizer(x)
        g0 = layer.gate(x)

    def conv(a: torch.Tensor) -> torch.Tensor:
        return F.conv2d(a, w_hat, layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)  # fmt: skip

    def through_sign(t: torch.Tensor) -> torch.Tensor:
        return (conv(approx_sign(t - 0.1)) * g0 * r).sum()

    def through_gate(t: torch.Tensor) -> torch.Tensor:
        return (conv(a_hat) * layer.gate(t) * r).sum()

    with torch.no_grad():
        sign_part = numeric_grad(through_sign, x.clone())
        gate_part = numeric_grad(through_gate, x.clone())
    assert sign_part.abs().max() > 0 and gate_part.abs().max() > 0
    torch.testing.assert_close(xr.grad, sign_part + gate_part, rtol=1e-6, atol=1e-7)


def test_weight_gradient_is_the_clipped_identity_through_the_gate(numeric_grad) -> None:
    """dL/dW = dL/dW_hat * 1[|W| <= 1], ``dL/dW_hat`` by finite differences of the gated
    convolution in ``W_hat``; alpha is analytic and carries no gradient of its own."""
    layer = _layer(8, 6, (3, 2), 2, (1, 0), 2, True)
    _randomise_gate(layer)
    with torch.no_grad():
        layer.weight.mul_(8.0)  # some |W| > 1: the clip window matters
    assert bool((layer.weight.abs() > 1).any())
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    r = torch.randn_like(layer(x))
    layer.zero_grad()
    (layer(x) * r).sum().backward()
    with torch.no_grad():
        w_hat = layer.weight_quantizer(layer.weight)
        a_hat = layer.activation_quantizer(x)
        g = layer.gate(x)

    def in_w_hat(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            conv = F.conv2d(a_hat, v, layer.bias, layer.stride, layer.padding, layer.dilation,
                            layer.groups)  # fmt: skip
            return (conv * g * r).sum()

    expected = numeric_grad(in_w_hat, w_hat.clone()) * (layer.weight.detach().abs() <= 1)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-6, atol=1e-8)


def test_gate_is_saved_and_loaded_with_the_layer() -> None:
    layer = _layer(16, 24, 3, 1, 1, 1, False)
    _randomise_gate(layer, seed=5)
    state = layer.state_dict()
    assert {"gate.reduce_weight", "gate.expand_weight"} <= set(state)
    other = _layer(16, 24, 3, 1, 1, 1, False, seed=9)
    other.load_state_dict(state)
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(other(x), layer(x))
