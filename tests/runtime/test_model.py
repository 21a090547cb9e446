"""The packed runtime end to end: torch-free import, whole networks vs PyTorch, float ops, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.numpy import save_file
from torch import nn

from binarize_cli.convert.surgery import binarize_model
from binarize_cli.core.errors import BadInputError, FormatError
from binarize_cli.export.packed import export_packed_model
from binarize_cli.export.verify import VerifyResult, verify_model
from binarize_cli.runtime import evaluate_packed, load_packed, ops


def meta(scheme: str, m: int, n: int, model: str = "timm:resnet18") -> dict:
    return {
        "model": model,
        "scheme": scheme,
        "M": m,
        "N": n,
        "num_classes": 10,
        "input_size": [3, 32, 32],
    }


def images(n: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def check(result: VerifyResult, *, float32_rtol: float = 1e-4) -> None:
    """Same function (float64): 100% agreement, differences at float rounding of the stored
    float32 scales (DoReFa's activation levels r 2^b / L are not float32-exact: ~1e-8)."""
    assert result.top1_agreement.runtime == 100.0
    assert result.max_rel_logit_diff.runtime < 1e-6
    if result.float32.flipped_activations == 0:
        assert result.float32.max_rel_logit_diff < float32_rtol


@pytest.mark.parametrize(
    ("scheme", "m", "n"),
    [
        ("pa", 4, 5),
        ("abc", 3, 3),
        ("xnor", 1, 1),
        ("bnn", 1, 1),
        ("dorefa", 2, 3),
        ("pa", 4, 0),
        ("ttq", 2, 3),
    ],
)
def test_slim_resnet_matches_pytorch(scheme, m, n, binarized_model) -> None:
    model = binarized_model("slim_resnet18", scheme, m, n)
    check(verify_model(model, meta(scheme, m, n), images(), onnx=False, backend="c"))


def test_numpy_backend_matches_pytorch(binarized_model) -> None:
    model = binarized_model("slim_resnet18", "abc", 2, 2)
    result = verify_model(model, meta("abc", 2, 2), images(4), onnx=False, backend="numpy")
    assert result.backend == "numpy"
    check(result)


def test_torchvision_densenet_concatenation(calibrate_activations) -> None:
    """torch.cat, F.relu, F.adaptive_avg_pool2d, torch.flatten, AvgPool2d (torchvision's code)."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10
    )
    binarize_model(model, "pa", 2, 3, first_conv="features.conv0", classifier="classifier")
    calibrate_activations(model, torch.randn(4, 3, 32, 32), bn="perturb")
    check(verify_model(model, meta("pa", 2, 3, "torchvision:densenet121"), images(4), onnx=False))


class TinyMobileNet(nn.Module):
    """MobileNetV2's building blocks from timm at toy width: BatchNormAct2d (ReLU6 and
    Identity acts), depthwise FP convolutions, inverted residuals with and without the skip,
    SelectAdaptivePool2d, dropout."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d, SelectAdaptivePool2d
        from timm.models._efficientnet_blocks import InvertedResidual

        bn = partial(BatchNormAct2d, act_layer=nn.ReLU6)
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = bn(8)
        self.blocks = nn.Sequential(
            InvertedResidual(
                8, 12, stride=2, exp_ratio=4, act_layer=nn.ReLU6, norm_layer=BatchNormAct2d
            ),
            InvertedResidual(
                12, 12, stride=1, exp_ratio=4, act_layer=nn.ReLU6, norm_layer=BatchNormAct2d
            ),
        )
        self.conv_head = nn.Conv2d(12, 40, 1, bias=False)
        self.bn2 = bn(40)
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.drop = nn.Dropout(0.2)
        self.classifier = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return self.classifier(self.drop(self.global_pool(self.bn2(self.conv_head(x)))))


