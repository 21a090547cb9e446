"""Accounting rules of binarize_cli.analyze.profile: exact per-layer arithmetic on odd shapes, the
paper's full-precision ResNet numbers, totals as sums of rows."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from binarize_cli.analyze.profile import OTHER_OPS_ROW, REAL_BITS, profile_model
from binarize_cli.quant import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d


def _binarized(conv: nn.Conv2d, scheme: str, m: int, n: int) -> BinarizedConv2d:
    return BinarizedConv2d.from_conv(conv, get_scheme(scheme), m, n)


class Odd(nn.Module):
    """First conv (kept), BN, a binarized 3x2 conv with stride and bias, a grouped conv, FC."""

    def __init__(self, scheme: str = "pa", m: int = 2, n: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.bconv = _binarized(
            nn.Conv2d(6, 5, (3, 2), stride=2, padding=1, bias=True), scheme, m, n
        )
        self.gconv = nn.Conv2d(5, 10, 1, groups=5, bias=False)
        self.fc = nn.Linear(10, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.gconv(self.bconv(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_odd_model_rows_are_exact():
    model = Odd("pa", 2, 3)
    prof = profile_model(model, (3, 11, 7))
    rows = {r.name: r for r in prof.layers}
    assert list(rows) == ["conv1", "bn", "bconv", "gconv", "fc"]

    conv1 = rows["conv1"]
    assert conv1.macs == 6 * 11 * 7 * 3 * 9
    assert conv1.bits == 32 * 6 * 3 * 9 and conv1.bops == 0 and conv1.flops == conv1.macs

    bn = rows["bn"]  # affine parameters count; running stats (buffers) do not
    assert bn.params_real == 12 and bn.bits == 12 * 32 and bn.macs == 0

    b = rows["bconv"]
    out_h, out_w = (11 + 2 - 3) // 2 + 1, (7 + 2 - 2) // 2 + 1
    assert b.output_shape == (5, out_h, out_w) and b.input_shape == (6, 11, 7)
    assert b.macs == 5 * out_h * out_w * 6 * 3 * 2
    assert b.binarized and (b.m, b.n, b.scheme) == (2, 3, "pa")
    assert b.params_binary == 2 * 5 * 6 * 3 * 2  # M binary values per weight
    quantizer_params = sum(p.numel() for p in model.bconv.activation_quantizer.parameters())
    quantizer_params += sum(p.numel() for p in model.bconv.weight_quantizer.parameters())
    assert b.scales == 2  # PA: one alpha per plane
    assert b.params_real == 5 + quantizer_params + 2  # bias + v/beta + alphas
    assert b.bits == REAL_BITS * b.params_real + b.params_binary
    assert b.fp_params == 5 * 6 * 3 * 2 + 5
    assert b.bops == 2 * 3 * b.macs
    assert b.flops == b.bops / 64 and b.real_macs == 0

    g = rows["gconv"]  # depthwise 1x1, multiplier 2: in_channels/groups = 1 MAC per output
    assert g.macs == 10 * out_h * out_w * 1 and g.kind == "depthwise"
    assert rows["fc"].macs == 70 and rows["fc"].params_real == 77

    total = prof.to_dict()
    assert total["memory_bits"] == sum(r.bits for r in prof.layers)
    assert total["fp_memory_bits"] == 32 * sum(
        p.numel() for n, p in model.named_parameters() if "quantizer" not in n
    )
    assert total["flops"] == sum(r.flops for r in prof.layers)
    assert total["fp_flops"] == sum(r.macs for r in prof.layers)
    assert total["params"]["binary"] == b.params_binary
    assert total["memory_saving"] == pytest.approx(total["fp_memory_bits"] / total["memory_bits"])
    assert total["speedup"] == pytest.approx(total["fp_flops"] / total["flops"])


def test_n0_has_no_bitwise_ops_and_single_plane_scales_fold():
    model = Odd("pa", 4, 0)
    b = profile_model(model, (3, 9, 9)).layer("bconv")
    assert b.bops == 0 and b.flops == b.macs  # real activations: one real convolution
    assert b.params_binary == 4 * model.bconv.weight.numel()
    assert b.scales == 4
    # XNOR-Net: sign weights with one scale per output channel, folded into the next affine
    model = Odd("xnor", 1, 1)
    x = profile_model(model, (3, 9, 9)).layer("bconv")
    assert x.scales == 0 and x.params_binary == model.bconv.weight.numel()
    assert x.bops == x.macs


def test_profile_leaves_model_untouched():
    model = Odd("pa", 2, 2).train()
    x = torch.randn(2, 3, 9, 9)
    model.eval()
    before = model(x)
    model.train()
    profile_model(model, (3, 9, 9))
    assert model.training
    assert "forward" not in vars(model.bconv)  # the plain-conv patch is removed
    model.eval()
    torch.testing.assert_close(model(x), before)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))  # owned directly, used by a bare matmul
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x @ self.w)


def test_matmuls_outside_modules_are_not_lost():
    prof = profile_model(Functional(), (5, 8))
    rows = {r.name: r for r in prof.layers}
    assert rows[""].params_real == 32  # the root's own parameter has a row
    assert rows["fc"].macs == 5 * 3 * 4
    other = rows[OTHER_OPS_ROW]
    assert other.macs == 5 * 4 * 8 and other.flops == other.macs
    assert prof.fp_flops == 5 * 3 * 4 + 5 * 4 * 8
    assert prof.warnings


def test_full_precision_resnet18_is_the_papers_374_1_mbit_and_1_81e9_flops():
    prof = profile_model(torchvision.models.resnet18(), (3, 224, 224))
    assert prof.memory_bits == 11_689_512 * 32  # 374.06 Mbit: every parameter, no buffers
    assert prof.fp_flops == 1_814_073_344  # conv + fc MACs only
    assert prof.flops == pytest.approx(1.81e9, rel=0.005)
    assert prof.bops == 0 and prof.memory_saving == 1.0 and prof.speedup == 1.0


def test_resnet50_v1_explains_the_papers_3_86e9():
    """docs/accounting.md 4.1: the paper's 3.86e9 is ResNet50 v1 (stride in the first 1x1)."""
    model = torchvision.models.resnet50()  # torchvision/timm: v1.5, 4,089,184,256 MACs
    for layer in (model.layer2, model.layer3, model.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    v1 = profile_model(model, (3, 224, 224)).fp_flops
    assert v1 == 3_857_973_248 and v1 == pytest.approx(3.86e9, rel=0.001)
