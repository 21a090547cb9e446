"""The `convert` pipeline: validate -> load -> baseline -> evaluate -> [sensitivity ->
allocation] -> surgery -> calibrate -> evaluate -> fine-tune -> evaluate -> save.

Every stage is a public function with a typed input and output, so a caller (a benchmark, a
notebook) can run them one at a time: :func:`prepare` (-> :class:`ConvertPlan`),
:func:`load_inputs` (-> :class:`ConvertInputs`), :func:`build_reference` (-> :class:`Reference`),
:func:`choose_bases` (-> :class:`Bases`; only with ``--policy auto`` or ``--sensitivity``),
:func:`binarize_student` (-> ``SurgeryResult``), :func:`calibrate_student`
(-> :class:`Calibration`), :func:`finetune_student` (-> ``FinetuneState``),
:func:`run_metadata` and :func:`write_result`; :func:`run_convert` chains them. Progress is
reported through an optional :class:`Reporter` (the CLI implements it with rich). The run directory is written once, at the
end, atomically (:func:`binarize_cli.core.rundir.write_run`); while fine-tuning, per-epoch
checkpoints live in a hidden sibling work directory ``.<run>.partial`` that ``--resume``
picks up and a successful run removes.

Reliability contract (docs/reliability.md):

* **Bad input fails first.** :func:`validate_settings` checks every setting that can be
  checked without loading anything (scheme, M/N, numbers, ``--keep`` regexes, scheme options,
  the checkpoint file's existence, the data spec's name); then the output location is checked
  (writable, not a foreign directory), the resume checkpoint (readable, same settings), the
  model (name, checkpoint contents) and the data (path, layout). All of this happens before
  the first progress line and before any directory is created, so bad input prints exactly
  one line (exit 2) and writes nothing. Only the baseline cache (``$BINARIZE_CACHE``) may be
  created by a run that later fails.
* **Interruption.** Ctrl-C (and SIGTERM, see :mod:`binarize_cli.cli`) during fine-tuning
  raises :class:`ConvertInterrupted` (exit 130) saying how to resume; a SIGKILL loses at most
  the epoch in progress, since checkpoints are written atomically after each epoch.
  ``--resume`` refuses a checkpoint written with different settings (:data:`RESUME_KEYS`);
  ``lr`` and ``epochs`` may change (the rest of the schedule is retargeted).
* **Divergence.** A non-finite loss or weights stops with
  :class:`~binarize_cli.core.errors.TrainingDivergedError` (exit 1) naming the kept checkpoint;
  no run directory is written.
* **One device.** ``--device`` is resolved once (:func:`~binarize_cli.convert.distributed.
  resolve_device`, checked with the other settings) and every stage runs there: the
  baseline's training and evaluation, the sensitivity measure, calibration, fine-tuning and
  every evaluation (:func:`execution`; ``binarize.json`` records it as ``device``).
  ``--workers``, ``--amp`` and ``--compile`` apply to the loaders and the training steps
  (docs/devices.md).
* **Determinism.** The same settings and seed on the same machine (CPU, same torch and
  thread count) give a bit-identical ``model.safetensors``: all randomness comes from
  ``torch.manual_seed(seed)`` and seeded ``torch.Generator`` s (loaders per epoch,
  calibration sampling); oneDNN runs in its deterministic mode while converting
  (``torch.backends.mkldnn.deterministic``, restored afterwards); the weights file holds no
  timestamps (``binarize.json`` does).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from binarize_cli.core.errors import (
    BadInputError,
    BinarizeError,
    CheckpointError,
    DataError,
    RunDirError,
)
from binarize_cli.core.files import check_writable_dir
from binarize_cli.core.heap import retained_heap
from binarize_cli.core.metadata import RunAccuracy, RunMetadata, RunTimings, StageAccuracy
from binarize_cli.core.rundir import (
    DEFAULT_RUNS_ROOT,
    METRICS_FILE,
    is_run_dir,
    recover_moved_aside,
    write_run,
)
from binarize_cli.core.settings import DISTILL_MODES, ConvertSettings, distill_mode
from binarize_cli.core.version import __version__

if TYPE_CHECKING:
    from binarize_cli.convert.allocate import Allocation
    from binarize_cli.convert.attention import AttentionSpec
    from binarize_cli.convert.baseline import Baseline
    from binarize_cli.convert.distributed import DistContext
    from binarize_cli.convert.finetune import FinetuneState
    from binarize_cli.convert.sensitivity import SensitivityTable
    from binarize_cli.convert.surgery import SurgeryResult
    from binarize_cli.convert.training import Execution
    from binarize_cli.load.data import DataBundle
    from binarize_cli.load.models import LoadedModel
    from binarize_cli.quant import Scheme

#: Settings a resumed fine-tune must share with the interrupted one (``lr`` and ``epochs``
#: may change: the rest of the schedule is retargeted; ``calib_batches`` is not used when
#: resuming).
RESUME_KEYS = (
    "model",
    "checkpoint",
    "pretrained",
    "scheme",
    "M",
    "N",
    "data",
    "input_size",
    "keep",
    "scheme_options",
    "batch_size",
    "seed",
    "baseline_seed",
    "baseline_epochs",
    "baseline_lr",
    "weight_decay",
    "distill",
    "distill_weight",
    "temperature",
    "attention_weight",
    "progressive",
    "layers",
    "policy",
    "budget_mbit",
    "budget_bops",
)


#: Full-precision training steps timed (after 2 untimed) as the step-time ratio's reference.
REFERENCE_STEPS = 8


class ConvertInterrupted(BinarizeError):
    """Ctrl-C or SIGTERM during `convert`; the message says what was kept (exit 130)."""

    exit_code = 130


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
    meta: RunMetadata
    decisions: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resumed_from_epoch: int = 0


def default_run_dir(model: str, scheme: str, m: int, n: int) -> Path:
    safe = model.replace(":", "-").replace("/", "-")
    return DEFAULT_RUNS_ROOT / f"{safe}-{scheme}-M{m}N{n}"


def work_dir_for(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.partial"


def _check_output_dir(run_dir: Path, overwrite: bool = False) -> None:
    recover_moved_aside(run_dir)  # a run a killed replace left in .NAME.*.old is still a run
    if is_run_dir(run_dir) and not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already exists; pass --overwrite to replace it "
            "or choose another -o"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInputError(f"output {run_dir} exists and is not a directory; choose another -o")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise RunDirError(
            f"output directory {run_dir} exists, is not empty and is not a binarize run; "
            "choose another -o (binarize never overwrites other files)"
        )
    # The run, its staging directory and the work directory are all created in the parent.
    check_writable_dir(run_dir.parent, "-o")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(float(value)):
        raise BadInputError(f"{name} must be a finite number (got {value})")


def _check_policy(settings: ConvertSettings) -> None:
    """``--policy``, ``--budget-mbit`` and ``--budget-bops``: a known policy, positive finite
    budgets, and budgets only with ``--policy auto``."""
    from binarize_cli.core.settings import POLICIES

    if settings.policy not in POLICIES:
        raise BadInputError(
            f"--policy must be one of {', '.join(POLICIES)} (got {settings.policy!r})"
        )
    for flag, value in (
        ("--budget-mbit", settings.budget_mbit),
        ("--budget-bops", settings.budget_bops),
    ):
        if value is None:
            continue
        if not (math.isfinite(value) and value > 0):
            raise BadInputError(f"{flag} must be a positive number (got {value})")
        if settings.policy != "auto":
            raise BadInputError(
                f"{flag} chooses per-layer bases, which --policy auto does; add --policy auto"
            )


def _check_execution(settings: ConvertSettings) -> None:
    """``--device`` (a known form, CUDA only where there is CUDA), ``--workers`` (>= 0) and
    ``--amp`` (a known mode; ``fp16`` only on CUDA)."""
    from binarize_cli.convert.distributed import resolve_device
    from binarize_cli.core.settings import AMP_MODES

    device = resolve_device(settings.device)
    if settings.workers < 0:
        raise BadInputError(f"--workers must be >= 0 (got {settings.workers})")
    if settings.amp not in AMP_MODES:
        raise BadInputError(f"--amp must be one of {', '.join(AMP_MODES)} (got {settings.amp!r})")
    if settings.amp == "fp16" and not device.startswith("cuda"):
        raise BadInputError(
            f"--amp fp16 needs a CUDA device (it scales the loss against float16 underflow "
            f"there); the run is on {device}: use --amp bf16"
        )


def validate_settings(settings: ConvertSettings) -> tuple[Any, int, int]:
    """Check every setting that needs no loading; returns ``(scheme, M, N)``.

    Raises a one-line BadInputError subclass for the first problem found.
    """
    from binarize_cli.convert.policy import LayerPolicy
    from binarize_cli.convert.surgery import compiled_rules
    from binarize_cli.load.data import DATA_LOADERS, DATA_SPECS
    from binarize_cli.quant import get_scheme

    if not settings.model or not str(settings.model).strip():
        raise BadInputError(
            "no model given; pass MODEL (e.g. resnet18) or set `model` in the recipe"
        )
    scheme = get_scheme(settings.scheme)
    m = settings.M if settings.M is not None else scheme.default_m
    n = settings.N if settings.N is not None else scheme.default_n
    scheme.check(m, n)
    _finite("--epochs", settings.epochs)
    _finite("--lr", settings.lr)
    _finite("baseline_lr", settings.baseline_lr)
    if settings.epochs < 0:
        raise BadInputError(f"--epochs must be >= 0 (got {settings.epochs})")
    if settings.baseline_epochs < 0:
        raise BadInputError(f"--baseline-epochs must be >= 0 (got {settings.baseline_epochs})")
    if settings.batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1 (got {settings.batch_size})")
    if settings.calib_batches < 1:
        raise BadInputError(f"--calib-batches must be >= 1 (got {settings.calib_batches})")
    if settings.lr <= 0:
        raise BadInputError(f"--lr must be > 0 (got {settings.lr})")
    if settings.baseline_lr <= 0:
        raise BadInputError(f"baseline_lr must be > 0 (got {settings.baseline_lr})")
    if not (math.isfinite(settings.weight_decay) and settings.weight_decay >= 0):
        raise BadInputError(f"weight_decay must be >= 0 (got {settings.weight_decay})")
    if not 0.0 <= settings.distill_weight <= 1.0:
        raise BadInputError(f"distill_weight must be in [0, 1] (got {settings.distill_weight})")
    if not (math.isfinite(settings.temperature) and settings.temperature > 0):
        raise BadInputError(f"temperature must be > 0 (got {settings.temperature})")
    if settings.distill not in DISTILL_MODES:
        raise BadInputError(
            f"--distill must be one of {', '.join(DISTILL_MODES)} (got {settings.distill!r})"
        )
    if not (math.isfinite(settings.attention_weight) and settings.attention_weight >= 0):
        raise BadInputError(f"attention_weight must be >= 0 (got {settings.attention_weight})")
    if not 0 <= settings.seed < 2**63:
        raise BadInputError(f"--seed must be in [0, 2**63) (got {settings.seed})")
    if settings.baseline_seed is not None and not 0 <= settings.baseline_seed < 2**63:
        raise BadInputError(f"--baseline-seed must be in [0, 2**63) (got {settings.baseline_seed})")
    if settings.input_size is not None and settings.input_size < 1:
        raise BadInputError(f"--input-size must be a positive integer (got {settings.input_size})")
    LayerPolicy(keep_patterns=tuple(settings.keep))  # compiles every --keep regex
    compiled_rules(settings.layers, scheme)  # every [layers] regex and choice
    _check_policy(settings)
    _check_execution(settings)
    options = dict(settings.scheme_options)
    scheme.weight_quantizer(m, options)  # each factory rejects bad or unknown options
    if n > 0:
        scheme.activation_quantizer(n, options)
    if settings.checkpoint is not None and settings.pretrained:
        raise BadInputError(
            "--pretrained and --checkpoint both name the weights; pass one of them "
            "(--checkpoint PATH for a local file, --pretrained for the hub weights)"
        )
    if settings.checkpoint is not None:
        ckpt = Path(settings.checkpoint).expanduser()
        if not ckpt.exists():
            raise CheckpointError(f"checkpoint {ckpt} does not exist; check the --checkpoint path")
        if not ckpt.is_file():
            raise CheckpointError(
                f"checkpoint {ckpt} is not a file; pass a .safetensors or .pt file"
            )
    data_name = re.split(r":", str(settings.data or "digits").strip(), maxsplit=1)[0].lower()
    if data_name not in DATA_LOADERS:
        raise DataError(f"unknown data spec {settings.data!r}; use one of: {', '.join(DATA_SPECS)}")
    return scheme, m, n


def resume_fingerprint(settings: ConvertSettings, scheme: str, m: int, n: int) -> dict[str, Any]:
    """The settings a resumed fine-tune must share with the interrupted one."""
    values = {**settings.to_dict(), "scheme": scheme, "M": m, "N": n}
    return {k: values[k] for k in RESUME_KEYS}


def _same(a: Any, b: Any) -> bool:
    number = (int, float)
    if isinstance(a, number) and isinstance(b, number) and not isinstance(a, bool | type(None)):
        return not isinstance(b, bool) and float(a) == float(b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_resume(saved: dict[str, Any], fingerprint: dict[str, Any], work_dir: Path) -> None:
    """Refuse to resume a checkpoint written with other settings (one line, exit 2)."""
    extra = saved.get("extra")
    if not isinstance(extra, dict) or "calibrated" not in extra or "calibrate_s" not in extra:
        raise CheckpointError(
            f"the fine-tune checkpoint in {work_dir} lacks its calibration record; "
            f"delete {work_dir} or rerun without --resume"
        )
    before = extra.get("settings")
    if not isinstance(before, dict):
        return  # written by an older binarize: nothing to compare
    if isinstance(before.get("distill"), bool):  # the key's former boolean form
        before = {**before, "distill": distill_mode(before["distill"])}
    diffs = [
        f"{k}={before.get(k)!r} (now {fingerprint[k]!r})"
        for k in fingerprint
        if k in before and not _same(before[k], fingerprint[k])
    ]
    if diffs:
        raise CheckpointError(
            f"the interrupted fine-tune in {work_dir} used other settings: {'; '.join(diffs[:3])}; "
            "rerun with its settings to resume, or without --resume to start over"
        )


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p``; returns the directories created (outermost first) for clean-up."""
    created: list[Path] = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(created))


