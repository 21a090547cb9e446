"""The Python API: summary, binarize, fine-tune, evaluate and export any ``nn.Module``.

The same code the ``binarize`` command runs, for a model object (a timm or torchvision
model, or a user's own class) instead of a model name; docs/api.md shows it in use.

* :func:`summary` -> :class:`Summary`: the per-layer profile ``binarize report`` prints
  (:func:`binarize_cli.analyze.profile.profile_model`); ``print()`` shows the table,
  ``to_dict()`` has ``report --json``'s totals and ``layers`` rows.
* :func:`binarize` -> :class:`Binarized`: graph surgery
  (:func:`binarize_cli.convert.surgery.binarize_model`) on a *copy* of the model, then
  calibration (:func:`binarize_cli.convert.calibrate.calibrate_model`) against the
  untouched original. The original is never modified: it stays the full-precision
  reference (and the teacher for :func:`finetune`).
* :func:`finetune`: :func:`binarize_cli.convert.finetune.finetune` (Adam, cosine schedule,
  fractional epochs, optional distillation), in place.
* :func:`evaluate`: :func:`binarize_cli.convert.training.evaluate` (top-1/top-5 in percent).
* :func:`export`: the packed writer (:func:`binarize_cli.export.packed.export_packed_model`)
  or the ONNX exporter (:func:`binarize_cli.export.onnx.export_onnx_model`), with the
  metadata a run directory would give them derived from the model and an example input.

Data arguments are plain iterables: ``calibration_data`` yields input batches or
``(input, target)`` pairs; ``train_data`` and ``data`` yield ``(input, target)`` pairs (a
``torch.utils.data.DataLoader`` or a list of tuples). Errors are
:class:`~binarize_cli.core.errors.BinarizeError` subclasses with one-line messages, as on the
command line.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarize_cli.analyze.profile import ModelProfile, profile_model
from binarize_cli.analyze.report import normalize_input_size
from binarize_cli.convert.allocate import Allocation
from binarize_cli.convert.calibrate import CalibrationStats
from binarize_cli.convert.finetune import FinetuneState
from binarize_cli.convert.sensitivity import SensitivityTable
from binarize_cli.convert.surgery import LayerDecision, SurgeryResult
from binarize_cli.convert.training import Accuracy
from binarize_cli.core.errors import BadInputError
from binarize_cli.core.heap import retained_heap
from binarize_cli.core.modes import evaluating
from binarize_cli.core.preprocess import Preprocessing
from binarize_cli.core.settings import CALIBRATION_RULES, ConvertSettings
from binarize_cli.quant.layers import BinarizedConv2d

__all__ = [
    "EXPORT_TARGETS",
    "Binarized",
    "Summary",
    "binarize",
    "evaluate",
    "export",
    "export_metadata",
    "finetune",
    "summary",
]

#: ``export(target=...)``: the ``binarize export --target`` names.
EXPORT_TARGETS = ("packed", "onnx", "onnx-float")
#: Width of :meth:`Summary.__str__` (the CLI's width when its output is piped).
SUMMARY_WIDTH = 160

_DEFAULTS = ConvertSettings()


def _model_name(model: nn.Module) -> str:
    """``MODULE:CLASS`` of a model object (the ``--arch`` spelling of its class)."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def _input_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 3


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# --------------------------------------------------------------------------------- summary


class Summary(ModelProfile):
    """A :class:`~binarize_cli.analyze.profile.ModelProfile` that prints as
    ``binarize report``'s tables: ``print(s)`` (plain text, :data:`SUMMARY_WIDTH` columns)
    or ``rich.print(s)`` (``__rich__``). ``s.to_dict()`` has ``report --json``'s keys (the
    totals and ``layers``, one dict per row); ``s.layers`` are the rows, ``s.layer(name)``
    one of them."""

    def __rich__(self) -> Any:
        from binarize_cli.analyze.report import Report
        from binarize_cli.render import render_report

        return render_report(Report(profile=self, mode="analytic"))

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=SUMMARY_WIDTH, color_system=None, soft_wrap=False).print(self)
        return buffer.getvalue()


