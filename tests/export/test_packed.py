"""The packed export: file layout, metadata, bit order, activation step functions, size budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from binarize_cli.analyze.profile import profile_model
from binarize_cli.core.errors import BadInputError
from binarize_cli.export.packed import (
    DEFAULT_FILE,
    activation_code,
    export_packed,
    export_packed_model,
    header_bytes,
    payload_bits,
)
from binarize_cli.quant.base import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.runtime.bits import unpack_planes
from binarize_cli.runtime.format import FORMAT_NAME, FORMAT_VERSION


def meta_for(scheme: str, m: int, n: int, arch: str = "resnet18") -> dict:
    return {
        "model": f"timm:{arch}",
        "scheme": scheme,
        "M": m,
        "N": n,
        "num_classes": 10,
        "input_size": [3, 32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "data": "digits",
    }


@pytest.fixture(scope="module")
def pa_resnet(tmp_path_factory, binarized_model) -> tuple[nn.Module, object]:
    model = binarized_model("slim_resnet18", "pa", 4, 5)
    path = export_packed_model(
        model, meta_for("pa", 4, 5), tmp_path_factory.mktemp("pk") / "r18.safetensors"
    )
    return model, path


def test_metadata_and_graph(pa_resnet) -> None:
    model, path = pa_resnet
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == str(FORMAT_VERSION)
    assert meta["bit_order"] == "lsb-first"
    assert (meta["scheme"], meta["M"], meta["N"]) == ("pa", "4", "5")
    assert meta["source_model"] == "timm:resnet18"
    assert json.loads(meta["input_size"]) == [3, 32, 32]
    graph = json.loads(meta["graph"])
    ops = [node["op"] for node in graph["nodes"]]
    binarized = [name for name, mod in model.named_modules() if isinstance(mod, BinarizedConv2d)]
    # 16 3x3 + the 1x1 downsamples (PA binarizes them; this slim stem has 64 channels, so
    # layer1.0 has a downsample too); the stem and the classifier stay full precision.
    assert ops.count("bconv2d") == len(binarized) == 20
    assert "layer2.0.downsample.0" in binarized and "conv1" not in binarized
    assert ops.count("conv2d") == 1 and ops.count("linear") == 1 and ops.count("add") == 8
    assert ops.count("batchnorm") == 21 and "maxpool2d" in ops
    for node in graph["nodes"]:  # every named tensor is in the file, every input defined before
        assert set(node.get("tensors", {}).values()) <= keys
    # No latent float weights of binarized layers, no running statistics.
    for name in binarized:
        assert f"{name}.weight" not in keys
    assert not any("running" in k for k in keys)


def test_weight_planes_bit_order(pa_resnet) -> None:
    model, path = pa_resnet
    layer = model.layer2[0].conv1
    with safe_open(str(path), framework="numpy") as fh:
        packed = fh.get_tensor("layer2.0.conv1.weight_planes")
        scales = fh.get_tensor("layer2.0.conv1.weight_scales")
    assert packed.dtype == np.uint8 and packed.shape == (4, (32 * 16 * 9 + 7) // 8)
    bp = layer.weight_quantizer.bit_planes(layer.weight.detach())
    np.testing.assert_array_equal(
        unpack_planes(packed, tuple(layer.weight.shape)), bp.planes.numpy()
    )
    np.testing.assert_array_equal(scales, bp.scales.numpy())
    # LSB-first: bit k of the flattened plane is bit k % 8 of byte k // 8.
    flat = bp.planes[0].flatten().numpy()
    k = int(np.flatnonzero(flat)[0])
    assert (packed[0, k // 8] >> (k % 8)) & 1 == 1


@pytest.mark.parametrize(
    ("scheme", "m", "n"),
    [
        ("pa", 4, 5),
        ("abc", 3, 3),
        ("bnn", 1, 1),
        ("xnor", 1, 1),
        ("bireal", 1, 1),
        ("dorefa", 2, 4),
        ("ttq", 2, 3),
    ],
)
def test_activation_code_reproduces_quantizer(scheme, m, n) -> None:
    q = get_scheme(scheme).activation_quantizer(n)
    torch.manual_seed(1)
    q.calibrate(
        torch.relu(torch.randn(4000)) * 2
        if scheme in ("pa", "dorefa", "ttq")
        else torch.randn(4000)
    )
    step = activation_code(q)
    assert step.codes.shape == (step.thresholds.size + 1, n)
    assert np.all(np.diff(step.thresholds) > 0)
    x = torch.cat(
        [
            torch.randn(20000) * 3,
            torch.from_numpy(step.thresholds),
            torch.from_numpy(np.nextafter(step.thresholds, -np.inf)),
        ]
    )
    bp = q.bit_planes(x)
    idx = np.searchsorted(step.thresholds, x.numpy(), side="right")
    np.testing.assert_array_equal(step.codes[idx].T.astype(bool), bp.planes.numpy())
    np.testing.assert_array_equal(step.scales, bp.scales.numpy())
    assert step.domain == bp.domain


def test_pa_thresholds_are_the_endpoints() -> None:
    q = get_scheme("pa").activation_quantizer(5)
    q.calibrate(torch.relu(torch.randn(5000)))
    step = activation_code(q)
    np.testing.assert_array_equal(step.thresholds, q.sorted_endpoints().detach().numpy())
    np.testing.assert_array_equal(step.codes, np.eye(6, 5, k=-1, dtype=np.uint8))  # eq. 18: one-hot


SIZE_CASES = [
    ("slim_resnet18", "pa", 4, 5),
    ("slim_resnet18", "xnor", 1, 1),
    ("slim_resnet18", "abc", 3, 3),
    ("slim_resnet18", "ttq", 2, 0),
    ("slim_resnet18", "realtobin", 1, 1),
    pytest.param("resnet18", "dorefa", 2, 4, marks=pytest.mark.slow),
    pytest.param("resnet18", "pa", 4, 5, marks=pytest.mark.slow),
    pytest.param("mobilenetv2_100", "pa", 4, 5, marks=pytest.mark.slow),
    pytest.param("resnet18", "abc", 5, 5, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "scheme", "m", "n"), SIZE_CASES)
def test_file_size_within_one_percent_of_report(
    tmp_path, binarized_model, arch, scheme, m, n
) -> None:
    model = binarized_model(arch, scheme, m, n)
    path = export_packed_model(model, meta_for(scheme, m, n, arch), tmp_path / "m.safetensors")
    report_bits = profile_model(model, (3, 32, 32)).memory_bits
    payload = payload_bits(path)
    assert abs(payload - report_bits) <= 0.01 * report_bits, payload / report_bits
    assert path.stat().st_size * 8 == payload + 8 * header_bytes(path)


def test_xnor_channel_scales_fold_into_batchnorm(tmp_path, binarized_model) -> None:
    model = binarized_model("slim_resnet18", "xnor", 1, 1)
    path = export_packed_model(model, meta_for("xnor", 1, 1), tmp_path / "x.safetensors")
    with safe_open(str(path), framework="numpy") as fh:
        graph = json.loads(fh.metadata()["graph"])
        bn_scale = fh.get_tensor("layer1.0.bn1.scale")
        w_scales = fh.get_tensor("layer1.0.conv1.weight_scales")
    node = next(
        n
        for n in graph["nodes"]
        if n["op"] == "bconv2d" and n["tensors"]["weight_planes"].startswith("layer1.0.conv1.")
    )
    assert node["attrs"]["scales_folded_into"]
    np.testing.assert_array_equal(w_scales, [1.0])
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    alpha = conv.weight_quantizer.bit_planes(conv.weight.detach()).scales.reshape(-1).double()
    expected = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps) * alpha
    np.testing.assert_allclose(bn_scale, expected.numpy(), rtol=1e-6)


def test_unsupported_module_is_named_and_nothing_is_written(tmp_path) -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.norm(self.conv(x)).flatten(1)

    out = tmp_path / "odd.safetensors"
    with pytest.raises(BadInputError, match="GroupNorm"):
        export_packed_model(Odd(), meta_for("pa", 4, 5), out)
    assert list(tmp_path.iterdir()) == []


def test_output_path_checks(tmp_path, pa_resnet) -> None:
    model, _ = pa_resnet
    with pytest.raises(BadInputError, match="directory"):
        export_packed_model(model, meta_for("pa", 4, 5), tmp_path)
    with pytest.raises(BadInputError, match="does not exist"):
        export_packed_model(model, meta_for("pa", 4, 5), tmp_path / "missing" / "x.safetensors")


@pytest.mark.slow
def test_export_packed_from_run_dir(tmp_path, binarized_model, run_meta) -> None:
    from binarize_cli.core.metadata import RunMetadata
    from binarize_cli.core.rundir import write_run

    model = binarized_model("resnet18", "pa", 2, 2)  # a run rebuilds its model from the timm name
    meta = {**run_meta("pa", 2, 2), **meta_for("pa", 2, 2)}
    run = write_run(tmp_path / "run", model.state_dict(), RunMetadata.from_dict(meta))
    written = export_packed(run)
    assert written == run / DEFAULT_FILE and written.is_file()
    other = export_packed(run, tmp_path)
    assert other == tmp_path / DEFAULT_FILE


class _Wrap(nn.Module):
    """A conv, then ``op(x)`` inside a submodule ``block`` (so errors name a layer)."""

    def __init__(self, op, linear: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _Op(op)
        self.fc = linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.block(self.conv(x)), 1))


class _Op(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


def _export_error(model: nn.Module, tmp_path) -> str:
    meta = {**meta_for("pa", 2, 2), "model": "timm:odd_net", "input_size": [3, 8, 8]}
    with pytest.raises(BadInputError) as info:
        export_packed_model(model.eval(), meta, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unsupported_op_is_one_line_naming_op_layer_and_model(tmp_path) -> None:
    message = _export_error(_Wrap(lambda x: torch.cumsum(x, 1)), tmp_path)
    assert "function cumsum" in message and "not supported" in message
    assert "layer block" in message and "model timm:odd_net" in message


def test_static_shape_that_follows_the_batch_is_refused_outside_a_reshape(tmp_path) -> None:
    message = _export_error(_Wrap(lambda x: x * x.size(0)), tmp_path)
    assert "at batch 2 but 3 at batch 3" in message and "reshape" in message
    # The same value as a reshape's leading dimension is fine (shufflenet's channel shuffle).
    model = _Wrap(
        lambda x: x.view(x.size(0), 2, 2, 8, 8).transpose(1, 2).reshape(x.size(0), 4, 8, 8)
    )
    meta = {**meta_for("pa", 2, 2), "input_size": [3, 8, 8]}
    export_packed_model(model.eval(), meta, tmp_path / "ok.safetensors")


def _batch_squared(x: torch.Tensor) -> torch.Tensor:
    """12 values per sample viewed as ``[n, n, 12 / n]``: a shape that follows the batch."""
    n, flat = x.size(0), x.flatten(1)
    odd = flat[:, :12].reshape(n, n, -1).reshape(n, -1)
    return torch.cat([odd, flat[:, 12:]], 1).view(n, 4, 8, 8)


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        (
            lambda x: torch.cat([x, x], 0),
            "changes the batch dimension (shape [4, 4, 8, 8] at batch 2)",
        ),
        (lambda x: x.reshape(1, -1).reshape(-1, 4, 8, 8), "changes the batch dimension"),
        (lambda x: x.permute(1, 0, 2, 3).permute(1, 0, 2, 3), "changes the batch dimension"),
        (lambda x: x[:1], "changes the batch dimension"),
        (lambda x: torch.cat([x], 0), "works along dimension 0, the batch"),
        (_batch_squared, "the dimensions after the batch change with the batch size"),
    ],
)
def test_ops_across_the_batch_are_refused(tmp_path, op, expected) -> None:
    assert expected in _export_error(_Wrap(op), tmp_path)


def test_linear_subclass_is_judged_by_what_it_computes(tmp_path) -> None:
    class Shifted(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight, self.bias) + 1

    class Plain(nn.Linear):  # timm's Linear: a subclass computing F.linear
        def forward(self, x):
            return F.linear(x, self.weight.to(x.dtype), self.bias)

    message = _export_error(_Wrap(torch.relu, Shifted), tmp_path)
    assert "layer fc (Shifted) does not compute F.linear" in message
    meta = {**meta_for("pa", 2, 2), "input_size": [3, 8, 8]}
    path = export_packed_model(_Wrap(torch.relu, Plain).eval(), meta, tmp_path / "p.safetensors")
    with safe_open(str(path), framework="numpy") as fh:
        assert "fc.weight" in set(fh.keys())


def test_conv_subclass_with_tensorflow_same_padding_is_pad_then_conv(tmp_path) -> None:
    from timm.layers import Conv2dSame

    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _Wrap(torch.relu)
    model.conv = Conv2dSame(3, 4, 4, stride=2)  # 8 -> 4: total padding 2 per side pair
    model.fc = nn.Linear(4 * 4 * 4, 10)
    meta = {**meta_for("pa", 2, 2), "input_size": [3, 8, 8]}
    path = export_packed_model(model.eval(), meta, tmp_path / "same.safetensors")
    with safe_open(str(path), framework="numpy") as fh:
        nodes = json.loads(fh.metadata()["graph"])["nodes"]
    assert [n["op"] for n in nodes[:2]] == ["pad", "conv2d"]
    assert nodes[0]["attrs"]["pads"] == [1, 1, 1, 1] and nodes[1]["attrs"]["padding"] == [0, 0]
    # a kernel larger than the feature map (tf_mobilenetv3's 5x5 depthwise at 4x4): only the
    # padded convolution runs at all, so the unpadded candidate must not stop the export
    model.conv = Conv2dSame(3, 4, 5, stride=2)  # 4 -> 2: total padding 3 per side pair
    model.fc = nn.Linear(4 * 2 * 2, 10)
    meta = {**meta_for("pa", 2, 2), "input_size": [3, 4, 4]}
    path = export_packed_model(model.eval(), meta, tmp_path / "small.safetensors")
    with safe_open(str(path), framework="numpy") as fh:
        nodes = json.loads(fh.metadata()["graph"])["nodes"]
    assert nodes[0]["op"] == "pad" and nodes[0]["attrs"]["pads"] == [1, 2, 1, 2]
    model.conv = Doubled(3, 4, 3, padding=1)
    model.fc = nn.Linear(4 * 8 * 8, 10)
    meta = {**meta_for("pa", 2, 2), "input_size": [3, 8, 8]}
    (tmp_path / "x").mkdir()
    assert "computes something other than nn.Conv2d" in _export_error(model, tmp_path / "x")
