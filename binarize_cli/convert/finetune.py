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

Which weights are kept. After every epoch the model is scored on a fixed selection subset of
the *training* split (:data:`SELECT_IMAGES` images, eval mode; the pipeline passes it as
``select``) and on the validation split (``validate``, recorded only). The run ends on the epoch
with the best selection score, not necessarily the last, and says which
(``FinetuneState.kept_epoch``). Selecting on training images keeps the validation accuracy
that ``convert`` reports free of selection bias; what it catches is a fine-tune that made the
model worse (a too-high learning rate, a collapse), which shows on training images as well.
Every epoch's numbers go to the run's ``metrics.csv`` (:func:`metrics_csv`).

Failure handling:

* A checkpoint is written only after the epoch's parameters and buffers were checked finite,
  so the checkpoint on disk is always the *last good* state. A non-finite loss (checked every
  step by :func:`binarize_cli.convert.training.train_one_epoch`) or non-finite weights after an epoch
  raise :class:`~binarize_cli.core.errors.TrainingDivergedError` naming the epoch and the kept
  checkpoint; the checkpoint is left untouched.
* Resuming with a different ``lr`` or ``epochs`` retargets the rest of the cosine schedule
  (new peak, new length, same step), so "lower --lr and rerun with --resume" does what it
  says, and a finished 1-epoch fine-tune can be extended with ``--epochs 2 --resume``.
* An unreadable checkpoint raises :class:`~binarize_cli.core.errors.CheckpointError` (exit 2)
  saying to delete the work directory or drop ``--resume``.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from binarize_cli.core.errors import CheckpointError, TrainingDivergedError
from binarize_cli.core.files import atomic_write_bytes

if TYPE_CHECKING:
    from binarize_cli.convert.attention import AttentionSpec

CHECKPOINT_FILE = "checkpoint.pt"
#: Training images the selection score is measured on (a fixed seeded subset).
SELECT_IMAGES = 1024


#: The columns of a run's ``metrics.csv``, one row per fine-tune epoch (:func:`metrics_csv`).
METRICS_COLUMNS = (
    "epoch",
    "loss",
    "train_top1",
    "val_top1",
    "val_top5",
    "select_top1",
    "lr",
    "images_per_s",
    "seconds",
    "kept",
    "stage",
)


@dataclass
class FinetuneState:
    """What survives an interruption: epochs done, their wall-clock times and per-epoch records.

    ``epoch_stats[i]`` holds epoch ``i + 1``'s ``loss``, running training ``top1``,
    ``images_per_s``, ``seconds``, ``steps`` and ``lr`` (the learning rate of its first step), plus
    ``val_top1``/``val_top5`` when a validation callback ran and ``select_top1`` when a
    selection callback ran. ``kept_epoch`` is the (1-based) epoch whose weights the model
    holds at the end: the best ``select_top1`` (ties: the later epoch), else the last epoch;
    ``None`` when no epoch ran.
    """

    epochs_done: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_stats: list[dict[str, float]] = field(default_factory=list)
    kept_epoch: int | None = None
    #: Seconds per full-precision training step, timed in this process (the pipeline sets it).
    fp_step_s: float | None = None
    #: Seconds and number of the first steps this process ran (at most
    #: :data:`~binarize_cli.convert.training.WARMUP_STEPS` per :func:`finetune` call): they
    #: compile and load the fused quantizer kernels, so :attr:`step_s` leaves them out, as the
    #: full-precision reference leaves out its own first steps.
    warmup_s: float = 0.0
    warmup_steps: int = 0

    @property
    def step_s(self) -> float | None:
        """Mean seconds per fine-tune step over the epochs of this state's record, without the
        warm-up steps (all steps when nothing else ran)."""
        steps = sum(int(row.get("steps", 0)) for row in self.epoch_stats)
        seconds = sum(self.epoch_seconds)
        if steps > self.warmup_steps:
            return (seconds - self.warmup_s) / (steps - self.warmup_steps)
        return seconds / steps if steps else None


@dataclass
class _Best:
    """The best epoch so far by the selection score, with a CPU copy of its weights."""

    epoch: int
    score: float
    weights: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, epoch: int, score: float) -> _Best:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return cls(epoch, score, weights)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "score": self.score, "model": self.weights}


