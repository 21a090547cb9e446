"""Brief fine-tuning of a calibrated binarized model, with epoch checkpoints and resume.

Adam (as in the paper, section 3.3) over the latent weights and the quantizers' trainable
endpoints/levels, a cosine learning-rate schedule over the whole (possibly fractional)
number of epochs, optional distillation from the full-precision model. ``epochs`` may be
fractional: ``1.5`` is one full epoch then half of the next.

After every epoch the full training state is written atomically to ``checkpoint.pt`` in the
work directory (model, optimizer, scheduler, epoch, timings). ``--resume`` reloads it (with
``torch.load(weights_only=True)``) and continues at the next epoch, so an interruption loses
at most the epoch in progress. Each epoch's shuffling is seeded by ``seed + epoch`` so a
resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarize_cli.errors import TrainingDivergedError
from binarize_cli.rundir import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class FinetuneState:
    """What survives an interruption: epochs done and their wall-clock times."""

    epochs_done: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_stats: list[dict[str, float]] = field(default_factory=list)


def epoch_plan(epochs: float, steps_per_epoch: int) -> list[int]:
    """Steps in each epoch for a possibly fractional number of epochs.

    ``epoch_plan(1.5, 100) == [100, 50]``; ``epoch_plan(0, 100) == []``.
    """
    if epochs <= 0 or steps_per_epoch <= 0:
        return []
    full = math.floor(epochs)
    plan = [steps_per_epoch] * full
    rest = round((epochs - full) * steps_per_epoch)
    if rest > 0:
        plan.append(rest)
    return plan


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def save_checkpoint(
    work_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: FinetuneState,
    extra: dict[str, Any],
) -> None:
    """Atomically write the training state after an epoch."""
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epochs_done": state.epochs_done,
            "epoch_seconds": list(state.epoch_seconds),
            "epoch_stats": list(state.epoch_stats),
            "extra": extra,
        },
        buf,
    )
    atomic_write_bytes(work_dir / CHECKPOINT_FILE, buf.getvalue())


def load_checkpoint(work_dir: Path) -> dict[str, Any] | None:
    """The saved training state, or ``None`` when there is none."""
    path = work_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def check_finite_parameters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingDivergedError(
                f"parameter {name} became non-finite during fine-tuning; lower --lr and rerun "
                "with --resume (the last good epoch checkpoint is kept)"
            )


def finetune(
    model: nn.Module,
    *,
    make_train_loader: Callable[[int], Any],
    epochs: float,
    lr: float,
    weight_decay: float = 0.0,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    temperature: float = 1.0,
    device: str = "cpu",
    work_dir: Path | None = None,
    resume: bool = False,
    is_main: bool = True,
    checkpoint_extra: dict[str, Any] | None = None,
    on_epoch_start: Callable[[int, int, int], None] | None = None,
    on_step: Callable[..., None] | None = None,
    train_module: nn.Module | None = None,
) -> FinetuneState:
    """Fine-tune ``model`` in place.

    Args:
        make_train_loader: ``epoch -> DataLoader`` (seeded per epoch for reproducible resume).
        train_module: what to call in the forward pass (a DDP wrapper of ``model``); defaults
            to ``model``. Checkpoints always hold ``model``'s own state dict.
        on_epoch_start: ``(epoch, num_epochs, steps)`` callback for progress display.
        on_step: forwarded to :func:`binarize_cli.training.train_one_epoch`.
    """
    from binarize_cli.training import train_one_epoch

    net = train_module if train_module is not None else model
    first_loader = make_train_loader(0)
    plan = epoch_plan(epochs, len(first_loader))
    total_steps = max(1, sum(plan))
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    state = FinetuneState()

    if resume and work_dir is not None:
        saved = load_checkpoint(work_dir)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = FinetuneState(
                epochs_done=int(saved["epochs_done"]),
                epoch_seconds=[float(s) for s in saved["epoch_seconds"]],
                epoch_stats=list(saved["epoch_stats"]),
            )

    for epoch in range(state.epochs_done, len(plan)):
        loader = first_loader if epoch == 0 else make_train_loader(epoch)
        steps = plan[epoch]
        if on_epoch_start is not None:
            on_epoch_start(epoch, len(plan), steps)
        net.train()
        stats = train_one_epoch(
            net,
            _Limited(loader, steps),
            optimizer,
            scheduler=scheduler,
            teacher=teacher,
            distill_weight=distill_weight if teacher is not None else 0.0,
            temperature=temperature,
            device=device,
            on_step=on_step,
        )
        check_finite_parameters(model)
        state.epochs_done = epoch + 1
        state.epoch_seconds.append(float(stats.seconds))
        state.epoch_stats.append(
            {
                "loss": float(stats.loss),
                "top1": float(stats.top1),
                "images_per_s": float(stats.images_per_s),
            }
        )
        if work_dir is not None and is_main:
            save_checkpoint(work_dir, model, optimizer, scheduler, state, checkpoint_extra or {})
    return state


class _Limited:
    """A loader cut to its first ``steps`` batches (fractional epochs), with a length."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader = loader
        self.steps = min(steps, len(loader))
        self.dataset = getattr(loader, "dataset", None)
        self.batch_size = getattr(loader, "batch_size", None)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.steps:
                break
            yield batch