def _remove_if_empty(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


def _calibration_batches(loader: Any, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` ``(images, labels)`` batches of ``loader``."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    for images, labels in loader:
        batches.append((images, labels))
        if len(batches) >= count:
            break
    return batches


def _calibration_loader(settings: ConvertSettings, data: DataBundle) -> Any:
    """The shuffled training loader calibration (and the sensitivity measure) read, seeded."""
    from binarize_cli.load.data import make_loader

    return make_loader(
        data.train,
        batch_size=settings.batch_size,
        shuffle=True,
        seed=settings.seed,
        num_workers=settings.workers,
    )


def execution(settings: ConvertSettings, ctx: DistContext) -> Execution:
    """Where and how this process trains and evaluates: ``ctx.device`` (the resolved
    ``--device``) with ``--workers``, ``--amp`` and ``--compile``."""
    from binarize_cli.convert.training import Execution

    return Execution(
        device=ctx.device, workers=settings.workers, amp=settings.amp, compile=settings.compile
    )


def describe_execution(run: Execution) -> str:
    """One line for the progress: the device (with the GPU's name), then ``amp``,
    ``compile`` and the loader workers where set."""
    where = run.device
    if where.startswith("cuda"):
        where += f" ({torch.cuda.get_device_name(torch.device(where))})"
    parts = [f"device {where}"]
    if run.amp != "off":
        parts.append(f"mixed precision {run.amp}")
    if run.compile:
        parts.append("torch.compile")
    if run.workers:
        parts.append(f"{run.workers} loader worker{'s' if run.workers != 1 else ''}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- stages
#
# Each stage is a public function with a typed input and output; :func:`run_convert` chains
# them. Calling them one at a time in the same order, after ``torch.manual_seed(seed)``, gives
# the same numbers as ``run_convert`` (benchmarks/bench_accuracy.py does so for its control).


@dataclass
class ConvertPlan:
    """Stage 0 (:func:`prepare`): validated settings, bases and where the run goes.

    ``saved`` is the fine-tune checkpoint a ``--resume`` continues (already checked against
    ``fingerprint``), or None.
    """

    settings: ConvertSettings
    scheme: Scheme
    m: int
    n: int
    run_dir: Path
    work_dir: Path
    fingerprint: dict[str, Any]
    resume: bool = False
    saved: dict[str, Any] | None = None


@dataclass
class ConvertInputs:
    """Stage 1 (:func:`load_inputs`): the model, sized to the data's classes, and the data.

    ``notes``: what loading changed or noticed on its own (a classifier reset for another
    number of classes, small images upscaled to the model's size), one line each; ``convert``
    prints them and records them in ``binarize.json``.
    """

    loaded: LoadedModel
    data: DataBundle
    notes: list[str] = field(default_factory=list)


@dataclass
class Reference:
    """Stage 2 (:func:`build_reference`): the full-precision baseline, the model on the
    device in eval mode (teacher and calibration reference), and the validation loader."""

    baseline: Baseline
    model: nn.Module
    val_loader: Any


@dataclass
class Calibration:
    """Stage 4 (:func:`calibrate_student`): the calibrated accuracy (``top1``, ``top5``,
    ``samples``) and seconds, or those recorded in the resumed checkpoint."""

    accuracy: dict[str, Any]
    seconds: float
    resumed_from_epoch: int = 0


def prepare(
    settings: ConvertSettings,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> ConvertPlan:
    """Validate everything that needs no model or data, silently, before writing anything:
    the settings, the output location (an existing run there is a RunDirError unless
    ``overwrite``) and (with ``resume``) the checkpoint to continue."""
    from binarize_cli.convert.finetune import load_checkpoint

    scheme, m, n = validate_settings(settings)
    assert settings.model is not None
    run_dir = out_dir or default_run_dir(settings.model, scheme.name, m, n)
    _check_output_dir(run_dir, overwrite)
    work_dir = work_dir_for(run_dir)
    fingerprint = resume_fingerprint(settings, scheme.name, m, n)
    if resume and settings.progressive:
        raise BadInputError(
            "a progressive fine-tune keeps no epoch checkpoints and cannot resume; "
            "rerun without --resume"
        )
    saved = load_checkpoint(work_dir) if resume else None
    if saved is not None:
        check_resume(saved, fingerprint, work_dir)
    return ConvertPlan(settings, scheme, m, n, run_dir, work_dir, fingerprint, resume, saved)


def check_keep_patterns(
    keep: list[str] | tuple[str, ...], model: nn.Module, layers: dict[str, Any] | None = None
) -> None:
    """Refuse a ``--keep`` regex, or a recipe's ``[layers]`` regex, that names no weight layer
    of ``model`` (one line, exit 2).

    A pattern that matches nothing is almost always a typo, and the layer the user meant to
    keep would otherwise be binarized; the role aliases (``first``, ``last``, ``classifier``)
    are not checked here (surgery resolves them). Checked right after the model loads, before
    the baseline trains; ``surgery.binarize_model`` still warns for library callers.
    """
    from binarize_cli.convert.policy import KEEP_ALIASES

    names = [
        name
        for name, module in model.named_modules()
        if any(p.dim() >= 2 for p in module.parameters(recurse=False))
    ]
    for pattern in keep:
        if pattern in KEEP_ALIASES or any(re.search(pattern, n) for n in names):
            continue
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise BadInputError(
            f"--keep {pattern!r} matches no layer of the model (its layers: {shown}); "
            "fix the pattern (a regular expression searched in each layer name)"
        )
    for pattern in layers or {}:
        if not any(re.search(pattern, n) for n in names):
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise BadInputError(
                f"[layers] {pattern!r} matches no layer of the model (its layers: {shown}); "
                "fix the pattern (a regular expression searched in each layer name)"
            )


def _reset_note(loaded: LoadedModel, data: DataBundle) -> str:
    what = (
        f"--checkpoint {loaded.source}"
        if loaded.weights.startswith("checkpoint:")
        else f"pretrained {loaded.spec}"
    )
    return (
        f"{what} has a {loaded.num_classes}-class classifier but {data.spec} has "
        f"{data.num_classes} classes: the classifier is reset to fresh weights, which the "
        "full-precision baseline step trains"
    )


def load_inputs(settings: ConvertSettings) -> ConvertInputs:
    """Load the model first (its normalisation and input size shape RGB data), then the
    data; reload the model with the data's number of classes when they differ.

    Before anything trains: every ``--keep`` and ``[layers]`` regex must name a layer
    (:func:`check_keep_patterns`) and the model must run at the data's input size
    (:func:`~binarize_cli.load.models.check_input_size`); both raise BadInputError.
    """
    from binarize_cli.load.data import load_data, upscale_hint
    from binarize_cli.load.models import check_input_size, load_model

    assert settings.model is not None
    loaded = load_model(
        settings.model, pretrained=settings.pretrained, checkpoint=settings.checkpoint
    )
    check_keep_patterns(settings.keep, loaded.model, settings.layers)
    data = load_data(
        settings.data,
        input_size=settings.input_size,
        mean=loaded.mean,
        std=loaded.std,
        model_input_size=loaded.input_size,
        crop_pct=loaded.crop_pct,
    )
    check_input_size(
        loaded.model, data.input_size, name=loaded.spec, default_size=loaded.input_size
    )
    notes = list(loaded.notes)
    hint = upscale_hint(data, loaded.input_size, explicit_size=settings.input_size is not None)
    if hint is not None:
        notes.append(hint)
    if data.num_classes != loaded.num_classes:
        if loaded.weights != "random":
            notes.append(_reset_note(loaded, data))
        loaded = load_model(
            settings.model,
            pretrained=settings.pretrained,
            checkpoint=settings.checkpoint,
            num_classes=data.num_classes,
        )
    return ConvertInputs(loaded, data, notes)


def weights_provenance(loaded: LoadedModel) -> tuple[str | None, str | None]:
    """``(file, sha256)`` of the local file the weights were read from (a checkpoint or a
    cached hub file), or ``(None, None)`` for random weights or a source that is no file."""
    from binarize_cli.load.models import file_sha256

    if loaded.weights == "random" or not loaded.source:
        return None, None
    path = Path(loaded.source)
    if not path.is_file():
        return None, None
    resolved = path.resolve()
    return str(resolved), file_sha256(resolved)


def _report_resume(plan: ConvertPlan, rep: Reporter) -> None:
    """Say when ``--resume`` finds nothing, or when a run without it ignores a checkpoint."""
    from binarize_cli.convert.finetune import CHECKPOINT_FILE

    if plan.resume and plan.saved is None:
        rep.stage(f"nothing to resume in {plan.work_dir}; starting from the beginning")
    elif not plan.resume and (plan.work_dir / CHECKPOINT_FILE).is_file():
        rep.stage(
            f"an interrupted fine-tune is in {plan.work_dir}; starting over "
            "(pass --resume to continue it instead)"
        )


def build_reference(
    settings: ConvertSettings,
    inputs: ConvertInputs,
    ctx: DistContext,
    *,
    progress: Any = None,
) -> Reference:
    """The full-precision baseline (adapted and cached when needed; rank 0 trains first and
    the other ranks then read its cache) trained and evaluated on ``ctx.device``
    (:func:`execution`), in eval mode."""
    from binarize_cli.convert.baseline import ensure_baseline
    from binarize_cli.load.data import make_loader

    run = execution(settings, ctx)

    def baseline_with(bar: Any) -> Baseline:
        return ensure_baseline(
            inputs.loaded,
            inputs.data,
            epochs=settings.baseline_epochs,
            batch_size=settings.batch_size,
            lr=settings.baseline_lr,
            seed=settings.seed if settings.baseline_seed is None else settings.baseline_seed,
            progress=bar,
            execution=run,
        )

    baseline = baseline_with(progress) if ctx.is_main else None
    ctx.barrier()
    if baseline is None:
        baseline = baseline_with(None)
    fp_model: nn.Module = baseline.model.to(ctx.device).eval()
    val_loader = make_loader(
        inputs.data.val,
        batch_size=max(settings.batch_size, 128),
        shuffle=False,
        seed=settings.seed,
        **run.loader_options,
    )
    return Reference(baseline, fp_model, val_loader)


def binarize_student(
    plan: ConvertPlan,
    inputs: ConvertInputs,
    reference: Reference,
    device: str,
    layer_bases: dict[str, Any] | None = None,
) -> SurgeryResult:
    """Graph surgery on a copy of the reference model (which stays the teacher), moved to
    ``device``; ``result.model`` is the student. The recipe's ``[layers]`` rules pin
    per-layer choices; ``layer_bases`` (an allocation's table) names the others."""
    from binarize_cli.convert.surgery import binarize_model

    surgery = binarize_model(
        copy.deepcopy(reference.model),
        plan.scheme,
        plan.m,
        plan.n,
        keep=tuple(plan.settings.keep),
        first_conv=inputs.loaded.first_conv,
        classifier=inputs.loaded.classifier,
        options=dict(plan.settings.scheme_options),
        layer_bases=layer_bases,
        layer_rules=plan.settings.layers,
    )
    surgery.model.to(device)
    return surgery


@dataclass
class Bases:
    """Stage 2b (:func:`choose_bases`): the measured sensitivity table and, for
    ``--policy auto``, the allocation whose ``layer_bases`` surgery applies."""

    sensitivity: SensitivityTable
    allocation: Allocation | None = None


def choose_bases(
    plan: ConvertPlan,
    inputs: ConvertInputs,
    reference: Reference,
    reporter: Reporter | None = None,
) -> Bases:
    """Measure the per-layer sensitivity of the layers the policy binarizes on the
    calibration batches (:mod:`binarize_cli.convert.sensitivity`) and, with ``--policy auto``,
    allocate their bases within the budget (:mod:`binarize_cli.convert.allocate`). The
    recipe's ``[layers]`` pins stay as pinned. Consumes no global RNG, so the rest of the
    run is as without it."""
    from binarize_cli.convert import allocate

    rep: Reporter = reporter or _Silent()
    settings = plan.settings
    with torch.random.fork_rng(devices=[]):
        batches = _calibration_batches(
            _calibration_loader(settings, inputs.data), settings.calib_batches
        )
    rep.stage("measuring the per-layer sensitivity")
    table, allocation = allocate.choose_bases(
        reference.model,
        plan.scheme,
        plan.m,
        plan.n,
        batches,
        auto=settings.policy == "auto",
        keep=tuple(settings.keep),
        first_conv=inputs.loaded.first_conv,
        classifier=inputs.loaded.classifier,
        options=settings.scheme_options,
        layer_rules=settings.layers,
        budget_mbit=settings.budget_mbit,
        budget_bops=settings.budget_bops,
        seed=settings.seed,
        on_measured=lambda t: rep.stage(
            f"sensitivity of {len(t.layers)} layers measured on {t.images} images "
            f"in {t.seconds:.1f} s"
        ),
    )
    if allocation is not None:
        rep.stage(
            f"allocated per-layer bases: {allocation.memory_bits / 1e6:.2f} Mbit "
            f"(uniform {allocation.uniform_bits / 1e6:.2f}), summed output error "
            f"{allocation.error:.4f} (uniform {allocation.uniform_error:.4f})"
        )
    return Bases(table, allocation)


def calibrate_student(
    plan: ConvertPlan,
    student: nn.Module,
    inputs: ConvertInputs,
    reference: Reference,
    device: str,
    reporter: Reporter | None = None,
) -> Calibration:
    """Activation endpoints/levels from ``calib_batches`` shuffled training batches, then
    batch-norm statistics, by the ``calibration`` rule's (``tensor`` or ``output``);
    evaluated on the validation split. A resumed run takes the record
    from its checkpoint instead (the checkpoint holds the calibrated and trained weights)."""
    from binarize_cli.convert.calibrate import calibrate_model
    from binarize_cli.convert.training import evaluate

    rep: Reporter = reporter or _Silent()
    settings = plan.settings
    if plan.saved is not None:
        extra = plan.saved["extra"]
        resumed_from = int(plan.saved["epochs_done"])
        rep.stage(f"resuming after epoch {resumed_from} from {plan.work_dir}")
        return Calibration(extra["calibrated"], float(extra["calibrate_s"]), resumed_from)
    batches = _calibration_batches(
        _calibration_loader(settings, inputs.data), settings.calib_batches
    )
    short = len(batches) < settings.calib_batches
    rep.stage(
        f"calibrating on {len(batches)} batch{'es' if len(batches) != 1 else ''}"
        + (
            f" (the training split has only {len(batches)} of the {settings.calib_batches} asked for)"
            if short
            else ""
        )
    )
    stats = calibrate_model(
        student,
        reference.model,
        [images for images, _ in batches],
        seed=settings.seed,
        rule=settings.calibration,
    )
    if stats.reconstructed:
        rep.stage(
            f"output-aware calibration: {stats.reconstructed} layers, summed layer output "
            f"error {stats.output_error_before:.4f} -> {stats.output_error_after:.4f}"
        )
    rep.stage("evaluating the calibrated model")
    accuracy = evaluate(student, reference.val_loader, device=device).to_dict()
    return Calibration(accuracy, stats.seconds)


def finetune_student(
    settings: ConvertSettings,
    student: nn.Module,
    data: DataBundle,
    ctx: DistContext,
    *,
    teacher: nn.Module | None = None,
    work_dir: Path | None = None,
    resume_state: dict[str, Any] | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    val_loader: Any = None,
    fp_model: nn.Module | None = None,
) -> FinetuneState:
    """Fine-tune ``student`` in place for ``settings.epochs`` (loaders seeded ``seed + epoch``).

    After each epoch the student is scored on a fixed subset of the training split (the
    selection score: the run ends on the best epoch, see :mod:`binarize_cli.convert.finetune`)
    and, with ``val_loader``, on the validation split (recorded in ``metrics.csv``). With
    ``fp_model`` (the full-precision model), :data:`REFERENCE_STEPS` training steps of a copy
    of it are timed first, in this process, with the same loss and data: the reference of the
    recorded step-time ratio (``FinetuneState.fp_step_s``).
    With ``work_dir`` (and ``epochs > 0``) a checkpoint is written there after each epoch;
    Ctrl-C becomes :class:`ConvertInterrupted`, saying whether one was kept.
    Training steps run as :func:`execution` says (``--amp``; with ``--compile``, a
    ``torch.compile`` d student and reference); the per-epoch scores are float32 eager.
    With ``distill = "attention"`` (and a ``teacher``) the loss adds the attention-matching
    term over the teacher's blocks (:mod:`binarize_cli.convert.attention`); with
    ``progressive`` the fine-tune runs the three-stage schedule
    (:mod:`binarize_cli.convert.progressive`), without epoch checkpoints.
    """
    from binarize_cli.convert.finetune import CHECKPOINT_FILE, finetune
    from binarize_cli.convert.progressive import progressive_finetune
    from binarize_cli.convert.training import compiled
    from binarize_cli.load.data import make_loader

    rep: Reporter = reporter or _Silent()
    run = execution(settings, ctx)
    train_module: nn.Module = student
    if ctx.enabled:
        # A progressive run's first stages bypass the quantizers: their parameters get no
        # gradient there, which DDP must be told to expect.
        train_module = torch.nn.parallel.DistributedDataParallel(
            student, find_unused_parameters=settings.progressive
        )
    train_module = compiled(train_module, run.compile)

    def make_train_loader(epoch: int) -> Any:
        return make_loader(
            data.train,
            batch_size=settings.batch_size,
            shuffle=True,
            seed=settings.seed + epoch,
            drop_last=True,
            distributed=ctx.enabled,
            **run.loader_options,
        )

    validate, select = _epoch_scores(settings, data, ctx, val_loader)
    attention = attention_spec(settings, teacher)
    fp_step_s = None
    if settings.epochs > 0 and ctx.is_main and fp_model is not None:
        rep.stage("timing full-precision training steps (the reference of the step-time ratio)")
        fp_step_s = _reference_step_s(
            settings, fp_model, teacher, make_train_loader(0), ctx, attention
        )
    common: dict[str, Any] = {
        "make_train_loader": make_train_loader,
        "epochs": settings.epochs,
        "lr": settings.lr,
        "weight_decay": settings.weight_decay,
        "distill_weight": settings.distill_weight,
        "temperature": settings.temperature,
        "device": ctx.device,
        "is_main": ctx.is_main,
        "checkpoint_extra": checkpoint_extra,
        "on_step": rep.step,
        "train_module": train_module,
        "validate": validate,
        "amp": run.amp,
        "attention": attention,
    }
    try:
        if settings.progressive:
            state = progressive_finetune(
                student,
                teacher=teacher,
                on_stage=lambda stage: rep.stage(stage.describe()),
                on_epoch_start=rep.epoch_start,
                select=select,
                **common,
            )
        else:
            state = finetune(
                student,
                teacher=teacher,
                work_dir=work_dir if settings.epochs > 0 else None,
                resume=resume_state is not None,
                resume_state=resume_state,
                on_epoch_start=rep.epoch_start,
                select=select,
                **common,
            )
        state.fp_step_s = fp_step_s
        return state
    except KeyboardInterrupt:
        kept = (
            not settings.progressive
            and work_dir is not None
            and (work_dir / CHECKPOINT_FILE).is_file()
        )
        raise ConvertInterrupted(
            f"interrupted; the completed fine-tune epochs are saved in {work_dir}: rerun "
            "the same command with --resume to continue"
            if kept
            else "interrupted before the first fine-tune epoch completed; nothing was saved"
        ) from None


def attention_spec(settings: ConvertSettings, teacher: nn.Module | None) -> AttentionSpec | None:
    """The attention-matching term of ``distill = "attention"``: ``attention_weight`` over
    the blocks found in ``teacher`` (:func:`~binarize_cli.convert.attention.block_ends`);
    ``None`` for the other modes or without a teacher."""
    from binarize_cli.convert.attention import AttentionSpec, block_ends

    if settings.distill != "attention" or teacher is None:
        return None
    return AttentionSpec(tuple(block_ends(teacher)), float(settings.attention_weight))


def _reference_step_s(
    settings: ConvertSettings,
    fp_model: nn.Module,
    teacher: nn.Module | None,
    loader: Any,
    ctx: DistContext,
    attention: AttentionSpec | None = None,
) -> float | None:
    """Seconds per training step of a copy of the full-precision model: :data:`REFERENCE_STEPS`
    steps after :data:`~binarize_cli.convert.training.WARMUP_STEPS` untimed ones (the
    fine-tune's step time leaves out as many), with the fine-tune's loss, distillation, data,
    device, ``--amp`` and ``--compile``."""
    from binarize_cli.convert.finetune import LimitedLoader
    from binarize_cli.convert.training import WARMUP_STEPS, time_training_steps

    run = execution(settings, ctx)
    return time_training_steps(
        fp_model,
        LimitedLoader(loader, REFERENCE_STEPS + WARMUP_STEPS),
        lr=settings.lr,
        teacher=teacher,
        distill_weight=settings.distill_weight,
        temperature=settings.temperature,
        device=run.device,
        amp=run.amp,
        compile=run.compile,
        attention=attention,
    )


def _epoch_scores(
    settings: ConvertSettings, data: DataBundle, ctx: DistContext, val_loader: Any
) -> tuple[Callable[[nn.Module], dict[str, float]] | None, Callable[[nn.Module], float]]:
    """The fine-tune's per-epoch callbacks: ``validate`` (top-1/top-5 on ``val_loader``,
    recorded; ``None`` without it) and ``select`` (top-1 on a fixed seeded subset of
    :data:`~binarize_cli.convert.finetune.SELECT_IMAGES` training images, which picks the
    kept epoch)."""
    from binarize_cli.convert.finetune import SELECT_IMAGES
    from binarize_cli.convert.training import evaluate
    from binarize_cli.load.data import make_loader

    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(settings.seed))
    select_loader = make_loader(
        torch.utils.data.Subset(data.train, pick[:SELECT_IMAGES].tolist()),
        batch_size=max(settings.batch_size, 128),
        shuffle=False,
        seed=settings.seed,
        **execution(settings, ctx).loader_options,
    )

    def validate(model: nn.Module) -> dict[str, float]:
        acc = evaluate(model, val_loader, device=ctx.device)
        return {"val_top1": float(acc.top1), "val_top5": float(acc.top5)}

    def select(model: nn.Module) -> float:
        return float(evaluate(model, select_loader, device=ctx.device).top1)

    return (validate if val_loader is not None else None), select


def run_metadata(
    plan: ConvertPlan,
    inputs: ConvertInputs,
    reference: Reference,
    surgery: SurgeryResult,
    calibration: Calibration,
    state: FinetuneState,
    final_acc: dict[str, Any],
    world_size: int,
    allocation: Allocation | None = None,
    device: str | None = None,
) -> RunMetadata:
    """The ``binarize.json`` of a run (BRIEF section 2 keys plus provenance, the per-layer
    table, for ``--policy auto`` the allocation, and the resolved ``device`` it ran on)."""
    settings, data, baseline = plan.settings, inputs.data, reference.baseline
    loaded, fp_acc, cal_acc = inputs.loaded, baseline.accuracy, calibration.accuracy
    weights_file, weights_sha256 = weights_provenance(loaded)
    return RunMetadata(
        model=loaded.spec,
        weights=loaded.weights,
        scheme=plan.scheme.name,
        M=plan.m,
        N=plan.n,
        data=data.spec,
        recipe=settings.to_dict(),
        accuracy=RunAccuracy(
            fp=StageAccuracy(**fp_acc.to_dict()),
            calibrated=StageAccuracy(**cal_acc),
            binarized=StageAccuracy(**final_acc),
        ),
        timings=RunTimings(
            baseline_epoch_s=[float(t) for t in baseline.epoch_times],
            baseline_cached=bool(baseline.cache_hit),
            finetune_epoch_s=state.epoch_seconds,
            finetune_step_s=state.step_s,
            fp_step_s=state.fp_step_s,
            calibrate_s=calibration.seconds,
        ),
        finetune_epochs=state.epoch_stats,
        finetune_kept_epoch=state.kept_epoch,
        num_classes=data.num_classes,
        keep=list(settings.keep),
        scheme_options=dict(settings.scheme_options),
        first_conv=list(surgery.first_conv),
        classifier=list(surgery.classifier),
        policy=surgery.policy.to_dict(),
        input_size=list(data.input_size),
        mean=list(data.mean),
        std=list(data.std),
        preprocessing=data.preprocessing.to_dict(),
        world_size=world_size,
        device=device,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        binarize_version=__version__,
        weights_file=weights_file,
        weights_sha256=weights_sha256,
        notes=list(inputs.notes),
        layer_bases=dict(surgery.layer_bases),
        allocation=None if allocation is None else allocation.to_dict(),
    )


def accuracy_warnings(
    fp_top1: float, calibrated_top1: float, finetuned_top1: float | None, num_classes: int
) -> list[str]:
    """What the three accuracies say about the run, one line each: a full-precision baseline
    near chance (below twice chance, ``200 / num_classes`` %) or below the calibrated model
    (under-trained), and a fine-tuned model worse than the calibrated one."""
    out: list[str] = []
    chance = 100.0 / max(num_classes, 1)
    if fp_top1 < 2 * chance:
        out.append(
            f"the full-precision baseline scores {fp_top1:.2f}% top-1, near chance "
            f"({chance:.2f}% for {num_classes} classes): the accuracies of this run say little; "
            "train it longer (--baseline-epochs) or load trained weights (--checkpoint)"
        )
    elif fp_top1 < calibrated_top1:
        out.append(
            f"the full-precision baseline ({fp_top1:.2f}% top-1) scores below the calibrated "
            f"binarized model ({calibrated_top1:.2f}%): the baseline is under-trained; raise "
            "--baseline-epochs or load trained weights"
        )
    if finetuned_top1 is not None and finetuned_top1 < calibrated_top1:
        out.append(
            f"fine-tuning lowered top-1 from {calibrated_top1:.2f}% (calibrated) to "
            f"{finetuned_top1:.2f}%: try a lower --lr, or --epochs 0 to keep the calibrated model"
        )
    return out


def write_result(
    plan: ConvertPlan,
    student: nn.Module,
    meta: RunMetadata,
    ctx: DistContext,
    state: FinetuneState | None = None,
    sensitivity: SensitivityTable | None = None,
) -> Path | None:
    """Rank 0 writes the run directory atomically (weights, ``binarize.json``, the
    per-epoch ``metrics.csv`` and, when measured, ``sensitivity.json``) and removes the work
    directory; returns the run directory (None on other ranks)."""
    from binarize_cli.convert.finetune import FinetuneState, metrics_csv
    from binarize_cli.convert.sensitivity import SENSITIVITY_FILE

    written: Path | None = None
    if ctx.is_main:
        written = write_run(
            plan.run_dir,
            {k: v.cpu() for k, v in student.state_dict().items()},
            meta,
            extra_files={
                METRICS_FILE: metrics_csv(state or FinetuneState()).encode(),
                **({} if sensitivity is None else {SENSITIVITY_FILE: sensitivity.to_json()}),
            },
        )
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    ctx.barrier()
    return written


def _load_and_say(settings: ConvertSettings, plan: ConvertPlan, rep: Reporter) -> ConvertInputs:
    """:func:`load_inputs`, then its progress lines: what was loaded, the notes (classifier
    reset, upscaling hint, ...) and what ``--resume`` found."""
    from binarize_cli.load.data import describe

    inputs = load_inputs(settings)
    loaded = inputs.loaded
    rep.stage(f"loaded {loaded.spec} ({loaded.weights} weights); data {describe(inputs.data)}")
    for note in inputs.notes:
        rep.stage(f"note: {note}")
    _report_resume(plan, rep)
    return inputs


def _final_evaluation(
    student: nn.Module,
    inputs: ConvertInputs,
    reference: Reference,
    calibration: Calibration,
    state: FinetuneState,
    rep: Reporter,
    device: str,
) -> tuple[dict[str, Any], list[str]]:
    """The saved model's validation accuracy and :func:`accuracy_warnings` (also appended to
    ``inputs.notes``, which ``binarize.json`` records); says when an earlier epoch was kept."""
    from binarize_cli.convert.training import evaluate

    if state.kept_epoch is not None and state.kept_epoch != state.epochs_done:
        rep.stage(
            f"kept epoch {state.kept_epoch} of {state.epochs_done}: the best top-1 on "
            "the training-subset selection score"
        )
    rep.stage("evaluating the fine-tuned model")
    final_acc = evaluate(student, reference.val_loader, device=device).to_dict()
    warnings = accuracy_warnings(
        reference.baseline.accuracy.top1,
        calibration.accuracy["top1"],
        final_acc["top1"] if state.epochs_done else None,
        inputs.data.num_classes,
    )
    inputs.notes.extend(warnings)
    return final_acc, warnings


def run_convert(
    settings: ConvertSettings,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    progress_console: Any = None,
) -> ConvertResult:
    """Run the whole conversion (the stages above, in order); returns the run directory and
    its metadata. An existing run at the output is replaced (atomically, at the end) only
    with ``overwrite``; without it, it is a RunDirError before any work.

    Raises BadInputError subclasses (before any output or directory) for bad input,
    TrainingDivergedError, ConvertInterrupted, or other BinarizeErrors for failures.
    """
    from binarize_cli.convert import distributed
    from binarize_cli.convert.finetune import CHECKPOINT_FILE

    rep: Reporter = reporter or _Silent()
    plan = prepare(settings, out_dir=out_dir, resume=resume, overwrite=overwrite)
    ctx = distributed.setup(settings.device)
    torch.manual_seed(settings.seed)
    # oneDNN's CPU convolution backward may reduce over threads in a run-dependent order
    # unless asked to be deterministic (same results otherwise; restored on exit).
    mkldnn_deterministic = torch.backends.mkldnn.deterministic
    torch.backends.mkldnn.deterministic = True
    created: list[Path] = []
    heap = contextlib.ExitStack()
    try:
        # the CPU's training steps reuse freed memory instead of faulting in fresh pages
        heap.enter_context(retained_heap(torch.device(ctx.device).type == "cpu"))
        inputs = _load_and_say(settings, plan, rep)
        rep.stage(describe_execution(execution(settings, ctx)))  # after bad input is ruled out
        rep.stage("full-precision baseline")
        reference = build_reference(settings, inputs, ctx, progress=progress_console)
        bases = (
            choose_bases(plan, inputs, reference, rep)
            if settings.policy == "auto" or settings.sensitivity
            else None
        )
        allocation = None if bases is None else bases.allocation
        rep.stage(
            f"graph surgery: {plan.scheme.name} M={plan.m} N={plan.n}"
            + (" (per-layer bases allocated)" if allocation is not None else "")
        )
        surgery = binarize_student(
            plan,
            inputs,
            reference,
            ctx.device,
            layer_bases=None if allocation is None else allocation.layer_bases,
        )
        student = surgery.model
        calibration = calibrate_student(plan, student, inputs, reference, ctx.device, rep)
        if ctx.is_main and settings.epochs > 0:
            created = _make_dirs(plan.work_dir)
        state = finetune_student(
            settings,
            student,
            inputs.data,
            ctx,
            teacher=reference.model if settings.distill != "off" else None,
            work_dir=plan.work_dir,
            resume_state=plan.saved,
            checkpoint_extra={
                "calibrated": calibration.accuracy,
                "calibrate_s": calibration.seconds,
                "settings": plan.fingerprint,
            },
            reporter=rep,
            val_loader=reference.val_loader,
            fp_model=reference.model,
        )
        final_acc, warnings = _final_evaluation(
            student, inputs, reference, calibration, state, rep, ctx.device
        )
        meta = run_metadata(
            plan,
            inputs,
            reference,
            surgery,
            calibration,
            state,
            final_acc,
            ctx.world_size,
            allocation,
            ctx.device,
        )
        return ConvertResult(
            run_dir=write_result(
                plan, student, meta, ctx, state, None if bases is None else bases.sensitivity
            ),
            meta=meta,
            decisions=list(surgery.decisions),
            warnings=[*surgery.warnings, *warnings],
            resumed_from_epoch=calibration.resumed_from_epoch,
        )
    except BaseException:
        # Keep a work directory that holds a checkpoint (``--resume`` needs it); remove the
        # directories this call created if nothing worth keeping is in them.
        if created and not (plan.work_dir / CHECKPOINT_FILE).is_file():
            shutil.rmtree(plan.work_dir, ignore_errors=True)
            _remove_if_empty(created[:-1])
        raise
    finally:
        heap.close()
        torch.backends.mkldnn.deterministic = mkldnn_deterministic
        distributed.teardown(ctx)
