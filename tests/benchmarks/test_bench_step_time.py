"""benchmarks/bench_step_time.py: its device check and its compiled-vs-compiled table (the
benchmark itself runs for minutes and is not run here)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_step_time.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        yield importlib.import_module("bench_step_time")
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CUDA-less machine")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_clear_line(bench, device):
    with pytest.raises(SystemExit) as exc:  # SystemExit(str): Python prints it, exit status 1
        bench.device_of(device)
    message = str(exc.value.code)
    assert "\n" not in message
    assert f"--device {device} needs a GPU" in message and "--device cpu" in message


def test_device_names(bench):
    assert bench.device_of("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="use cpu, cuda or cuda:N"):
        bench.device_of("tpu")


def test_compiled_rows_are_held_against_compiled_full_precision(bench):
    labels = [row[0] for row in bench.rows(True)]
    assert labels == [
        "full precision",
        "PA (M=4, N=5)",
        "ABC (M=5, N=5)",
        "full precision, compiled",
        "PA (M=4, N=5), compiled",
        "ABC (M=5, N=5), compiled",
        "full precision, compiled, inductor defaults",
    ]
    times = dict(zip(labels, [1.0, 1.2, 1.6, 0.5, 0.7, 0.7, 0.4], strict=True))
    text = bench.markdown({32: times}, 64, "python bench", torch.device("cpu"), True)
    assert "| 32x32 | 64 | PA (M=4, N=5) | 1.200 | 1.20x | yes |" in text
    assert "| 32x32 | 64 | ABC (M=5, N=5) | 1.600 | 1.60x | no |" in text
    assert "| 32x32 | 64 | PA (M=4, N=5), compiled | 0.700 | 1.40x | no |" in text
    assert "| 32x32 | 64 | ABC (M=5, N=5), compiled | 0.700 | 1.40x | yes |" in text
    # shown beside the others, without a target
    assert "| 32x32 | 64 | full precision, compiled, inductor defaults | 0.400 | 1.00x |  |" in text
    assert [row[0] for row in bench.rows(False)] == labels[:3]


def test_compiled_rows_compile_as_convert_does(bench, monkeypatch):
    from binarize_cli.convert.training import compile_options

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    cpu = torch.device("cpu")
    for mode in (bench.EAGER, bench.COMPILED, bench.INDUCTOR_DEFAULTS):
        bench.step_fn(torch.nn.Conv2d(3, 2, 3), 8, 2, cpu, mode)
    assert calls == [
        {"fullgraph": True, "dynamic": False, "options": compile_options(cpu)},
        {"fullgraph": True, "dynamic": False, "options": None},
    ]
    assert compile_options(cpu) == {"layout_optimization": False}


def test_unfused_rows_are_compared_without_a_target(bench):
    rows = bench.rows(False, True)
    labels = [row[0] for row in rows]
    assert labels == [
        "full precision",
        "PA (M=4, N=5)",
        "PA (M=4, N=5), unfused",
        "ABC (M=5, N=5)",
        "ABC (M=5, N=5), unfused",
    ]
    assert [row[5] for row in rows] == [False, False, True, False, True]
    times = dict(zip(labels, [1.0, 1.2, 1.8, 1.4, 1.9], strict=True))
    text = bench.markdown({32: times}, 64, "python bench", torch.device("cpu"), False, True)
    assert "| 32x32 | 64 | PA (M=4, N=5) | 1.200 | 1.20x | yes |" in text
    assert "| 32x32 | 64 | PA (M=4, N=5), unfused | 1.800 | 1.80x |  |" in text


def test_unfused_steps_run_with_the_fused_kernels_off(bench, monkeypatch):
    from binarize_cli.quant import fused

    monkeypatch.delenv(fused.ENV, raising=False)
    seen = []
    with bench.unfused_quantizers(True):
        seen.append(fused.enabled(torch.zeros(fused.MIN_NUMEL)))
    with bench.unfused_quantizers(False):
        seen.append(fused.enabled(torch.zeros(fused.MIN_NUMEL)))
    assert seen == [False, True]
    assert fused.ENV not in __import__("os").environ  # restored


def test_the_table_says_which_heap_the_steps_ran_on(bench):
    labels = [row[0] for row in bench.rows(False)]
    times = dict(zip(labels, [1.0, 1.2, 1.4], strict=True))
    cpu = torch.device("cpu")
    kept = bench.markdown({32: times}, 64, "python bench", cpu, False, False, "retained")
    assert "- C heap: retained\n" in kept
    assert "- C heap: glibc defaults\n" in bench.markdown({32: times}, 64, "x", cpu, False)
