"""Generic supervised training and evaluation loops (baseline adaptation and fine-tuning).

* :func:`evaluate` -> :class:`Accuracy`: top-1 and top-5 in percent (top-k with
  ``k = min(5, num_classes)`` so that sets with fewer than five classes still report).
* :func:`time_training_steps`: seconds per step of that same step on a copy of a model (the
  same-process full-precision reference of the fine-tune's step time).
* :class:`Execution`: where and how training runs (``convert --device/--workers/--amp/
  --compile``): the device, the loaders' worker processes, mixed precision and
  ``torch.compile``.

Mixed precision (``amp="bf16"`` or ``"fp16"``): the training step's forward passes (the
model's and the teacher's) run under :func:`torch.autocast`, so convolutions and linear
layers compute in the reduced type while the parameters, the optimizer state and the loss stay
float32; a binarized layer hands its quantizers float32 inputs with autocast off
(:class:`~binarize_cli.quant.layers.BinarizedConv2d`), so thresholds and scales never leave
float32. ``fp16`` scales the loss (:class:`torch.amp.GradScaler`) and needs CUDA.
Evaluation never uses autocast: every recorded accuracy is the float32 model's.
* :func:`train_one_epoch` -> :class:`EpochStats`: one pass of cross-entropy training,
  optionally with knowledge distillation (Hinton et al.) from a teacher's logits::

      loss = (1 - w) * CE(z_s, y) + w * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

  with ``w = distill_weight`` and ``T = temperature``; the ``T^2`` keeps the soft-target
  gradient scale independent of ``T``. With an attention match (``convert --distill
  attention``, :mod:`binarize_cli.convert.attention`) the loss gains
  ``attention_weight * L_att`` over the blocks' attention maps. The scheduler, when given,
  is stepped once per batch
  (build it with ``T_max = total steps``). A non-finite loss raises
  :class:`~binarize_cli.core.errors.TrainingDivergedError` before the optimizer step, so the
  weights stay finite.

Both accept DDP-wrapped models (only ``model(x)``, ``.train()``/``.eval()`` are used) and any
loader yielding ``(images, labels)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.convert.attention import AttentionMatch, AttentionSpec
from binarize_cli.core.errors import TrainingDivergedError
from binarize_cli.core.modes import evaluating

__all__ = [
    "AMP_DTYPES",
    "WARMUP_STEPS",
    "Accuracy",
    "EpochStats",
    "Execution",
    "autocast",
    "compiled",
    "distillation_loss",
    "evaluate",
    "time_training_steps",
    "topk_correct",
    "train_one_epoch",
]

#: ``on_step(step, total, loss, acc, images_per_s)``; ``step`` is 1-based, ``total`` may be None.
StepCallback = Callable[[int, int | None, float, float, float], None]

#: ``--amp`` values and the autocast type each runs convolutions in (``"off"``: float32).
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "off": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

#: Untimed first steps of a step-time measurement, on both sides of the ratio (the fine-tune's
#: first steps in a process also compile and load the fused quantizer kernels).
WARMUP_STEPS = 2

#: The backend :func:`compiled` hands to ``torch.compile`` (tests set a cheaper one).
COMPILE_BACKEND = "inductor"

#: Inductor options :func:`compiled` sets for a model on the CPU (:func:`compile_options`).
#: ``layout_optimization`` off: by default inductor stores the convolutions' weights and
#: activations channels-last, and the quantizers' fused bodies, which read their input as one
#: flat row-major tensor (:mod:`binarize_cli.quant.fused`), then copy every binarized weight
#: and activation back, element by element.  Measured (resnet18, batch 64, PA (4,5), scratch,
#: same process): a compiled training step at 32x32 took 170 ms with the default and 94 ms
#: without.  benchmarks/bench_step_time.py has a full-precision row with inductor's defaults:
#: 0.092 s against 0.074 s without at 32x32, 1.89 s against 2.04 s at 224x224.
CPU_COMPILE_OPTIONS: dict[str, Any] = {"layout_optimization": False}


def compile_options(device: str | torch.device) -> dict[str, Any]:
    """The inductor options of ``--compile`` on ``device``: :data:`CPU_COMPILE_OPTIONS` on
    the CPU; inductor's defaults elsewhere (not measured on a GPU)."""
    return dict(CPU_COMPILE_OPTIONS) if torch.device(device).type == "cpu" else {}


