"""The `convert` pipeline: load -> baseline -> evaluate -> surgery -> calibrate -> evaluate ->
fine-tune -> evaluate -> save.

Every stage is a library call that returns data; progress is reported through an optional
:class:`Reporter` (the CLI implements it with rich). The run directory is written once, at the
end, atomically (:func:`binarize_cli.rundir.write_run`); while fine-tuning, per-epoch
checkpoints live in a hidden sibling work directory ``.<run>.partial`` that ``--resume``
picks up and a successful run removes.
"""

from __future__ import annotations

import copy
import datetime as _dt
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from binarize_cli import __version__
from binarize_cli.errors import BadInputError, RunDirError
from binarize_cli.recipe import ConvertSettings
from binarize_cli.rundir import DEFAULT_RUNS_ROOT, is_run_dir, write_run


class Reporter(Protocol):
    """Progress sink for the pipeline (all methods optional in spirit; no return values)."""

    def stage(self, text: str) -> None: ...

    def epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None: ...

    def step(self, step: int, total: int, loss: float, acc: float, images_per_s: float) -> None: ...

    def epoch_end(self, epoch: int, seconds: float) -> None: ...


class _Silent:
    def stage(self, text: str) -> None:
        pass

    def epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        pass

    def step(self, step: int, total: int, loss: float, acc: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, epoch: int, seconds: float) -> None:
        pass


@dataclass
class ConvertResult:
    """What `convert` produced: where, the metadata written, and the surgery table."""

    run_dir: Path | None
    meta: dict[str, Any]
    decisions: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resumed_from_epoch: int = 0


def default_run_dir(model: str, scheme: str, m: int, n: int) -> Path:
    safe = model.replace(":", "-").replace("/", "-")
    return DEFAULT_RUNS_ROOT / f"{safe}-{scheme}-M{m}N{n}"


