"""Interruption, resume and divergence during fine-tuning.

Fast tests drive :func:`binarize_cli.convert.finetune.finetune` on a tiny network: an interrupt or a
divergence keeps the last good epoch checkpoint, ``resume`` continues from it to the same
result as an uninterrupted run, a new ``lr`` rescales the rest of the schedule, unreadable
checkpoints are one-line errors.

Slow tests (``-m slow``) drive ``binarize convert`` itself: SIGKILL mid-epoch then
``--resume`` ends with every epoch and a loadable run, bit-identical to an uninterrupted run;
Ctrl-C (SIGINT) and SIGTERM exit 130 with a line saying how to resume; a huge ``--lr``
stops with one ``training diverged`` line and writes no run; a divergence after an epoch
keeps that epoch's checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from binarize_cli.convert.finetune import CHECKPOINT_FILE, finetune, load_checkpoint
from binarize_cli.core.errors import CheckpointError, TrainingDivergedError
from binarize_cli.core.metadata import RunMetadata

# --------------------------------------------------------------------------- tiny finetune


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _loaders(epoch: int) -> DataLoader:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(16, 3, 5, 5, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return DataLoader(
        TensorDataset(x, y),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(epoch),
        drop_last=True,
    )


def _run(model: nn.Module, work: Path, **kw) -> object:
    return finetune(model, make_train_loader=_loaders, epochs=3, lr=1e-2, work_dir=work, **kw)


def test_interrupt_keeps_completed_epochs_and_resume_matches_uninterrupted(tmp_path):
    reference = _tiny_model()
    _run(reference, tmp_path / "ref")

    model = _tiny_model()
    work = tmp_path / "work"

    def stop_in_epoch_2(epoch: int, total: int, steps: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(model, work, on_epoch_start=stop_in_epoch_2)
    saved = load_checkpoint(work)
    assert saved is not None and saved["epochs_done"] == 1
    assert list(work.iterdir()) == [work / CHECKPOINT_FILE]  # no temporary files left

    resumed = _tiny_model()
    state = _run(resumed, work, resume=True)
    assert state.epochs_done == 3 and len(state.epoch_seconds) == 3
    assert state.epoch_seconds[0] == saved["epoch_seconds"][0]
    for (name, a), b in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    model = _tiny_model()
    work = tmp_path / "work"
    steps = {"n": 0}

    def poison(step, total, loss, acc, ips):
        steps["n"] += 1
        if steps["n"] == 6:  # the 2nd step of epoch 2 (4 steps per epoch)
            with torch.no_grad():
                model[0].weight[0, 0, 0, 0] = float("nan")

    with pytest.raises(TrainingDivergedError) as exc:
        _run(model, work, on_step=poison)
    message = str(exc.value)
    assert "\n" not in message
    assert "epoch 2" in message and "after epoch 1" in message and "--resume" in message
    saved = load_checkpoint(work)
    assert saved is not None and saved["epochs_done"] == 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_non_finite_buffers_count_as_divergence(tmp_path):
    model = _tiny_model()

    def poison(step, total, loss, acc, ips):
        model[1].running_var.fill_(float("inf"))

    with pytest.raises(TrainingDivergedError, match="running_var") as exc:
        _run(model, tmp_path / "work", on_step=poison)
    assert "no epoch completed" in str(exc.value)
    assert load_checkpoint(tmp_path / "work") is None


def test_resume_with_a_new_lr_rescales_the_schedule(tmp_path):
    work = tmp_path / "work"
    model = _tiny_model()

    def stop(epoch: int, total: int, steps: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(model, work, on_epoch_start=stop)
    saved = load_checkpoint(work)
    old_lr = saved["optimizer"]["param_groups"][0]["lr"]

    seen: list[float] = []
    from binarize_cli.convert import training

    original = training.train_one_epoch

    def spy(net, loader, optimizer, **kw):
        seen.append(optimizer.param_groups[0]["lr"])
        return original(net, loader, optimizer, **kw)

    training.train_one_epoch = spy
    try:
        finetune(
            _tiny_model(), make_train_loader=_loaders, epochs=3, lr=1e-3, work_dir=work, resume=True
        )
    finally:
        training.train_one_epoch = original
    assert seen[0] == pytest.approx(old_lr / 10)


def test_unreadable_checkpoint_is_a_one_line_bad_input(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(work)
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value)
    assert "without --resume" in str(exc.value)
    torch.save({"something": 1}, work / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not a binarize fine-tune checkpoint"):
        load_checkpoint(work)


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    work = tmp_path / "work"
    model = _tiny_model()
    _run(model, work)
    stale = work / f".{CHECKPOINT_FILE}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    _run(_tiny_model(), work, resume=True)
    assert not stale.exists()


# --------------------------------------------------------------------------- the real CLI

CONVERT = [
    "convert",
    "test_resnet",
    "--data",
    "fake",
    "--baseline-epochs",
    "1",
    "--batch-size",
    "16",
    "--calib-batches",
    "1",
    "--seed",
    "1",
]


def _env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BINARIZE_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
    }


def _start(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "binarize_cli", *args],
        cwd=cwd,
        env=_env(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"convert ended before {path} appeared: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def _convert(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "binarize_cli", *args],
        cwd=cwd,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    from binarize_cli.convert.rebuild import load_run

    cache = tmp_path / "cache"
    args = [*CONVERT, "--epochs", "3", "-o", "run"]
    checkpoint = tmp_path / ".run.partial" / CHECKPOINT_FILE

    proc = _start(args, tmp_path, cache)
    _wait_for(checkpoint, proc)  # epoch 1 is done and saved; epoch 2 is starting
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run").exists()
    saved = load_checkpoint(checkpoint.parent)
    assert saved is not None and 1 <= saved["epochs_done"] < 3

    resumed = _convert([*args, "--resume"], tmp_path, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {saved['epochs_done']}" in resumed.stderr
    meta = json.loads((tmp_path / "run" / "binarize.json").read_text())
    assert len(meta["timings"]["finetune_epoch_s"]) == 3
    assert len(meta["finetune_epochs"]) == 3
    assert meta["timings"]["finetune_epoch_s"][0] == pytest.approx(saved["epoch_seconds"][0])
    assert not checkpoint.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]
    run = load_run(tmp_path / "run")
    assert run.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    # The same command, never interrupted, gives the same weights bit for bit.
    straight = _convert([*CONVERT, "--epochs", "3", "-o", "straight"], tmp_path, cache)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = (tmp_path / "run" / "model.safetensors").read_bytes()
    b = (tmp_path / "straight" / "model.safetensors").read_bytes()
    if a != b:
        from safetensors.torch import load

        ta, tb = load(a), load(b)
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        pytest.fail(
            f"resumed and uninterrupted weights differ in {len(differ)} tensors: {differ[:8]}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_during_finetune_exits_130_and_says_resume(tmp_path, sig):
    cache = tmp_path / "cache"
    args = [*CONVERT, "--epochs", "3", "-o", "run"]
    checkpoint = tmp_path / ".run.partial" / CHECKPOINT_FILE
    proc = _start(args, tmp_path, cache)
    _wait_for(checkpoint, proc)
    before = checkpoint.read_bytes()
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("binarize: error: interrupted") and "--resume" in last, last
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    saved = load_checkpoint(checkpoint.parent)
    assert saved is not None and saved["epochs_done"] >= 1
    leftovers = [p.name for p in checkpoint.parent.iterdir()]
    assert leftovers == [CHECKPOINT_FILE]
    if saved["epochs_done"] == 1:
        assert checkpoint.read_bytes() == before


@pytest.mark.slow
def test_huge_lr_stops_with_one_line_and_writes_no_run(tmp_path):
    cache = tmp_path / "cache"
    proc = _convert([*CONVERT, "--epochs", "2", "--lr", "1e30", "-o", "run"], tmp_path, cache)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("binarize: error: training diverged"), last
    assert "--lr" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.slow
def test_divergence_after_an_epoch_keeps_its_checkpoint(tmp_path, monkeypatch):
    from binarize_cli.convert import training
    from binarize_cli.convert.pipeline import run_convert, work_dir_for
    from binarize_cli.core.settings import merge_settings

    original = training.train_one_epoch
    calls = {"n": 0}

    def poisoned(net, loader, optimizer, **kw):
        if type(loader).__name__ == "LimitedLoader":  # fine-tuning (the baseline passes its loader)
            calls["n"] += 1
            if calls["n"] == 2:  # fine-tune epoch 2
                with torch.no_grad():
                    next(net.parameters()).fill_(math.nan)
        return original(net, loader, optimizer, **kw)

    settings = merge_settings(
        None,
        {
            "model": "test_resnet",
            "data": "fake",
            "epochs": 3.0,
            "baseline_epochs": 1,
            "batch_size": 32,
            "calib_batches": 1,
        },
    )
    out = tmp_path / "run"
    monkeypatch.setattr(training, "train_one_epoch", poisoned)
    # baseline.py imported train_one_epoch by name: it keeps the original.
    with pytest.raises(TrainingDivergedError) as exc:
        run_convert(settings, out_dir=out)
    assert "fine-tune epoch 2" in str(exc.value) and "after epoch 1" in str(exc.value)
    assert not out.exists()
    saved = load_checkpoint(work_dir_for(out))
    assert saved is not None and saved["epochs_done"] == 1


# --------------------------------------------------------------------------- atomic writes


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from binarize_cli.core import files

    target = tmp_path / "file.bin"
    target.write_bytes(b"old contents")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_an_interrupted_run_write_keeps_the_old_run(tmp_path, monkeypatch, run_meta):
    from binarize_cli.core import rundir

    run = rundir.write_run(
        tmp_path / "run", _tiny_model().state_dict(), RunMetadata.from_dict(run_meta(num_classes=3))
    )
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    monkeypatch.setattr(
        RunMetadata, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        rundir.write_run(
            tmp_path / "run",
            _tiny_model().state_dict(),
            RunMetadata.from_dict(run_meta(num_classes=3)),
        )
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # staging removed


def test_a_run_moved_aside_by_a_killed_write_is_recovered(tmp_path, monkeypatch, run_meta):
    from binarize_cli.core import rundir

    run = rundir.write_run(
        tmp_path / "run", _tiny_model().state_dict(), RunMetadata.from_dict(run_meta(num_classes=3))
    )
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    aside = tmp_path / ".run.x1y2.old"
    run.rename(aside)  # what a SIGKILL between write_run's two renames leaves
    monkeypatch.chdir(tmp_path)
    assert rundir.resolve_run("run") == Path("run")
    assert not aside.exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_staging_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path, run_meta):
    import os

    from binarize_cli.core import rundir

    stale = tmp_path / ".run.k1ll.staging"  # what a SIGKILL inside write_run leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = time.time() - 2 * rundir.STALE_STAGING_S
    os.utime(stale, (old, old))
    fresh = tmp_path / ".run.busy.staging"  # another writer, still working: kept
    fresh.mkdir()
    other = tmp_path / ".other.k1ll.staging"  # a different run's: not ours to touch
    other.mkdir()
    os.utime(other, (old, old))
    rundir.write_run(
        tmp_path / "run", _tiny_model().state_dict(), RunMetadata.from_dict(run_meta(num_classes=3))
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.k1ll.staging",
        ".run.busy.staging",
        "run",
    ]


def test_hidden_work_directories_are_never_the_latest_run(tmp_path, run_meta):
    from binarize_cli.core import rundir

    root = tmp_path / "runs"
    rundir.write_run(
        root / "real", _tiny_model().state_dict(), RunMetadata.from_dict(run_meta(num_classes=3))
    )
    time.sleep(0.05)
    rundir.write_run(
        root / ".real.abc.staging",
        _tiny_model().state_dict(),
        RunMetadata.from_dict(run_meta(num_classes=3)),
    )
    assert rundir.find_latest_run(root) == root / "real"
