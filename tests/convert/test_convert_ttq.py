"""`--scheme ttq` end to end: convert (fine-tuning W_p, W_n), export packed + ONNX, verify."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file


def test_ttq_convert_export_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run_cli: Callable[..., tuple[int, str, str]]
) -> None:
    run = tmp_path / "run"
    args = ["convert", "timm:test_resnet", "--no-pretrained", "--data", "digits"]
    args += ["--scheme", "ttq", "--input-size", "16", "--batch-size", "128"]
    args += ["--baseline-epochs", "1", "--epochs", "0.2", "--calib-batches", "1", "-o", str(run)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    meta = json.loads((run / "binarize.json").read_text())
    assert (meta["scheme"], meta["M"], meta["N"]) == ("ttq", 2, 0)
    state = load_file(str(run / "model.safetensors"))
    scales = {k: v for k, v in state.items() if k.endswith((".w_p", ".w_n"))}
    assert scales and all(v.shape == (1,) and float(v) > 0 for v in scales.values())
    name = next(k for k in scales if k.endswith(".w_p")).rsplit(".weight_quantizer", 1)[0]

    packed = tmp_path / "m.packed.safetensors"
    code, _, err = run_cli(["export", str(run), "--target", "packed", "-o", str(packed)], capsys)
    assert code == 0, err
    with safe_open(str(packed), framework="pt") as fh:
        stored = fh.get_tensor(f"{name}.weight_scales")
    expected = torch.cat(
        [scales[f"{name}.weight_quantizer.w_p"], -scales[f"{name}.weight_quantizer.w_n"]]
    )
    assert torch.equal(stored, expected.float())

    code, out, err = run_cli(["verify", str(run), "--samples", "16", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["top1_agreement"]["runtime"] == 100.0
    assert result["top1_agreement"]["onnx"] == 100.0
