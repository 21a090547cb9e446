"""`--scheme realtobin` end to end: convert (fine-tuning the gates), export packed + ONNX,
verify (the issue's check at test size: timm's test_resnet on digits, fractional epochs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file


def test_realtobin_convert_export_verify(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    run_cli: Callable[..., tuple[int, str, str]],
) -> None:
    run = tmp_path / "run"
    args = ["convert", "timm:test_resnet", "--no-pretrained", "--data", "digits"]
    args += ["--scheme", "realtobin", "--input-size", "16", "--batch-size", "128"]
    args += ["--baseline-epochs", "1", "--epochs", "0.2", "--calib-batches", "1", "-o", str(run)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    meta = json.loads((run / "binarize.json").read_text())
    assert (meta["scheme"], meta["M"], meta["N"]) == ("realtobin", 1, 1)
    state = load_file(str(run / "model.safetensors"))
    expand = {k: v for k, v in state.items() if k.endswith(".gate.expand_weight")}
    assert expand and all(f"{k[: -len('expand_weight')]}reduce_weight" in state for k in expand)
    # Zero at conversion; fine-tuning moved every gate.
    assert all(float(v.abs().max()) > 0 for v in expand.values())
    name = next(iter(expand)).rsplit(".gate.", 1)[0]

    packed = tmp_path / "m.packed.safetensors"
    code, _, err = run_cli(["export", str(run), "--target", "packed", "-o", str(packed)], capsys)
    assert code == 0, err
    with safe_open(str(packed), framework="pt") as fh:
        graph = json.loads(fh.metadata()["graph"])
        stored = fh.get_tensor(f"{name}.gate.expand_weight")
    assert stored.equal(expand[f"{name}.gate.expand_weight"].float())
    ops = [n["op"] for n in graph["nodes"]]
    assert ops.count("sigmoid") == ops.count("bconv2d") == len(expand)

    code, out, err = run_cli(["verify", str(run), "--samples", "16", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["top1_agreement"]["runtime"] == 100.0
    assert result["top1_agreement"]["onnx"] == 100.0
    assert result["max_rel_logit_diff"]["runtime"] < 1e-6
