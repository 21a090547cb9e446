"""`realtobin`'s channel gate through the packed format, the runtime and ONNX: the graph it
writes, the weight-scale fold past the gate, and agreement with PyTorch (float64 reference)
on a ResNet and on grouped / depthwise / odd-shaped convolutions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from binarize_cli.core.errors import BadInputError
from binarize_cli.export.packed import export_packed_model
from binarize_cli.export.verify import VerifyResult, verify_model
from binarize_cli.quant.base import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.quant.realtobin import ChannelGate

GATE_OPS = ["mean", "linear", "relu", "linear", "sigmoid", "mul", "reshape", "mul"]


def _meta(size: tuple[int, int]) -> dict:
    return {
        "model": "timm:resnet18",
        "scheme": "realtobin",
        "M": 1,
        "N": 1,
        "num_classes": 10,
        "input_size": [3, *size],
    }


def _randomise_gates(model: nn.Module, seed: int = 3) -> int:
    """Random ``W_2`` (at conversion it is 0 and the gate a constant 1); returns the count."""
    gen = torch.Generator().manual_seed(seed)
    gates = [m for m in model.modules() if isinstance(m, ChannelGate)]
    with torch.no_grad():
        for g in gates:
            g.expand_weight.copy_(torch.randn(g.expand_weight.shape, generator=gen))
    return len(gates)


def _check(result: VerifyResult) -> None:
    assert result.top1_agreement.runtime == 100.0
    assert result.max_rel_logit_diff.runtime < 1e-6
    assert result.top1_agreement.onnx == 100.0
    if result.float32.flipped_activations == 0:
        assert result.float32.max_rel_logit_diff < 1e-4
        assert result.max_rel_logit_diff.onnx < 1e-4


def test_resnet_gates_in_the_packed_graph_and_scales_folded(tmp_path, binarized_model) -> None:
    model = binarized_model("slim_resnet18", "realtobin", 1, 1)
    binarized = [n for n, m in model.named_modules() if isinstance(m, BinarizedConv2d)]
    assert _randomise_gates(model) == len(binarized) == 16  # downsamples stay real
    path = export_packed_model(model, _meta((32, 32)), tmp_path / "r2b.safetensors")
    with safe_open(str(path), framework="numpy") as fh:
        graph = json.loads(fh.metadata()["graph"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    nodes = graph["nodes"]
    ops = [n["op"] for n in nodes]
    assert ops.count("sigmoid") == ops.count("bconv2d") == 16
    # layer1.0.conv1: bconv2d, the gate on the same input, the product, then its batch norm.
    start = next(
        i for i, n in enumerate(nodes) if n.get("tensors", {}).get("weight_planes", "").startswith("layer1.0.conv1.")
    )  # fmt: skip
    conv = nodes[start]
    chain = nodes[start + 1 : start + 1 + len(GATE_OPS)]
    assert [n["op"] for n in chain] == GATE_OPS
    assert chain[0]["inputs"] == conv["inputs"]  # G is computed from the real input A
    assert chain[-1]["inputs"] == [conv["name"], chain[-2]["name"]]
    assert chain[5]["attrs"] == {"scalar": 2.0} and chain[6]["attrs"]["shape"] == [16, 1, 1]
    gate = model.layer1[0].conv1.gate
    np.testing.assert_array_equal(
        tensors[chain[1]["tensors"]["weight"]], gate.reduce_weight.detach().numpy()
    )
    np.testing.assert_array_equal(tensors[chain[3]["tensors"]["weight"]], gate.expand_weight.detach().numpy())  # fmt: skip
    # alpha folds into the batch norm after the gate product (both are per channel).
    assert conv["attrs"]["scales_folded_into"] == nodes[start + 1 + len(GATE_OPS)]["name"]
    np.testing.assert_array_equal(tensors["layer1.0.conv1.weight_scales"], [1.0])
    layer, bn = model.layer1[0].conv1, model.layer1[0].bn1
    alpha = layer.weight.detach().abs().flatten(1).mean(1).double()
    expected = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps) * alpha
    np.testing.assert_allclose(tensors["layer1.0.bn1.scale"], expected.numpy(), rtol=1e-6)
    images = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    _check(verify_model(model, _meta((32, 32)), images, onnx=True))


class GroupedNet(nn.Module):
    """A grouped (3x2, stride 2), a depthwise (with bias, residual) and a pointwise convolution
    on an odd-sized input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, (3, 2), stride=2, padding=(1, 0), groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(12)
        self.point = nn.Conv2d(12, 10, 1, bias=False)
        self.fc = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.grouped(x)))
        x = self.bn2(self.depthwise(x)) + x
        return self.fc(self.point(x).mean(dim=(2, 3)))


def _gate_convs(model: nn.Module, scheme, m: int, n: int) -> None:
    for name in ("grouped", "depthwise", "point"):
        conv = getattr(model, name)
        setattr(model, name, BinarizedConv2d.from_conv(conv, get_scheme(scheme), m, n))


def test_grouped_depthwise_odd_shapes_agree(binarized_model) -> None:
    size = (13, 11)
    model = binarized_model(GroupedNet, "realtobin", 1, 1, size=size, surgery=_gate_convs)
    assert _randomise_gates(model) == 3
    assert model.depthwise.gate.hidden == 1 and model.grouped.gate.out_channels == 12
    images = np.random.default_rng(2).standard_normal((6, 3, *size)).astype(np.float32)
    _check(verify_model(model, _meta(size), images, onnx=True))


class _OtherGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x.mean(dim=(1, 2, 3), keepdim=True))


def test_a_gate_other_than_channel_gate_is_refused(tmp_path) -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = BinarizedConv2d.from_conv(conv, get_scheme("realtobin"), 1, 1)
    layer.gate = _OtherGate()
    out = tmp_path / "g.safetensors"
    with pytest.raises(BadInputError, match="_OtherGate is not supported by the packed format"):
        export_packed_model(nn.Sequential(layer, nn.Flatten()), _meta((4, 4)), out)
    assert not out.exists()