def summary(
    model: nn.Module,
    input_size: int | Sequence[int] = 224,
    *,
    decisions: Iterable[LayerDecision] | None = None,
    name: str | None = None,
) -> Summary:
    """Per-layer memory, MACs, FLOPs and BOPs of ``model`` (the accounting of
    docs/accounting.md), from one forward pass on a zero input.

    Args:
        model: any ``nn.Module``; its ``BinarizedConv2d`` layers count as binarized. Its
            train/eval mode and weights are left as they were.
        input_size: ``224``, ``(H, W)`` or ``(C, H, W)``; C defaults to the first
            convolution's input channels.
        decisions: surgery's rows (``Binarized.decisions``) for the kind and reason columns.
        name: the model's name in the header; default ``MODULE:CLASS`` of its class.
    """
    size = normalize_input_size(
        tuple(input_size) if isinstance(input_size, Sequence) else input_size,
        _input_channels(model),
    )
    by_name = {d.name: d for d in decisions or ()}
    profile = profile_model(model, size, decisions=by_name, model_name=name or _model_name(model))
    return Summary(**{f.name: getattr(profile, f.name) for f in fields(ModelProfile)})


# -------------------------------------------------------------------------------- binarize


@dataclass
class Binarized:
    """What :func:`binarize` produced.

    Attributes:
        model: the converted copy (``BinarizedConv2d`` layers in place), in eval mode, on the
            original's device.
        scheme, M, N: the scheme and the bases used (defaults resolved).
        surgery: surgery's record: one :class:`~binarize_cli.convert.surgery.LayerDecision`
            per weight layer (``decisions``), ``warnings``, whether ``torch.fx`` traced it,
            the first convolution and classifier it kept full precision.
        calibration: layers calibrated, batches used and seconds, or ``None`` when no
            ``calibration_data`` was given (activation quantizers keep their initial
            endpoints: fine for :func:`summary`, not for accuracy).
        sensitivity: the measured per-layer sensitivity (``policy="auto"`` or a budget;
            docs/sensitivity.md), else ``None``.
        allocation: what the budgeted allocation chose (``layer_bases``, ``memory_bits``,
            ``ops``, ``error`` and the uniform configuration's), else ``None``.
    """

    model: nn.Module
    scheme: str
    M: int
    N: int
    surgery: SurgeryResult
    calibration: CalibrationStats | None
    sensitivity: SensitivityTable | None = None
    allocation: Allocation | None = None

    @property
    def decisions(self) -> list[LayerDecision]:
        """One row per weight layer: binarized or kept, and why."""
        return list(self.surgery.decisions)

    @property
    def warnings(self) -> list[str]:
        """Layers surgery could not handle, ``keep`` patterns that matched nothing, ..."""
        return list(self.surgery.warnings)

    def summary(self, input_size: int | Sequence[int] = 224) -> Summary:
        """:func:`summary` of the converted model with surgery's kind/reason columns."""
        return summary(self.model, input_size, decisions=self.surgery.decisions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly record: ``scheme``, ``M``, ``N``, surgery's record (``traced``,
        ``policy``, ``first_conv``, ``classifier``, ``layers``, ``layer_bases``,
        ``warnings``), ``calibration`` (``layers``, ``batches``, ``seconds``, or ``None``) and
        ``allocation`` (or ``None``)."""
        return {
            "scheme": self.scheme,
            "M": self.M,
            "N": self.N,
            **self.surgery.to_dict(),
            "calibration": None if self.calibration is None else asdict(self.calibration),
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
        }


def _input_batches(data: Iterable[Any], limit: int) -> list[torch.Tensor]:
    """The first ``limit`` input batches of ``data`` (tensors, or the first item of pairs)."""
    if limit < 1:
        raise BadInputError(f"calib_batches must be >= 1 (got {limit})")
    batches: list[torch.Tensor] = []
    for item in itertools.islice(data, limit):
        batch = item[0] if isinstance(item, tuple | list) and item else item
        if not isinstance(batch, torch.Tensor):
            raise BadInputError(
                "calibration_data must yield input tensors or (input, target) pairs, "
                f"got {type(item).__name__}"
            )
        batches.append(batch)
    if not batches:
        raise BadInputError("calibration_data yielded no batches")
    return batches


def _labelled_batches(batches: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input, target)`` pairs, as the sensitivity measure needs them (its loss column)."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for item in batches:
        if not (isinstance(item, tuple | list) and len(item) >= 2):
            raise BadInputError(
                "a budget (or policy='auto') measures each layer's loss increase: "
                "calibration_data must yield (input, target) pairs"
            )
        pairs.append((item[0], item[1]))
    return pairs


def binarize(
    model: nn.Module,
    scheme: str = _DEFAULTS.scheme,
    M: int | None = None,
    N: int | None = None,
    calibration_data: Iterable[Any] | None = None,
    *,
    keep: str | Sequence[str] = (),
    calib_batches: int = _DEFAULTS.calib_batches,
    first_conv: str | Sequence[str] | None = None,
    classifier: str | Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = _DEFAULTS.seed,
    budget: float | None = None,
    budget_bops: float | None = None,
    policy: str | None = None,
    layer_bases: Mapping[str, Any] | None = None,
    calibration: str = _DEFAULTS.calibration,
) -> Binarized:
    """Convert a copy of ``model`` into a multiple-binary network; ``model`` is not modified.

    Args:
        model: any ``nn.Module`` with ``nn.Conv2d`` layers (timm, torchvision or your own).
        scheme: ``pa``, ``abc``, ``bnn``, ``xnor``, ``bireal``, ``dorefa``, ``ttq``, ``realtobin``
            (case-insensitive).
        M, N: weight and activation bases (``-M``/``-N``); default the scheme's. ``N=0``
            keeps activations in full precision.
        calibration_data: an iterable of input batches or of ``(input, target)`` pairs; the
            first ``calib_batches`` set the activation endpoints and levels (from the
            original model's activations) and re-estimate batch norm. ``None``: no calibration.
        keep: ``--keep`` regexes (one or a list) of layer names to keep full precision
            (``first``/``last`` aliases).
        first_conv, classifier: module names in those roles (kept full precision); default
            the model's ``pretrained_cfg``, else the first convolution / last weight layer run.
        options: scheme options (``weight_endpoints``, ``lambda_w``, ...; as in recipes).
        seed: seeds the calibration's activation sampling.
        budget: a memory budget in Mbit (as :func:`summary` counts memory): measure each
            layer's sensitivity on ``calibration_data`` (``(input, target)`` pairs) and choose
            per-layer bases, or full precision, within it (``convert --budget-mbit``;
            docs/sensitivity.md). ``budget_bops``: a compute budget (``--budget-bops``).
        policy: ``"uniform"`` (M, N everywhere) or ``"auto"`` (per-layer bases; without a
            budget, at most the uniform model's memory and operations); default ``"auto"``
            when a budget is given, else ``"uniform"``.
        layer_bases: per-layer choices by layer name, ``(M, N)`` or ``None`` for full
            precision (a run's ``layer_bases``); layers not named take (M, N).
        calibration: the calibration rule (``convert --calibration``): ``"tensor"`` fits
            each activation quantizer to its own input, ``"output"`` then refines it to
            minimise each layer's output error (docs/sensitivity.md).

    Raises:
        SchemeError: unknown scheme or invalid (M, N). BadInputError: a bad ``keep`` regex,
        ``calibration_data`` that yields no tensors, a budget without labelled
        ``calibration_data`` or below the cheapest configuration, an unknown ``calibration``.
    """
    from binarize_cli.convert.calibrate import calibrate_model
    from binarize_cli.convert.surgery import binarize_model
    from binarize_cli.quant import get_scheme

    sch = get_scheme(scheme.lower())
    m = sch.default_m if M is None else M
    n = sch.default_n if N is None else N
    chosen = policy or ("auto" if budget is not None or budget_bops is not None else "uniform")
    if chosen not in ("uniform", "auto"):
        raise BadInputError(f"policy must be 'uniform' or 'auto' (got {policy!r})")
    if chosen == "uniform" and (budget is not None or budget_bops is not None):
        raise BadInputError("a budget chooses per-layer bases: use policy='auto'")
    if calibration not in CALIBRATION_RULES:
        raise BadInputError(
            f"calibration must be one of {', '.join(CALIBRATION_RULES)} (got {calibration!r})"
        )
    items = (
        None
        if calibration_data is None
        else list(itertools.islice(calibration_data, calib_batches))
    )
    batches = None if items is None else _input_batches(items, calib_batches)
    device = _device_of(model)
    table = allocation = None
    if chosen == "auto":
        from binarize_cli.convert.allocate import choose_bases

        if items is None:
            raise BadInputError("policy='auto' needs calibration_data ((input, target) pairs)")
        table, allocation = choose_bases(
            model,
            sch,
            m,
            n,
            _labelled_batches(items),
            keep=(keep,) if isinstance(keep, str) else tuple(keep),
            first_conv=first_conv,
            classifier=classifier,
            options=dict(options or {}),
            budget_mbit=budget,
            budget_bops=budget_bops,
            seed=seed,
        )
        assert allocation is not None
        layer_bases = {**allocation.layer_bases, **dict(layer_bases or {})}
    result = binarize_model(
        copy.deepcopy(model),
        sch,
        m,
        n,
        keep=(keep,) if isinstance(keep, str) else tuple(keep),
        first_conv=first_conv,
        classifier=classifier,
        options=dict(options or {}),
        example_input=None if batches is None else batches[0][:1].to(device),
        layer_bases=layer_bases,
    )
    stats = (
        None
        if batches is None
        else calibrate_model(result.model, model, batches, seed=seed, rule=calibration)
    )
    result.model.eval()
    return Binarized(result.model, sch.name, m, n, result, stats, table, allocation)


# ----------------------------------------------------------------------- finetune, evaluate


def finetune(
    model: nn.Module,
    train_data: Iterable[Any],
    *,
    epochs: float = 1.0,
    lr: float = _DEFAULTS.lr,
    weight_decay: float = _DEFAULTS.weight_decay,
    teacher: nn.Module | None = None,
    distill_weight: float = _DEFAULTS.distill_weight,
    temperature: float = _DEFAULTS.temperature,
    device: str | torch.device | None = None,
    amp: str = _DEFAULTS.amp,
    compile: bool = _DEFAULTS.compile,
    distill: str = _DEFAULTS.distill,
    attention_weight: float = _DEFAULTS.attention_weight,
    progressive: bool = _DEFAULTS.progressive,
) -> FinetuneState:
    """Fine-tune ``model`` in place (``binarize convert``'s fine-tune); returns it in eval mode.

    Args:
        train_data: ``(input, target)`` batches with a length, iterated once per epoch (a
            ``DataLoader``, or a list of tuples); shuffle it yourself if you want shuffling.
        epochs: may be fractional: ``0.25`` runs the first quarter of the batches.
        lr, weight_decay: Adam's; the learning rate follows a cosine schedule to 0.
        teacher: a full-precision model to distil from (usually the original model):
            ``loss = (1 - w) CE + w T^2 KL(teacher || student)``, ``w = distill_weight``,
            ``T = temperature``.
        distill: with a ``teacher``: ``"logits"`` (the loss above), ``"attention"`` (that
            plus ``attention_weight * L_att``, the attention maps at the end of each block
            matched by module name, docs/schemes-abc-baselines.md "Real-to-Bin training")
            or ``"off"`` (the teacher is not used).
        progressive: run the three-stage teacher-student schedule (real, then binary
            activations, then binary weights and activations; ``epochs`` each; ``teacher``
            teaches stage 1); the state's ``epoch_stats`` rows carry their ``stage``.
        device: where the batches go (the model must be there already); default the
            model's device.
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` (CUDA only): the training steps under
            autocast, the quantizers in float32 (``convert --amp``, docs/devices.md).
        compile: run the training steps through ``torch.compile`` (``convert --compile``).

    Returns:
        ``epochs_done``, ``epoch_seconds`` and per-epoch ``epoch_stats`` (loss, running
        top-1, images/s). Raises TrainingDivergedError on a non-finite loss.
    """
    from binarize_cli.convert.attention import AttentionSpec, block_ends
    from binarize_cli.convert.finetune import finetune as run_finetune
    from binarize_cli.convert.progressive import progressive_finetune
    from binarize_cli.convert.training import compiled
    from binarize_cli.core.settings import AMP_MODES, DISTILL_MODES

    if not (math.isfinite(epochs) and epochs >= 0):
        raise BadInputError(f"epochs must be >= 0 (got {epochs})")
    if not (math.isfinite(lr) and lr > 0):
        raise BadInputError(f"lr must be > 0 (got {lr})")
    if not 0.0 <= distill_weight <= 1.0:
        raise BadInputError(f"distill_weight must be in [0, 1] (got {distill_weight})")
    if distill not in DISTILL_MODES:
        raise BadInputError(f"distill must be one of {', '.join(DISTILL_MODES)} (got {distill!r})")
    if not (math.isfinite(attention_weight) and attention_weight >= 0):
        raise BadInputError(f"attention_weight must be >= 0 (got {attention_weight})")
    where = str(device if device is not None else _device_of(model))
    if amp not in AMP_MODES or (amp == "fp16" and not where.startswith("cuda")):
        raise BadInputError(f"amp must be off, bf16 or fp16 on CUDA (got {amp!r} on {where})")
    if not hasattr(train_data, "__len__") or iter(train_data) is train_data:
        raise BadInputError(
            "train_data must be re-iterable with a length (a DataLoader or a list of "
            f"(input, target) batches), got {type(train_data).__name__}"
        )
    teacher = teacher if distill != "off" else None
    attention = None
    if distill == "attention" and teacher is not None:
        attention = AttentionSpec(tuple(block_ends(teacher)), float(attention_weight))
    run = progressive_finetune if progressive else run_finetune
    with retained_heap(torch.device(where).type == "cpu"):
        state = run(
            model,
            make_train_loader=lambda _epoch: train_data,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            teacher=teacher,
            distill_weight=distill_weight,
            temperature=temperature,
            device=where,
            train_module=compiled(model, compile),
            amp=amp,
            attention=attention,
        )
    model.eval()
    return state


def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> Accuracy:
    """Top-1/top-5 accuracy (percent) and ``samples`` of ``model`` on ``(input, target)``
    batches, in eval mode without gradients (the model's mode is restored); ``device``
    defaults to the model's."""
    from binarize_cli.convert.training import evaluate as run_evaluate

    return run_evaluate(
        model,
        data,
        device=device if device is not None else _device_of(model),
        max_batches=max_batches,
    )


# ---------------------------------------------------------------------------------- export


def _bases(model: nn.Module) -> tuple[str, int, int]:
    """The scheme of the model's binarized layers and their most common (M, N) (the
    run-level bases an export records; each layer's own travel in the file)."""
    found = [
        (m.scheme_name, m.weight_bases, m.activation_bases)
        for m in model.modules()
        if isinstance(m, BinarizedConv2d)
    ]
    if not found:
        raise BadInputError("the model has no binarized layers; convert it with binarize() first")
    schemes = sorted({s for s, _, _ in found})
    if len(schemes) > 1:
        raise BadInputError(
            f"the model mixes binarized schemes ({', '.join(schemes)}); an export records one"
        )
    return max(set(found), key=lambda b: (found.count(b), b))


def export_metadata(
    model: nn.Module,
    *,
    example_input: torch.Tensor | None = None,
    input_size: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str | None = None,
    data: str | None = None,
    preprocessing: Preprocessing | None = None,
) -> dict[str, Any]:
    """The metadata :func:`export` hands the writers (a run's ``binarize.json`` keys), derived
    from the model where it can be (see :func:`export`); also what
    :func:`binarize_cli.export.verify.verify_model` takes as ``meta``."""
    if preprocessing is not None:
        mean = preprocessing.mean if mean is None else mean
        std = preprocessing.std if std is None else std
    if example_input is not None:
        if example_input.dim() != 4:
            raise BadInputError(
                f"example_input must be a [B, C, H, W] batch, got shape {tuple(example_input.shape)}"
            )
        size = tuple(int(v) for v in example_input.shape[1:])
    elif input_size is not None:
        size = normalize_input_size(
            tuple(input_size) if isinstance(input_size, Sequence) else input_size,
            _input_channels(model),
        )
    else:
        raise BadInputError("export needs example_input (a [B, C, H, W] batch) or input_size")
    scheme, m, n = _bases(model)
    if num_classes is None:
        probe = example_input if example_input is not None else torch.zeros(1, *size)
        with evaluating(model):
            num_classes = int(model(probe.to(_device_of(model))).shape[-1])
    return {
        "model": name or _model_name(model),
        "scheme": scheme,
        "M": m,
        "N": n,
        "data": data or "",
        "num_classes": num_classes,
        "input_size": list(size),
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
    }


def export(
    model: nn.Module,
    path: str | Path,
    *,
    target: str = "packed",
    **metadata: Any,
) -> Path:
    """Write a binarized model as a packed file (``target="packed"``, the bitwise runtime's
    format, docs/format.md) or ONNX (``"onnx"``: packed bit-planes unpacked in the graph;
    ``"onnx-float"``: plain dequantized weights); atomically, nothing left on error.

    ``metadata``: the keyword arguments of :func:`export_metadata` (``example_input``,
    ``input_size``, ``num_classes``, ``mean``, ``std``, ``name``, ``data``,
    ``preprocessing``). The metadata a run
    directory would give the exporters is derived where it can be:

    * ``input_size`` (C, H, W): ``example_input.shape[1:]`` (a ``[B, C, H, W]`` batch), else
      the ``input_size`` argument (``32``, ``(H, W)`` or ``(C, H, W)``);
    * ``num_classes``: the width of ``model(example_input)`` (or of the model on a zero input
      of ``input_size``), unless given;
    * ``scheme``, ``M``, ``N``: from the model's binarized layers (one scheme; the most
      common M, N: layers with their own bases keep them in the file);
    * ``name`` (the file's ``source_model``): default ``MODULE:CLASS`` of the model's class.

    ``mean``/``std`` (per channel) record the normalisation the inputs must already have,
    ``data`` the data spec and ``preprocessing`` the whole record of how an image becomes the
    input (a :class:`~binarize_cli.core.preprocess.Preprocessing`, e.g. ``load_data(spec)
    .preprocessing``; its mean/std stand in for missing ``mean``/``std``), so that ``binarize
    run FILE`` makes its images the same way; they cannot be derived from the model (default:
    not recorded). A model on an accelerator
    is exported from a CPU copy. Returns ``path``.
    """
    wanted = target.lower()
    if wanted not in EXPORT_TARGETS:
        raise BadInputError(
            f"unknown export target {target!r}; choose one of: {', '.join(EXPORT_TARGETS)}"
        )
    meta = export_metadata(model, **metadata)
    cpu_model = model if _device_of(model).type == "cpu" else copy.deepcopy(model).cpu()
    if wanted == "packed":
        from binarize_cli.export.packed import export_packed_model

        return export_packed_model(cpu_model, meta, path)
    from binarize_cli.export.onnx import export_onnx_model

    return export_onnx_model(cpu_model, meta, path, float_weights=wanted == "onnx-float")
