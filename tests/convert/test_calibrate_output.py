"""The output-aware calibration rule (``--calibration output``): it lowers the layers' output
error below the tensor rule's, is deterministic, and is chosen by the flag, a recipe key or
the API, and recorded in binarize.json."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from typer.testing import CliRunner

from binarize_cli.api import binarize
from binarize_cli.cli import app
from binarize_cli.convert.calibrate import (
    _error_terms,
    calibrate_model,
    layer_output_errors,
    output_error,
    trace_layers,
)
from binarize_cli.convert.surgery import binarize_model
from binarize_cli.core.errors import BadInputError, RecipeError
from binarize_cli.core.settings import merge_settings
from binarize_cli.quant import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d

STEPS = 30  # Adam steps per layer: enough to move, a few seconds for the whole model


def _converted(scheme: str = "pa", m: int = 4, n: int = 3):
    """timm's 0.37M-parameter test ResNet (12 binarizable convolutions) and its binarized copy."""
    torch.manual_seed(0)
    fp = timm.create_model("test_resnet", num_classes=10).eval()
    student = binarize_model(copy.deepcopy(fp), scheme, m, n).model
    return fp, student


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(2)]


def test_output_rule_lowers_the_layers_output_error():
    batches = _batches()
    fp, tensor = _converted()
    calibrate_model(tensor, fp, batches, rule="tensor")
    fp2, output = _converted()
    stats = calibrate_model(output, fp2, batches, rule="output", steps=STEPS)
    assert stats.rule == "output" and stats.reconstructed == 14
    assert stats.output_error_after < stats.output_error_before
    before = layer_output_errors(tensor, batches)
    after = layer_output_errors(output, batches)
    assert list(before) == list(after) and len(after) == 14
    assert sum(after.values()) < 0.95 * sum(before.values()), (before, after)


def test_output_rule_is_deterministic_and_moves_only_activation_parameters():
    batches = _batches()
    fp, a = _converted("abc", 3, 3)
    fp_b, b = _converted("abc", 3, 3)
    fp_t, t = _converted("abc", 3, 3)
    calibrate_model(a, fp, batches, rule="output", steps=STEPS)
    calibrate_model(b, fp_b, batches, rule="output", steps=STEPS)
    calibrate_model(t, fp_t, batches, rule="tensor")
    state_t = t.state_dict()
    moved = False
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
        if key.endswith("weight") and "activation_quantizer" not in key:
            assert torch.equal(value, state_t[key]), key  # W (and the norms' gains) untouched
        if "activation_quantizer" in key:
            moved = moved or not torch.equal(value, state_t[key])
    assert moved


def test_the_error_follows_the_norm_the_layer_feeds():
    """With a batch norm after the layer, a per-channel offset and scale of the output cost
    nothing (re-estimation removes them) and channels weigh by the norm's squared gain."""
    torch.manual_seed(0)
    _, student = _converted()
    order, norms = trace_layers(student, _batches()[0])
    modules = dict(student.named_modules())
    assert norms["layer1.0.conv1"] is modules["layer1.0.bn1"]
    assert norms["layer2.0.downsample.1"] is modules["layer2.0.downsample.2"]
    assert norms["conv1.6"] is modules["bn1"] and len(norms) == 14
    binarized = {n for n, m in modules.items() if isinstance(m, BinarizedConv2d)}
    assert order[:2] == ["conv1.3", "conv1.6"] and set(order) == binarized
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(8, 2, 4, 4, generator=generator)
    affine = y * torch.tensor([2.0, 0.5]).reshape(1, 2, 1, 1) + torch.tensor([0.3, -1.0]).reshape(
        1, 2, 1, 1
    )
    norm = torch.nn.BatchNorm2d(2)
    num, den = _error_terms(y, affine, None)
    assert float(num / den) > 0.5
    num, den = _error_terms(y, affine, norm)
    assert float(num / den) == pytest.approx(0.0, abs=1e-6)
    noisy = y.clone()
    noisy[:, 1] += torch.randn(8, 4, 4, generator=generator)
    num, den = _error_terms(y, noisy, norm)
    assert float(num / den) > 0.1
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 0.0]))  # the noisy channel no longer passes
    num, den = _error_terms(y, noisy, norm)
    assert float(num / den) == pytest.approx(0.0, abs=1e-6)
    conv = torch.nn.Conv2d(2, 2, 3, bias=False)
    layer = BinarizedConv2d.from_conv(conv, get_scheme("pa"), 2, 3)
    assert output_error(layer, [torch.rand(4, 2, 6, 6, generator=generator)]) > 0


def test_an_unknown_rule_is_one_bad_input_error():
    fp, student = _converted()
    with pytest.raises(BadInputError, match="unknown calibration rule 'mse'"):
        calibrate_model(student, fp, _batches(), rule="mse")
    with pytest.raises(BadInputError, match="calibration must be one of tensor, output"):
        binarize(fp, "pa", 4, 3, _batches(), calibration="mse")


def test_api_binarize_takes_the_rule():
    torch.manual_seed(0)
    fp = timm.create_model("test_resnet", num_classes=10).eval()
    result = binarize(fp, "pa", 4, 3, _batches(), calibration="output")
    assert result.calibration is not None and result.calibration.rule == "output"
    binarized = [d for d in result.decisions if d.binarized]
    assert result.calibration.reconstructed == len(binarized) > 0
    assert result.to_dict()["calibration"]["rule"] == "output"


def test_a_recipe_key_sets_the_rule_and_a_flag_overrides_it():
    assert merge_settings(None, {}).calibration == "tensor"
    assert merge_settings({"calibration": "output"}, {}).calibration == "output"
    assert merge_settings({"calibration": "output"}, {"calibration": "tensor"}).calibration == (
        "tensor"
    )
    with pytest.raises(RecipeError, match="calibration must be one of tensor, output"):
        merge_settings({"calibration": "layer"}, {})
    with pytest.raises(RecipeError, match="calibration must be str"):
        merge_settings({"calibration": 1}, {})


def test_convert_runs_the_output_rule_and_records_it(tmp_path):
    # One end-to-end convert (the recipe key and the flag's precedence are merged by
    # merge_settings: test_a_recipe_key_sets_the_rule_and_a_flag_overrides_it).
    args = ["convert", "timm:test_resnet", "--data", "fake", "--baseline-epochs", "1"]
    args += ["--epochs", "0", "--batch-size", "32", "--calib-batches", "1"]
    result = CliRunner().invoke(app, [*args, "--calibration", "Output", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "a" / "binarize.json").read_text())
    assert meta["recipe"]["calibration"] == "output"