def test_timm_mobilenet_blocks(calibrate_activations) -> None:
    torch.manual_seed(0)
    model = TinyMobileNet()
    result = binarize_model(model, "pa", 4, 5, first_conv="conv_stem", classifier="classifier")
    binarized = {d.name for d in result.decisions if d.binarized}
    assert (
        "blocks.1.conv_pw" in binarized and "blocks.1.conv_dw" not in binarized
    )  # depthwise stays FP
    calibrate_activations(model, torch.randn(4, 3, 32, 32), bn="perturb")
    check(verify_model(model, meta("pa", 4, 5, "timm:mobilenetv2_100"), images(4), onnx=False))


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch",
    [
        "timm:resnet18",
        "timm:resnet50",
        "timm:mobilenetv2_100",
        "timm:mobilenetv2_035",
        "torchvision:resnet18",
        "torchvision:mobilenet_v2",
        "torchvision:densenet121",
    ],
)
def test_full_size_architectures(arch, calibrate_activations) -> None:
    torch.manual_seed(0)
    family, name = arch.split(":")
    model = (
        timm.create_model(name, num_classes=10)
        if family == "timm"
        else getattr(torchvision.models, name)(num_classes=10)
    )
    binarize_model(model, "pa", 4, 5)
    calibrate_activations(model, torch.randn(8, 3, 32, 32), bn="perturb")
    check(verify_model(model, meta("pa", 4, 5, arch), images(8), onnx=False))


