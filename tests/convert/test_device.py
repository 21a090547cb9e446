"""Where and how `convert` trains: ``--device`` resolution, ``--workers``, ``--amp``, ``--compile``.

CUDA is faked where a case needs it (``torch.cuda.is_available``/``device_count``), so every
case runs the same on a machine with or without a GPU. The end-to-end convert is in
tests/cli/test_convert_device.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.convert.distributed import resolve_device
from binarize_cli.convert.training import (
    AMP_DTYPES,
    Execution,
    autocast,
    compiled,
    train_one_epoch,
)
from binarize_cli.core.errors import BadInputError
from binarize_cli.core.settings import AMP_MODES
from binarize_cli.load.data import load_data, make_loader
from binarize_cli.quant import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# --------------------------------------------------------------------------- --device


@pytest.mark.parametrize(("spec", "expected"), [("auto", "cpu"), ("cpu", "cpu"), (" CPU ", "cpu")])
def test_without_cuda_auto_is_the_cpu(no_cuda, spec, expected):
    assert resolve_device(spec) == expected


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_says_to_use_the_cpu(no_cuda, spec):
    with pytest.raises(BadInputError, match=f"--device {spec}: .*use --device cpu"):
        resolve_device(spec)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"), ("CUDA:1", "cuda:1")],
)
def test_with_cuda_the_device_gets_its_index(two_gpus, spec, expected):
    assert resolve_device(spec) == expected


def test_a_cuda_index_not_visible_is_refused(two_gpus):
    with pytest.raises(BadInputError, match=r"cuda:2: only 2 CUDA devices visible \(cuda:0 to"):
        resolve_device("cuda:2")


def test_under_torchrun_each_rank_takes_its_local_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(BadInputError, match="torchrun .* pass --device cuda"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("spec", ["tpu", "", "cuda:", "cuda:x", "cpu:0", "auto:1", "mps"])
def test_a_device_of_no_known_form_is_refused(spec):
    with pytest.raises(BadInputError, match=r"--device must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


# --------------------------------------------------------------------------- Execution


def test_amp_choices_are_the_autocast_table():
    assert tuple(AMP_DTYPES) == AMP_MODES
    assert AMP_DTYPES["off"] is None and AMP_DTYPES["bf16"] is torch.bfloat16


def test_loader_options_pin_memory_on_cuda_only():
    assert Execution("cpu", workers=2).loader_options == {"num_workers": 2, "pin_memory": False}
    assert Execution("cuda:1").loader_options == {"num_workers": 0, "pin_memory": True}


def test_only_fp16_scales_the_loss():
    assert Execution("cpu").grad_scaler() is None
    assert Execution("cpu", amp="bf16").grad_scaler() is None
    assert isinstance(Execution("cpu", amp="fp16").grad_scaler(), torch.amp.GradScaler)


def test_loader_workers_persist_across_passes():
    data = load_data("fake")
    assert make_loader(data.val, batch_size=8, shuffle=False, seed=0).persistent_workers is False
    with_workers = make_loader(data.val, batch_size=8, shuffle=False, seed=0, num_workers=1)
    assert with_workers.persistent_workers is True


def test_compiled_wraps_only_when_asked_and_shares_the_weights(monkeypatch):
    from binarize_cli.convert import training

    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    module = nn.Linear(3, 2)
    assert compiled(module, False) is module
    wrapper = compiled(module)
    assert wrapper is not module
    assert list(wrapper.parameters())[0] is module.weight
    x = torch.randn(4, 3)
    assert torch.equal(wrapper(x), module(x))


def test_compiled_turns_inductor_layout_optimisation_off_on_the_cpu(monkeypatch):
    from binarize_cli.convert import training

    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(kw) or module)
    compiled(nn.Linear(3, 2))
    assert calls == [{"backend": "inductor", "options": {"layout_optimization": False}}]
    assert training.compile_options("cuda:0") == {}  # inductor's defaults (not measured)
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")  # other backends take no options
    compiled(nn.Linear(3, 2))
    assert calls[1] == {"backend": "eager"}


def test_inductor_accepts_the_cpu_options():
    import torch._inductor.config as inductor_config

    from binarize_cli.convert.training import CPU_COMPILE_OPTIONS

    for key, value in CPU_COMPILE_OPTIONS.items():
        assert hasattr(inductor_config, key) and type(getattr(inductor_config, key)) is type(value)


# --------------------------------------------------------------------------- --amp


def _layer() -> BinarizedConv2d:
    conv = nn.Conv2d(4, 8, 3, padding=1)
    layer = BinarizedConv2d.from_conv(conv, get_scheme("pa"), 4, 5)
    layer.activation_quantizer.calibrate(torch.randn(64, 4, 6, 6))
    return layer


def test_under_autocast_the_quantizers_see_float32_and_the_conv_runs_in_bf16():
    layer = _layer()
    seen: list[torch.dtype] = []
    for q in (layer.activation_quantizer, layer.weight_quantizer):
        q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())  # a reduced-precision input, as an autocast conv hands on
    assert seen == [torch.float32, torch.float32]
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        x_hat = layer.activation_quantizer(x.bfloat16().float())
        w_hat = layer.quantized_weight()
    expected = F.conv2d(x_hat.bfloat16(), w_hat.bfloat16(), layer.bias.bfloat16(), padding=1)
    assert torch.equal(out.detach(), expected)
    out.float().sum().backward()
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None, name
        assert p.grad.dtype == torch.float32, name


def test_without_autocast_the_layer_is_unchanged():
    layer = _layer()
    x = torch.randn(2, 4, 6, 6)
    expected = F.conv2d(
        layer.activation_quantizer(x), layer.quantized_weight(), layer.bias, padding=1
    )
    assert torch.equal(layer(x), expected)
    with autocast("cpu", "off"):
        assert torch.equal(layer(x), expected)


def test_a_bf16_epoch_trains_float32_weights_through_a_compiled_module(monkeypatch):
    from binarize_cli.convert import training

    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        _layer(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    stats = train_one_epoch(compiled(model), batches, opt, amp="bf16")
    assert stats.steps == 3 and torch.isfinite(torch.tensor(stats.loss))
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "3.weight" in changed and "6.weight" in changed
