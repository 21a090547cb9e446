"""`binarize convert --device/--workers/--amp/--compile` end to end on a tiny model.

One run covers the four options: every batch of every stage goes to the one resolved device
(here the string ``cpu:0``, which no stage's own default produces: a stage that chose its own
device would show as ``cpu``), the loaders use a worker process, training runs under bf16
autocast, and the training steps run compiled (with the cheap ``eager`` backend). The run
records all of it and its model still exports and verifies bit for bit in float64.
"""

from __future__ import annotations

import json

import pytest
import torch

from binarize_cli.cli import main

SMALL = "timm:test_resnet"
TINY_RUN = [
    "--data",
    "fake",
    "--baseline-epochs",
    "1",
    "--epochs",
    "0.2",
    "--batch-size",
    "32",
    "--calib-batches",
    "1",
]


def test_convert_on_one_device_with_workers_amp_and_compile(tmp_path, monkeypatch, capsys):
    from binarize_cli.convert import distributed, training
    from binarize_cli.export.verify import verify_run

    monkeypatch.setattr(distributed, "resolve_device", lambda spec: "cpu:0")
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    devices: set[str] = set()
    real_to = training._to

    def spy_to(batch, device):
        devices.add(str(device))
        return real_to(batch, device)

    monkeypatch.setattr(training, "_to", spy_to)
    compiled_modules: list[str] = []
    real_compile = torch.compile

    def spy_compile(module, **kwargs):
        if isinstance(module, torch.nn.Module):  # not the quantizers' own kernels
            compiled_modules.append(type(module).__name__)
        return real_compile(module, **kwargs)

    monkeypatch.setattr(torch, "compile", spy_compile)
    out = tmp_path / "run"
    flags = ["--workers", "1", "--amp", "BF16", "--compile", "--device", "cuda"]
    try:
        main(["convert", SMALL, *TINY_RUN, *flags, "-o", str(out)])
    except SystemExit as exc:  # main exits only on failure
        pytest.fail(f"convert exited {exc.code}: {capsys.readouterr().err}")
    captured = capsys.readouterr()
    assert "device cpu:0, mixed precision bf16, torch.compile, 1 loader worker" in captured.err
    # baseline, the full-precision reference timing and the fine-tune: every batch on cpu:0
    assert devices == {"cpu:0"}
    assert len(compiled_modules) == 3
    meta = json.loads((out / "binarize.json").read_text())
    assert meta["device"] == "cpu:0"
    recipe = meta["recipe"]
    assert (recipe["device"], recipe["workers"], recipe["amp"], recipe["compile"]) == (
        "cuda",
        1,
        "bf16",
        True,
    )
    assert meta["timings"]["fp_step_s"] > 0 and meta["timings"]["finetune_step_s"] > 0
    result = verify_run(out, samples=16, onnx=False)
    assert result.top1_agreement.runtime == 100.0
    assert result.max_rel_logit_diff.runtime < 1e-9
