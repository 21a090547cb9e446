"""PA-Net scheme (seed 002, section 3): forward, every backward, bit planes, calibration.

Every backward is checked against central finite differences of an explicit ramp surrogate
written here independently of the library (double precision), and the one-convolution
forward of BinarizedConv2d against the explicit sum of M x N {0,1}-plane convolutions.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.core.errors import BadInputError, SchemeError
from binarize_cli.quant import pa
from binarize_cli.quant.base import Domain, FullPrecisionActivation, get_scheme
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.pa import (
    GAUSSIAN_ENDPOINTS,
    PA_SCHEME,
    TABLE1_ENDPOINTS,
    PAActivationQuantizer,
    PAWeightQuantizer,
)

D = torch.float64

# ----------------------------------------------------------------------------------------
# Independent reference implementations (eq. 6-14 read directly, no library helpers)
# ----------------------------------------------------------------------------------------


def ref_weight(w: torch.Tensor, c: list[float]):
    """Return (u, levels over the M+1 pieces, piece index per element) by eq. 6-7."""
    m = len(c)
    h = m // 2
    flat = w.detach().reshape(-1).tolist()
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
    u = [mean + ck * std for ck in c]

    def piece(x: float) -> int:
        if x < u[0]:
            return 0
        for k in range(1, m):
            if u[k - 1] <= x < u[k]:
                return k
        return m

    idx = [piece(x) for x in flat]
    levels = []
    for k in range(m + 1):
        members = [x for x, i in zip(flat, idx, strict=True) if i == k]
        if k == h:
            levels.append(0.0)
        elif members:
            levels.append(sum(members) / len(members))
        else:  # empty piece: midpoint of its interval, the finite endpoint for outer pieces
            lo = u[k - 1] if k > 0 else u[0]
            hi = u[k] if k < m else u[m - 1]
            levels.append((lo + hi) / 2)
    return u, levels, idx


def ref_weight_ramp(u: list[float], levels: list[float], lam: float):
    """The continuous piecewise-linear function whose derivative is eq. 8 (s_k of eq. 9)."""
    m = len(u)
    s = [-math.inf] + [(u[k] + u[k + 1]) / 2 for k in range(m - 1)] + [math.inf]
    slopes = [lam * (levels[k + 1] - levels[k]) for k in range(m)]

    def ramp(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for k in range(m):
            lo, hi = s[k], s[k + 1]
            out = out + slopes[k] * (x.clamp(lo, hi) - min(max(0.0, lo), hi))
        return out

    return ramp, s[1:-1]


def ref_act_segments(v: list[float], lambda_delta: float | None, lambda_a: float | None):
    """t_0..t_N (eq. 12, t_0 = max(2 v_1 - t_1, 0+)) and lambda_A, with the library's defaults."""
    n = len(v)
    mids = [(v[i] + v[i + 1]) / 2 for i in range(n - 1)]
    if lambda_delta is None:
        lambda_delta = (v[-1] - mids[-1]) if n >= 2 else abs(v[0])
    t_n = v[-1] + lambda_delta
    t1 = mids[0] if n >= 2 else t_n
    t0 = 2 * v[0] - t1
    if v[0] > 0:  # eq. 10 layout: the first segment stops at 0 (exclusive)
        t0 = max(t0, torch.finfo(D).tiny)
    t = [t0, *mids, t_n]
    lam = n / (t[-1] - t[0]) if lambda_a is None else lambda_a
    return t, lam


def ref_act_ramp(x, v, beta, t, lam, frozen_v):
    """Ramp surrogate sum_i lambda_A (beta_i - beta_{i-1}) clamp(x - v_i, a_i, b_i).

    The segment ends relative to v_i (a_i = t_{i-1} - v_i, b_i = t_i - v_i) come from
    ``frozen_v`` and stay constant, so d/dx is eq. 11 and d/dv_i is eq. 14 (sign corrected).
    """
    out = torch.zeros_like(x)
    prev = 0.0
    for i in range(len(v)):
        a_i, b_i = t[i] - frozen_v[i], t[i + 1] - frozen_v[i]
        out = out + lam * (beta[i] - prev) * (x - v[i]).clamp(a_i, b_i)
        prev = beta[i]
    return out