def test_runtime_imports_and_runs_without_torch(tmp_path, binarized_model) -> None:
    model = binarized_model("slim_resnet18", "pa", 4, 5)
    path = export_packed_model(model, meta("pa", 4, 5), tmp_path / "m.safetensors")
    x = images(2)
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad():
        np.save(tmp_path / "ref.npy", model(torch.from_numpy(x)).numpy())
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch.") or name in ("timm", "torchvision"):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        from binarize_cli.runtime import load_packed
        model = load_packed({str(path)!r})
        out = model(np.load({str(tmp_path / "x.npy")!r}))
        ref = np.load({str(tmp_path / "ref.npy")!r})
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        print(float(np.abs(out - ref).max() / np.abs(ref).max()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-3


def test_evaluate_packed_and_batching(tmp_path, binarized_model) -> None:
    model = binarized_model("slim_resnet18", "pa", 2, 2)
    path = export_packed_model(model, meta("pa", 2, 2), tmp_path / "m.safetensors")
    rt = load_packed(path)
    x = images(10)
    whole = rt(x)
    np.testing.assert_allclose(rt(x, batch_size=3), whole, rtol=1e-5, atol=1e-6)
    labels = whole.argmax(axis=1)
    acc = evaluate_packed(rt, [(x[:6], labels[:6]), (x[6:], labels[6:])])
    assert acc.samples == 10 and acc.top1 == 100.0 and acc.top5 == 100.0
    acc = evaluate_packed(rt, [(x, (labels + 1) % 10)], max_samples=4)
    assert acc.samples == 4 and acc.top1 == 0.0
    assert rt.scheme == "pa" and rt.m == 2 and rt.n == 2 and rt.input_size == (3, 32, 32)
    with pytest.raises(BadInputError, match="channels"):
        rt(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(BadInputError, match="batch"):
        rt(np.zeros((3, 32, 32), np.float32))


def _packed_like(path: Path, version: str, graph: dict) -> Path:
    """A safetensors file with one float tensor and a packed file's metadata."""
    metadata = {
        "format": "binarize-packed",
        "format_version": version,
        "bit_order": "lsb-first",
        "graph": json.dumps(graph),
    }
    save_file({"w": np.zeros(3, np.float32)}, str(path), metadata=metadata)
    return path


def test_format_errors(tmp_path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(plain))
    with pytest.raises(FormatError, match="not a binarize packed file"):
        load_packed(plain)
    with pytest.raises(FormatError, match="version '99'"):
        load_packed(_packed_like(tmp_path / "future.safetensors", "99", {}))
    graph = {
        "inputs": ["input"],
        "outputs": ["x"],
        "nodes": [{"name": "x", "op": "softmax2", "inputs": ["input"], "attrs": {}}],
    }
    with pytest.raises(FormatError, match="softmax2"):
        load_packed(_packed_like(tmp_path / "odd.safetensors", "1", graph))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(FormatError):
        load_packed(garbage)
    with pytest.raises(BadInputError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------
# Float ops against torch.nn.functional
# ----------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


@pytest.mark.parametrize(
    ("c", "o", "k", "s", "p", "d", "g"),
    [
        (3, 8, 7, 2, 3, 1, 1),
        (8, 8, 3, 2, 1, 1, 8),
        (8, 16, 3, 1, 1, 1, 8),
        (6, 4, 3, 1, 2, 2, 2),
        (5, 7, 1, 2, 0, 1, 1),
        (4, 6, 1, 1, 0, 1, 1),
    ],
)
def test_conv2d(c, o, k, s, p, d, g) -> None:
    x = RNG.standard_normal((2, c, 9, 8))
    w = RNG.standard_normal((o, c // g, k, k))
    b = RNG.standard_normal(o)
    ref = F.conv2d(_t(x), _t(w), _t(b), s, p, d, g).numpy()
    np.testing.assert_allclose(
        ops.conv2d(x, w, b, (s, s), (p, p), (d, d), g), ref, rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(
    ("k", "s", "p", "d", "ceil"),
    [(3, 2, 1, 1, False), (3, 2, 1, 1, True), (2, 2, 0, 1, True), (3, 2, 0, 2, True)],
)
def test_maxpool2d(k, s, p, d, ceil) -> None:
    x = RNG.standard_normal((2, 3, 9, 10))
    ref = F.max_pool2d(_t(x), k, s, p, d, ceil_mode=ceil).numpy()
    np.testing.assert_array_equal(ops.maxpool2d(x, k, s, p, d, ceil), ref)


@pytest.mark.parametrize(
    ("k", "s", "p", "ceil", "cip"),
    [
        (2, 2, 0, False, True),
        (3, 2, 1, True, True),
        (3, 2, 1, True, False),
        (3, 1, 1, False, False),
    ],
)
def test_avgpool2d(k, s, p, ceil, cip) -> None:
    x = RNG.standard_normal((2, 3, 9, 10))
    ref = F.avg_pool2d(_t(x), k, s, p, ceil_mode=ceil, count_include_pad=cip).numpy()
    np.testing.assert_allclose(ops.avgpool2d(x, k, s, p, ceil, cip), ref, rtol=1e-12)


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (4, 4), (None, 2)])
def test_adaptive_pools(size) -> None:
    x = RNG.standard_normal((2, 3, 7, 9))
    np.testing.assert_allclose(
        ops.adaptive_pool2d(x, size, "avg"), F.adaptive_avg_pool2d(_t(x), size).numpy(), rtol=1e-12
    )
    np.testing.assert_array_equal(
        ops.adaptive_pool2d(x, size, "max"), F.adaptive_max_pool2d(_t(x), size).numpy()
    )


def test_activations() -> None:
    x = RNG.standard_normal((3, 4, 5)) * 5
    t = _t(x)
    for ours, theirs in [
        (ops.relu(x), F.relu(t)),
        (ops.clip(x, 0.0, 6.0), F.relu6(t)),
        (ops.leaky_relu(x, 0.1), F.leaky_relu(t, 0.1)),
        (ops.sigmoid(x), torch.sigmoid(t)),
        (ops.silu(x), F.silu(t)),
        (ops.hardswish(x), F.hardswish(t)),
        (ops.hardsigmoid(x), F.hardsigmoid(t)),
    ]:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-15)


def test_gelu_and_prelu() -> None:
    x = RNG.standard_normal((2, 4, 3, 5)) * 4
    t = _t(x)
    for approximate in ("none", "tanh"):
        np.testing.assert_allclose(
            ops.gelu(x, approximate),
            F.gelu(t, approximate=approximate).numpy(),
            rtol=1e-12,
            atol=1e-15,  # PyTorch's own 1 + erf(x) cancels in the far negative tail
        )
    assert ops.gelu(x.astype(np.float32), "none").dtype == np.float32
    for w in (RNG.standard_normal(4), np.array([0.25])):
        np.testing.assert_array_equal(ops.prelu(x, w), F.prelu(t, _t(w)).numpy())


def test_softmax() -> None:
    x = RNG.standard_normal((2, 4, 3, 5)) * 30
    for dim in (1, 2, 3):
        np.testing.assert_allclose(ops.softmax(x, dim), F.softmax(_t(x), dim).numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("mode", "corners"), [("nearest", None), ("bilinear", False), ("bilinear", True)]
)
def test_resize_matches_interpolate(dtype, mode, corners) -> None:
    """Sizes (down, up, odd ratios such as 10 -> 6 where float32 rounding decides the nearest
    pixel) and scale factors (PyTorch then maps with 1 / factor, not in / out)."""
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for h, w in [(2, 3), (5, 7), (10, 6), (16, 16)]:
        x = RNG.standard_normal((2, 3, h, w)).astype(dtype)
        for size in [(3, 5), (6, 10), (2 * h, 2 * w), (h, w), (17, 4), (1, 1)]:
            ref = F.interpolate(_t(x), size=size, mode=mode, align_corners=corners).numpy()
            np.testing.assert_allclose(ops.resize(x, size, mode, bool(corners)), ref, atol=tol)
        for factor in [(2.0, 2.0), (1.7, 0.6), (3.0, 1.5)]:
            ref = F.interpolate(_t(x), scale_factor=factor, mode=mode, align_corners=corners)
            out = ops.resize(x, ref.shape[2:], mode, bool(corners), factor)
            np.testing.assert_allclose(out, ref.numpy(), atol=tol)


@pytest.mark.parametrize("pads", [(1, 2), (1, 0, 2, 3), (-1, 2, 0, -2), (0, 0, 1, 1, 2, 0)])
def test_pad_matches_torch(pads) -> None:
    x = RNG.standard_normal((2, 3, 5, 6))
    ref = F.pad(_t(x), pads, value=0.5).numpy()
    np.testing.assert_array_equal(ops.pad(x, pads, 0.5), ref)


def test_slice_dims() -> None:
    x = RNG.standard_normal((2, 7, 5, 6))
    out = ops.slice_dims(x, [1, 3], [2, 1], [7, 6], [2, 3])
    np.testing.assert_array_equal(out, x[:, 2:7:2, :, 1:6:3])
    assert out.flags.c_contiguous


def test_version_1_files_still_load(tmp_path, binarized_model) -> None:
    """A file of format version 1 (its ops are all in version 1) loads and runs as before;
    a version-1 file that uses an op of version 2 is refused."""
    from binarize_cli.runtime import read_packed
    from binarize_cli.runtime.optable import OPS

    model = binarized_model("slim_resnet18", "pa", 2, 2)
    path = export_packed_model(model, meta("pa", 2, 2), tmp_path / "v2.safetensors")
    metadata, tensors = read_packed(path)
    graph = json.loads(metadata["graph"])
    assert metadata["format_version"] == "2"
    assert all(OPS[node["op"]].since == 1 for node in graph["nodes"])
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, str(v1), metadata={**metadata, "format_version": "1"})
    x = images(2)
    np.testing.assert_array_equal(load_packed(v1)(x), load_packed(path)(x))
    out = graph["outputs"][0]
    graph["nodes"].append({"name": "y", "op": "sub", "inputs": [out], "attrs": {"scalar": 1.0}})
    graph["outputs"] = ["y"]
    newer = tmp_path / "newer.safetensors"
    save_file(
        tensors,
        str(newer),
        metadata={**metadata, "format_version": "1", "graph": json.dumps(graph)},
    )
    with pytest.raises(FormatError, match="new in format version 2"):
        load_packed(newer)
    save_file(tensors, str(newer), metadata={**metadata, "graph": json.dumps(graph)})
    np.testing.assert_array_equal(load_packed(newer)(x), load_packed(path)(x) - 1)
