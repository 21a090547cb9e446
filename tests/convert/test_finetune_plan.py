"""Fractional epochs, checkpoint round trip, best-epoch selection, metrics.csv, warnings."""

from __future__ import annotations

import csv
import io

import torch
from torch import nn

from binarize_cli.convert.finetune import (
    METRICS_COLUMNS,
    FinetuneState,
    epoch_plan,
    finetune,
    load_checkpoint,
    make_optimizer,
    metrics_csv,
    save_checkpoint,
)
from binarize_cli.convert.pipeline import accuracy_warnings


def test_epoch_plan():
    assert epoch_plan(1.5, 100) == [100, 50]
    assert epoch_plan(2, 7) == [7, 7]
    assert epoch_plan(0, 10) == []
    assert epoch_plan(0.25, 8) == [2]
    assert epoch_plan(0.01, 8) == []


def test_checkpoint_round_trip_uses_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    opt = make_optimizer(model, 1e-3, 0.0)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    state = FinetuneState(epochs_done=2, epoch_seconds=[1.0, 2.0], epoch_stats=[{"loss": 1.0}])
    save_checkpoint(
        tmp_path, model, opt, sched, state, {"calibrated": {"top1": 50.0, "top5": 90.0}}
    )
    saved = load_checkpoint(tmp_path)
    assert saved is not None
    assert saved["epochs_done"] == 2
    assert torch.equal(saved["model"]["weight"], model.weight)
    assert saved["extra"]["calibrated"]["top1"] == 50.0
    assert load_checkpoint(tmp_path / "nothing") is None


def _toy_loader(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(epoch)
    return [
        (torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)
    ]


def _scored_finetune(
    scores: list[float], epochs: float, **kw: object
) -> tuple[nn.Module, FinetuneState, list[dict[str, torch.Tensor]]]:
    """Fine-tune a toy model; ``select`` returns ``scores`` in turn and snapshots the weights."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    snapshots: list[dict[str, torch.Tensor]] = []
    it = iter(scores)

    def select(m: nn.Module) -> float:
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(it)

    state = finetune(
        model, make_train_loader=_toy_loader, epochs=epochs, lr=0.05, select=select, **kw
    )  # type: ignore[arg-type]
    return model, state, snapshots


def test_the_best_epoch_is_kept_not_the_last():
    model, state, snaps = _scored_finetune([60.0, 80.0, 70.0], 3)
    assert state.epochs_done == 3 and state.kept_epoch == 2
    assert [row["select_top1"] for row in state.epoch_stats] == [60.0, 80.0, 70.0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, snaps[1][key]), key
    assert not torch.equal(snaps[1]["weight"], snaps[2]["weight"])  # the last epoch differed


def test_ties_keep_the_later_epoch_and_no_select_keeps_the_last():
    _, state, _ = _scored_finetune([70.0, 70.0], 2)
    assert state.kept_epoch == 2
    torch.manual_seed(0)
    plain = finetune(nn.Linear(3, 2), make_train_loader=_toy_loader, epochs=2, lr=0.05)
    assert plain.kept_epoch == 2 and "select_top1" not in plain.epoch_stats[0]
    empty = finetune(nn.Linear(3, 2), make_train_loader=_toy_loader, epochs=0, lr=0.05)
    assert empty.kept_epoch is None and metrics_csv(empty) == ",".join(METRICS_COLUMNS) + "\n"


def test_a_resumed_run_selects_over_all_its_epochs(tmp_path):
    # epoch 1 is best; "interrupt" after it, resume for a worse epoch 2: epoch 1 is still kept
    _, first, snaps = _scored_finetune([90.0], 1, work_dir=tmp_path)
    assert first.kept_epoch == 1
    model, state, _ = _scored_finetune([50.0], 2, work_dir=tmp_path, resume=True)
    assert state.epochs_done == 2 and state.kept_epoch == 1
    assert torch.equal(model.weight, snaps[0]["weight"])


def test_metrics_csv_has_one_row_per_epoch_and_marks_the_kept_one():
    state = FinetuneState(
        epochs_done=2,
        epoch_seconds=[1.5, 1.25],
        epoch_stats=[
            {"loss": 0.5, "top1": 80.0, "images_per_s": 100.0, "seconds": 1.5, "lr": 1e-3,
             "val_top1": 75.0, "val_top5": 99.0, "select_top1": 81.0},
            {"loss": 0.25, "top1": 85.0, "images_per_s": 110.0, "seconds": 1.25, "lr": 5e-4},
        ],
        kept_epoch=1,
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(metrics_csv(state))))
    assert list(rows[0]) == list(METRICS_COLUMNS)
    assert [r["kept"] for r in rows] == ["1", "0"]
    assert rows[0]["train_top1"] == "80" and rows[0]["val_top1"] == "75"
    assert rows[1]["val_top1"] == "" and rows[1]["lr"] == "0.0005"


def test_accuracy_warnings():
    assert accuracy_warnings(95.0, 90.0, 93.0, 10) == []
    (chance,) = accuracy_warnings(12.0, 10.0, None, 10)
    assert "near chance" in chance and "10.00% for 10 classes" in chance
    (under,) = accuracy_warnings(62.2, 70.0, None, 10)
    assert "under-trained" in under
    (worse,) = accuracy_warnings(95.0, 90.0, 85.5, 10)
    assert "from 90.00% (calibrated) to 85.50%" in worse
    assert accuracy_warnings(0.15, 0.1, None, 1000)[0].startswith("the full-precision baseline")


def test_the_step_time_leaves_out_the_first_steps_of_the_process():
    # the first two steps load the fused kernels (seconds, once): the full-precision reference
    # leaves out its first two as well, so the ratio compares steady steps with steady steps
    state = FinetuneState(epoch_seconds=[10.0, 4.0], warmup_s=7.0, warmup_steps=2)
    state.epoch_stats = [{"steps": 4}, {"steps": 4}]
    assert state.step_s == (14.0 - 7.0) / 6
    state.warmup_steps, state.warmup_s = 0, 0.0  # nothing recorded: every step
    assert state.step_s == 14.0 / 8
    too_short = FinetuneState(epoch_seconds=[3.0], warmup_s=3.0, warmup_steps=2)
    too_short.epoch_stats = [{"steps": 2}]
    assert too_short.step_s == 1.5  # no step after the warm-up: the mean of all
    seen: list[int] = []
    torch.manual_seed(0)
    run = finetune(
        nn.Linear(3, 2),
        make_train_loader=_toy_loader,
        epochs=2,
        lr=0.05,
        on_step=lambda step, *_: seen.append(step),
    )
    assert seen == [1, 2, 3, 4, 1, 2, 3, 4]  # the caller's callback still sees every step
    assert run.warmup_steps == 2 and 0 < run.warmup_s < run.epoch_seconds[0]
    steady = (sum(run.epoch_seconds) - run.warmup_s) / 6
    assert run.step_s is not None and abs(run.step_s - steady) < 1e-12
