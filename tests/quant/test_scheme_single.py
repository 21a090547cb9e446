"""Single-binary and low-bit baselines: BNN, XNOR-Net/BWN, Bi-Real Net, DoReFa-Net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.core.errors import BadInputError, SchemeError
from binarize_cli.quant import Domain, FullPrecisionActivation, get_scheme
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.single import (
    DoReFaActivationQuantizer,
    DoReFaWeightQuantizer,
    SignActivationQuantizer,
    SignWeightQuantizer,
    approx_sign,
    dorefa_weight_planes,
    optimal_clip_range,
    optimal_sign_threshold,
    round_half_up,
)

SIGN_SCHEMES = ["bnn", "xnor", "bireal"]
ALL_SCHEMES = [*SIGN_SCHEMES, "dorefa"]

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def explicit_binary_sum(layer: BinarizedConv2d, x: torch.Tensor) -> torch.Tensor:
    """sum_ij alpha_i beta_j conv(B_i, A_j) on zero-padded planes read in their domains."""
    wp = layer.weight_quantizer.bit_planes(layer.weight)
    ap = layer.activation_quantizer.bit_planes(x)
    w_planes, a_planes = wp.signed_planes(), ap.signed_planes()
    out = torch.zeros(())
    for i in range(wp.num_planes):
        alpha = wp.scales[i].reshape(1, -1, 1, 1)  # layer-wise [] or per-channel [C_out]
        for j in range(ap.num_planes):
            conv = F.conv2d(
                a_planes[j], w_planes[i], None, layer.stride, layer.padding, layer.dilation
            )
            out = out + alpha * ap.scales[j] * conv
    return out + layer.bias.reshape(1, -1, 1, 1)


def build_layer(name: str, c_in: int, m: int, n: int, x: torch.Tensor) -> BinarizedConv2d:
    conv = nn.Conv2d(c_in, 7, 3, stride=2, padding=1, bias=True).double()
    layer = BinarizedConv2d.from_conv(conv, get_scheme(name), m, n)
    layer.activation_quantizer.calibrate(x.flatten())
    return layer


# ---------------------------------------------------------------------------------------
# forward values
# ---------------------------------------------------------------------------------------


def test_bnn_forward_values() -> None:
    w = torch.tensor([[[[-0.3, 0.0], [0.2, -1.5]]]])
    q = SignWeightQuantizer(scaled=False)
    torch.testing.assert_close(q(w), torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]]))
    a = SignActivationQuantizer()
    x = torch.tensor([-2.0, -0.0, 0.0, 0.4])
    torch.testing.assert_close(a(x), torch.tensor([-1.0, 1.0, 1.0, 1.0]))  # sign(0) = +1
    with torch.no_grad():
        a.threshold.fill_(0.5)
    torch.testing.assert_close(a(x), torch.tensor([-1.0, -1.0, -1.0, -1.0]))


def test_xnor_weights_use_per_channel_mean_abs() -> None:
    w = torch.tensor([[[[1.0, -3.0]]], [[[-0.5, 0.0]]], [[[0.2, 0.4]]]])  # C_out = 3
    q = SignWeightQuantizer(scaled=True)
    expected = torch.tensor([[[[2.0, -2.0]]], [[[-0.25, 0.25]]], [[[0.3, 0.3]]]])
    torch.testing.assert_close(q(w), expected)
    bp = q.bit_planes(w)
    assert bp.scales.shape == (1, 3)
    torch.testing.assert_close(bp.scales, torch.tensor([[2.0, 0.25, 0.3]]))
    # mean|W_c| is the L2-optimal scale for the fixed signs of each channel
    s = torch.sign(w) + (w == 0)
    opt = (w * s).flatten(1).sum(1) / s.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(bp.scales[0], opt)


def test_dorefa_weight_levels_and_scale() -> None:
    w = torch.tensor([-0.4, -0.1, 0.0, 0.05, 0.2, 0.4]).reshape(2, 3, 1, 1)
    bits = 2
    q = DoReFaWeightQuantizer(bits)
    t = torch.tanh(w)
    x = t / (2 * t.abs().max()) + 0.5
    n = torch.floor(x * 3 + 0.5)
    wq = 2 * n / 3 - 1
    expected = (w.abs().mean() / wq.abs().mean()) * wq
    torch.testing.assert_close(q(w), expected)
    assert set(n.long().unique().tolist()) <= {0, 1, 2, 3}
    assert float(wq.min()) == -1.0 and float(wq.max()) == 1.0  # max|tanh| maps to +-1
    torch.testing.assert_close(q(w).abs().mean(), w.abs().mean())  # magnitude kept
    # k = 1: DoReFa's binary case, E|W| sign(W) with sign(0) = +1
    q1 = DoReFaWeightQuantizer(1)
    sign = torch.where(w >= 0, 1.0, -1.0)
    torch.testing.assert_close(q1(w), w.abs().mean() * sign)


def test_dorefa_planes_are_the_bits_of_the_level() -> None:
    w = torch.randn(4, 3, 3, 3) * 0.1
    bits = 3
    bp = dorefa_weight_planes(w, bits)
    assert bp.domain is Domain.PLUS_MINUS_ONE and bp.planes.shape == (3, 4, 3, 3, 3)
    n = sum((2**b) * bp.planes[b].long() for b in range(bits))
    t = torch.tanh(w)
    assert torch.equal(n, round_half_up((t / (2 * t.abs().max()) + 0.5) * 7).long())
    # 2 n / L - 1 == sum_b (2^b / L)(2 bit_b - 1): the planes are an exact decomposition
    ratios = bp.scales / bp.scales[0]
    torch.testing.assert_close(ratios, torch.tensor([1.0, 2.0, 4.0]))


def test_dorefa_activation_values() -> None:
    q = DoReFaActivationQuantizer(2)
    x = torch.tensor([-1.0, 0.0, 0.1, 1 / 6, 0.5, 0.8, 1.0, 3.0])
    # levels {0, 1/3, 2/3, 1}; round half up: 1/6 -> 1/3
    expected = torch.tensor([0.0, 0.0, 0.0, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0])
    torch.testing.assert_close(q(x), expected)
    with torch.no_grad():
        q.clip_max.fill_(3.0)
    # r = 3, L = 3: n = round(x), so 0.5 -> 1 (half up)
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 3.0]))
    bp = q.bit_planes(x)
    assert bp.domain is Domain.ZERO_ONE and bp.scales.shape == (2,)
    torch.testing.assert_close(bp.scales, torch.tensor([1.0, 2.0]))


def test_round_half_up_is_not_bankers_rounding() -> None:
    y = torch.tensor([0.5, 1.5, 2.5, -0.5, 2.49])
    assert round_half_up(y).tolist() == [1.0, 2.0, 3.0, 0.0, 2.0]


# ---------------------------------------------------------------------------------------
# bit planes reconstruct the forward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_bit_planes_reconstruct_forward(name: str) -> None:
    scheme = get_scheme(name)
    m, n = (3, 4) if name == "dorefa" else (1, 1)
    wq, aq = scheme.weight_quantizer(m), scheme.activation_quantizer(n)
    w = torch.randn(5, 3, 3, 3) * 0.07
    x = torch.relu(torch.randn(2, 3, 6, 5)) * 2.0
    aq.calibrate(x.flatten())
    assert wq.bit_planes(w).planes.shape[0] == wq.num_bases == m
    assert aq.bit_planes(x).planes.shape[0] == aq.num_bases == n
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            wr = w.clone().requires_grad_(grad)
            xr = x.clone().requires_grad_(grad)
            torch.testing.assert_close(
                wq.bit_planes(w).reconstruct(), wq(wr).detach(), rtol=1e-6, atol=1e-7
            )
            torch.testing.assert_close(
                aq.bit_planes(x).reconstruct(), aq(xr).detach(), rtol=1e-6, atol=1e-6
            )


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------


def hardtanh_surrogate(u: torch.Tensor) -> torch.Tensor:
    return torch.clamp(u, -1.0, 1.0)


@pytest.mark.parametrize(
    ("backward", "surrogate"), [("clipped", hardtanh_surrogate), ("approx", approx_sign)]
)
def test_sign_activation_backward_matches_surrogate(
    backward: str, surrogate, numeric_grad, away_from
) -> None:
    q = SignActivationQuantizer(backward=backward).double()
    with torch.no_grad():
        q.threshold.fill_(0.3)
    x = away_from(torch.randn(3, 4, 5, dtype=torch.float64) * 1.3, [-0.7, 0.3, 1.3])
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    (q(xr) * g).sum().backward()
    expected = numeric_grad(lambda t: (surrogate(t - 0.3) * g).sum(), x.clone())
    torch.testing.assert_close(xr.grad, expected, rtol=1e-6, atol=1e-7)


def test_bireal_backward_is_the_stated_piecewise_slope() -> None:
    q = SignActivationQuantizer(backward="approx").double()
    x = torch.tensor([-1.5, -1.0, -0.75, -0.25, 0.0, 0.25, 0.75, 1.0, 2.0], dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    q(xr).sum().backward()
    expected = torch.tensor([0.0, 0.0, 0.5, 1.5, 2.0, 1.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(xr.grad, expected)


@pytest.mark.parametrize("scaled", [False, True])
def test_sign_weight_backward_is_the_clipped_identity(scaled: bool) -> None:
    w = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.2], dtype=torch.float64)
    w = w.reshape(7, 1, 1, 1).requires_grad_(True)
    g = torch.randn_like(w)
    SignWeightQuantizer(scaled=scaled)(w).backward(g)
    torch.testing.assert_close(w.grad, g * (w.detach().abs() <= 1))


def test_dorefa_weight_backward_matches_surrogate(numeric_grad) -> None:
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64) * 0.3
    g = torch.randn_like(w)
    q = DoReFaWeightQuantizer(2)
    wr = w.clone().requires_grad_(True)
    out = q(wr)
    (out * g).sum().backward()
    with torch.no_grad():
        wq = 2 * round_half_up((torch.tanh(w) / (2 * torch.tanh(w).abs().max()) + 0.5) * 3) / 3 - 1
        s = w.abs().mean() / wq.abs().mean()  # a constant in the backward

    def surrogate(t: torch.Tensor) -> torch.Tensor:
        return (s * torch.tanh(t) / torch.tanh(t).abs().max() * g).sum()

    torch.testing.assert_close(wr.grad, numeric_grad(surrogate, w.clone()), rtol=1e-6, atol=1e-8)


def test_dorefa_activation_backward_is_the_clip_window() -> None:
    q = DoReFaActivationQuantizer(3).double()
    with torch.no_grad():
        q.clip_max.fill_(2.0)
    x = torch.tensor([-0.5, 0.0, 0.3, 1.9, 2.0, 2.5], dtype=torch.float64, requires_grad=True)
    g = torch.arange(1.0, 7.0, dtype=torch.float64)
    (q(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g * torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------


def brute_force_split(x: torch.Tensor) -> float:
    xs = torch.sort(x.double()).values
    best, best_t = float("inf"), 0.0
    for i in range(1, xs.numel()):
        if xs[i] == xs[i - 1]:
            continue
        left, right = xs[:i], xs[i:]
        sse = float(((left - left.mean()) ** 2).sum() + ((right - right.mean()) ** 2).sum())
        if sse < best:
            best, best_t = sse, float((xs[i - 1] + xs[i]) / 2)
    return best_t


def test_sign_threshold_is_the_optimal_split() -> None:
    x = torch.cat([torch.zeros(40), torch.rand(60) * 3])
    assert optimal_sign_threshold(x) == pytest.approx(brute_force_split(x))
    assert optimal_sign_threshold(x) > 0  # a ReLU input is not split at 0 (all +1)
    sym = torch.randn(20000)
    assert abs(optimal_sign_threshold(sym)) < 0.05  # zero-centred input: the papers' sign
    assert optimal_sign_threshold(torch.full((10,), 2.0)) is None


@pytest.mark.parametrize("name", SIGN_SCHEMES)
def test_sign_calibration_makes_relu_inputs_informative(name: str) -> None:
    q = get_scheme(name).activation_quantizer(1)
    x = torch.relu(torch.randn(4000))
    assert torch.unique(q(x)).tolist() == [1.0]  # uncalibrated: a constant
    q.calibrate(x)
    assert torch.unique(q(x)).tolist() == [-1.0, 1.0]
    q.calibrate(torch.full((5,), 3.0))  # constant samples leave it unchanged
    assert float(q.threshold) == pytest.approx(optimal_sign_threshold(x))


def test_dorefa_clip_range_calibration() -> None:
    x = torch.relu(torch.randn(8000)) * 5.0
    q = DoReFaActivationQuantizer(2)

    def err() -> float:
        with torch.no_grad():
            return float(((q(x) - x) ** 2).mean())

    paper = err()
    q.calibrate(x)
    assert err() < 0.5 * paper
    assert float(q.clip_max) == pytest.approx(optimal_clip_range(x, 2))
    q.calibrate(-torch.rand(10))  # no positive sample: the range is left unchanged
    assert float(q.clip_max) == pytest.approx(optimal_clip_range(x, 2))
    assert optimal_clip_range(-torch.rand(10), 2) is None
    with pytest.raises(BadInputError):
        q.calibrate(torch.empty(0))
    with pytest.raises(BadInputError):
        get_scheme("xnor").activation_quantizer(1).calibrate(torch.tensor([float("inf")]))


def test_dorefa_clip_range_beats_its_neighbours() -> None:
    x = torch.relu(torch.randn(8000)) * 5.0
    r = optimal_clip_range(x, 2)

    def err(rr: float) -> float:
        q = torch.floor(torch.clamp(x / rr, 0, 1) * 3 + 0.5) * rr / 3
        return float(((q - x) ** 2).mean())

    assert err(r) <= err(r * 0.85) and err(r) <= err(r * 1.15)
    assert err(r) < err(float(x.max()))


def test_weight_quantizers_need_no_calibration() -> None:
    w = torch.randn(3, 2, 3, 3)
    for name in ALL_SCHEMES:
        wq = get_scheme(name).weight_quantizer(1)
        before = wq(w)
        wq.calibrate(w)
        assert torch.equal(before, wq(w))


# ---------------------------------------------------------------------------------------
# registration and validation
# ---------------------------------------------------------------------------------------


def test_registration() -> None:
    for name in SIGN_SCHEMES:
        s = get_scheme(name)
        assert (s.default_m, s.default_n) == (1, 1)
        assert s.binarize_downsample is False
        assert s.weight_domain is s.activation_domain is Domain.PLUS_MINUS_ONE
    d = get_scheme("dorefa")
    assert (d.default_m, d.default_n, d.binarize_downsample) == (2, 2, True)
    assert (d.weight_domain, d.activation_domain) == (Domain.PLUS_MINUS_ONE, Domain.ZERO_ONE)
    assert get_scheme("BiReal").name == "bireal"
    # -N 0 on xnor: BWN, the weight-only form
    bwn = get_scheme("xnor")
    bwn.check(1, 0)
    assert isinstance(bwn.activation_quantizer(0), FullPrecisionActivation)
    assert get_scheme("bnn").weight_quantizer(1).scaled is False
    assert get_scheme("xnor").weight_quantizer(1).scaled is True
    assert get_scheme("bireal").activation_quantizer(1).backward_kind == "approx"


@pytest.mark.parametrize("name", SIGN_SCHEMES)
@pytest.mark.parametrize(("m", "n"), [(2, 1), (1, 2), (3, 3), (0, 1), (1, -1)])
def test_single_binary_validation(name: str, m: int, n: int) -> None:
    with pytest.raises(SchemeError) as info:
        get_scheme(name).check(m, n)
    assert "\n" not in str(info.value)
    with pytest.raises(SchemeError):
        get_scheme(name).weight_quantizer(2)
    with pytest.raises(SchemeError):
        get_scheme(name).activation_quantizer(2)


def test_dorefa_validation() -> None:
    d = get_scheme("dorefa")
    d.check(1, 0)
    d.check(16, 16)
    for m, n in [(17, 2), (2, 17), (0, 2)]:
        with pytest.raises(SchemeError):
            d.check(m, n)
    with pytest.raises(SchemeError):
        DoReFaWeightQuantizer(0)
    with pytest.raises(SchemeError):
        DoReFaActivationQuantizer(17)


# ---------------------------------------------------------------------------------------
# one convolution == the explicit binary sum
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_in", [3, 5])
@pytest.mark.parametrize(
    ("name", "m", "n"), [("bnn", 1, 1), ("xnor", 1, 1), ("bireal", 1, 1), ("dorefa", 2, 3)]
)
def test_one_conv_equals_the_explicit_binary_sum(name: str, m: int, n: int, c_in: int) -> None:
    x = torch.randn(2, c_in, 9, 11, dtype=torch.float64)
    if name == "dorefa":
        x = torch.relu(x) * 2.0
    layer = build_layer(name, c_in, m, n, x)
    with torch.no_grad():
        y = layer(x)
        explicit = explicit_binary_sum(layer, x)
        assert float((y - explicit).abs().max() / y.abs().max()) < 1e-5
        # Padding the stored bits with 0: exact for {0,1} planes, wrong for {-1,+1} planes.
        ap = layer.activation_quantizer.bit_planes(x)
        wp = layer.weight_quantizer.bit_planes(layer.weight)
        bit0 = 0.0 if ap.domain is Domain.ZERO_ONE else -1.0
        padded = F.pad(ap.signed_planes(), (1, 1, 1, 1), value=bit0)
        naive = layer.bias.reshape(1, -1, 1, 1) + sum(
            wp.scales[i].reshape(1, -1, 1, 1)
            * ap.scales[j]
            * F.conv2d(padded[j], wp.signed_planes()[i], None, layer.stride)
            for i in range(m)
            for j in range(n)
        )
        gap = float((naive - y).abs().max())
        if ap.domain is Domain.ZERO_ONE:
            assert gap < 1e-9
        else:
            assert gap > 1e-3


def test_xnor_with_full_precision_activations_is_bwn() -> None:
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    layer = BinarizedConv2d.from_conv(conv, get_scheme("xnor"), 1, 0)
    alpha = conv.weight.detach().abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    w_bwn = alpha * torch.where(conv.weight.detach() >= 0, 1.0, -1.0).double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, w_bwn, conv.bias, padding=1))


@pytest.mark.parametrize(
    ("name", "m", "n", "key"),
    [
        ("bnn", 1, 1, "activation_quantizer.threshold"),
        ("xnor", 1, 1, "activation_quantizer.threshold"),
        ("bireal", 1, 1, "activation_quantizer.threshold"),
        ("dorefa", 2, 2, "activation_quantizer.clip_max"),
    ],
)
def test_calibrated_state_is_saved(name: str, m: int, n: int, key: str) -> None:
    conv = nn.Conv2d(3, 4, 3)
    x = torch.relu(torch.randn(1, 3, 6, 6)) * 3
    layer = BinarizedConv2d.from_conv(conv, get_scheme(name), m, n)
    layer.activation_quantizer.calibrate(x.flatten())
    state = layer.state_dict()
    assert state[key].shape == (1,)
    assert float(state[key]) != (1.0 if name == "dorefa" else 0.0)
    clone = BinarizedConv2d.from_conv(conv, get_scheme(name), m, n)
    clone.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(clone(x), layer(x))
