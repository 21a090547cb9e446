"""PA's signed activation layout (inputs not behind a ReLU): forward, backward, calibration,
and exact agreement of the packed runtime and ONNX with the PyTorch simulation.

Eq. 10 maps everything below ``v_1`` to 0, which assumes a ReLU before every binarized
convolution (true of the paper's networks). MobileNetV2/EfficientNet feed 1x1 convolutions
from linear bottlenecks; there the calibration may put ``K`` levels below 0 and keep the
zero piece ``[v_K, v_{K+1})`` (``zero_piece = K``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from binarize_cli.core.errors import RecipeError, SchemeError
from binarize_cli.core.settings import validate_recipe
from binarize_cli.export.onnx import export_onnx_model, onnx_logits
from binarize_cli.export.verify import verify_model
from binarize_cli.quant import pa
from binarize_cli.quant.base import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.pa import PAActivationQuantizer

D = torch.float64


def signed_quantizer(v: list[float], beta: list[float], k: int) -> PAActivationQuantizer:
    q = PAActivationQuantizer(len(v)).to(D)
    with torch.no_grad():
        q.v.copy_(torch.tensor(v, dtype=D))
        q.beta.copy_(torch.tensor(beta, dtype=D))
        q.zero_piece.fill_(k)
    return q


# v sorted; beta_1..beta_K < 0 < beta_{K+1}..beta_N
CASES = [
    ([-0.4, 0.5], [-0.8, 1.0], 1),
    ([-1.3, -0.5, 0.4, 1.2], [-1.8, -0.9, 0.8, 1.6], 2),
    ([-1.0, -0.3, 0.6], [-1.4, -0.7, 1.1], 2),
    ([-2.0, -1.1, -0.4], [-2.5, -1.5, -0.8], 3),  # all levels negative
]


def reference_levels(beta: list[float], k: int) -> list[float]:
    return beta[:k] + [0.0] + beta[k:]


def reference_segments(v: list[float]) -> tuple[list[float], float]:
    """Eq. 11-12 with the defaults (mirror rules, lambda_A = N / (t_N - t_0))."""
    n = len(v)
    mids = [(v[i] + v[i + 1]) / 2 for i in range(n - 1)]
    top = v[-1] + (v[-1] - mids[-1]) if n > 1 else 2 * v[0]
    first = mids[0] if n > 1 else top
    t = [2 * v[0] - first, *mids, top]
    return t, n / (t[-1] - t[0])


def reference_ramp(x, v, levels, t, lam):
    """Piecewise-linear surrogate: on ``[t_{i-1}, t_i)`` slope ``lambda_A (L_i - L_{i-1})``,
    written as a function of ``v_i`` so its derivative in ``v_i`` is eq. 14's."""
    out = torch.full_like(x, levels[0])
    out = torch.where(x >= t[-1], torch.full_like(x, levels[-1]), out)
    for i in range(1, len(levels)):
        seg = (x >= t[i - 1]) & (x < t[i])
        jump = levels[i] - levels[i - 1]
        val = levels[i - 1] + jump * (0.5 + lam * (x - v[i - 1]))
        out = torch.where(seg, val, out)
    return out


@pytest.mark.parametrize(("v", "beta", "k"), CASES)
def test_forward_levels(v, beta, k):
    q = signed_quantizer(v, beta, k)
    levels = reference_levels(beta, k)
    x = torch.tensor([-9.0, *v, *(e - 1e-9 for e in v), 9.0, 0.0], dtype=D)
    expected = [levels[sum(e <= xi for e in v)] for xi in x.tolist()]
    assert q(x).tolist() == expected
    with torch.no_grad():
        assert float(q(torch.zeros(1, dtype=D))) == 0.0 or k == len(v)  # 0 sits in the zero piece


@pytest.mark.parametrize(("v", "beta", "k"), CASES)
def test_backward_matches_ramp_surrogate(v, beta, k, away_from, check_ramp_gradients):
    q = signed_quantizer(v, beta, k)
    levels = reference_levels(beta, k)
    t, lam = reference_segments(v)
    h = 1e-6
    x = away_from(torch.randn(4, 5, 6, 7, dtype=D) * 1.5, t + v, 4 * h)
    xd, g = check_ramp_gradients(q, x, lambda x_, v_: reference_ramp(x_, v_, levels, t, lam), v, h)

    # dC/dbeta: the sum of the upstream gradient over each non-zero piece
    piece = torch.bucketize(xd, torch.tensor(v, dtype=D), right=True)
    sums = [float(g[piece == p].sum()) for p in range(len(v) + 1) if p != k]
    assert q.beta.grad.tolist() == pytest.approx(sums, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("v", "beta", "k"), CASES)
def test_bit_planes_reconstruct_forward(v, beta, k):
    q = signed_quantizer(v, beta, k)
    x = torch.randn(2, 3, 5, 7, dtype=D) * 2
    bp = q.bit_planes(x)
    assert bp.num_planes == len(v)
    assert int(bp.planes.sum(0).max()) <= 1
    assert torch.equal(bp.reconstruct(), q(x))
    assert not bp.planes[:, x == 0].any()  # zero (padding) has no plane set


def test_calibration_keeps_eq10_layout_behind_a_relu():
    x = torch.relu(torch.randn(50_000, generator=torch.Generator().manual_seed(0)))
    v, beta, k = pa.calibrate_signed_activation(x, 5)
    v0, beta0 = pa.calibrate_activation(x, 5)
    assert k == 0
    assert torch.equal(v, v0) and torch.equal(beta, beta0)