def act_quantizer(v, beta, **kw) -> PAActivationQuantizer:
    q = PAActivationQuantizer(len(v), **kw).to(D)
    with torch.no_grad():
        q.v.copy_(torch.tensor(v, dtype=D))
        q.beta.copy_(torch.tensor(beta, dtype=D))
    return q


# ----------------------------------------------------------------------------------------
# Weight endpoints
# ----------------------------------------------------------------------------------------


def test_table1_is_the_m8_default():
    q = PAWeightQuantizer(8)
    assert q.endpoint_multipliers.tolist() == list(TABLE1_ENDPOINTS)
    assert TABLE1_ENDPOINTS == (-1.5, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5)
    assert PA_SCHEME.weight_quantizer(8).endpoint_multipliers.tolist() == list(TABLE1_ENDPOINTS)


@pytest.mark.parametrize("m", sorted(GAUSSIAN_ENDPOINTS))
def test_gaussian_endpoint_table_regenerates(m):
    assert tuple(round(c, 4) for c in pa.gaussian_lloyd_endpoints(m)) == GAUSSIAN_ENDPOINTS[m]
    assert pa.default_weight_endpoints(m) == GAUSSIAN_ENDPOINTS[m]


def test_gaussian_endpoints_match_max_1960_and_are_optimal():
    # J. Max (1960), optimal Gaussian quantizers with 3, 5, 7 levels: thresholds and MSE.
    assert pa.gaussian_lloyd_endpoints(2)[1] == pytest.approx(0.6120, abs=1e-4)
    assert pa.gaussian_lloyd_endpoints(4)[2:] == pytest.approx((0.3823, 1.2444), abs=1e-4)
    assert pa.gaussian_lloyd_endpoints(6)[3:] == pytest.approx((0.2803, 0.8744, 1.6108), abs=1e-4)
    for m, mse in ((2, 0.1902), (4, 0.07994), (6, 0.04400)):
        assert pa.gaussian_pa_mse(pa.gaussian_lloyd_endpoints(m)) == pytest.approx(mse, abs=1e-4)
    # a local minimum: symmetric perturbations of any endpoint pair raise the error
    c = list(pa.gaussian_lloyd_endpoints(6))
    best = pa.gaussian_pa_mse(c)
    for k in range(3):
        for d in (-0.02, 0.02):
            p = list(c)
            p[k] -= d
            p[5 - k] += d
            assert pa.gaussian_pa_mse(p) > best
    # Table 1 is not the M=8 optimum (the paper says the difference is negligible)
    assert pa.gaussian_pa_mse(TABLE1_ENDPOINTS) == pytest.approx(0.0349, abs=1e-4)
    assert pa.gaussian_pa_mse(pa.gaussian_lloyd_endpoints(8)) < pa.gaussian_pa_mse(TABLE1_ENDPOINTS)


def test_gaussian_pa_mse_matches_monte_carlo():
    w = torch.randn(400_000, dtype=D)
    q = PAWeightQuantizer(4, endpoints=[-1.2, -0.4, 0.3, 1.1])
    emp = float(((q(w) - w) ** 2).mean())
    assert emp == pytest.approx(pa.gaussian_pa_mse([-1.2, -0.4, 0.3, 1.1]), rel=0.03)


# ----------------------------------------------------------------------------------------
# Weight forward
# ----------------------------------------------------------------------------------------


def test_weight_forward_on_endpoints_exactly():
    # mean 0 and population std 1 (to rounding), so u = Table 1 and +-0.5, +-1 sit on endpoints
    w = torch.tensor([-2.0, -1.0, -0.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 2.0], dtype=D)
    q = PAWeightQuantizer(8)
    assert q.endpoints(w).tolist() == pytest.approx(list(TABLE1_ENDPOINTS), abs=1e-15)
    # exactly on the endpoints: half-open pieces [u_k, u_{k+1}), a value on u_k goes right
    u = torch.tensor(TABLE1_ENDPOINTS, dtype=D)
    idx, levels = pa.weight_levels(w, u)
    assert idx.tolist() == [0, 2, 3, 3, 3, 3, 6, 6, 6, 6, 7, 8]
    # every piece mean is the value itself; pieces [-1.5, -1) and [0.25, 0.5) are empty and
    # get the midpoints of their intervals; the zero piece (index 4) is 0
    assert levels.tolist() == [-2.0, -1.25, -1.0, -0.5, 0.0, 0.375, 0.5, 1.0, 2.0]
    assert pa.piece_index(u, u).tolist() == list(range(1, 9))
    assert torch.equal(pa.piece_index(w, u), torch.bucketize(w, u, right=True).to(torch.uint8))
    # the quantizer itself (endpoints from mean/std, within 1 ulp of Table 1)
    assert torch.equal(q(w), w)
    assert q.bit_planes(w).planes.sum(dim=1).tolist() == [1, 0, 1, 4, 0, 4, 1, 1]