def metrics_csv(state: FinetuneState) -> str:
    """``metrics.csv`` of a run: a header of :data:`METRICS_COLUMNS` and one row per epoch
    (an empty cell where a value was not measured; ``kept`` is 1 on the kept epoch; ``stage``
    is the progressive schedule's stage, 1-3, empty for a single-stage fine-tune)."""
    lines = [",".join(METRICS_COLUMNS)]
    for i, row in enumerate(state.epoch_stats, start=1):
        values = {
            **row,
            "epoch": i,
            "train_top1": row.get("top1"),
            "kept": int(i == state.kept_epoch),
        }
        cells = []
        for column in METRICS_COLUMNS:
            v = values.get(column)
            cells.append("" if v is None else (str(v) if isinstance(v, int) else f"{float(v):.6g}"))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


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
    best: _Best | None = None,
) -> None:
    """Atomically write the training state after an epoch (and the best epoch's weights)."""
    buf = io.BytesIO()
    torch.save(
        {
            "best": None if best is None else best.to_dict(),
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
    """The saved training state, or ``None`` when there is none.

    Raises CheckpointError (one line) when the file exists but cannot be read.
    """
    path = work_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(
            f"the fine-tune checkpoint {path} is unreadable ({first}); delete {work_dir} "
            "or rerun without --resume to start over"
        ) from None
    needed = ("model", "optimizer", "scheduler", "epochs_done", "epoch_seconds")
    if not isinstance(saved, dict) or any(k not in saved for k in needed):
        raise CheckpointError(
            f"{path} is not a binarize fine-tune checkpoint; delete {work_dir} "
            "or rerun without --resume to start over"
        )
    return saved


def check_finite_state(model: nn.Module) -> None:
    """Raise TrainingDivergedError if any parameter or floating buffer is NaN or infinite."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingDivergedError(f"training diverged: {name} became non-finite")


def _retarget_schedule(
    optimizer: torch.optim.Optimizer, scheduler: Any, lr: float, total_steps: int
) -> None:
    """Point a resumed cosine schedule at a new peak ``lr`` and/or length ``total_steps``.

    The learning rate is set to the closed form ``lr * (1 + cos(pi * t / T)) / 2`` at the
    step ``t`` reached. Nothing is touched when neither changed, so a plain resume continues
    the saved schedule bit for bit.
    """
    base = list(getattr(scheduler, "base_lrs", []))
    if scheduler.T_max == total_steps and all(b == lr for b in base):
        return
    scheduler.T_max = total_steps
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    t = min(int(scheduler.last_epoch), total_steps)
    eta_min = float(getattr(scheduler, "eta_min", 0.0))
    current = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t / total_steps)) / 2
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = current
    scheduler._last_lr = [current] * len(optimizer.param_groups)


def _clean_stale_temporaries(work_dir: Path) -> None:
    """Remove temporary files a killed process left behind (they are never read)."""
    for tmp in work_dir.glob(f".{CHECKPOINT_FILE}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _diverged(exc: TrainingDivergedError, epoch: int, done: int, work_dir: Path | None) -> str:
    head = str(exc).split(";")[0].strip()
    if done > 0 and work_dir is not None:
        advice = (
            f"the last good checkpoint (after epoch {done}) is kept in {work_dir}: rerun with a "
            "lower --lr and --resume to continue from it"
        )
    else:
        advice = "no epoch completed, nothing was saved: rerun with a lower --lr"
    return f"{head} in fine-tune epoch {epoch + 1}; {advice}"


def _start(
    saved: dict[str, Any] | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    lr: float,
    total_steps: int,
    work_dir: Path | None,
) -> tuple[FinetuneState, _Best | None]:
    """Where the fine-tune starts: a fresh state, or the ``saved`` checkpoint loaded into the
    model, optimizer and (retargeted) schedule, with its best epoch; stale temporaries of a
    killed run are removed first."""
    if work_dir is not None and work_dir.is_dir():
        _clean_stale_temporaries(work_dir)
    if saved is None:
        return FinetuneState(), None
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(
            f"the fine-tune checkpoint in {work_dir} does not fit this model ({first}); "
            "rerun with the settings of the interrupted run, or without --resume"
        ) from None
    _retarget_schedule(optimizer, scheduler, lr, total_steps)
    state = FinetuneState(
        epochs_done=int(saved["epochs_done"]),
        epoch_seconds=[float(s) for s in saved["epoch_seconds"]],
        epoch_stats=list(saved.get("epoch_stats", [])),
    )
    return state, _saved_best(saved)


def _saved_best(saved: dict[str, Any] | None) -> _Best | None:
    best = saved.get("best") if saved is not None else None
    if not isinstance(best, dict):
        return None
    return _Best(int(best["epoch"]), float(best["score"]), dict(best["model"]))


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
    resume_state: dict[str, Any] | None = None,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    select: Callable[[nn.Module], float] | None = None,
    amp: str = "off",
    attention: AttentionSpec | None = None,
) -> FinetuneState:
    """Fine-tune ``model`` in place; with ``select``, end on the best epoch's weights.

    Args:
        make_train_loader: ``epoch -> DataLoader`` (seeded per epoch for reproducible resume).
        train_module: what the forward pass calls (a DDP wrapper or a ``torch.compile`` d
            ``model``; default ``model``). Checkpoints always hold ``model``'s own state dict.
        on_epoch_start, on_step: progress callbacks (``(epoch, num_epochs, steps)``; see
            :func:`~binarize_cli.convert.training.train_one_epoch`).
        resume_state: a checkpoint read by :func:`load_checkpoint` (else ``resume`` reads it).
        validate, select: called after every epoch: ``{"val_top1", "val_top5"}`` (recorded)
            and a score; the best-scoring epoch is kept (ties: the later; across a resume).
        amp: the training steps' mixed precision (:class:`~binarize_cli.convert.training.
            Execution`); ``"fp16"`` scales the loss (the scaler starts afresh on resume).
        attention: with a ``teacher``, add the attention-matching loss over these blocks
            (:mod:`binarize_cli.convert.attention`; hooked on ``model`` and ``teacher``
            during the training epochs only).

    Raises:
        TrainingDivergedError: non-finite loss or weights; the last good checkpoint is kept.
    """
    from binarize_cli.convert.training import WARMUP_STEPS, Execution, train_one_epoch

    net = model if train_module is None else train_module
    first_loader = make_train_loader(0)
    plan = epoch_plan(epochs, len(first_loader))
    total_steps = max(1, sum(plan))
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if resume_state is None and resume and work_dir is not None:
        resume_state = load_checkpoint(work_dir)
    state, best = _start(resume_state, model, optimizer, scheduler, lr, total_steps, work_dir)
    scaler = Execution(device, amp=amp).grad_scaler()
    first_epoch = state.epochs_done
    for epoch in range(state.epochs_done, len(plan)):
        loader = first_loader if epoch == 0 else make_train_loader(epoch)
        warmup_mark: list[float] = []
        step_callback = on_step
        if epoch == first_epoch:
            step_callback = _marking(on_step, WARMUP_STEPS, warmup_mark)
        if on_epoch_start is not None:
            on_epoch_start(epoch, len(plan), plan[epoch])
        first_lr = float(optimizer.param_groups[0]["lr"])
        match = (
            attention.bind(model, teacher)
            if attention is not None and teacher is not None
            else contextlib.nullcontext()
        )
        try:
            with match as bound:
                stats = train_one_epoch(
                    net,
                    LimitedLoader(loader, plan[epoch]),
                    optimizer,
                    scheduler=scheduler,
                    teacher=teacher,
                    distill_weight=distill_weight if teacher is not None else 0.0,
                    temperature=temperature,
                    device=device,
                    on_step=step_callback,
                    amp=amp,
                    scaler=scaler,
                    attention=bound,
                )
            ended = time.perf_counter()
            check_finite_state(model)
        except TrainingDivergedError as exc:
            where = work_dir if is_main else None
            raise TrainingDivergedError(_diverged(exc, epoch, state.epochs_done, where)) from None
        state.epochs_done = epoch + 1
        state.epoch_seconds.append(float(stats.seconds))
        if warmup_mark and stats.steps > WARMUP_STEPS:
            state.warmup_s = float(stats.seconds) - (ended - warmup_mark[0])
            state.warmup_steps = WARMUP_STEPS
        row = {**stats.summary(), "seconds": stats.seconds, "steps": stats.steps, "lr": first_lr}
        best = _score_epoch(model, epoch + 1, row, validate, select, best)
        state.epoch_stats.append(row)
        if work_dir is not None and is_main:
            save_checkpoint(
                work_dir, model, optimizer, scheduler, state, checkpoint_extra or {}, best
            )
    _end_on_best(model, state, best)
    return state


def _marking(
    on_step: Callable[..., None] | None, step: int, mark: list[float]
) -> Callable[..., None]:
    """``on_step`` that also appends the time at which step ``step`` ended to ``mark``."""

    def callback(done: int, *args: Any) -> None:
        if done == step and not mark:
            mark.append(time.perf_counter())
        if on_step is not None:
            on_step(done, *args)

    return callback


def _score_epoch(
    model: nn.Module,
    epoch: int,
    row: dict[str, float],
    validate: Callable[[nn.Module], dict[str, float]] | None,
    select: Callable[[nn.Module], float] | None,
    best: _Best | None,
) -> _Best | None:
    """Add epoch ``epoch``'s validation and selection scores to its ``row``; the best epoch
    so far (this one when its score is at least the best's: ties go to the later epoch)."""
    if validate is not None:
        row.update(validate(model))
    if select is None:
        return best
    row["select_top1"] = score = float(select(model))
    return _Best.of(model, epoch, score) if best is None or score >= best.score else best


def _end_on_best(model: nn.Module, state: FinetuneState, best: _Best | None) -> None:
    """Load the best epoch's weights when it is not the last; record the kept epoch."""
    if not state.epochs_done:
        return
    state.kept_epoch = state.epochs_done
    if best is not None and best.epoch != state.epochs_done:
        model.load_state_dict(best.weights)
        state.kept_epoch = best.epoch


class LimitedLoader:
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