def work_dir_for(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.partial"


def _check_output_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInputError(f"output {run_dir} exists and is not a directory; choose another -o")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise RunDirError(
            f"output directory {run_dir} exists, is not empty and is not a binarize run; "
            "choose another -o (binarize never overwrites other files)"
        )


def _calibration_batches(loader: Any, count: int) -> list[torch.Tensor]:
    batches: list[torch.Tensor] = []
    for images, _labels in loader:
        batches.append(images)
        if len(batches) >= count:
            break
    return batches


def run_convert(
    settings: ConvertSettings,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    progress_console: Any = None,
) -> ConvertResult:
    """Run the whole conversion; returns the run directory and its metadata."""
    from binarize_cli import distributed
    from binarize_cli.baseline import ensure_baseline
    from binarize_cli.calibrate import calibrate_model
    from binarize_cli.data import load_data, make_loader
    from binarize_cli.finetune import finetune, load_checkpoint
    from binarize_cli.models import load_model
    from binarize_cli.schemes import get_scheme
    from binarize_cli.surgery import binarize_model
    from binarize_cli.training import evaluate

    rep: Reporter = reporter or _Silent()
    if not settings.model:
        raise BadInputError(
            "no model given; pass MODEL (e.g. resnet18) or set `model` in the recipe"
        )
    scheme = get_scheme(settings.scheme)
    m = settings.M if settings.M is not None else scheme.default_m
    n = settings.N if settings.N is not None else scheme.default_n
    scheme.check(m, n)
    if settings.epochs < 0:
        raise BadInputError(f"--epochs must be >= 0 (got {settings.epochs})")
    if settings.batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1 (got {settings.batch_size})")
    if settings.calib_batches < 1:
        raise BadInputError(f"--calib-batches must be >= 1 (got {settings.calib_batches})")
    if settings.lr <= 0:
        raise BadInputError(f"--lr must be > 0 (got {settings.lr})")
    run_dir = out_dir or default_run_dir(settings.model, scheme.name, m, n)
    _check_output_dir(run_dir)
    work_dir = work_dir_for(run_dir)

    ctx = distributed.setup()
    torch.manual_seed(settings.seed)
    try:
        # 1. load: model first (its normalisation and input size shape RGB data), then data.
        rep.stage(f"loading {settings.model}")
        loaded = load_model(
            settings.model, pretrained=settings.pretrained, checkpoint=settings.checkpoint
        )
        data = load_data(
            settings.data,
            input_size=settings.input_size,
            mean=loaded.mean,
            std=loaded.std,
            seed=settings.seed,
            model_input_size=loaded.input_size,
            crop_pct=loaded.crop_pct,
        )
        if data.num_classes != loaded.num_classes:
            loaded = load_model(
                settings.model,
                pretrained=settings.pretrained,
                checkpoint=settings.checkpoint,
                num_classes=data.num_classes,
            )

        # 2. full-precision baseline (adapted and cached when needed); rank 0 trains first.
        rep.stage("full-precision baseline")
        baseline = None
        if ctx.is_main:
            baseline = ensure_baseline(
                loaded,
                data,
                epochs=settings.baseline_epochs,
                batch_size=settings.batch_size,
                lr=settings.baseline_lr,
                seed=settings.seed,
                progress=progress_console,
            )
        ctx.barrier()
        if baseline is None:
            baseline = ensure_baseline(
                loaded,
                data,
                epochs=settings.baseline_epochs,
                batch_size=settings.batch_size,
                lr=settings.baseline_lr,
                seed=settings.seed,
                progress=None,
            )
        fp_model: nn.Module = baseline.model.to(ctx.device).eval()
        val_loader = make_loader(
            data.val, batch_size=max(settings.batch_size, 128), shuffle=False, seed=settings.seed
        )
        fp_acc = baseline.accuracy

        # 3. surgery on a copy: the full-precision model stays the teacher and reference.
        rep.stage(f"graph surgery: {scheme.name} M={m} N={n}")
        student = copy.deepcopy(fp_model)
        surgery = binarize_model(
            student,
            scheme,
            m,
            n,
            keep=tuple(settings.keep),
            first_conv=loaded.first_conv,
            classifier=loaded.classifier,
            options=dict(settings.scheme_options),
        )
        student = surgery.model.to(ctx.device)

        saved = load_checkpoint(work_dir) if resume else None
        if saved is not None:
            extra = saved["extra"]
            cal_acc = extra["calibrated"]
            calibrate_s = float(extra["calibrate_s"])
            resumed_from = int(saved["epochs_done"])
            rep.stage(f"resuming after epoch {resumed_from} from {work_dir}")
        else:
            # 4. calibrate: activation endpoints/levels from data, then batch-norm statistics.
            rep.stage(f"calibrating on {settings.calib_batches} batches")
            calib_loader = make_loader(
                data.train, batch_size=settings.batch_size, shuffle=True, seed=settings.seed
            )
            stats = calibrate_model(
                student,
                fp_model,
                _calibration_batches(calib_loader, settings.calib_batches),
                seed=settings.seed,
            )
            calibrate_s = stats.seconds
            rep.stage("evaluating the calibrated model")
            cal_acc = evaluate(student, val_loader, device=ctx.device).to_dict()
            resumed_from = 0
            if ctx.is_main and settings.epochs > 0:
                work_dir.mkdir(parents=True, exist_ok=True)

        # 5. fine-tune.
        teacher = fp_model if settings.distill else None
        train_module: nn.Module = student
        if ctx.enabled:
            train_module = torch.nn.parallel.DistributedDataParallel(student)

        def make_train_loader(epoch: int) -> Any:
            return make_loader(
                data.train,
                batch_size=settings.batch_size,
                shuffle=True,
                seed=settings.seed + epoch,
                drop_last=True,
                distributed=ctx.enabled,
            )

        state = finetune(
            student,
            make_train_loader=make_train_loader,
            epochs=settings.epochs,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            teacher=teacher,
            distill_weight=settings.distill_weight,
            temperature=settings.temperature,
            device=ctx.device,
            work_dir=work_dir if settings.epochs > 0 else None,
            resume=resume,
            is_main=ctx.is_main,
            checkpoint_extra={"calibrated": cal_acc, "calibrate_s": calibrate_s},
            on_epoch_start=rep.epoch_start,
            on_step=rep.step,
            train_module=train_module,
        )

        # 6. evaluate and save.
        rep.stage("evaluating the fine-tuned model")
        final_acc = evaluate(student, val_loader, device=ctx.device).to_dict()
        meta = {
            "model": loaded.spec,
            "weights": loaded.weights,
            "scheme": scheme.name,
            "M": m,
            "N": n,
            "data": data.spec,
            "recipe": settings.to_dict(),
            "accuracy": {"fp": fp_acc.to_dict(), "calibrated": cal_acc, "binarized": final_acc},
            "timings": {
                "baseline_epoch_s": [float(t) for t in baseline.epoch_times],
                "baseline_cached": bool(baseline.cache_hit),
                "finetune_epoch_s": state.epoch_seconds,
                "calibrate_s": calibrate_s,
            },
            "finetune_epochs": state.epoch_stats,
            "num_classes": data.num_classes,
            "keep": list(settings.keep),
            "scheme_options": dict(settings.scheme_options),
            "first_conv": loaded.first_conv,
            "classifier": loaded.classifier,
            "input_size": data.input_size,
            "mean": list(data.mean),
            "std": list(data.std),
            "world_size": ctx.world_size,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "binarize_version": __version__,
        }
        written: Path | None = None
        if ctx.is_main:
            written = write_run(
                run_dir, {k: v.cpu() for k, v in student.state_dict().items()}, meta
            )
            shutil.rmtree(work_dir, ignore_errors=True)
        ctx.barrier()
        return ConvertResult(
            run_dir=written,
            meta=meta,
            decisions=list(surgery.decisions),
            warnings=list(surgery.warnings),
            resumed_from_epoch=resumed_from,
        )
    finally:
        distributed.teardown(ctx)
