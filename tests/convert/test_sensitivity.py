"""Per-layer sensitivity: the definitions of convert/sensitivity.py checked against a brute-force
rebuild of the model with one layer binarized, calibrated the way `convert` calibrates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from binarize_cli.convert.calibrate import calibrate_model
from binarize_cli.convert.sensitivity import (
    SENSITIVITY_FILE,
    SensitivityTable,
    candidates_for,
    measure_sensitivity,
)
from binarize_cli.core.errors import BadInputError, RunDirError
from binarize_cli.core.modes import evaluating
from binarize_cli.quant import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d

LAYERS = ["layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"]


def slim_resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], channels=(8, 16, 16, 16), num_classes=10)
    for m in model.modules():  # trained-looking norms (timm zeroes each block's last gain)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))]


@pytest.fixture(scope="module")
def table(data) -> SensitivityTable:
    return measure_sensitivity(slim_resnet(), LAYERS, get_scheme("pa"), 4, 5, data)


def test_candidates_per_scheme() -> None:
    pa = candidates_for(get_scheme("pa"), 4, 5)
    assert len(pa) == 16 and (2, 3) in pa and (8, 0) in pa and (4, 5) in pa
    assert (6, 7) in candidates_for(get_scheme("pa"), 6, 7)
    assert (10, 9) in candidates_for(get_scheme("pa"), 10, 9)  # the run's own is always there
    assert candidates_for(get_scheme("abc"), 5, 5) == [
        (m, n) for m in (1, 3, 5) for n in (0, 1, 3, 5)
    ]
    assert candidates_for(get_scheme("bnn"), 1, 1) == [(1, 0), (1, 1)]


def brute_force(model: nn.Module, x: torch.Tensor, layer: str | None, m: int, n: int):
    """Logits of a copy of ``model`` with ``layer`` alone binarized at (m, n) (None: none),
    calibrated by convert's own calibrate_model (activation quantizer fitted on all of the
    layer's input, batch norms re-estimated, refitted, re-estimated again)."""
    copy_ = copy.deepcopy(model)
    if layer is not None:
        parent_name, _, child = layer.rpartition(".")
        parent = copy_.get_submodule(parent_name)
        new = BinarizedConv2d.from_conv(getattr(parent, child), get_scheme("pa"), m, n)
        setattr(parent, child, new)
    calibrate_model(copy_, model, [x], samples_per_layer=10**9)
    with evaluating(copy_):
        return copy_(x).double()


@pytest.mark.parametrize(
    ("layer", "m", "n"),
    [("layer1.0.conv1", 4, 5), ("layer2.0.downsample.0", 2, 3), ("layer4.1.conv2", 8, 0)],
)
def test_a_candidate_is_the_brute_force_measure(table, data, layer, m, n) -> None:
    x, y = data[0]
    model = slim_resnet()
    z_fp = brute_force(model, x, None, 0, 0)
    z = brute_force(model, x, layer, m, n)
    error = float(((z - z_fp) ** 2).sum() / (z_fp**2).sum())
    loss = float(nn.functional.cross_entropy(z, y) - nn.functional.cross_entropy(z_fp, y))
    measured = table.layer(layer).at((m, n))
    assert measured is not None and error > 1e-4
    # convert re-estimates in train mode (batch statistics, biased variance) and refits the
    # quantizer on the re-estimated model; the measure re-estimates in eval mode, in graph
    # order: a few percent apart on 64 images.
    assert measured.output_error == pytest.approx(error, rel=0.1)
    assert measured.loss_increase == pytest.approx(loss, abs=0.03)
    assert table.fp_loss == pytest.approx(float(nn.functional.cross_entropy(z_fp, y)), rel=0.01)


def test_full_precision_is_zero_and_costs_are_the_accounting(table) -> None:
    row = table.layer("layer2.0.downsample.0")
    fp = row.at(None)
    assert fp is not None and (fp.output_error, fp.loss_increase, fp.bops) == (0.0, 0.0, 0)
    conv = slim_resnet().get_submodule("layer2.0.downsample.0")
    assert fp.bits == 32 * conv.weight.numel()
    assert row.macs == conv.weight.numel() * 4 * 4  # 1x1 conv to a 4x4 output at 32x32 input
    c = row.at((2, 3))
    # M bits per weight, 2 scales... PA: M layer-wise scales, N thresholds and N levels
    assert c.bits == 2 * conv.weight.numel() + 32 * (2 + 2 * 3)
    assert c.bops == 2 * 3 * row.macs
    # more bases, less error (on the same layer, the same data)
    assert row.at((8, 7)).output_error < row.at((2, 3)).output_error


def test_the_model_and_the_rng_are_left_as_they_were(data) -> None:
    model = slim_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    measure_sensitivity(model, LAYERS[:1], get_scheme("pa"), 4, 5, data)
    assert torch.equal(rng, torch.get_rng_state())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not any(isinstance(m, BinarizedConv2d) for m in model.modules())


def test_table_round_trips_through_its_file(table, tmp_path) -> None:
    path = table.save(tmp_path)
    assert path == tmp_path / SENSITIVITY_FILE
    again = SensitivityTable.load(tmp_path)
    assert again is not None and again.to_dict() == table.to_dict()
    assert SensitivityTable.load(tmp_path / "none") is None
    path.write_text('{"format": "other"}')
    with pytest.raises(RunDirError, match="not a sensitivity table"):
        SensitivityTable.load(tmp_path)


def test_bad_layers_and_untraceable_models_are_one_line_errors(data) -> None:
    with pytest.raises(BadInputError, match="no full-precision nn.Conv2d"):
        measure_sensitivity(slim_resnet(), ["fc"], get_scheme("pa"), 4, 5, data)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(BadInputError, match="traces with torch.fx"):
        measure_sensitivity(Branchy(), ["conv"], get_scheme("pa"), 4, 5, data)
