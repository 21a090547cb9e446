"""Fractional epochs, checkpoint round trip."""

from __future__ import annotations

import torch
from torch import nn

from binarize_cli.convert.finetune import (
    FinetuneState,
    epoch_plan,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
)


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