@dataclass(frozen=True)
class Execution:
    """Where and how the training and evaluation loops run (``convert --device``,
    ``--workers``, ``--amp``, ``--compile``).

    ``device`` is a resolved torch device string (``"cpu"``, ``"cuda:0"``); ``workers`` the
    DataLoader worker processes (0: load in the main process); ``amp`` a key of
    :data:`AMP_DTYPES`; ``compile``: training steps run a ``torch.compile`` d model
    (:func:`compiled`).
    """

    device: str = "cpu"
    workers: int = 0
    amp: str = "off"
    compile: bool = False

    @property
    def loader_options(self) -> dict[str, Any]:
        """``make_loader`` keyword arguments: the workers, and pinned memory on CUDA."""
        return {
            "num_workers": self.workers,
            "pin_memory": torch.device(self.device).type == "cuda",
        }

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The loss scaler ``fp16`` training needs (``None`` otherwise)."""
        if self.amp != "fp16":
            return None
        return torch.amp.GradScaler(torch.device(self.device).type)


def autocast(device: str | torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to :data:`AMP_DTYPES` ``[amp]`` on ``device``'s type; a no-op for
    ``"off"``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def compiled(module: nn.Module, enabled: bool = True) -> nn.Module:
    """``torch.compile(module)`` (with :data:`COMPILE_BACKEND` and, for inductor, the
    :func:`compile_options` of the device ``module``'s parameters are on) when ``enabled``,
    else ``module``. The compiled wrapper shares ``module``'s parameters, so an optimizer
    built on ``module`` trains it; call the wrapper for training steps only."""
    if not enabled:
        return module
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    options = compile_options(device) if COMPILE_BACKEND == "inductor" else {}
    extra = {"options": options} if options else {}
    return torch.compile(module, backend=COMPILE_BACKEND, **extra)  # type: ignore[return-value]


@dataclass
class Accuracy:
    """Top-1/top-5 accuracy in percent over ``samples`` images."""

    top1: float
    top5: float
    samples: int = 0

    def to_dict(self) -> dict[str, float]:
        """``{"top1": ..., "top5": ...}`` (the binarize.json form)."""
        return {"top1": float(self.top1), "top5": float(self.top5)}


@dataclass
class EpochStats:
    """One training epoch: mean loss, running top-1 (%), throughput and wall time."""

    loss: float
    top1: float
    images_per_s: float
    seconds: float
    steps: int = 0
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, float]:
        """What a run records per epoch (``finetune_epochs``, the baseline cache)."""
        return {
            "loss": float(self.loss),
            "top1": float(self.top1),
            "images_per_s": float(self.images_per_s),
        }


def topk_correct(
    logits: torch.Tensor, target: torch.Tensor, ks: Iterable[int] = (1, 5)
) -> list[int]:
    """Number of rows whose target is among the top-k logits, for each k (k capped at C)."""
    ks = list(ks)
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hits = top.eq(target.view(-1, 1))
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def _to(batch: Any, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[0], batch[1]
    non_blocking = torch.device(device).type == "cuda"
    return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    distributed: bool = False,
) -> Accuracy:
    """Top-1/top-5 accuracy (%) of ``model`` on ``loader`` in eval mode, without gradients.

    The model's train/eval mode is restored afterwards. ``distributed=True`` sums the counts
    over all ranks (every rank must call it then, each with its shard of the data).
    """
    counts = torch.zeros(3, dtype=torch.float64)
    with evaluating(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _to(batch, device)
            logits = model(x)
            c1, c5 = topk_correct(logits.float(), y)
            counts += torch.tensor([c1, c5, y.shape[0]], dtype=torch.float64)
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        buf = counts.to(device)
        torch.distributed.all_reduce(buf)
        counts = buf.cpu()
    n = int(counts[2])
    if n == 0:
        return Accuracy(0.0, 0.0, 0)
    return Accuracy(100.0 * float(counts[0]) / n, 100.0 * float(counts[1]) / n, n)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, averaged over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    device: str | torch.device = "cpu",
    on_step: StepCallback | None = None,
    epoch: int | None = None,
    max_grad_norm: float | None = None,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    attention: AttentionMatch | None = None,
) -> EpochStats:
    """One epoch of training (see the module docstring for the loss).

    ``attention``: an entered :class:`~binarize_cli.convert.attention.AttentionMatch` of the
    student and ``teacher`` (whose forward then runs even when ``distill_weight`` is 0); its
    loss is added to every step's.

    ``epoch``, when given, is passed to ``loader.sampler.set_epoch`` (DistributedSampler).
    ``max_grad_norm`` clips the global gradient norm. ``amp`` runs the forward passes under
    :func:`autocast`; ``scaler`` (``fp16``) scales the loss before the backward pass. Raises
    TrainingDivergedError on a non-finite loss.
    """
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sampler = getattr(loader, "sampler", None)
    if epoch is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # type: ignore[union-attr]
    if attention is not None and teacher is None:
        raise ValueError("attention matching needs a teacher")
    use_teacher = teacher is not None and (distill_weight > 0 or attention is not None)
    if use_teacher:
        teacher.eval()  # type: ignore[union-attr]
    model.train()
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    for batch in loader:
        x, y = _to(batch, device)
        with autocast(device, amp):
            logits = model(x)
            if use_teacher:
                with torch.no_grad():
                    t_logits = teacher(x)  # type: ignore[misc]
        loss = F.cross_entropy(logits.float(), y)
        if use_teacher and distill_weight > 0:
            loss = (1.0 - distill_weight) * loss + distill_weight * distillation_loss(
                logits, t_logits, temperature
            )
        if attention is not None:
            loss = loss + attention.loss()
        value = float(loss.detach())
        if not math.isfinite(value):
            where = f"epoch {epoch + 1}, " if epoch is not None else ""
            raise TrainingDivergedError(
                f"training diverged: loss is {value} at {where}step {steps + 1}; lower --lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        _step(model, optimizer, loss, scaler, max_grad_norm)
        if scheduler is not None:
            scheduler.step()
        n = int(y.shape[0])
        steps += 1
        seen += n
        loss_sum += value * n
        correct += int((logits.detach().argmax(dim=-1) == y).sum())
        if on_step is not None:
            elapsed = max(time.perf_counter() - start, 1e-9)
            on_step(steps, total, value, 100.0 * correct / seen, seen / elapsed)
    seconds = time.perf_counter() - start
    if seen == 0:
        return EpochStats(loss=0.0, top1=0.0, images_per_s=0.0, seconds=seconds, steps=0, samples=0)
    return EpochStats(
        loss=loss_sum / seen,
        top1=100.0 * correct / seen,
        images_per_s=seen / max(seconds, 1e-9),
        seconds=seconds,
        steps=steps,
        samples=seen,
    )


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float | None,
) -> None:
    """Backward pass and optimizer step, through ``scaler`` when there is one (which skips
    the step when the scaled gradients overflowed)."""
    if scaler is None:
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def time_training_steps(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    lr: float,
    warmup: int = WARMUP_STEPS,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    device: str | torch.device = "cpu",
    amp: str = "off",
    compile: bool = False,
    attention: AttentionSpec | None = None,
) -> float | None:
    """Seconds per training step of a copy of ``model``: :func:`train_one_epoch`'s step (the
    same loss, distillation and Adam update) over ``loader``, the first ``warmup`` steps
    untimed (with ``compile``, they also compile). ``None`` when ``loader`` has no step after
    the warm-up. ``amp`` and ``compile`` as in :class:`Execution`; ``attention`` (with a
    ``teacher``) adds the attention-matching loss as the fine-tune does.

    This is the full-precision reference the fine-tune's step time is divided by: the same
    code, data and process, only without binarization. ``model`` itself is not touched and
    the global RNG state is restored, so measuring changes nothing in the run.
    """
    import copy

    rng = torch.get_rng_state()
    marks: list[float] = []

    def on_step(step: int, *_: Any) -> None:
        if step == warmup:
            marks.append(time.perf_counter())

    work = copy.deepcopy(model).to(device)
    try:
        optimizer = torch.optim.Adam([p for p in work.parameters() if p.requires_grad], lr=lr)
        scaler = Execution(str(device), amp=amp).grad_scaler()
        match = (
            attention.bind(work, teacher)
            if attention is not None and teacher is not None
            else contextlib.nullcontext()
        )
        with match as bound:
            stats = train_one_epoch(
                compiled(work, compile),
                loader,
                optimizer,
                teacher=teacher,
                distill_weight=distill_weight if teacher is not None else 0.0,
                temperature=temperature,
                device=device,
                on_step=on_step if warmup > 0 else None,
                amp=amp,
                scaler=scaler,
                attention=bound,
            )
        end = time.perf_counter()
    finally:
        torch.set_rng_state(rng)
    timed = stats.steps - warmup
    if timed <= 0:
        return None
    start = marks[0] if marks else end - stats.seconds
    return (end - start) / timed


def progress_bar(title: str, console: Any = None, **kwargs: Any) -> Any:
    """The rich progress bar of a training loop (the baseline's and the fine-tune's):
    ``title`` (a rich column template such as ``"[bold]{task.description}"``), the bar, steps
    done of total, the task's ``info`` field (loss, accuracy, speed), elapsed and remaining
    time. ``kwargs`` go to :class:`rich.progress.Progress`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(title),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        **kwargs,
    )
