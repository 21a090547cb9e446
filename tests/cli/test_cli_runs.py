"""Runs are never silently replaced (``--overwrite``), ``binarize runs`` lists them, and
``convert``'s tables (surgery, accuracy and its gap) fit 80 columns."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from binarize_cli.cli import app, main
from binarize_cli.commands.convert import _accuracy_table, _decisions_table
from binarize_cli.convert.pipeline import default_run_dir, prepare, work_dir_for
from binarize_cli.core.errors import RunDirError
from binarize_cli.core.metadata import META_FILE, RunMetadata
from binarize_cli.core.rundir import WEIGHTS_FILE, list_runs
from binarize_cli.core.settings import merge_settings

runner = CliRunner()
TINY = ["--data", "fake", "--scheme", "xnor", "-M", "1", "-N", "1", "--epochs", "0"]
TINY += ["--baseline-epochs", "0", "--calib-batches", "1", "--batch-size", "32"]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _fake_run(path: Path, run_meta, **extra) -> Path:
    """A run directory as listing sees it: a binarize.json and a weights file."""
    path.mkdir(parents=True)
    RunMetadata.from_dict(run_meta(**extra)).save(path)
    (path / WEIGHTS_FILE).write_bytes(b"weights")
    return path


# --------------------------------------------------------------------------- --overwrite


def test_convert_into_an_existing_run_exits_2_naming_overwrite(
    tmp_path, make_run_dir, capsys, monkeypatch
):
    run = make_run_dir(tmp_path / "run")
    before = _hashes(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("convert loaded the model before refusing the output")

    monkeypatch.setattr("binarize_cli.convert.pipeline.load_inputs", no_work)
    with pytest.raises(SystemExit) as exc:
        main(["convert", "timm:test_resnet", *TINY, "-o", str(run)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and str(run) in err[0]
    assert _hashes(tmp_path) == before  # byte-identical, and nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_default_run_directory_is_protected_too(tmp_path, run_meta, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    existing = _fake_run(tmp_path / default_run_dir("timm:test_resnet", "xnor", 1, 1), run_meta)
    before = _hashes(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["convert", "timm:test_resnet", *TINY])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _hashes(tmp_path) == before and existing.is_dir()


def test_overwrite_replaces_the_run(tmp_path, make_run_dir):
    run = make_run_dir(tmp_path / "run", scheme="pa")
    result = runner.invoke(
        app, ["convert", "timm:test_resnet", *TINY, "-o", str(run), "--overwrite"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    meta = RunMetadata.load(run)
    assert (meta.scheme, meta.data) == ("xnor", "fake")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_of_an_interrupted_run_needs_no_overwrite(tmp_path):
    """An interrupted run has only its hidden work directory; the run does not exist yet."""
    out = tmp_path / "run"
    work_dir_for(out).mkdir()
    settings = merge_settings(None, {"model": "timm:test_resnet", "data": "fake"})
    plan = prepare(settings, out_dir=out, resume=True)
    assert plan.run_dir == out and plan.work_dir == work_dir_for(out)
    (out).mkdir()
    (out / META_FILE).write_text("{}")
    (out / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(RunDirError, match="--overwrite"):
        prepare(settings, out_dir=out, resume=True)
    assert prepare(settings, out_dir=out, resume=True, overwrite=True).run_dir == out


# --------------------------------------------------------------------------- binarize runs


@pytest.fixture
def runs_root(tmp_path, run_meta) -> Path:
    root = tmp_path / "runs"
    acc = {"fp": {"top1": 90.0, "top5": 99.0}, "binarized": {"top1": 85.5, "top5": 97.0}}
    _fake_run(
        root / "newer",
        run_meta,
        scheme="abc",
        m=5,
        n=5,
        created="2026-03-01T10:00:00+00:00",
        accuracy=acc,
    )
    # Written second, so newer by mtime, and after "newer" by name: only `created` orders it.
    _fake_run(root / "older", run_meta, created="2026-01-01T10:00:00+00:00", accuracy=acc)
    os.utime(root / "older" / META_FILE, (time.time() + 60, time.time() + 60))
    damaged = root / "damaged"
    damaged.mkdir()
    (damaged / META_FILE).write_text("{not json")
    (damaged / WEIGHTS_FILE).write_bytes(b"")
    _fake_run(root / ".newer.partial", run_meta)  # a work area, never listed
    return root


def test_list_runs_newest_first_with_errors(runs_root):
    entries = list_runs(runs_root)
    by_name = {e.path.name: e for e in entries}
    assert set(by_name) == {"newer", "older", "damaged"}  # the hidden work area is not a run
    good = [e.path.name for e in entries if e.meta is not None]
    assert good == ["newer", "older"]  # by `created`, not by name or mtime
    assert by_name["damaged"].meta is None and "not JSON" in by_name["damaged"].error
    assert by_name["newer"].meta.scheme == "abc"


def test_runs_json(runs_root):
    result = runner.invoke(app, ["runs", "--root", str(runs_root), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    good = [r for r in rows if "error" not in r]
    assert [r["run_dir"] for r in good] == [str(runs_root / "newer"), str(runs_root / "older")]
    assert good[0] == {
        "run_dir": str(runs_root / "newer"),
        "model": "timm:test_resnet",
        "scheme": "abc",
        "M": 5,
        "N": 5,
        "data": "fake",
        "fp_top1": 90.0,
        "calibrated_top1": None,
        "binarized_top1": 85.5,
        "created": "2026-03-01T10:00:00+00:00",
    }
    (bad,) = [r for r in rows if "error" in r]
    assert bad["run_dir"].endswith("damaged") and "binarize.json" in bad["error"]


@pytest.mark.parametrize("columns", [80, 200])
def test_runs_table(runs_root, columns):
    result = runner.invoke(app, ["runs", "--root", str(runs_root)], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= columns
    assert text.index("newer") < text.index("older")
    for cell in ("abc 5/5", "90.00", "85.50", "2026-03-01", "error"):
        assert cell in text
    assert "damaged: " in text and "not JSON" in " ".join(text.split())


def test_runs_default_root_and_missing_root(tmp_path, run_meta, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = runner.invoke(app, ["runs"])
    assert empty.exit_code == 0 and "no runs under runs/" in empty.output
    _fake_run(tmp_path / "runs" / "one", run_meta)
    assert "one" in runner.invoke(app, ["runs"], env={"COLUMNS": "120"}).stdout
    (tmp_path / "file").write_text("x")
    refused = runner.invoke(app, ["runs", "--root", "file"])
    assert refused.exit_code != 0 and isinstance(refused.exception, RunDirError)


# --------------------------------------------------------------------------- convert's tables


def _render(table, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text()


def _decision(name: str, binarized: bool = True, groups: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        name=name,
        kind="downsample",
        in_channels=320,
        out_channels=1280,
        kernel_size=(3, 3),
        stride=(2, 2),
        groups=groups,
        binarized=binarized,
        reason="kept full precision: depthwise conv (paper 4.3), too few channels",
        m=8 if binarized else None,
        n=7 if binarized else None,
    )


def test_surgery_table_fits_80_columns():
    names = ["conv1.0", "layer2.0.downsample.1", "blocks.5.2.conv_pwl.0"]
    decisions = [_decision(n, i % 2 == 0) for i, n in enumerate(names)]
    for width in (80, 200):
        text = _render(_decisions_table(decisions, width), width)
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
        assert all(name in text for name in names)  # whole, on one line
        assert "320->1280 k3x3 s2x2" in text
        assert text.count("8/7") == 2  # each binarized layer's own bases, never dropped
    assert "why" in _render(_decisions_table(decisions, 200), 200)
    # names too long for any column layout fold instead of being cut
    long = [_decision("stages.3.blocks.12.attention.conv_pointwise_expand_" + "x" * 30, groups=32)]
    text = _render(_decisions_table(long, 80), 80)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "xxxxxxxxxxxxx" in text


def test_convert_accuracy_table_gap_is_fp_minus_model(run_meta):
    acc = {
        "fp": {"top1": 90.0, "top5": 99.0},
        "calibrated": {"top1": 40.0, "top5": 70.0},
        "binarized": {"top1": 85.28, "top5": 97.0},
    }
    text = _render(_accuracy_table(RunMetadata.from_dict(run_meta(accuracy=acc))), 80)
    rows = {
        line.split("│")[1].strip(): line.split("│")[4].strip()
        for line in text.splitlines()
        if line.count("│") == 5
    }
    assert rows["fine-tuned"] == "4.72" and rows["calibrated (no training)"] == "50.00"
    assert "positive: accuracy lost" in " ".join(text.split())