@pytest.mark.parametrize("m", [2, 4, 6, 8])
def test_weight_forward_matches_reference(m):
    w = (torch.randn(5, 3, 3, 3, dtype=D) * 0.07 + 0.004).requires_grad_()
    q = PAWeightQuantizer(m)
    c = list(pa.default_weight_endpoints(m))
    u, levels, idx = ref_weight(w, c)
    expected = torch.tensor([levels[i] for i in idx], dtype=D).reshape(w.shape)
    assert torch.allclose(q.endpoints(w), torch.tensor(u, dtype=D), rtol=0, atol=1e-14)
    assert torch.allclose(q(w), expected, rtol=0, atol=1e-14)
    # alpha_k = mean of the latent weights in piece k (eq. 7), zero piece excluded
    alphas = [lv for k, lv in enumerate(levels) if k != m // 2]
    assert torch.allclose(q.alphas(w), torch.tensor(alphas, dtype=D), rtol=0, atol=1e-14)
    # recomputed every forward from the current latent weight
    with torch.no_grad():
        w.mul_(2.0)
    assert torch.allclose(q(w), 2.0 * expected, rtol=0, atol=1e-13)


def test_weight_levels_monotone_and_finite_for_degenerate_weights():
    q = PAWeightQuantizer(8)
    const = torch.full((4, 2, 3, 3), 0.3, requires_grad=True)  # std 0: every u_k = mean
    out = q(const)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(const.grad).all()
    assert torch.allclose(out, const.detach())
    skew = torch.cat([torch.zeros(500), torch.tensor([5.0, -0.01])])  # most pieces empty
    a = q.alphas(skew)
    assert torch.isfinite(a).all()
    h = 4
    assert (a[1:h] >= a[: h - 1]).all() and (a[h + 1 :] >= a[h:-1]).all()


def test_weight_custom_endpoints_and_lambda_option():
    q = PA_SCHEME.weight_quantizer(4, {"weight_endpoints": [-1, -0.2, 0.2, 1], "lambda_w": 3.0})
    assert q.endpoint_multipliers.tolist() == pytest.approx([-1, -0.2, 0.2, 1])
    assert q.lambda_w == 3.0


# ----------------------------------------------------------------------------------------
# Weight backward (eq. 8-9) vs the ramp surrogate
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "lambda_w"), [(2, None), (4, None), (6, 40.0), (8, None)])
def test_weight_backward_matches_ramp_surrogate(m, lambda_w):
    w = (torch.randn(7, 5, 3, 3, dtype=D) * 0.05 - 0.003).requires_grad_()
    g = torch.randn(w.shape, dtype=D)
    q = PAWeightQuantizer(m, lambda_w=lambda_w)
    (q(w) * g).sum().backward()

    u, levels, _ = ref_weight(w, list(pa.default_weight_endpoints(m)))
    lam = (m - 1) / (u[-1] - u[0]) if lambda_w is None else lambda_w
    ramp, splits = ref_weight_ramp(u, levels, lam)
    h = 1e-6
    x = w.detach()
    assert all(float((x - s).abs().min()) > 2 * h for s in splits)  # no kink within +-h
    fd = g * (ramp(x + h) - ramp(x - h)) / (2 * h)
    assert torch.allclose(w.grad, fd, rtol=1e-6, atol=1e-8)
    # the default lambda_W makes the surrogate's slope ~1 on Gaussian-like weights
    if lambda_w is None:
        big = torch.randn(100_000, dtype=D).mul(0.05).requires_grad_()
        q(big).sum().backward()
        assert 0.85 < float(big.grad.mean()) < 1.15


# ----------------------------------------------------------------------------------------
# Activation forward (eq. 10)
# ----------------------------------------------------------------------------------------


