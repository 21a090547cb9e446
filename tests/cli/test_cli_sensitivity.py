"""`convert --policy auto` / `--sensitivity` and what `report` shows of them, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from binarize_cli.cli import app
from binarize_cli.convert.sensitivity import SENSITIVITY_FILE

runner = CliRunner()
TINY = [
    "timm:test_resnet",
    "--data",
    "fake",
    "--epochs",
    "0",
    "--baseline-epochs",
    "1",
    "--calib-batches",
    "1",
    "--batch-size",
    "32",
    "--input-size",
    "32",
]


def convert(out: Path, *extra: str) -> str:
    result = runner.invoke(app, ["convert", *TINY, "-o", str(out), *extra])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("auto") / "run"
    return out, convert(out, "--policy", "auto")


def test_auto_records_its_choice_within_the_uniform_memory(auto_run) -> None:
    out, printed = auto_run
    meta = json.loads((out / "binarize.json").read_text())
    allocation, table = meta["allocation"], meta["layer_bases"]
    assert allocation["policy"] == "auto" and allocation["method"] == "greedy"
    assert allocation["memory_bits"] <= allocation["budget_bits"] == allocation["uniform_bits"]
    assert allocation["ops"] <= allocation["budget_ops"] == allocation["uniform_ops"]
    assert allocation["error"] <= allocation["uniform_error"]
    assert (meta["M"], meta["N"]) == (4, 5)  # the run-level bases stay the requested ones
    assert len(table) == 14 and all(v is None or len(v) == 2 for v in table.values())
    assert (out / SENSITIVITY_FILE).is_file()
    assert "per-layer bases allocated" in printed and "M/N" in printed
    # report counts the converted model exactly as the allocation predicted
    report = json.loads(runner.invoke(app, ["report", str(out), "--json"]).stdout)
    assert report["memory_bits"] == allocation["memory_bits"]
    rows = {r["name"]: r for r in report["layers"]}
    for name, bases in table.items():
        row = rows[name]
        assert len(row["sensitivity"]) == 17  # full precision and the 16 PA candidates
        if bases is None:
            assert row["precision"] == "fp" and row["sensitivity_error"] == 0.0
        else:
            assert [row["M"], row["N"]] == bases
            chosen = [c for c in row["sensitivity"] if [c["M"], c["N"]] == bases]
            assert row["sensitivity_error"] == chosen[0]["output_error"]
    assert rows["conv1.0"]["sensitivity"] is None  # the first convolution is not allocated


def test_report_shows_the_sensitivity_column_in_80_columns(auto_run, tmp_path) -> None:
    out, _ = auto_run
    for columns in (80, 200):
        result = runner.invoke(app, ["report", str(out)], env={"COLUMNS": str(columns)})
        assert result.exit_code == 0, result.output
        text = result.stdout
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= columns
        assert "sens." in text and "relative logit error" in " ".join(text.split())
    result = runner.invoke(app, ["report", str(out), "--plot", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fig" / "sensitivity.png").stat().st_size > 1000


def test_sensitivity_leaves_a_uniform_run_byte_identical(tmp_path) -> None:
    convert(tmp_path / "plain")
    convert(tmp_path / "measured", "--sensitivity")
    plain = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (tmp_path / "measured" / "model.safetensors").read_bytes() == plain
    assert not (tmp_path / "plain" / SENSITIVITY_FILE).exists()
    assert (tmp_path / "measured" / SENSITIVITY_FILE).is_file()
    assert json.loads((tmp_path / "measured" / "binarize.json").read_text())["allocation"] is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget-mbit", "40"], "--budget-mbit chooses per-layer bases"),
        (["--policy", "auto", "--budget-bops", "-1"], "--budget-bops must be a positive"),
        (["--policy", "greedy"], "policy must be one of uniform, auto"),
        (["--policy", "auto", "--budget-mbit", "0.001"], "below the cheapest configuration"),
    ],
)
def test_bad_policy_flags_are_one_line_exit_2(tmp_path, capsys, flags, message) -> None:
    from binarize_cli.cli import main

    with pytest.raises(SystemExit) as info:
        main(["convert", *TINY, "-o", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    # bad flags fail before any work; a budget too small, once the costs are measured
    lines = err.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("binarize: error: ")
    assert len(lines) == 1 or "cheapest" in message
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "r").exists()
