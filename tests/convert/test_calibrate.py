"""Calibration: data-driven activation endpoints, refinement on the model's own inputs, BN."""

from __future__ import annotations

import copy

import timm
import torch

from binarize_cli.convert.calibrate import (
    calibrate_model,
    collect_input_samples,
    reestimate_batchnorm,
)
from binarize_cli.convert.surgery import binarize_model
from binarize_cli.quant.layers import BinarizedConv2d


def _converted(scheme: str, m: int, n: int):
    torch.manual_seed(0)
    fp = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    student = binarize_model(
        copy.deepcopy(fp), scheme, m, n, first_conv="conv1", classifier="fc"
    ).model
    return fp, student


def _activation_error(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Mean over binarized layers of ||A - A_hat|| / ||A|| on the model's own inputs."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, BinarizedConv2d)]
    samples = collect_input_samples(model, names, [batch], samples_per_layer=20_000)
    modules = dict(model.named_modules())
    errors = []
    with torch.no_grad():
        for name in names:
            a = samples[name]
            a_hat = modules[name].activation_quantizer(a)
            errors.append(float((a - a_hat).norm() / a.norm().clamp_min(1e-12)))
    return sum(errors) / len(errors)


def test_refinement_lowers_activation_error_on_own_inputs():
    batches = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    fp, once = _converted("pa", 4, 3)
    calibrate_model(once, fp, batches, refinements=0)
    fp2, refined = _converted("pa", 4, 3)
    calibrate_model(refined, fp2, batches, refinements=1)
    probe = torch.randn(16, 3, 32, 32)
    assert _activation_error(refined, probe) < _activation_error(once, probe)


def test_calibration_sets_endpoints_from_data_and_is_deterministic():
    batches = [torch.randn(8, 3, 32, 32)]
    fp, a = _converted("abc", 3, 3)
    fp_b, b = _converted("abc", 3, 3)
    before = {k: v.clone() for k, v in a.state_dict().items() if "activation_quantizer" in k}
    stats = calibrate_model(a, fp, batches)
    calibrate_model(b, fp_b, batches)
    assert stats.layers == 16  # abc keeps the 3 downsample convs full precision
    after = {k: v for k, v in a.state_dict().items() if "activation_quantizer" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_batchnorm_reestimation_matches_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(32, 3, 8, 8) * 3 + 1
    assert reestimate_batchnorm(model, [x[:16], x[16:]]) == 1
    y = model[0](x)
    bn = model[1]
    assert torch.allclose(bn.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-4)
    assert not model.training and not bn.training
