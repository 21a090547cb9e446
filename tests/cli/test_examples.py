"""Every script in examples/ runs (tiny settings) and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_convert_in_code_then_run_packed(tmp_path):
    run_dir = tmp_path / "run"
    out = _run(
        str(EXAMPLES / "convert_in_code.py"),
        "resnet18",
        "--data",
        "fake",
        "--epochs",
        "0.5",
        "--baseline-epochs",
        "1",
        "-o",
        str(run_dir),
        cwd=tmp_path,
    )
    assert "binarized 19 layers" in out
    assert "binarized: top-1" in out
    out = _run(str(EXAMPLES / "run_packed.py"), str(run_dir), "--samples", "64", cwd=tmp_path)
    assert "bitwise runtime top-1 on 64 images" in out
    assert (run_dir / "model.packed.safetensors").is_file()


def test_compare_schemes(tmp_path):
    out = _run(str(EXAMPLES / "compare_schemes.py"), "resnet18", "--input-size", "64", cwd=tmp_path)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 6
    assert lines[1].split()[0] == "pa" and lines[-1].split()[0] == "xnor"
