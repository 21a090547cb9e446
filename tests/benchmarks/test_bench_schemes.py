"""benchmarks/bench_schemes.py: its configuration syntax, run names shared with the
sensitivity benchmark, and its table (the benchmark itself runs for an hour; not run here)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("bench_schemes")
    finally:
        sys.path.remove(str(SCRIPTS))


def test_configs_parse_with_settings(bench):
    assert bench.parse("ttq:2:0") == ("ttq", 2, 0, {})
    assert bench.parse("realtobin:1:1:distill=attention,progressive=true,lr=0.001") == (
        "realtobin",
        1,
        1,
        {"distill": "attention", "progressive": True, "lr": 0.001},
    )
    with pytest.raises(SystemExit, match="scheme:M:N"):
        bench.parse("pa:4")


def test_plain_configs_reuse_the_sensitivity_benchmark_runs(bench):
    # bench_sensitivity names a uniform run f"{scheme}-M{m}N{n}": the same key is reused.
    assert bench.key_of(*bench.parse("pa:4:5")) == "pa-M4N5"
    assert bench.key_of(*bench.parse("realtobin:1:1:progressive=true")) == (
        "realtobin-M1N1-progressive_true"
    )


def test_table_has_one_row_per_scheme_with_its_gap(bench):
    args = argparse.Namespace(
        data="fashion-mnist", model="resnet18", baseline_epochs=8, epochs=1.0, lr=5e-4,
        batch_size=64, seed=0,
    )  # fmt: skip
    control = {"baseline_top1": 92.25, "top1": 92.0, "seconds": 60.0}
    row = {
        "memory_bits": 12.5e6, "bops": 0.25e9, "calibrated": 80.0, "top1": 90.5,
        "step_ratio": 1.5, "seconds": 120.0,
    }  # fmt: skip
    text = bench.markdown(args, [("control", control), ("BNN (1,1)", row)], "python x")
    assert "| BNN (1,1) | 12.500 | 0.250 | 80.00 | 90.50 | +1.50 | 1.50 |" in text
    assert "| full precision (control: +1 epoch(s)) | - | - | - | 92.00 | 0.00 | - |" in text
    assert "(3 min: the runs' wall times" in text
