"""The Python API (binarize_cli.api, docs/api.md) on a user's own nn.Module.

The acceptance test of issue 17: a small custom model (conv / batch norm / ReLU / residual
add / pooling / linear, from neither timm nor torchvision) is summarised, converted,
fine-tuned for a fraction of an epoch and exported through the API alone, and the packed
file computes the same function as the model (100 % top-1 agreement in float64, the way
``binarize verify`` checks it). Every python block of docs/api.md runs as written.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import binarize_cli
from binarize_cli import api
from binarize_cli.core.errors import BadInputError, SchemeError
from binarize_cli.quant.layers import BinarizedConv2d

REPO = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyNet(nn.Module):
    """A user's model: stem, one residual block, a strided conv, pooling, a linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.bn(self.stem(x))))
        x = torch.relu(self.down(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def batches(n: int = 4, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, size, size, generator=g), torch.randint(0, 10, (16,), generator=g))
        for _ in range(n)
    ]


def packed_agreement(model: nn.Module, path: Path, images: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement (%) and max relative logit difference of the packed file's runtime vs
    PyTorch on the file's own parameters, both in float64 (``binarize verify``'s check)."""
    from binarize_cli.export.verify import replay_model
    from binarize_cli.runtime import load_packed, read_packed

    _, tensors = read_packed(path)
    runtime = load_packed(path, precision="float64")
    with torch.no_grad():
        reference = replay_model(model, tensors, runtime.graph)(
            torch.from_numpy(images.astype(np.float64))
        ).numpy()
    out = runtime(images, batch_size=16)
    agree = 100.0 * float((reference.argmax(1) == out.argmax(1)).mean())
    return agree, float(np.abs(reference - out).max() / np.abs(reference).max())


def test_custom_module_through_the_api_alone(tmp_path: Path) -> None:
    """Issue 17's "Checked by": summary, binarize, fine-tune, evaluate, export, verify."""
    torch.manual_seed(0)
    net = TinyNet()
    data = batches()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    fp = binarize_cli.summary(net, 16)
    assert [r.name for r in fp.layers if r.macs][:2] == ["stem", "block.conv1"]
    assert fp.bops == 0 and fp.memory_saving == pytest.approx(1.0)
    text = str(fp)
    assert "block.conv2" in text and "memory (Mbit)" in text

    result = binarize_cli.binarize(net, "pa", 4, 5, data, calib_batches=3)
    binarized = {d.name for d in result.decisions if d.binarized}
    assert binarized == {"block.conv1", "block.conv2", "down"}  # stem and fc stay FP
    assert result.calibration is not None
    assert (result.calibration.layers, result.calibration.batches) == (3, 3)
    assert (result.scheme, result.M, result.N) == ("pa", 4, 5)
    # The original is untouched: still plain convolutions, same weights.
    assert not any(isinstance(m, BinarizedConv2d) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(result.model.down, BinarizedConv2d)

    converted = result.summary(16)
    assert converted.bops > 0 and converted.memory_bits < fp.memory_bits
    assert converted.layer("down").m == 4 and converted.layer("down").n == 5
    assert converted.layer("stem").reason == "first convolution"  # surgery's reason column
    assert converted.layer("stem").kind == "first_conv"

    latent = result.model.down.weight.detach().clone()
    state = binarize_cli.finetune(result.model, data, epochs=0.5, teacher=net)
    assert state.epochs_done == 1 and len(state.epoch_stats) == 1
    assert not torch.equal(latent, result.model.down.weight)  # it trained
    assert not result.model.training

    acc = binarize_cli.evaluate(result.model, data)
    assert acc.samples == 64 and 0.0 <= acc.top1 <= acc.top5 <= 100.0

    images = torch.cat([x for x, _ in data])[:32]
    path = api.export(result.model, tmp_path / "tiny.packed.safetensors", example_input=images)
    from binarize_cli.runtime import load_packed

    meta = load_packed(path)
    assert (meta.scheme, meta.m, meta.n, meta.num_classes) == ("pa", 4, 5, 10)
    assert tuple(meta.input_size) == (3, 16, 16)
    assert meta.source_model.endswith("test_api:TinyNet")
    agree, rel = packed_agreement(result.model, path, images.numpy())
    assert agree == 100.0 and rel < 1e-6
    # ... and `binarize verify`'s own check, with the metadata export derived, agrees.
    from binarize_cli.export.verify import verify_model

    meta = api.export_metadata(result.model, example_input=images)
    assert meta["input_size"] == [3, 16, 16] and meta["num_classes"] == 10
    checked = verify_model(result.model, meta, images.numpy(), onnx=False)
    assert checked.top1_agreement.runtime == 100.0


def test_summary_matches_report_json(tmp_path: Path) -> None:
    """The API's numbers and keys are `binarize report --json`'s for the same model."""
    from binarize_cli.analyze.report import analytic_report
    from binarize_cli.load.models import create_architecture

    report = analytic_report("timm:test_resnet", "pa", 4, 5, input_size=32).to_dict()
    model = create_architecture("timm:test_resnet", num_classes=1000).model
    ours = binarize_cli.binarize(model, "pa", 4, 5).summary(32).to_dict()
    for key in ("memory_bits", "fp_memory_bits", "flops", "fp_flops", "bops", "params"):
        assert ours[key] == report[key], key
    assert [row.keys() for row in ours["layers"]] == [row.keys() for row in report["layers"]]
    assert [r["name"] for r in ours["layers"]] == [r["name"] for r in report["layers"]]
    assert [r["kind"] for r in ours["layers"]] == [r["kind"] for r in report["layers"]]


def test_calibration_data_may_be_bare_batches_or_pairs() -> None:
    torch.manual_seed(0)
    net = TinyNet()
    data = batches(2)
    pairs = binarize_cli.binarize(net, "abc", 2, 2, data)
    bare = binarize_cli.binarize(net, "abc", 2, 2, (x for x, _ in data))
    a, b = pairs.model.state_dict(), bare.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pairs.to_dict()["calibration"]["batches"] == 2
    assert pairs.to_dict()["layers"][0]["name"] == "stem"


def test_binarize_without_calibration_and_defaults() -> None:
    result = binarize_cli.binarize(TinyNet(), "PA")  # scheme names are case-insensitive
    assert result.calibration is None and result.to_dict()["calibration"] is None
    assert (result.scheme, result.M, result.N) == ("pa", 4, 5)  # the scheme's defaults


def test_binarize_keep_and_warnings() -> None:
    result = binarize_cli.binarize(TinyNet(), "pa", 4, 5, keep=["down", "nothing_matches"])
    assert not isinstance(result.model.down, BinarizedConv2d)
    assert any("nothing_matches" in w for w in result.warnings)
    one = binarize_cli.binarize(TinyNet(), "pa", 4, 5, keep="down")  # one pattern, not letters
    assert not isinstance(one.model.down, BinarizedConv2d) and not one.warnings


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scheme": "nope"}, SchemeError, "nope"),
        ({"scheme": "pa", "M": 3}, SchemeError, "even"),
        ({"calibration_data": ["text"]}, BadInputError, "input tensors"),
        ({"calibration_data": []}, BadInputError, "no batches"),
        ({"calibration_data": batches(1), "calib_batches": 0}, BadInputError, "calib_batches"),
    ],
)
def test_binarize_bad_input(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        binarize_cli.binarize(TinyNet(), **kwargs)


def test_finetune_bad_input() -> None:
    model = binarize_cli.binarize(TinyNet(), "pa", 4, 5).model
    with pytest.raises(BadInputError, match="re-iterable"):
        binarize_cli.finetune(model, iter(batches(1)))
    with pytest.raises(BadInputError, match="epochs"):
        binarize_cli.finetune(model, batches(1), epochs=-1)
    with pytest.raises(BadInputError, match="lr"):
        binarize_cli.finetune(model, batches(1), lr=math.nan)
    with pytest.raises(BadInputError, match="distill must be one of logits, attention, off"):
        binarize_cli.finetune(model, batches(1), distill="soft")
    with pytest.raises(BadInputError, match="attention_weight"):
        binarize_cli.finetune(model, batches(1), attention_weight=-1.0)


def test_finetune_on_the_cpu_keeps_freed_memory_while_it_trains(monkeypatch) -> None:
    import contextlib

    seen: list[object] = []

    @contextlib.contextmanager
    def spy(enabled: bool = True):
        seen.append(enabled)
        yield enabled
        seen.append("exit")

    monkeypatch.setattr(api, "retained_heap", spy)
    model = binarize_cli.binarize(TinyNet(), "pa", 4, 5).model
    binarize_cli.finetune(model, batches(1), epochs=1)
    assert seen == [True, "exit"]


def test_finetune_progressive_with_attention_distillation() -> None:
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    model = binarize_cli.binarize(copy.deepcopy(teacher), "xnor", 1, 1, batches(1)).model
    latent = model.down.weight.detach().clone()
    state = binarize_cli.finetune(
        model, batches(2), epochs=1, teacher=teacher, distill="attention", progressive=True
    )
    assert [row["stage"] for row in state.epoch_stats] == [1, 2, 3]
    assert state.epochs_done == 3 and state.kept_epoch == 3 and not model.training
    assert not torch.equal(latent, model.down.weight)
    layers = [m for m in model.modules() if isinstance(m, BinarizedConv2d)]
    assert layers and all(m.quantize_weights and m.quantize_activations for m in layers)
    assert all(not m._forward_hooks for m in [*model.modules(), *teacher.modules()])


def test_finetune_with_amp_and_compile_trains_float32_weights(monkeypatch) -> None:
    from binarize_cli.convert import training

    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    model = binarize_cli.binarize(TinyNet(), "pa", 4, 5, batches(2)).model
    latent = model.down.weight.detach().clone()
    state = binarize_cli.finetune(model, batches(2), epochs=1, amp="bf16", compile=True)
    assert state.epochs_done == 1 and not model.training
    assert not torch.equal(latent, model.down.weight)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(BadInputError, match="amp must be off, bf16 or fp16 on CUDA"):
        binarize_cli.finetune(model, batches(1), amp="fp16")  # a CPU model


def test_export_derives_and_checks_its_metadata(tmp_path: Path) -> None:
    from binarize_cli.runtime import load_packed

    model = binarize_cli.binarize(TinyNet(num_classes=7), "xnor", 1, 1, batches(1)).model
    path = api.export(
        model,
        tmp_path / "m.safetensors",
        input_size=24,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        name="my-net",
    )
    packed = load_packed(path)
    assert packed.num_classes == 7 and tuple(packed.input_size) == (3, 24, 24)
    assert list(packed.mean) == [0.5] * 3 and packed.source_model == "my-net"
    assert packed.scheme == "xnor"
    assert packed.preprocessing is None  # not given: not recorded
    from binarize_cli.load.data import load_data

    digits = load_data("digits", input_size=24).preprocessing
    recorded = api.export(
        model, tmp_path / "r.safetensors", input_size=24, data="digits", preprocessing=digits
    )
    packed = load_packed(recorded)
    assert packed.preprocessing == digits.to_dict() and packed.data == "digits"
    assert list(packed.mean) == list(digits.mean)  # the record's normalisation
    with pytest.raises(BadInputError, match="no binarized layers"):
        api.export(TinyNet(), tmp_path / "fp.safetensors", input_size=16)
    with pytest.raises(BadInputError, match="unknown export target"):
        api.export(model, tmp_path / "x", target="tflite", input_size=16)
    with pytest.raises(BadInputError, match="example_input .* or input_size"):
        api.export(model, tmp_path / "x")
    with pytest.raises(BadInputError, match=r"\[B, C, H, W\]"):
        api.export(model, tmp_path / "x", example_input=torch.zeros(3, 16, 16))
    partly = binarize_cli.binarize(TinyNet(), "xnor", 1, 1, keep=["down"]).model
    mixed = binarize_cli.binarize(partly, "pa", 4, 5).model  # binarizes only `down`
    with pytest.raises(BadInputError, match="mixes binarized schemes"):
        api.export(mixed, tmp_path / "x", input_size=16)
    assert not (tmp_path / "x").exists()


def test_onnx_export_runs_in_onnxruntime(tmp_path: Path) -> None:
    from binarize_cli.export.onnx import onnx_logits

    torch.manual_seed(0)
    data = batches(2)
    model = binarize_cli.binarize(TinyNet(), "pa", 4, 5, data).model
    images = data[0][0]
    path = api.export(model, tmp_path / "tiny.onnx", target="ONNX", example_input=images)
    with torch.no_grad():
        expected = model(images).numpy()
    got = onnx_logits(path, images.numpy())
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max() + 1e-4


def test_package_root_serves_the_api_lazily() -> None:
    assert binarize_cli.summary is api.summary and binarize_cli.Binarized is api.Binarized
    assert set(binarize_cli.API_NAMES) <= set(dir(binarize_cli))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        binarize_cli.nope  # noqa: B018


# --------------------------------------------------------------------------- docs/api.md


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


DOC_BLOCKS = _python_blocks((REPO / "docs" / "api.md").read_text())


def test_docs_api_has_examples() -> None:
    assert len(DOC_BLOCKS) >= 5
    joined = "\n".join(DOC_BLOCKS)
    for name in ("summary(", "binarize(", "finetune(", "evaluate(", "export("):
        assert name in joined, name


@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)))
def test_docs_api_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block runs standalone (a fresh namespace) in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = compile(DOC_BLOCKS[index], f"docs/api.md block {index + 1}", "exec")
    exec(code, {"__name__": f"docs_api_block_{index}"})