def test_activation_forward_levels_on_endpoints():
    q = act_quantizer([0.5, 1.0, 2.0], [0.3, 1.2, 2.5])
    x = torch.tensor([-1.0, 0.0, 0.49, 0.5, 0.99, 1.0, 1.5, 2.0, 3.0], dtype=D)
    assert q(x).tolist() == [0.0, 0.0, 0.0, 0.3, 0.3, 1.2, 1.2, 2.5, 2.5]
    planes = q.bit_planes(x)
    assert planes.domain is Domain.ZERO_ONE and planes.scales.tolist() == [0.3, 1.2, 2.5]
    assert planes.planes.to(torch.int64).tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_activation_crossing_endpoints_use_sorted_order():
    crossed = act_quantizer([1.0, 0.5, 2.0], [0.3, 1.2, 2.5])
    ordered = act_quantizer([0.5, 1.0, 2.0], [0.3, 1.2, 2.5])
    x = torch.linspace(-0.5, 3.0, 71, dtype=D).requires_grad_()
    g = torch.randn(71, dtype=D)
    y1, y2 = crossed(x), ordered(x)
    assert torch.equal(y1, y2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    # gradients reach the stored slots through the sort: slot 0 holds the 2nd endpoint
    assert torch.allclose(crossed.v.grad, ordered.v.grad[[1, 0, 2]])
    assert torch.allclose(crossed.beta.grad, ordered.beta.grad)
    assert torch.equal(crossed.bit_planes(x).planes, ordered.bit_planes(x).planes)


# ----------------------------------------------------------------------------------------
# Activation backward (eq. 11-14) vs the ramp surrogate
# ----------------------------------------------------------------------------------------

ACT_CASES = [
    ([0.6], [1.1], None, None),
    ([0.6], [1.1], 2.0, 0.25),
    ([0.3, 1.1], [0.5, 1.7], None, None),
    ([0.2, 0.55, 0.9, 1.4, 2.1], [0.35, 0.8, 0.7, 1.6, 2.4], None, None),  # non-monotone beta
    ([0.2, 0.55, 0.9, 1.4, 2.1], [0.35, 0.8, 1.1, 1.6, 2.4], 1.5, 0.4),
]


@pytest.mark.parametrize(("v", "beta", "lambda_a", "lambda_delta"), ACT_CASES)
def test_activation_backward_matches_ramp_surrogate(
    v, beta, lambda_a, lambda_delta, away_from, check_ramp_gradients
):
    q = act_quantizer(v, beta, lambda_a=lambda_a, lambda_delta=lambda_delta)
    t, lam = ref_act_segments(v, lambda_delta, lambda_a)
    h = 1e-6
    x = away_from(torch.randn(3, 4, 5, 7, dtype=D).abs() * 1.5 - 0.3, t + v, 4 * h)
    # dA_hat/dA (eq. 11) and dC/dv_i (eq. 14, sign corrected): FD of the same ramp, in x and
    # in v_i with the segments frozen at v
    xd, g = check_ramp_gradients(q, x, lambda x_, v_: ref_act_ramp(x_, v_, beta, t, lam, v), v, h)

    # dC/dbeta_i (eq. 13): A_hat is linear in beta, so FD of the forward itself is exact
    fd_b = []
    for i in range(len(beta)):
        bp, bm = list(beta), list(beta)
        bp[i] += h
        bm[i] -= h
        lp = (g * act_quantizer(v, bp)(xd)).sum().detach()
        lm = (g * act_quantizer(v, bm)(xd)).sum().detach()
        fd_b.append(float(lp - lm) / (2 * h))
    assert q.beta.grad.tolist() == pytest.approx(fd_b, rel=1e-6, abs=1e-8)
    # ... which is the sum of the upstream gradient over piece i
    piece_sum = [
        float(g[(xd >= v[i]) & (xd < (v[i + 1] if i + 1 < len(v) else math.inf))].sum())
        for i in range(len(v))
    ]
    assert q.beta.grad.tolist() == pytest.approx(piece_sum, rel=1e-12, abs=1e-12)


def _relu_gaussian_grid(count: int) -> torch.Tensor:
    """ReLU(N(0, 1)) as a deterministic quantile grid: half exact zeros, then the positive half."""
    p = (torch.arange(count, dtype=D) + 0.5) / count
    return torch.clamp_min(math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0), 0.0)


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_activation_endpoint_gradients_track_finite_differences_on_relu_data(n):
    # The true derivative of C = sum(g * A_hat) in v_i is -(L_i - L_{i-1}) * density(v_i) *
    # g(v_i); the surrogate (eq. 14) estimates it from the segment around v_i. Behind a ReLU,
    # half the inputs are exact zeros: they never cross v_1, so they must not count. With the
    # mirrored t_0 = 2 v_1 - t_1 <= 0 they did (2.2-3.5x the finite difference for N = 3..7).
    x = _relu_gaussian_grid(400_000)
    g = 1.0 + 0.5 * torch.sin(3.0 * x)
    v, beta = pa.calibrate_activation(x, n)
    v, beta = v.to(D), beta.to(D)
    q = act_quantizer(v.tolist(), beta.tolist())
    (g * q(x)).sum().backward()
    h = 1e-3
    fd = []
    for i in range(n):
        step = torch.zeros(n, dtype=D)
        step[i] = h
        up = (g * pa.pa_activation_forward(x, v + step, beta)).sum()
        down = (g * pa.pa_activation_forward(x, v - step, beta)).sum()
        fd.append(float(up - down) / (2 * h))
    ratios = [float(a) / b for a, b in zip(q.v.grad, fd, strict=True)]
    # the first endpoint is now estimated like the others (0.7-0.85 of the FD here)
    assert 0.6 <= ratios[0] <= 1.1, ratios
    # every endpoint: the paper's single lambda_A gives 0.75-1.8x on this data
    assert all(0.5 <= r <= 2.0 for r in ratios), ratios


