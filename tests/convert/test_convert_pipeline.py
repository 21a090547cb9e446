"""`binarize convert` end to end on tiny settings: run directory contract, resume, torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from binarize_cli.cli import app
from binarize_cli.convert.finetune import load_checkpoint
from binarize_cli.convert.pipeline import run_convert, validate_settings, work_dir_for
from binarize_cli.convert.rebuild import load_run
from binarize_cli.core.errors import BadInputError
from binarize_cli.core.settings import merge_settings
from binarize_cli.load.data import load_data, make_loader

FAST = {
    "model": "resnet18",
    "data": "fake",
    "baseline_epochs": 1,
    "epochs": 1.0,
    "batch_size": 32,
    "calib_batches": 2,
}
CONTRACT_KEYS = ("model", "scheme", "M", "N", "data", "recipe", "accuracy", "timings")


def test_convert_writes_the_contract(tmp_path, top1_recount):
    out = tmp_path / "run"
    result = run_convert(
        merge_settings(None, {**FAST, "scheme": "pa", "M": 4, "N": 5}), out_dir=out
    )
    assert result.run_dir == out
    meta = json.loads((out / "binarize.json").read_text())
    for key in CONTRACT_KEYS:
        assert key in meta
    data = load_data(
        meta["data"], input_size=tuple(meta["input_size"]), mean=meta["mean"], std=meta["std"]
    )
    for stage in ("fp", "calibrated", "binarized"):
        acc = meta["accuracy"][stage]
        assert set(acc) >= {"top1", "top5"} and acc["top5"] >= acc["top1"]
        # a count of whole validation images, in percent
        images = acc["top1"] * len(data.val) / 100
        assert images == pytest.approx(round(images), abs=1e-6), stage
    timings = meta["timings"]
    assert len(timings["finetune_epoch_s"]) == 1 and timings["finetune_epoch_s"][0] > 0
    assert len(timings["baseline_epoch_s"]) == 1 and timings["calibrate_s"] > 0
    # the step-time ratio's two sides, both timed in this process
    assert timings["fp_step_s"] > 0 and timings["finetune_step_s"] > 0
    steps = meta["finetune_epochs"][0]["steps"]
    # the mean over the steps after the first two (which also load the fused kernels)
    assert steps > 2
    assert 0 < timings["finetune_step_s"] < timings["finetune_epoch_s"][0] / (steps - 2)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["binarize.json", "metrics.csv", "model.safetensors"]
    assert not work_dir_for(out).exists()
    # metrics.csv: the one epoch, kept, its validation top-1 the one binarize.json records
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1"] and rows[0]["kept"] == "1"
    assert float(rows[0]["val_top1"]) == pytest.approx(meta["accuracy"]["binarized"]["top1"])
    assert float(rows[0]["seconds"]) > 0 and float(rows[0]["lr"]) == pytest.approx(5e-4)
    assert 0 <= float(rows[0]["select_top1"]) <= 100
    # The run reloads into an identical model.
    run = load_run(out)
    state = load_file(str(out / "model.safetensors"))
    for key, value in run.model.state_dict().items():
        assert (value == state[key]).all(), key
    # ... whose top-1, recounted over the same validation loader, is the recorded one.
    loader = make_loader(data.val, batch_size=128, shuffle=False, seed=0)
    correct, total = top1_recount(run.model, loader)
    assert total == len(data.val)
    assert meta["accuracy"]["binarized"]["top1"] == pytest.approx(100 * correct / total, abs=1e-9)
    binarized = [d for d in result.decisions if d.binarized]
    assert len(binarized) == 19  # 16 3x3 convs + 3 downsample convs for PA


def test_resume_continues_after_the_last_epoch(tmp_path):
    out = tmp_path / "run"
    settings = merge_settings(None, {**FAST, "scheme": "abc", "M": 2, "N": 2, "epochs": 2.0})
    # Simulate an interruption after epoch 1: run 1 epoch keeping the work dir.
    work = work_dir_for(out)
    first = merge_settings(None, {**FAST, "scheme": "abc", "M": 2, "N": 2, "epochs": 1.0})
    from binarize_cli.convert import pipeline

    original = pipeline.write_run
    pipeline.write_run = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            run_convert(first, out_dir=out)
    finally:
        pipeline.write_run = original
    saved = load_checkpoint(work)
    assert saved is not None and saved["epochs_done"] == 1
    assert not out.exists()
    result = run_convert(settings, out_dir=out, resume=True)
    assert result.resumed_from_epoch == 1
    meta = json.loads((out / "binarize.json").read_text())
    assert len(meta["timings"]["finetune_epoch_s"]) == 2
    assert meta["timings"]["finetune_epoch_s"][0] == pytest.approx(saved["epoch_seconds"][0])


def test_cli_convert_and_refuses_foreign_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    runner = CliRunner()
    from binarize_cli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["convert", "resnet18", "--data", "fake", "-o", str(foreign), "--epochs", "0"])
    assert exc.value.code == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    result = runner.invoke(
        app,
        [
            "convert",
            "resnet18",
            "--data",
            "fake",
            "--scheme",
            "xnor",
            "-M",
            "1",
            "-N",
            "1",
            "--epochs",
            "0",
            "--baseline-epochs",
            "1",
            "--calib-batches",
            "1",
            "--batch-size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Graph surgery" in result.output
    assert (tmp_path / "runs" / "resnet18-xnor-M1N1" / "binarize.json").is_file()


TINY = {**FAST, "model": "timm:test_resnet", "epochs": 0.0, "calib_batches": 1}


def test_recipe_layers_pin_per_layer_bases(tmp_path):
    out = tmp_path / "run"
    layers = {"layer2\\.0\\.downsample": "fp", "layer1\\.": [2, 3], "layer4": [6, 7]}
    result = run_convert(
        merge_settings(None, {**TINY, "scheme": "pa", "M": 4, "N": 5, "layers": layers}),
        out_dir=out,
    )
    table = json.loads((out / "binarize.json").read_text())["layer_bases"]
    assert table["layer2.0.downsample.1"] is None
    assert table["layer1.0.conv1"] == table["layer1.0.conv2"] == [2, 3]
    assert table["layer4.0.downsample.1"] == [6, 7] and table["layer3.0.conv1"] == [4, 5]
    rows = {d.name: d for d in result.decisions}
    assert not rows["layer2.0.downsample.1"].binarized
    assert (rows["layer4.0.conv2"].m, rows["layer4.0.conv2"].n) == (6, 7)
    modules = dict(load_run(out).model.named_modules())
    assert modules["layer4.0.conv2"].activation_bases == 7
    assert type(modules["layer2.0.downsample.1"]).__name__ == "Conv2d"


def test_a_cpu_conversion_runs_with_the_heap_retained_and_restores_it(tmp_path, monkeypatch):
    import contextlib

    from binarize_cli.convert import pipeline

    seen: list[str] = []

    @contextlib.contextmanager
    def spy(enabled: bool = True):
        seen.append(f"enter {enabled}")
        try:
            yield enabled
        finally:
            seen.append("exit")

    monkeypatch.setattr(pipeline, "retained_heap", spy)
    run_convert(merge_settings(None, {**TINY, "scheme": "pa", "M": 2, "N": 2}), out_dir=tmp_path)
    assert seen == ["enter True", "exit"]
    seen.clear()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "calibrate_student", boom)
    with pytest.raises(RuntimeError, match="boom"):  # a failing run leaves it too
        run_convert(merge_settings(None, {**TINY, "scheme": "pa"}), out_dir=tmp_path / "bad")
    assert seen == ["enter True", "exit"]


def test_a_layers_regex_matching_nothing_fails_before_training(tmp_path):
    from binarize_cli.core.errors import BadInputError

    settings = merge_settings(None, {**TINY, "layers": {"layer9": "fp"}})
    with pytest.raises(BadInputError, match="\\[layers\\] 'layer9' matches no layer"):
        run_convert(settings, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_two_processes_matches_one_process_shape(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BINARIZE_CACHE": str(tmp_path / "cache")}
    args = [
        "convert",
        "resnet18",
        "--data",
        "fake",
        "--scheme",
        "pa",
        "-M",
        "2",
        "-N",
        "2",
        "--epochs",
        "1",
        "--baseline-epochs",
        "1",
        "--calib-batches",
        "1",
        "--batch-size",
        "16",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "binarize_cli", *args, "-o", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "binarize_cli",
            *args,
            "-o",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert two.returncode == 0, two.stderr
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    meta = json.loads((tmp_path / "two" / "binarize.json").read_text())
    assert meta["world_size"] == 2
    assert len(meta["timings"]["finetune_epoch_s"]) == 1


def test_baseline_seed_reuses_one_cached_baseline_across_seeds():
    from binarize_cli.convert.distributed import DistContext
    from binarize_cli.convert.pipeline import build_reference, load_inputs

    def reference(**over):
        settings = merge_settings(None, {**FAST, "model": "timm:test_resnet", **over})
        return build_reference(settings, load_inputs(settings), DistContext())

    first = reference(seed=11)
    shared = reference(seed=12, baseline_seed=11)
    own = reference(seed=12)
    assert shared.baseline.cache_hit and not own.baseline.cache_hit
    weights = [dict(r.model.state_dict()) for r in (first, shared, own)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    with pytest.raises(BadInputError, match="--baseline-seed"):
        validate_settings(merge_settings(None, {**FAST, "baseline_seed": -1}))
