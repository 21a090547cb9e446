"""Weight reconstruction error on a real trained layer (the digits baseline), PA vs ABC.

Schemes issue: PA with M = 8 approximates a trained layer better than ABC with M = 5, and the
error falls as M grows for both. Trains (or reuses from the cache) the digits baseline, so it
is marked slow.
"""

from __future__ import annotations

import pytest
import torch

from binarize_cli.convert.baseline import ensure_baseline
from binarize_cli.load.data import load_data
from binarize_cli.load.models import load_model
from binarize_cli.quant import get_scheme

LAYERS = ("layer2.0.conv1", "layer3.1.conv2", "layer4.0.conv2")


def _relative_error(scheme: str, m: int, weight: torch.Tensor) -> float:
    quantizer = get_scheme(scheme).weight_quantizer(m)
    quantizer.calibrate(weight)
    with torch.no_grad():
        w_hat = quantizer(weight)
    return float((weight - w_hat).norm() / weight.norm())


@pytest.mark.slow
def test_pa_beats_abc_and_error_falls_with_m_on_trained_layers():
    data = load_data("digits")
    loaded = load_model("resnet18", num_classes=data.num_classes)
    baseline = ensure_baseline(loaded, data)
    assert baseline.accuracy.top1 >= 95.0
    modules = dict(baseline.model.named_modules())
    for name in LAYERS:
        weight = modules[name].weight.detach()
        pa = [_relative_error("pa", m, weight) for m in (2, 4, 6, 8)]
        abc = [_relative_error("abc", m, weight) for m in (1, 2, 3, 4, 5)]
        assert pa[-1] < abc[-1], (name, pa, abc)
        assert all(a > b for a, b in zip(pa, pa[1:], strict=False)), (name, pa)
        assert all(a > b for a, b in zip(abc, abc[1:], strict=False)), (name, abc)