@pytest.mark.parametrize("n", [1, 4])
def test_activation_exact_zeros_contribute_no_gradient(n):
    # Appending exact zeros (with any upstream gradient) changes no parameter gradient, and
    # the zeros get no input gradient: they sit in the zero piece, away from v_1.
    x = _relu_gaussian_grid(2_000)
    v, beta = pa.calibrate_activation(x, n)
    q = act_quantizer(v.tolist(), beta.tolist())
    q(x).sum().backward()
    grads = (q.v.grad.clone(), q.beta.grad.clone())
    q.zero_grad()
    padded = torch.cat([x, torch.zeros(500, dtype=D)]).requires_grad_()
    q(padded).sum().backward()
    assert torch.equal(q.v.grad, grads[0]) and torch.equal(q.beta.grad, grads[1])
    assert torch.count_nonzero(padded.grad[x.numel() :]) == 0
    assert torch.count_nonzero(padded.grad[: x.numel()][x > 0]) > 0


def test_activation_v_gradient_sign_moves_endpoint_the_right_way():
    # Loss = sum(A_hat): raising the output wants v_1 to move LEFT, i.e. dC/dv_1 < 0.
    q = act_quantizer([1.0], [1.0])
    x = torch.linspace(0.0, 2.0, 201, dtype=D)
    q(x).sum().backward()
    assert float(q.v.grad[0]) < 0


