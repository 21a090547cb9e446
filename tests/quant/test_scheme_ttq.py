"""Trained Ternary Quantization (Zhu et al., ICLR 2017): sets, delta, scales, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.core.errors import SchemeError
from binarize_cli.quant import Domain, FullPrecisionActivation, get_scheme
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.pa import PAActivationQuantizer
from binarize_cli.quant.ttq import (
    DEFAULT_THRESHOLD,
    TTQWeightQuantizer,
    initial_scales,
    ternary_sets,
    ternary_threshold,
)

# max|W| = 1, so delta = t = 0.25 exactly; +-0.25 sit on the threshold (zero set).
W_ROW = [-1.0, -0.3, -0.25, 0.0, 0.1, 0.25, 0.26, 0.8]


def quantizer(w_p: float, w_n: float, t: float = 0.25) -> TTQWeightQuantizer:
    q = TTQWeightQuantizer(threshold=t).double()
    with torch.no_grad():
        q.w_p.fill_(w_p)
        q.w_n.fill_(w_n)
    return q


def ttq_layer(n: int = 0, seed: int = 0) -> BinarizedConv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True).double()
    return BinarizedConv2d.from_conv(conv, get_scheme("ttq"), 2, n)


# ---------------------------------------------------------------------------------------
# forward: delta, sets, values, planes
# ---------------------------------------------------------------------------------------


def test_delta_sets_and_values_exact() -> None:
    w = torch.tensor(W_ROW, dtype=torch.float64)
    assert float(ternary_threshold(w, 0.25)) == 0.25
    pos, neg = ternary_sets(w, 0.25)
    assert pos.tolist() == [False] * 6 + [True, True]
    assert neg.tolist() == [True, True] + [False] * 6
    q = quantizer(2.0, 3.0)
    assert q(w).tolist() == [-3.0, -3.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0]


def test_bit_planes_are_two_zero_one_planes_with_signed_scales() -> None:
    w = torch.tensor(W_ROW, dtype=torch.float64)
    q = quantizer(2.0, 3.0)
    bp = q.bit_planes(w)
    assert bp.domain is Domain.ZERO_ONE and bp.num_planes == 2
    assert bp.planes.tolist() == [[False] * 6 + [True, True], [True, True] + [False] * 6]
    assert bp.scales.tolist() == [2.0, -3.0] and bp.scales.dtype == torch.float64
    torch.manual_seed(0)
    big = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(q.bit_planes(big).reconstruct(), q(big))


def test_delta_follows_the_current_weight() -> None:
    """delta = t max|W| is recomputed on every forward: growing the largest weight moves it."""
    q = quantizer(1.0, 1.0)
    w = torch.tensor(W_ROW, dtype=torch.float64)
    assert q(w)[1] == -1.0  # -0.3 < -0.25
    w[0] = -2.0  # delta becomes 0.5
    out = q(w)
    assert out.tolist() == [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_default_threshold_is_the_papers() -> None:
    q = get_scheme("ttq").weight_quantizer(2)
    assert isinstance(q, TTQWeightQuantizer) and q.threshold == DEFAULT_THRESHOLD == 0.05


# ---------------------------------------------------------------------------------------
# initial scales (least squares for the initial sets)
# ---------------------------------------------------------------------------------------


def test_calibrate_sets_least_squares_scales() -> None:
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    q = TTQWeightQuantizer().double()
    q.calibrate(w)
    pos, neg = ternary_sets(w, DEFAULT_THRESHOLD)
    assert float(q.w_p.detach()) == pytest.approx(float(w[pos].mean()), rel=1e-12)
    assert float(q.w_n.detach()) == pytest.approx(float(-w[neg].mean()), rel=1e-12)

    def error(wp: float, wn: float) -> float:
        with torch.no_grad():
            return float((w - quantizer(wp, wn, DEFAULT_THRESHOLD)(w)).pow(2).sum())

    best = error(float(q.w_p.detach()), float(q.w_n.detach()))
    for dp, dn in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        assert error(float(q.w_p.detach()) + dp, float(q.w_n.detach()) + dn) > best


def test_from_conv_initialises_the_scales() -> None:
    layer = ttq_layer()
    wp, wn = initial_scales(layer.weight, DEFAULT_THRESHOLD)
    assert float(layer.weight_quantizer.w_p.detach()) == pytest.approx(wp, rel=1e-6)
    assert float(layer.weight_quantizer.w_n.detach()) == pytest.approx(wn, rel=1e-6)
    assert wp > 0 and wn > 0


def test_initial_scales_with_an_empty_set() -> None:
    assert initial_scales(torch.tensor([0.5, 1.0, 0.0]), 0.25) == (0.75, 0.75)
    assert initial_scales(torch.tensor([-0.5, -1.0]), 0.25) == (0.75, 0.75)
    assert initial_scales(torch.zeros(4), 0.05) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------
# backward: the paper's eq. 7-8 against finite differences (float64)
# ---------------------------------------------------------------------------------------


def _layer_loss(layer: BinarizedConv2d, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((layer(x) - target) ** 2).sum()


def test_scale_gradients_match_finite_differences(numeric_grad) -> None:
    layer = ttq_layer()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    _layer_loss(layer, x, target).backward()
    q = layer.weight_quantizer
    for param in (q.w_p, q.w_n):
        with torch.no_grad():
            fd = numeric_grad(lambda _: _layer_loss(layer, x, target), param.data)
        assert torch.allclose(param.grad, fd, rtol=1e-6, atol=1e-8)
        assert float(param.grad.abs()) > 1e-3  # a real signal, not a vacuous match


def test_scale_gradient_formulas() -> None:
    """dL/dW_p = sum over I_p of dL/dW_t; dL/dW_n = -(sum over I_n) (the paper's eq. 7 up to
    its sign convention)."""
    torch.manual_seed(2)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    q = TTQWeightQuantizer().double()
    q.calibrate(w.detach())
    g = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    (q(w) * g).sum().backward()
    pos, neg = ternary_sets(w, DEFAULT_THRESHOLD)
    assert float(q.w_p.grad) == pytest.approx(float(g[pos].sum()), rel=1e-12)
    assert float(q.w_n.grad) == pytest.approx(-float(g[neg].sum()), rel=1e-12)


def test_latent_gradient_is_the_scaled_straight_through(numeric_grad, away_from) -> None:
    """dL/dW = W_p g on I_p, g on the zero set, W_n g on I_n: the exact gradient of the
    surrogate W_p W / W / W_n W on the (fixed) sets, checked by finite differences away from
    the thresholds."""
    torch.manual_seed(4)
    t = 0.3
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    delta = float(ternary_threshold(w, t))
    w = away_from(w, [delta, -delta], margin=1e-3)
    delta = float(ternary_threshold(w, t))
    assert bool(((w.abs() - delta).abs() > 1e-4).all())
    q = quantizer(0.7, 1.9, t)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    def loss_of(w_t: torch.Tensor) -> torch.Tensor:
        return (F.conv2d(x, w_t, padding=1).tanh() ** 2).sum()

    latent = w.clone().requires_grad_(True)
    loss_of(q(latent)).backward()
    pos, neg = ternary_sets(w, t)
    assert pos.any() and neg.any() and (~pos & ~neg).any()

    def surrogate(v: torch.Tensor) -> torch.Tensor:
        # the ternary value plus the scaled identity around the current latent point
        scale = torch.where(pos, 0.7, torch.where(neg, 1.9, 1.0))
        return q(w) + scale * (v - w)

    fd = numeric_grad(lambda v: loss_of(surrogate(v)), w.clone())
    assert torch.allclose(latent.grad, fd, rtol=1e-6, atol=1e-8)
    g = torch.func.grad(loss_of)(q(w))
    assert torch.allclose(latent.grad[pos], 0.7 * g[pos])
    assert torch.allclose(latent.grad[neg], 1.9 * g[neg])
    assert torch.allclose(latent.grad[~pos & ~neg], g[~pos & ~neg])


def test_gradient_direction_moves_the_scales_the_right_way() -> None:
    """A loss that wants a larger output (positive input) raises W_p and lowers W_n; one that
    wants a smaller output raises W_n (the sign the paper's printed eq. 7 omits)."""
    for sign in (-1.0, 1.0):
        layer = ttq_layer()
        q = layer.weight_quantizer
        wp0, wn0 = float(q.w_p.detach()), float(q.w_n.detach())
        x = torch.ones(1, 3, 4, 4, dtype=torch.float64)
        opt = torch.optim.SGD(q.parameters(), lr=1e-3)
        loss = sign * layer(x).sum()
        loss.backward()
        opt.step()
        if sign < 0:  # wants larger output
            assert float(q.w_p.detach()) > wp0 and float(q.w_n.detach()) < wn0
        else:
            assert float(q.w_p.detach()) < wp0 and float(q.w_n.detach()) > wn0
        assert float(sign * layer(x).sum().detach()) < float(loss.detach())


def test_no_grad_forward_matches_the_autograd_forward() -> None:
    layer = ttq_layer()
    w_t = layer.quantized_weight()
    assert w_t.requires_grad
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), w_t.detach())