@pytest.mark.parametrize("n", [2, 4, 5])
def test_calibration_picks_signed_layout_for_signed_data(n):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1), dtype=D)
    v, beta, k = pa.calibrate_signed_activation(x, n)
    assert 1 <= k < n
    levels = pa.activation_levels(beta, k)
    assert bool((levels[1:] > levels[:-1]).all())
    assert float(v[k - 1]) <= 0.0 < float(v[k])  # the zero piece holds 0
    mse = pa.activation_mse(x, v, beta, k)
    eq10 = pa.activation_mse(x, *pa.calibrate_activation(x, n))
    assert mse < 0.6 * eq10  # eq. 10 loses the negative half (~half the variance)
    for other in range(n + 1):  # the chosen layout is the best one fitted
        assert mse <= pa.activation_mse(x, *pa.calibrate_activation(x, n, zero_piece=other), other)


def test_calibration_of_mostly_positive_silu_like_data():
    x = torch.nn.functional.silu(torch.randn(50_000, generator=torch.Generator().manual_seed(2)))
    v, beta, k = pa.calibrate_signed_activation(x, 5)
    assert pa.activation_mse(x, v, beta, k) <= pa.activation_mse(x, *pa.calibrate_activation(x, 5))


def test_option_off_keeps_eq10_and_bad_values_are_errors():
    x = torch.randn(10_000)
    q = get_scheme("pa").make_activation_quantizer(4, {"signed_activations": False})
    q.calibrate(x)
    assert q.zero_level_piece == 0
    q = get_scheme("pa").make_activation_quantizer(4, {})
    q.calibrate(x)
    assert q.zero_level_piece > 0
    with pytest.raises(SchemeError, match="signed_activations"):
        get_scheme("pa").make_activation_quantizer(4, {"signed_activations": "yes"})
    with pytest.raises(SchemeError, match="zero_piece"):
        pa.calibrate_activation(x, 4, zero_piece=5)
    validate_recipe({"scheme_options": {"signed_activations": False}})
    with pytest.raises(RecipeError, match="signed_activations must be bool"):
        validate_recipe({"scheme_options": {"signed_activations": 1}})


def test_state_dict_round_trip_and_files_without_zero_piece():
    q = PAActivationQuantizer(4)
    q.calibrate(torch.randn(10_000))
    k = q.zero_level_piece
    assert k == 2  # symmetric samples: two levels below the zero piece, two above
    fresh = PAActivationQuantizer(4)
    fresh.load_state_dict(q.state_dict())
    assert fresh.zero_level_piece == k
    old = {n: t for n, t in q.state_dict().items() if n != "zero_piece"}
    fresh.load_state_dict(old)  # an older file: eq. 10's layout
    assert fresh.zero_level_piece == 0
    assert "layout=signed, 2 negative levels" in repr(q)


class LinearBottleneckNet(nn.Module):
    """1x1 convolutions fed by linear bottlenecks (signed), odd sizes, a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 11, 3, padding=1, bias=False), nn.BatchNorm2d(11))
        self.expand = nn.Conv2d(11, 21, 1, bias=False)
        self.bn_e = nn.BatchNorm2d(21)
        self.dw = nn.Conv2d(21, 21, 3, padding=1, groups=21, bias=False)
        self.project = nn.Conv2d(21, 11, 1, bias=False)
        self.bn_p = nn.BatchNorm2d(11)
        self.mix = nn.Conv2d(11, 9, 3, stride=2, padding=1, bias=True)
        self.head = nn.Linear(9, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # no ReLU: signed input to `expand`
        y = torch.relu(self.dw(torch.relu(self.bn_e(self.expand(x)))))
        x = x + self.bn_p(self.project(y))  # signed input to `mix`
        return self.head(self.mix(x).mean(dim=(2, 3)))


@torch.no_grad()
def linear_bottleneck_model(m: int, n: int) -> nn.Module:
    torch.manual_seed(0)
    model = LinearBottleneckNet()
    scheme = get_scheme("pa")
    for name in ("expand", "project", "mix"):
        setattr(model, name, BinarizedConv2d.from_conv(getattr(model, name), scheme, m, n))
    x = torch.randn(16, 3, 15, 13)
    samples: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_pre_hook(lambda _m, a, k=name: samples.__setitem__(k, a[0].flatten()))
        for name, mod in model.named_modules()
        if isinstance(mod, BinarizedConv2d)
    ]
    model.eval()(x)
    for h in hooks:
        h.remove()
    for name, mod in model.named_modules():
        if isinstance(mod, BinarizedConv2d):
            mod.activation_quantizer.calibrate(samples[name])
    return model


def test_runtime_and_onnx_agree_exactly_on_the_signed_layout(tmp_path: Path):
    model = linear_bottleneck_model(4, 3)
    layouts = {
        n: m.activation_quantizer.zero_level_piece
        for n, m in model.named_modules()
        if isinstance(m, BinarizedConv2d)
    }
    assert layouts["expand"] > 0 and layouts["mix"] > 0 and layouts["project"] == 0
    meta = {
        "model": "test:linear-bottleneck",
        "scheme": "pa",
        "M": 4,
        "N": 3,
        "num_classes": 10,
        "input_size": [3, 15, 13],
    }
    images = np.random.default_rng(3).standard_normal((6, 3, 15, 13)).astype(np.float32)
    result = verify_model(model, meta, images, onnx=False)
    assert result.top1_agreement.runtime == 100.0
    assert result.max_rel_logit_diff.runtime < 1e-6
    path = export_onnx_model(model, meta, tmp_path / "m.onnx")
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    got = onnx_logits(path, images)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