def test_activation_default_segments_n1_is_clipped_identity():
    # N = 1 with the defaults: t = [0, 2 v_1], lambda_A = 1 / (2 v_1); with beta_1 = 2 v_1
    # (what calibration gives) the surrogate is the identity on [0, beta_1).
    q = act_quantizer([0.6], [1.2])
    x = torch.tensor([-0.1, 0.05, 0.59, 0.61, 1.19, 1.21], dtype=D, requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------------------
# Bit planes (eq. 15-18) and the one-convolution forward (eq. 19)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 4, 8])
def test_weight_bit_planes_reconstruct_forward(m):
    w = torch.randn(5, 3, 3, 3) * 0.1
    q = PAWeightQuantizer(m)
    bp = q.bit_planes(w)
    assert bp.domain is Domain.ZERO_ONE and bp.num_planes == m
    assert bp.planes.dtype == torch.bool and bp.planes.shape == (m, *w.shape)
    assert bp.scales.shape == (m,)
    assert int(bp.planes.sum(0).max()) <= 1  # a weight is in at most one non-zero piece
    assert torch.equal(bp.reconstruct(), q(w))


@pytest.mark.parametrize("n", [1, 3, 5])
def test_activation_bit_planes_reconstruct_forward(n):
    x = torch.randn(2, 3, 5, 7)
    q = PAActivationQuantizer(n)
    q.calibrate(torch.relu(x))
    bp = q.bit_planes(x)
    assert bp.num_planes == n and bp.scales.shape == (n,)
    assert int(bp.planes.sum(0).max()) <= 1
    assert torch.equal(bp.reconstruct(), q(x))


@pytest.mark.parametrize(("c_in", "m", "n"), [(3, 4, 5), (5, 8, 3), (5, 2, 1)])
def test_one_conv_forward_equals_sum_of_plane_convolutions(c_in, m, n):
    conv = nn.Conv2d(c_in, 7, 3, stride=2, padding=1)
    layer = BinarizedConv2d.from_conv(conv, PA_SCHEME, m, n)
    x = torch.randn(2, c_in, 9, 11)
    layer.activation_quantizer.calibrate(torch.relu(x))
    y = layer(x)

    wp = layer.weight_quantizer.bit_planes(layer.weight)
    ap = layer.activation_quantizer.bit_planes(x)
    expected = torch.zeros_like(y, dtype=D)
    for i in range(m):
        for j in range(n):
            t_i = wp.planes[i].to(D)
            v_j = ap.planes[j].to(D)
            expected += (
                float(wp.scales[i]) * float(ap.scales[j]) * F.conv2d(v_j, t_i, stride=2, padding=1)
            )
    expected += layer.bias.detach().to(D).reshape(1, -1, 1, 1)
    err = (y.detach().to(D) - expected).abs().max() / expected.abs().max()
    assert float(err) < 1e-5


def test_onnx_export_of_pa_conv_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    layer = BinarizedConv2d.from_conv(
        nn.Conv2d(5, 7, 3, stride=2, padding=1), PA_SCHEME, 4, 5
    ).eval()
    x = torch.randn(2, 5, 9, 11)
    layer.activation_quantizer.calibrate(torch.relu(x))
    path = tmp_path / "pa.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), str(path), dynamo=False)
    sess = ort.InferenceSession(str(path))
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), layer(x).detach(), atol=1e-5)


def test_masked_sum_path_equals_bincount_path(monkeypatch):
    idx = torch.randint(0, 6, (1000,), dtype=torch.uint8)
    vals = torch.randn(1000, dtype=D)
    cpu = pa._bin_sums(idx, vals, 7, D)
    counts = pa._bin_sums(idx, None, 7, D)
    monkeypatch.setattr(pa, "_exporting", lambda: True)  # the CUDA / export code path
    assert torch.allclose(pa._bin_sums(idx, vals, 7, D), cpu, rtol=0, atol=1e-12)
    assert torch.equal(pa._bin_sums(idx, None, 7, D), counts)
    assert counts[6] == 0


# ----------------------------------------------------------------------------------------
# Calibration and reconstruction error
# ----------------------------------------------------------------------------------------


def test_calibration_beats_naive_inits_on_relu_gaussian():
    samples = torch.relu(torch.randn(40_000, dtype=D))
    n = 5
    v, beta = pa.calibrate_activation(samples, n)
    assert (v[1:] > v[:-1]).all() and float(v[0]) > 0
    calibrated = pa.activation_mse(samples, v, beta)
    top = float(samples.max())
    uniform_v = torch.linspace(0, top, n + 1, dtype=D)[1:]
    naive = {
        "uniform to max": (uniform_v, uniform_v),
        "unit steps": (torch.arange(1, n + 1, dtype=D) - 0.5, torch.arange(1, n + 1, dtype=D)),
        "random (seeds)": (torch.sort(torch.rand(n, dtype=D)).values, torch.rand(n, dtype=D)),
    }
    for name, (nv, nb) in naive.items():
        assert calibrated < pa.activation_mse(samples, nv, nb), name
    # Lloyd-Max fixed point: v = midpoints of (0, beta), beta = piece means
    mids = (torch.cat([torch.zeros(1, dtype=D), beta[:-1]]) + beta) / 2
    assert torch.allclose(v, mids)
    for i in range(n):
        hi = v[i + 1] if i + 1 < n else math.inf
        members = samples[(samples >= v[i]) & (samples < hi)]
        assert float(beta[i]) == pytest.approx(float(members.mean()), abs=1e-6)
    # ... and close to the analytic optimum for ReLU(N(0,1)) (the data-free initial value)
    v0, b0 = pa.relu_gaussian_levels(n)
    assert beta.tolist() == pytest.approx(list(b0), abs=0.05)
    assert calibrated < 0.5 * pa.activation_mse(
        samples, torch.tensor(v0, dtype=D) * 2, torch.tensor(b0, dtype=D) * 2
    )