# ---------------------------------------------------------------------------------------
# the layer: state dict, activations, accounting
# ---------------------------------------------------------------------------------------


def test_state_dict_names_and_round_trip() -> None:
    layer = ttq_layer()
    assert set(layer.state_dict()) == {
        "weight",
        "bias",
        "weight_quantizer.w_p",
        "weight_quantizer.w_n",
    }
    assert isinstance(layer.activation_quantizer, FullPrecisionActivation)
    with torch.no_grad():
        layer.weight_quantizer.w_p.fill_(0.123)
    clone = ttq_layer(seed=9)
    clone.load_state_dict(layer.state_dict())
    assert float(clone.weight_quantizer.w_p.detach()) == pytest.approx(0.123)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(clone(x), layer(x))


def test_activations_use_pas_quantizer_and_the_planes_compose() -> None:
    """-N > 0: PA's activation quantizer (its options pass through); the layer equals the
    explicit sum over weight and activation {0,1} planes."""
    scheme = get_scheme("ttq")
    act = scheme.activation_quantizer(3, {"ttq_threshold": 0.1, "lambda_a": 0.5})
    assert isinstance(act, PAActivationQuantizer) and act.lambda_a == 0.5
    layer = ttq_layer(n=2)
    torch.manual_seed(5)
    x = torch.relu(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    layer.activation_quantizer.calibrate(x.flatten())
    wp, ap = (
        layer.weight_quantizer.bit_planes(layer.weight),
        layer.activation_quantizer.bit_planes(x),
    )
    out = torch.zeros(())
    for i in range(2):
        for j in range(2):
            conv = F.conv2d(ap.signed_planes()[j], wp.signed_planes()[i], None, 1, 1)
            out = out + wp.scales[i] * ap.scales[j] * conv
    out = out + layer.bias.reshape(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(layer(x), out, rtol=1e-12, atol=1e-12)


def test_accounting_counts_two_bits_and_the_two_scales_once() -> None:
    layer = ttq_layer()
    assert layer.weight_bases == 2 and layer.weight_scale_count() == 2
    real, binary = layer.stored_values()
    assert binary == 2 * layer.weight.numel()
    assert real == 5 + 2  # bias + (W_p, W_n), not counted again as quantizer parameters
    with_act = ttq_layer(n=3)
    assert with_act.stored_values()[0] == 5 + 2 + 2 * 3  # + PA's v, beta


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 4])
def test_m_must_be_two(m: int) -> None:
    scheme = get_scheme("ttq")
    for call in (lambda: scheme.check(m, 0), lambda: scheme.weight_quantizer(m)):
        with pytest.raises(SchemeError, match="-M must be 2") as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("n", [-1, 65])
