"""Issue #14's model list: every classifier converts, exports packed and ONNX, and verifies.

For each timm / torchvision classifier below, at its smallest valid input, on ``fake`` data with
PA (M=2, N=3) and random weights: ``convert`` (calibration only) -> ``export --target packed`` ->
``export --target onnx`` -> ``verify --json``. Asserted:

* the packed runtime (float64) agrees 100% top-1 with the float64 PyTorch replay, to rounding
  (relative logit error below 1e-9);
* ONNX (float32) agrees 100% with the float64 reference, except where float32 PyTorch itself moves
  activations across a step threshold: then ``verify`` must report threshold flips, and float32
  PyTorch's own distance from float64 must be of the same order as ONNX's (at least half of it).
  A wrong ONNX op would show as an ONNX error far above PyTorch's float32 drift; rounding that a
  step function amplifies (deep random-weight nets: densenet121, dpn68) shows in both alike.

Slow (tens of seconds per model on two cores); run with ``pytest -m slow tests/export/test_zoo_export.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from binarize_cli.cli import app

runner = CliRunner()

#: (model spec, smallest valid square input side: 32, or the smallest the model runs at).
ZOO = [
    ("resnet18d", 32),
    ("mobilenetv3_large_100", 32),
    ("efficientnet_b0", 32),
    ("ghostnet_100", 32),
    ("inception_v3", 75),
    ("dpn68", 32),
    ("rexnet_100", 32),
    ("regnetx_002", 32),
    ("densenet121", 32),
    ("mixnet_s", 32),
    ("torchvision:shufflenet_v2_x1_0", 32),
    ("torchvision:googlenet", 32),
    ("torchvision:squeezenet1_1", 32),
    ("torchvision:mnasnet1_0", 32),
    ("torchvision:efficientnet_b0", 32),
    ("torchvision:mobilenet_v3_small", 32),
]


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"binarize {' '.join(args)}:\n{result.output}"
    return result.output


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "size"), ZOO, ids=[s for s, _ in ZOO])
def test_converts_exports_and_verifies(spec: str, size: int, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _cli(
        "convert", spec, "--scheme", "pa", "-M", "2", "-N", "3", "--data", "fake",
        "--input-size", str(size), "--epochs", "0", "--baseline-epochs", "1",
        "--calib-batches", "1", "-o", str(run),
    )  # fmt: skip
    packed = run / "model.packed.safetensors"
    onnx_file = run / "model.onnx"
    _cli("export", str(run), "--target", "packed", "-o", str(packed))
    _cli("export", str(run), "--target", "onnx", "-o", str(onnx_file))
    assert packed.stat().st_size > 0 and onnx_file.stat().st_size > 0
    out = _cli("verify", str(run), "--json", "--samples", "64")
    result = json.loads(out[out.index("{") :])
    assert result["samples"] == 64
    assert result["top1_agreement"]["runtime"] == 100.0, result
    assert result["max_rel_logit_diff"]["runtime"] < 1e-9, result
    onnx = result["top1_agreement"]["onnx"]
    if onnx != 100.0:
        f32 = result["float32"]
        assert f32["flipped_activations"] > 0, result
        assert f32["pytorch_vs_float64"] >= 0.5 * result["max_abs_logit_diff"]["onnx"], result