def test_quantizer_calibrate_sets_parameters_and_rejects_bad_samples():
    q = PAActivationQuantizer(3)
    x = torch.relu(torch.randn(4, 8, 6, 6)) * 3.0
    q.calibrate(x)
    v, beta = pa.calibrate_activation(x, 3)
    assert torch.allclose(q.v, v.float()) and torch.allclose(q.beta, beta.float())
    # the same one-line bad-input errors (exit 2) as every other scheme's calibration
    with pytest.raises(BadInputError, match="got no samples"):
        q.calibrate(torch.empty(0))
    with pytest.raises(BadInputError, match="NaN"):
        q.calibrate(torch.tensor([1.0, float("nan")]))
    # all samples <= 0: still valid, strictly increasing, maps everything to 0
    v, beta = pa.calibrate_activation(-torch.rand(100), 3)
    assert (v[1:] > v[:-1]).all() and float(v[0]) > 0


def test_reconstruction_error_falls_as_m_grows():
    w = torch.randn(64, 32, 3, 3) * 0.05 + 0.002
    errors = []
    for m in (2, 4, 6, 8):
        err = float(((PAWeightQuantizer(m)(w) - w) ** 2).mean()) / float(w.var())
        errors.append(err)
        assert err == pytest.approx(pa.gaussian_pa_mse(pa.default_weight_endpoints(m)), rel=0.05)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.2 * errors[0]


# ----------------------------------------------------------------------------------------
# Registration and validation
# ----------------------------------------------------------------------------------------


def test_scheme_registered():
    assert get_scheme("pa") is PA_SCHEME
    assert (PA_SCHEME.default_m, PA_SCHEME.default_n) == (4, 5)
    assert PA_SCHEME.binarize_downsample is True
    assert (
        PA_SCHEME.weight_domain is Domain.ZERO_ONE
        and PA_SCHEME.activation_domain is Domain.ZERO_ONE
    )
    assert isinstance(PA_SCHEME.activation_quantizer(0), FullPrecisionActivation)
    assert isinstance(PA_SCHEME.activation_quantizer(5), PAActivationQuantizer)
    PA_SCHEME.check(4, 5)
    PA_SCHEME.check(8, 0)


@pytest.mark.parametrize("m", [1, 3, 5, 66])
def test_bad_m_is_a_one_line_scheme_error(m):
    with pytest.raises(SchemeError, match="PA needs an even -M >= 2") as e:
        PA_SCHEME.check(m, 5)
    assert "\n" not in str(e.value)
    with pytest.raises(SchemeError):
        PAWeightQuantizer(m)


@pytest.mark.parametrize(
    ("endpoints", "match"),
    [
        ([-1.0, 0.5, 1.0], "exactly M = 4"),
        ([-1.0, -0.5, 0.5, 0.4], "strictly increasing"),
        ([-1.0, 0.1, 0.5, 1.0], "negative"),
        ([-1.0, -0.5, 0.5, float("inf")], "finite"),
        ("abc", "list of numbers"),
    ],
)
def test_bad_weight_endpoints(endpoints, match):
    with pytest.raises(SchemeError, match=match):
        PA_SCHEME.weight_quantizer(4, {"weight_endpoints": endpoints})


def test_bad_options():
    with pytest.raises(SchemeError, match="unknown PA option"):
        PA_SCHEME.weight_quantizer(4, {"lamda_w": 1.0})
    with pytest.raises(SchemeError, match="lambda_a"):
        PA_SCHEME.activation_quantizer(5, {"lambda_a": -1})
    with pytest.raises(SchemeError, match="lambda_delta"):
        PAActivationQuantizer(5, lambda_delta=float("nan"))
    with pytest.raises(SchemeError, match="-N"):
        PA_SCHEME.check(4, 65)
