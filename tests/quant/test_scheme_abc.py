"""ABC-Net scheme: weight bases and least-squares alpha, activation bases, STE, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.core.errors import BadInputError, SchemeError
from binarize_cli.quant import Domain, FullPrecisionActivation, get_scheme
from binarize_cli.quant.abc import (
    ABCActivationQuantizer,
    ABCWeightQuantizer,
    abc_activation,
    abc_weight_planes,
    fit_activation_scales,
    least_squares_scales,
    search_activation_shifts,
    weight_shifts,
)
from binarize_cli.quant.layers import BinarizedConv2d

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def numpy_lstsq(planes: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Independent reference: min-norm least squares on the {-1,+1} design matrix."""
    design = planes.reshape(planes.shape[0], -1).double().numpy().T * 2.0 - 1.0
    coeff, *_ = np.linalg.lstsq(design, target.reshape(-1).double().numpy(), rcond=None)
    return coeff


def ramp_surrogate(x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The surrogate whose gradient the ABC activation backward is: sum_n beta_n clip(x+v_n,0,1)."""
    return sum(beta[i] * torch.clamp(x + v[i], 0.0, 1.0) for i in range(v.shape[0]))


def explicit_binary_sum(layer: BinarizedConv2d, x: torch.Tensor) -> torch.Tensor:
    """sum_ij alpha_i beta_j conv(B_i, A_j) with the planes read in their domain.

    Padding: the layer pads A_hat with real zeros, so each plane is zero-padded here too
    (a padded position is 0, which is not a {-1,+1} value: the bitwise runtime needs a
    border correction for it).
    """
    wp = layer.weight_quantizer.bit_planes(layer.weight)
    ap = layer.activation_quantizer.bit_planes(x)
    w_planes, a_planes = wp.signed_planes(), ap.signed_planes()
    out = torch.zeros(())
    for i in range(wp.num_planes):
        alpha = wp.scales[i].reshape(1, -1, 1, 1)
        for j in range(ap.num_planes):
            conv = F.conv2d(
                a_planes[j],
                w_planes[i],
                None,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )
            out = out + alpha * ap.scales[j] * conv
    if layer.bias is not None:
        out = out + layer.bias.reshape(1, -1, 1, 1)
    return out


# ---------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------


def test_weight_shifts_follow_the_paper() -> None:
    assert weight_shifts(1) == [0.0]
    assert weight_shifts(2) == [-1.0, 1.0]
    assert weight_shifts(5) == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])
    with pytest.raises(SchemeError):
        weight_shifts(0)


def test_weight_planes_values_and_sign_of_zero() -> None:
    # mean 0, population std sqrt(2/3); W - mean = W, so u = 0 puts the middle weight on 0.
    w = torch.tensor([-1.0, 0.0, 1.0])
    bp = abc_weight_planes(w, 1)
    assert bp.domain is Domain.PLUS_MINUS_ONE
    assert bp.planes.tolist() == [[False, True, True]]  # sign(0) = +1
    # M = 3: thresholds at mean + std, mean, mean - std (u = -1, 0, 1).
    w = torch.tensor([-2.0, -0.5, 0.3, 2.2])
    mean, std = w.mean(), w.std(correction=0)
    bp = abc_weight_planes(w, 3)
    expected = torch.stack([(w - mean + u * std) >= 0 for u in (-1.0, 0.0, 1.0)])
    assert torch.equal(bp.planes, expected)
    assert bp.scales.shape == (3,)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_alpha_is_the_least_squares_optimum(m: int) -> None:
    w = torch.randn(7, 3, 3, 3, dtype=torch.float64) * 0.1 + 0.01
    bp = abc_weight_planes(w, m)
    ref = numpy_lstsq(bp.planes, w)
    np.testing.assert_allclose(bp.scales.numpy(), ref, rtol=1e-9, atol=1e-12)

    def err(alpha: torch.Tensor) -> float:
        recon = (alpha.reshape(-1, 1, 1, 1, 1) * bp.signed_planes()).sum(0)
        return float(((w - recon) ** 2).sum())

    best = err(bp.scales)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        delta = torch.randn(m, generator=gen, dtype=torch.float64) * 1e-3
        assert err(bp.scales + delta) > best


def test_alpha_is_robust_to_degenerate_bases() -> None:
    # A constant weight: every base is all +1 (rank 1); W_hat must still equal W.
    w = torch.full((4, 2, 3, 3), 0.25)
    for m in (1, 3, 5):
        bp = abc_weight_planes(w, m)
        assert torch.isfinite(bp.scales).all()
        torch.testing.assert_close(bp.reconstruct(), w)
    # Two values, five bases: duplicate planes; min-norm solution as numpy gives it.
    w = torch.tensor([[-1.0, 3.0]], dtype=torch.float64)
    bp = abc_weight_planes(w, 5)
    np.testing.assert_allclose(bp.scales.numpy(), numpy_lstsq(bp.planes, w), atol=1e-12)
    torch.testing.assert_close(bp.reconstruct(), w)
    # A single weight (population std = 0, no NaN): one equation, fitted exactly.
    w = torch.tensor([[[[0.7]]]])
    torch.testing.assert_close(ABCWeightQuantizer(3)(w), w)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_nested_scales_are_the_minimum_norm_fit_for_any_empty_buckets(m: int) -> None:
    """The closed form (no eigendecomposition) against numpy's SVD least squares on the
    weighted design: patterns of empty buckets (every one up to M = 5, every seventh at
    M = 8: both ends empty, runs of empty interior buckets), and tied cuts (every plane
    stepping at one boundary, as a constant weight gives)."""
    from binarize_cli.quant.abc import _nested_scales, _plane_table

    gen = torch.Generator().manual_seed(m)
    distinct = _plane_table(torch.arange(m, dtype=torch.float64), torch.arange(m + 0.0))
    tied = _plane_table(torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64))
    patterns = [[bool(b >> i & 1) for i in range(m + 1)] for b in range(1, 2 ** (m + 1))]
    ends = [
        [i == 0 and a or i == m and b for i in range(m + 1)] for a, b in [(1, 0), (0, 1), (1, 1)]
    ]
    # tied cuts leave the buckets between them empty: only the two ends can hold weights
    for table, cases in ((distinct, patterns[:: max(1, len(patterns) // 64)]), (tied, ends)):
        for full in cases:
            counts = torch.tensor(full, dtype=torch.float64) * torch.randint(
                1, 50, (m + 1,), generator=gen
            )
            sums = counts * torch.randn(m + 1, generator=gen, dtype=torch.float64)
            got = _nested_scales(table, counts, sums)
            rows = counts > 0  # min sum_i n_i (mu_i - L_i)^2: rows sqrt(n_i) * signed column i
            design = (table.double() * 2 - 1).T[rows] * counts[rows].sqrt()[:, None]
            target = sums[rows] / counts[rows].sqrt()
            ref, *_ = np.linalg.lstsq(design.numpy(), target.numpy(), rcond=None)
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_least_squares_scales_matches_numpy_on_random_planes() -> None:
    planes = torch.rand(4, 50) > 0.5
    planes[3] = planes[1]  # a duplicate plane
    target = torch.randn(50, dtype=torch.float64)
    np.testing.assert_allclose(
        least_squares_scales(planes, target).numpy(), numpy_lstsq(planes, target), atol=1e-10
    )


def test_weight_forward_equals_bit_planes_exactly() -> None:
    w = torch.randn(5, 3, 3, 3) * 0.05
    q = ABCWeightQuantizer(4)
    w_train = w.clone().requires_grad_(True)
    assert torch.equal(q(w_train).detach(), q.bit_planes(w).reconstruct())
    with torch.no_grad():
        assert torch.equal(q(w), q.bit_planes(w).reconstruct())


def test_weight_reconstruction_error_falls_with_m() -> None:
    w = torch.randn(64, 8, 3, 3) * 0.05 + 0.002
    errors = [float(((abc_weight_planes(w, m).reconstruct() - w) ** 2).sum()) for m in range(1, 6)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    # M = 1 on a Gaussian: relative squared error ~ 1 - 2/pi.
    assert errors[0] / float((w - w.mean()).pow(2).sum()) == pytest.approx(
        1 - 2 / math.pi, abs=0.03
    )


@pytest.mark.parametrize("clip_std", [3.0, 0.5, math.inf])
def test_weight_backward_is_the_clipped_identity(clip_std: float) -> None:
    w = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.1).requires_grad_(True)
    g = torch.randn_like(w)
    ABCWeightQuantizer(3, clip_std=clip_std)(w).backward(g)
    mean, std = w.detach().mean(), w.detach().std(correction=0)
    mask = (w.detach() - mean).abs() <= clip_std * std
    torch.testing.assert_close(w.grad, g * mask)
    if clip_std == 0.5:
        assert 0 < int(mask.sum()) < mask.numel()  # the clip really cuts something


# ---------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------


def test_activation_forward_values() -> None:
    q = ABCActivationQuantizer(2)
    with torch.no_grad():
        q.v.copy_(torch.tensor([0.5, -0.5]))  # thresholds at 0 and 1
        q.beta.copy_(torch.tensor([0.25, 2.0]))
    x = torch.tensor([-3.0, -0.1, 0.0, 0.7, 1.0, 4.0])
    # A_1 = +1 iff x >= 0; A_2 = +1 iff x >= 1.
    expected = torch.tensor([-2.25, -2.25, -1.75, -1.75, 2.25, 2.25])
    torch.testing.assert_close(q(x), expected)
    bp = q.bit_planes(x)
    assert bp.domain is Domain.PLUS_MINUS_ONE
    assert bp.scales.shape == (2,)
    torch.testing.assert_close(bp.reconstruct(), expected)


def test_default_initialisation_is_a_uniform_quantizer() -> None:
    q = ABCActivationQuantizer(1)
    x = torch.tensor([-2.0, -0.0, 0.0, 0.3])
    torch.testing.assert_close(q(x), torch.tensor([-1.0, 1.0, 1.0, 1.0]))  # sign, sign(0)=+1
    q = ABCActivationQuantizer(4)
    levels = torch.unique(q(torch.linspace(-2, 2, 101)))
    torch.testing.assert_close(levels, torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))


def test_activation_backward_matches_the_surrogate(numeric_grad, away_from) -> None:
    torch.manual_seed(3)
    v = torch.tensor([0.9, 0.3, -0.6], dtype=torch.float64)
    beta = torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64) * 1.2
    x = away_from(x, [k - float(vi) for vi in v for k in (0.0, 0.5, 1.0)])
    g = torch.randn_like(x)

    q = ABCActivationQuantizer(3).double()
    with torch.no_grad():
        q.v.copy_(v)
        q.beta.copy_(beta)
    xr = x.clone().requires_grad_(True)
    (q(xr) * g).sum().backward()

    gx = numeric_grad(lambda t: (ramp_surrogate(t, v, beta) * g).sum(), x.clone())
    gv = numeric_grad(lambda t: (ramp_surrogate(x, t, beta) * g).sum(), v.clone())
    gb = numeric_grad(lambda t: (abc_activation(x, v, t) * g).sum(), beta.clone())
    torch.testing.assert_close(xr.grad, gx, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.v.grad, gv, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.beta.grad, gb, rtol=1e-6, atol=1e-7)
    # the stated formula, too: dC/dR = sum_n beta_n g 1[0 <= R + v_n <= 1]
    stated = sum(beta[i] * g * ((x + v[i] >= 0) & (x + v[i] <= 1)) for i in range(3))
    torch.testing.assert_close(xr.grad, stated)


def test_activation_bit_planes_reconstruct_forward() -> None:
    q = ABCActivationQuantizer(5)
    x = torch.relu(torch.randn(2, 3, 5, 7))
    q.calibrate(x.flatten())
    bp = q.bit_planes(x)
    assert bp.planes.shape == (5, 2, 3, 5, 7) and bp.planes.dtype == torch.bool
    torch.testing.assert_close(bp.reconstruct(), q(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(q(x), q(x.requires_grad_(True)).detach())


# ---------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------


def mse(q: ABCActivationQuantizer, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((q(x) - x) ** 2).mean())


@pytest.mark.parametrize("kind", ["relu", "gaussian"])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_calibration_beats_random_and_quantile_inits(kind: str, n: int) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20000, generator=gen) * 1.5 + 0.2
    if kind == "relu":
        x = torch.relu(x)
    calibrated = ABCActivationQuantizer(n)
    calibrated.calibrate(x)
    best = mse(calibrated, x)

    # the seeds' random initialisation (normal v and beta), best of several draws
    random_errors = []
    for _ in range(10):
        q = ABCActivationQuantizer(n)
        with torch.no_grad():
            q.v.copy_(torch.randn(n, generator=gen))
            q.beta.copy_(torch.randn(n, generator=gen))
        random_errors.append(mse(q, x))
    assert best < min(random_errors)
    if n > 1:  # (N = 1 on ReLU data: the best is a constant, which a random draw can near)
        assert best < 0.5 * min(random_errors)

    # thresholds at the quantiles i/(N+1) with least-squares beta
    quant = ABCActivationQuantizer(n)
    with torch.no_grad():
        probs = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
        quant.v.copy_(0.5 - torch.quantile(x.double(), probs).float())
        quant.beta.copy_(fit_activation_scales(x, quant.v).float())
    assert best <= mse(quant, x) * (1 + 1e-6)
    assert best < mse(ABCActivationQuantizer(n), x)  # and the uncalibrated default


def test_calibration_quality_on_post_relu_data() -> None:
    x = torch.relu(torch.randn(50000))
    q = ABCActivationQuantizer(5)
    q.calibrate(x)
    assert mse(q, x) / float(x.var()) < 0.05
    # a plane below all data (the offset) maps the zero mass near 0
    with torch.no_grad():
        assert abs(float(q(torch.zeros(1)))) < 0.1


def test_fit_activation_scales_is_least_squares() -> None:
    x = torch.randn(3000)
    v = torch.tensor([0.1, 0.5, 1.2])
    beta = fit_activation_scales(x, v)
    planes = torch.stack([(x + v[i]) >= 0.5 for i in range(3)])
    np.testing.assert_allclose(beta.numpy(), numpy_lstsq(planes, x), rtol=1e-9, atol=1e-12)


def test_search_is_deterministic_and_handles_degenerate_samples() -> None:
    x = torch.randn(5000)
    torch.testing.assert_close(search_activation_shifts(x, 4), search_activation_shifts(x, 4))
    for samples in (torch.zeros(100), torch.tensor([2.5]), torch.tensor([0.0, 1.0])):
        q = ABCActivationQuantizer(3)
        q.calibrate(samples)
        assert torch.isfinite(q.v).all() and torch.isfinite(q.beta).all()
        torch.testing.assert_close(q(samples), samples, atol=1e-5, rtol=0)


def test_gradients_reach_v_and_beta_after_calibration() -> None:
    x = torch.relu(torch.randn(4, 8, 6, 6))
    q = ABCActivationQuantizer(4)
    q.calibrate(x.flatten())
    target = x * 1.1
    ((q(x) - target) ** 2).mean().backward()
    assert (q.beta.grad.abs() > 0).all()
    thresholds = 0.5 - q.v.detach()
    data_planes = thresholds > float(x.min())  # the constant plane's window lies below the data
    assert (q.v.grad[data_planes].abs() > 0).all()


def test_the_offset_plane_shift_is_frozen_because_its_true_gradient_is_zero() -> None:
    # On post-ReLU data calibration picks a plane below all data: A_n = +1 everywhere, the
    # offset that maps the zero mass to ~0. Its v gets no gradient, and that is the exact
    # answer: no sample crosses its threshold, so moving it changes nothing. The offset
    # itself trains through its beta, whose gradient is the full sum of the upstream gradient.
    x = torch.relu(torch.randn(20000, dtype=torch.float64))
    q = ABCActivationQuantizer(5).double()
    q.calibrate(x)
    thresholds = 0.5 - q.v.detach()
    offset = thresholds < float(x.min())
    assert int(offset.sum()) == 1
    g = torch.randn_like(x)
    (g * q(x)).sum().backward()
    assert float(q.v.grad[offset]) == 0.0
    assert float(q.beta.grad[offset]) == pytest.approx(float(g.sum()), rel=1e-12)
    for h in (1e-3, 0.1):  # finite differences of the forward itself, in the offset's v
        step = offset.to(torch.float64) * h
        with torch.no_grad():
            up = (g * abc_activation(x, q.v + step, q.beta)).sum()
            down = (g * abc_activation(x, q.v - step, q.beta)).sum()
        assert float(up - down) == 0.0


def test_calibration_rejects_bad_samples() -> None:
    q = ABCActivationQuantizer(2)
    with pytest.raises(BadInputError):
        q.calibrate(torch.empty(0))
    with pytest.raises(BadInputError):
        q.calibrate(torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------------------------------
# the scheme and the binarized convolution
# ---------------------------------------------------------------------------------------


def test_abc_is_registered_with_paper_defaults() -> None:
    scheme = get_scheme("abc")
    assert (scheme.default_m, scheme.default_n) == (5, 5)
    assert scheme.binarize_downsample is False
    assert scheme.weight_domain is Domain.PLUS_MINUS_ONE
    assert scheme.activation_domain is Domain.PLUS_MINUS_ONE
    assert isinstance(scheme.activation_quantizer(0), FullPrecisionActivation)
    wq = scheme.weight_quantizer(3, {"weight_clip_std": 2.0, "lambda_w": 1.0})
    assert wq.num_bases == 3 and wq.clip_std == 2.0
    assert scheme.activation_quantizer(4).num_bases == 4


def test_validation_errors() -> None:
    scheme = get_scheme("abc")
    with pytest.raises(SchemeError):
        scheme.check(0, 3)
    with pytest.raises(SchemeError):
        scheme.check(3, -1)
    scheme.check(1, 0)
    scheme.check(8, 7)
    with pytest.raises(SchemeError):
        ABCWeightQuantizer(0)
    with pytest.raises(SchemeError):
        ABCActivationQuantizer(0)
    for bad in (0, -1.0, "3", True):
        with pytest.raises(SchemeError):
            scheme.weight_quantizer(2, {"weight_clip_std": bad})


@pytest.mark.parametrize("c_in", [3, 5])
@pytest.mark.parametrize(("m", "n"), [(3, 2), (1, 1), (5, 5)])
def test_one_conv_equals_the_explicit_binary_sum(c_in: int, m: int, n: int) -> None:
    conv = nn.Conv2d(c_in, 7, 3, stride=2, padding=1, bias=True).double()
    layer = BinarizedConv2d.from_conv(conv, get_scheme("abc"), m, n)
    x = torch.relu(torch.randn(2, c_in, 9, 11, dtype=torch.float64))
    layer.activation_quantizer.calibrate(x.flatten())
    with torch.no_grad():
        y = layer(x)
        explicit = explicit_binary_sum(layer, x)
        rel = float((y - explicit).abs().max() / y.abs().max())
        assert rel < 1e-5
        # Reading a padded position as bit 0 (= -1) is wrong: the runtime must correct borders.
        ap = layer.activation_quantizer.bit_planes(x)
        wp = layer.weight_quantizer.bit_planes(layer.weight)
        padded = F.pad(ap.signed_planes(), (1, 1, 1, 1), value=-1.0)
        wrong = sum(
            wp.scales[i]
            * ap.scales[j]
            * F.conv2d(padded[j], wp.signed_planes()[i], None, layer.stride)
            for i in range(m)
            for j in range(n)
        ) + layer.bias.reshape(1, -1, 1, 1)
        assert float((wrong - y).abs().max()) > 1e-3


def test_state_dict_names_are_the_runtime_contract() -> None:
    conv = nn.Conv2d(3, 4, 3)
    layer = BinarizedConv2d.from_conv(conv, get_scheme("abc"), 3, 2)
    keys = set(layer.state_dict())
    assert {"activation_quantizer.v", "activation_quantizer.beta"} <= keys
    assert not any(k.startswith("weight_quantizer.") for k in keys)  # alpha is recomputed
    x = torch.relu(torch.randn(1, 3, 6, 6))
    layer.activation_quantizer.calibrate(x.flatten())
    clone = BinarizedConv2d.from_conv(conv, get_scheme("abc"), 3, 2)
    clone.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(x), layer(x))
