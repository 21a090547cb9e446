"""The issue's check of `--policy auto` (slow: trains the digits resnet18 baseline and measures
19 layers' sensitivity): at the uniform PA (4, 5) run's memory, the allocated model's
calibrated top-1 is at least 5 points higher, and its exports verify at 100%."""

from __future__ import annotations

import json

import pytest

from binarize_cli.cli import main

CONVERT = ["convert", "resnet18", "--data", "digits", "-M", "4", "-N", "5", "--epochs", "0"]


def _json(capsys, *args: str) -> dict:
    main(list(args))
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_auto_beats_uniform_at_the_same_memory(tmp_path, capsys) -> None:
    uniform, auto = tmp_path / "uniform", tmp_path / "auto"
    main([*CONVERT, "-o", str(uniform)])
    capsys.readouterr()
    u = _json(capsys, "report", str(uniform), "--json")
    budget = u["memory_bits"] / 1e6
    main([*CONVERT, "--policy", "auto", "--budget-mbit", repr(budget), "-o", str(auto)])
    capsys.readouterr()
    a = _json(capsys, "report", str(auto), "--json")
    with capsys.disabled():
        print(
            f"\nuniform {u['memory_bits']} bits, calibrated {u['accuracy']['calibrated']['top1']:.2f}%"
            f"\nauto    {a['memory_bits']} bits, calibrated {a['accuracy']['calibrated']['top1']:.2f}%"
        )
    assert a["memory_bits"] <= u["memory_bits"]
    gain = a["accuracy"]["calibrated"]["top1"] - u["accuracy"]["calibrated"]["top1"]
    assert gain >= 5.0
    v = _json(capsys, "verify", str(auto), "--samples", "100", "--json")
    assert v["top1_agreement"]["runtime"] == 100.0
    assert v["top1_agreement"]["onnx"] == 100.0, v["notes"]