def test_invalid_n(n: int) -> None:
    with pytest.raises(SchemeError, match="-N"):
        get_scheme("ttq").check(2, n)


def test_valid_m_n() -> None:
    scheme = get_scheme("ttq")
    scheme.check(2, 0)
    scheme.check(2, 5)
    assert (scheme.default_m, scheme.default_n) == (2, 0)
    assert scheme.weight_domain is Domain.ZERO_ONE and scheme.binarize_downsample


@pytest.mark.parametrize("bad", [1.0, -0.1, 2, float("nan"), "0.1", True, None])
def test_invalid_threshold(bad) -> None:
    with pytest.raises(SchemeError, match="ttq_threshold"):
        get_scheme("ttq").weight_quantizer(2, {"ttq_threshold": bad})


def test_unknown_option() -> None:
    scheme = get_scheme("ttq")
    with pytest.raises(SchemeError, match="unknown TTQ option.*weight_endpoints"):
        scheme.weight_quantizer(2, {"weight_endpoints": [1.0]})
    with pytest.raises(SchemeError, match="unknown TTQ option"):
        scheme.activation_quantizer(2, {"lambda_w": 1.0})
    q = scheme.weight_quantizer(2, {"ttq_threshold": 0, "signed_activations": False})
    assert q.threshold == 0.0
