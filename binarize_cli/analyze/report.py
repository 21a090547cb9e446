"""``binarize report``'s data: analytic and run reports, run comparison, the paper's Table 7.

Everything here returns data (dataclasses with ``to_dict``); :mod:`binarize_cli.render` turns
it into tables and :mod:`binarize_cli.analyze.plots` into figures. The accounting rules live in
:mod:`binarize_cli.analyze.profile` (paper 4.6.1); ``docs/accounting.md`` compares them with the paper.

* :func:`analytic_report`: build an architecture with random weights (no download), apply
  graph surgery with a scheme and (M, N), and profile it on a zero input.
* :func:`run_report`: a run directory's model, accuracies (full precision, calibrated,
  fine-tuned) and per-layer approximation errors::

      weight error      ||W - W_hat||_F / ||W||_F           (W_hat = sum_i alpha_i T_i, eq. 15)
      activation error  ||A - A_hat||_F / ||A||_F           (A_hat = sum_j beta_j V_j, eq. 17)

  with ``A`` the real input of each binarized convolution on one batch of the run's
  validation data; and, when the run measured it (``sensitivity.json``), each layer's
  sensitivity (:mod:`binarize_cli.convert.sensitivity`).
* :func:`compare_runs`: one row per run (the paper's Tables 3 and 6 layout).
* :func:`paper_comparison`: ResNet18/34/50 under Bi-Real, ABC and PA accounting beside the
  paper's published Table 7.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarize_cli.analyze.profile import ModelProfile, contract_dict, profile_model
from binarize_cli.convert.sensitivity import SensitivityTable
from binarize_cli.core.errors import BadInputError, BinarizeError
from binarize_cli.core.metadata import ACCURACY_STAGES, RunMetadata, accuracy_gap
from binarize_cli.core.modes import evaluating
from binarize_cli.quant.base import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d

#: Batch size for the activation-error pass of a run report.
ERROR_BATCH = 32


def normalize_input_size(value: Any, channels: int = 3) -> tuple[int, int, int]:
    """``224`` -> ``(3, 224, 224)``; ``[H, W]`` -> ``(3, H, W)``; ``[C, H, W]`` unchanged."""
    if isinstance(value, bool):
        raise BadInputError(f"input size must be a positive integer, got {value!r}")
    if isinstance(value, int):
        sizes: tuple[int, ...] = (channels, value, value)
    elif isinstance(value, list | tuple) and len(value) in (2, 3):
        sizes = tuple(int(v) for v in value)
        if len(sizes) == 2:
            sizes = (channels, *sizes)
    else:
        raise BadInputError(f"input size must be an integer or [C, H, W], got {value!r}")
    if any(s < 1 for s in sizes):
        raise BadInputError(f"input size must be positive, got {value!r}")
    return sizes  # type: ignore[return-value]


@dataclass
class Report:
    """One model's report: its profile, and for a run the accuracies and warnings."""

    profile: ModelProfile
    mode: str  # "analytic" | "run"
    run_dir: Path | None = None
    data: str | None = None
    accuracy: dict[str, dict[str, float] | None] | None = None
    warnings: list[str] = field(default_factory=list)
    #: False for a run converted with ``--epochs 0``: its ``binarized`` accuracy is the
    #: calibrated model's, so tables show no fine-tuned row (the JSON keeps the key).
    fine_tuned: bool = True

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode}
        if self.run_dir is not None:
            d["run_dir"] = str(self.run_dir)
        if self.data is not None:
            d["data"] = self.data
        d.update(self.profile.to_dict())
        if self.accuracy is not None:
            d["accuracy"] = self.accuracy
        d["warnings"] = list(self.profile.warnings) + list(self.warnings)
        return d


# --------------------------------------------------------------------------------------
# Analytic mode


@dataclass
class BuiltModel:
    """A randomly initialised, binarized architecture and surgery's decisions."""

    model: nn.Module
    spec: str
    scheme: str | None
    m: int | None
    n: int | None
    input_size: tuple[int, int, int]
    decisions: dict[str, Any]
    warnings: list[str]


def build_binarized(
    spec: str,
    scheme: str | None,
    m: int | None = None,
    n: int | None = None,
    *,
    num_classes: int = 1000,
    keep: Sequence[str] = (),
    options: dict[str, Any] | None = None,
    fp_model: Any | None = None,
    first_conv: str | None = None,
    classifier: str | None = None,
    layer_bases: dict[str, Any] | None = None,
) -> BuiltModel:
    """Build ``spec`` with random weights (never downloads) and binarize it.

    ``scheme=None`` leaves the model full precision. ``m``/``n`` default to the scheme's
    defaults. ``fp_model`` (a :class:`~binarize_cli.load.models.LoadedModel`) is deep-copied instead
    of building the architecture again. ``first_conv``/``classifier`` override the model's
    own (as a run's metadata may); ``layer_bases`` gives layers their own bases (a run's
    per-layer table, :func:`binarize_cli.convert.surgery.binarize_model`).
    """
    from binarize_cli.load.models import create_architecture

    loaded = (
        fp_model if fp_model is not None else create_architecture(spec, num_classes=num_classes)
    )
    model = copy.deepcopy(loaded.model) if fp_model is not None else loaded.model
    input_size = normalize_input_size(tuple(loaded.input_size))
    if scheme is None:
        return BuiltModel(model, loaded.spec, None, None, None, input_size, {}, [])
    from binarize_cli.convert.surgery import binarize_model

    sch = get_scheme(scheme)
    m = sch.default_m if m is None else m
    n = sch.default_n if n is None else n
    result = binarize_model(
        model,
        sch.name,
        m,
        n,
        keep=tuple(keep),
        first_conv=first_conv or loaded.first_conv,
        classifier=classifier or loaded.classifier,
        options=options,
        layer_bases=layer_bases,
    )
    decisions = {d.name: d for d in result.decisions}
    return BuiltModel(
        result.model, loaded.spec, sch.name, m, n, input_size, decisions, list(result.warnings)
    )


def analytic_report(
    spec: str,
    scheme: str = "pa",
    m: int | None = None,
    n: int | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    keep: Sequence[str] = (),
    num_classes: int = 1000,
) -> Report:
    """Memory/FLOPs/BOPs of ``spec`` binarized with ``scheme`` (M, N): no data, no weights.

    Args:
        spec: a model spec (``resnet18``, ``torchvision:resnet50``).
        scheme: a registered scheme name.
        m, n: bases; default the scheme's defaults.
        input_size: resolution (``224``) or ``[C, H, W]``; default the model's own.
        keep: ``--keep`` patterns.
        num_classes: classifier width (1000, ImageNet, like the paper).
    """
    built = build_binarized(spec, scheme, m, n, num_classes=num_classes, keep=keep)
    size = normalize_input_size(input_size, built.input_size[0]) if input_size else built.input_size
    prof = profile_model(built.model, size, decisions=built.decisions, model_name=built.spec)
    prof.scheme, prof.m, prof.n = built.scheme, built.m, built.n
    return Report(profile=prof, mode="analytic", warnings=built.warnings)


# --------------------------------------------------------------------------------------
# Run mode


def _run_decisions(meta: RunMetadata) -> dict[str, Any]:
    """Surgery's decisions for a run (rebuilt on a random architecture: reasons only)."""
    try:
        built = build_binarized(
            meta.model,
            meta.scheme,
            meta.M,
            meta.N,
            num_classes=meta.num_classes,
            keep=tuple(meta.keep),
            options=dict(meta.scheme_options),
            first_conv=meta.first_conv,
            classifier=meta.classifier,
            layer_bases=meta.layer_bases,
        )
    except BinarizeError:
        return {}
    return built.decisions


def weight_errors(model: nn.Module) -> dict[str, float]:
    """``||W - W_hat|| / ||W||`` (Frobenius) of every binarized layer, by module name."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, BinarizedConv2d):
                w = module.weight.detach()
                w_hat = module.quantized_weight().detach()
                norm = float(w.norm())
                out[name] = float((w - w_hat).norm()) / norm if norm > 0 else 0.0
    return out


def activation_errors(model: nn.Module, batch: torch.Tensor) -> dict[str, float | None]:
    """``||A - A_hat|| / ||A||`` of every binarized layer's input on ``batch``.

    ``A`` is captured by forward pre-hooks; ``A_hat`` is the layer's activation quantizer
    applied to it. Layers with ``N = 0`` (real activations) get ``None``.
    """
    errors: dict[str, float | None] = {}
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, BinarizedConv2d)}

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        assert isinstance(module, BinarizedConv2d)
        name = names[id(module)]
        if name in errors:
            return
        if module.activation_bases == 0:
            errors[name] = None
            return
        a = args[0].detach()
        a_hat = module.activation_quantizer(a).detach()
        norm = float(a.norm())
        errors[name] = float((a - a_hat).norm()) / norm if norm > 0 else 0.0

    binarized = [m for m in model.modules() if isinstance(m, BinarizedConv2d)]
    with evaluating(model, hooks=[m.register_forward_pre_hook(pre_hook) for m in binarized]):
        model(batch)
    return errors


_BATCHES: dict[str, torch.Tensor] = {}


def run_batch(meta: RunMetadata, batch_size: int = ERROR_BATCH) -> torch.Tensor:
    """The first ``batch_size`` validation images of a run's data (deterministic; cached per
    data spec, size and normalisation, so a report and its figures load the data once)."""
    from binarize_cli.load.data import load_data, make_loader

    kwargs = meta.data_kwargs()
    key = repr((meta.data, sorted(kwargs.items()), batch_size))
    if key not in _BATCHES:
        bundle = load_data(meta.data, **kwargs)
        loader = make_loader(bundle.val, batch_size=batch_size, shuffle=False, seed=0)
        images, _ = next(iter(loader))
        _BATCHES.clear()  # keep one batch: enough for one command
        _BATCHES[key] = images
    return _BATCHES[key]


def _accuracy(meta: RunMetadata) -> dict[str, dict[str, float] | None]:
    out: dict[str, dict[str, float] | None] = {}
    for stage in ACCURACY_STAGES:
        value = meta.accuracy.stage(stage)
        out[stage] = (
            None if value is None else {"top1": float(value.top1), "top5": float(value.top5)}
        )
    return out


def profile_input_size(
    meta: RunMetadata, override: int | Sequence[int] | None
) -> tuple[int, int, int]:
    if override:
        return normalize_input_size(override)
    if meta.input_size is not None:
        return normalize_input_size(meta.input_size)
    raise BadInputError("the run records no input_size; pass --input-size")


def run_report(
    path: str | Path | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    errors: bool = True,
    batch: torch.Tensor | None = None,
) -> Report:
    """Report of a run directory (``None``: the most recent under ``./runs``).

    Args:
        path: the run directory.
        input_size: profile at this resolution instead of the run's own (accounting only).
        errors: compute per-layer weight and activation errors.
        batch: the images for activation errors; default the first
            :data:`ERROR_BATCH` validation images of the run's data. When the data cannot be
            loaded, activation errors are skipped with a warning.
    """
    from binarize_cli.convert.rebuild import load_run

    run = load_run(path)
    return report_for_run(run, input_size=input_size, errors=errors, batch=batch)


def report_for_run(
    run: Any,
    *,
    input_size: int | Sequence[int] | None = None,
    errors: bool = True,
    batch: torch.Tensor | None = None,
) -> Report:
    """:func:`run_report` for an already loaded :class:`~binarize_cli.convert.rebuild.Run`."""
    meta = run.meta
    size = profile_input_size(meta, input_size)
    prof = profile_model(run.model, size, decisions=_run_decisions(meta), model_name=meta.model)
    prof.scheme, prof.m, prof.n = meta.scheme, meta.M, meta.N
    warnings: list[str] = []
    if errors:
        w_err = weight_errors(run.model)
        a_err: dict[str, float | None] = {}
        try:
            images = batch if batch is not None else run_batch(meta)
            a_err = activation_errors(run.model, images)
        except BinarizeError as exc:
            warnings.append(f"activation errors skipped: {exc}")
        for row in prof.layers:
            if row.binarized:
                row.weight_error = w_err.get(row.name)
                row.activation_error = a_err.get(row.name)
    add_sensitivity(prof, SensitivityTable.load(run.path))
    return Report(
        profile=prof,
        mode="run",
        run_dir=run.path,
        data=meta.data,
        accuracy=_accuracy(meta),
        warnings=warnings,
        fine_tuned=meta.fine_tuned,
    )


def add_sensitivity(profile: ModelProfile, table: SensitivityTable | None) -> None:
    """Give each measured layer of ``profile`` its candidates (``sensitivity``) and the output
    error at its own bases (``sensitivity_error``; 0 when kept full precision)."""
    if table is None:
        return
    for row in profile.layers:
        measured = table.layer(row.name)
        if measured is None:
            continue
        row.sensitivity = [asdict(c) for c in measured.candidates]
        chosen = measured.at((row.m, row.n) if row.binarized else None)
        row.sensitivity_error = None if chosen is None else chosen.output_error


# --------------------------------------------------------------------------------------
# Comparison across runs


@dataclass
class _Row:
    """The leading columns of a comparison row: a model under a scheme and (M, N), or full
    precision (``scheme``, ``m``, ``n`` None), and its memory."""

    label: str
    model: str
    scheme: str | None
    m: int | None
    n: int | None
    memory_bits: int

    def to_dict(self) -> dict[str, Any]:
        return contract_dict(self)


@dataclass
class CompareRow(_Row):
    """One row of ``--compare`` (paper Tables 3 and 6): a run, or a full-precision baseline."""

    flops: float
    top1: float | None
    top5: float | None
    data: str | None = None
    gap_top1: float | None = None
    gap_top5: float | None = None
    memory_saving: float | None = None
    speedup: float | None = None
    run_dir: str | None = None


def compare_reports(reports: Sequence[Report]) -> list[CompareRow]:
    """Comparison rows (paper Tables 3 and 6): a full-precision row per (model, data) first,
    then one row per run; ``gap_top1``/``gap_top5`` are
    :func:`~binarize_cli.core.metadata.accuracy_gap` of the run's fine-tuned model (its own
    full-precision top-1/top-5 minus its fine-tuned ones, percentage points)."""
    rows: list[CompareRow] = []
    for rep in reports:
        prof = rep.profile
        acc = rep.accuracy or {}
        fp = acc.get("fp")
        final = acc.get("binarized")
        rows.append(
            CompareRow(
                label=rep.run_dir.name if rep.run_dir is not None else str(prof.model),
                model=str(prof.model),
                scheme=prof.scheme,
                m=prof.m,
                n=prof.n,
                memory_bits=prof.memory_bits,
                flops=prof.flops,
                top1=final["top1"] if final else None,
                top5=final["top5"] if final else None,
                data=rep.data,
                gap_top1=accuracy_gap(fp["top1"] if fp else None, final["top1"] if final else None),
                gap_top5=accuracy_gap(fp["top5"] if fp else None, final["top5"] if final else None),
                memory_saving=prof.memory_saving,
                speedup=prof.speedup,
                run_dir=str(rep.run_dir) if rep.run_dir is not None else None,
            )
        )
    baselines: list[CompareRow] = []
    added: set[tuple[str, str | None]] = set()
    for rep in reports:
        fp = (rep.accuracy or {}).get("fp")
        model = str(rep.profile.model)
        if fp is None or (model, rep.data) in added:
            continue
        added.add((model, rep.data))
        baselines.append(
            CompareRow(
                label="full precision",
                model=model,
                scheme=None,
                m=None,
                n=None,
                memory_bits=rep.profile.fp_memory_bits,
                flops=float(rep.profile.fp_flops),
                top1=fp["top1"],
                top5=fp["top5"],
                data=rep.data,
                memory_saving=1.0,
                speedup=1.0,
            )
        )
    return baselines + rows


def compare_runs(
    paths: Sequence[str | Path], *, input_size: int | Sequence[int] | None = None
) -> list[CompareRow]:
    """``--compare``: one row per run plus a full-precision row per (model, data)."""
    if not paths:
        raise BadInputError("--compare needs at least one run directory")
    reports = [run_report(p, input_size=input_size, errors=False) for p in paths]
    return compare_reports(reports)


# --------------------------------------------------------------------------------------
# The paper's Table 7

#: Seed 002 (Zhu, Al-Ars, Pan, "Towards Lossless Binary Convolutional Neural Networks Using
#: Piecewise Approximation", ECAI 2020, doi:10.3233/FAIA200286), Table 7, as published:
#: (model, scheme) -> (memory Mbit, memory saving, FLOPs, speedup). ImageNet, 224x224.
#: Bi-Real is M = N = 1, ABC is M = N = 5 (Table 3), PA is M = 4, N = 5 (section 4.6).
PAPER_TABLE7: dict[tuple[str, str | None], tuple[float, float | None, float, float | None]] = {
    ("resnet18", "bireal"): (33.6, 11.14, 1.67e8, 10.86),
    ("resnet18", "abc"): (77.1, 4.85, 6.74e8, 2.70),
    ("resnet18", "pa"): (61.6, 6.08, 6.74e8, 2.70),
    ("resnet18", None): (374.1, None, 1.81e9, None),
    ("resnet34", "bireal"): (43.7, 15.97, 1.81e8, 18.99),
    ("resnet34", "abc"): (106.3, 6.56, 1.27e9, 2.88),
    ("resnet34", "pa"): (85.0, 8.20, 1.27e9, 2.88),
    ("resnet34", None): (697.3, None, 3.66e9, None),
    ("resnet50", "bireal"): (176.8, 4.62, 5.45e8, 7.08),
    ("resnet50", "abc"): (201.6, 4.06, 1.44e9, 2.68),
    ("resnet50", "pa"): (161.3, 5.07, 1.44e9, 2.68),
    ("resnet50", None): (817.8, None, 3.86e9, None),
}

#: The source of the paper figures ``report --paper`` sets beside ours.
PAPER_SOURCE = "PA-Net (Zhu, Al-Ars & Pan, ECAI 2020), Table 7"

#: The (scheme, M, N) of each Table 7 row family.
PAPER_CONFIGS: tuple[tuple[str | None, int | None, int | None, str], ...] = (
    ("bireal", 1, 1, "Bi-Real"),
    ("abc", 5, 5, "ABC"),
    ("pa", 4, 5, "PA"),
    (None, None, None, ""),
)

#: One-line explanation per row whose numbers differ from ours (docs/accounting.md, section 4).
PAPER_NOTES: dict[tuple[str, str | None], str] = {
    ("resnet18", "bireal"): "FLOPs +1.8% over the rule (Bi-Real's own paper: 1.63e8) [4.3]",
    ("resnet18", "abc"): "FLOPs: paper reuses PA's 6.74e8; M=N=5 costs 25/64 [4.4]",
    ("resnet18", "pa"): "FLOPs: paper adds ~15 real ops per binarized output [4.2]",
    ("resnet34", None): "697.3 Mbit = 21.79M params; the model has 21.80M [4.1]",
    ("resnet34", "bireal"): "FLOPs 1.81e8 misprint: its 18.99x speedup implies 1.93e8 [4.3]",
    ("resnet34", "abc"): "memory = paper's PA row + 1 bit/weight; FLOPs = PA's [4.4]",
    ("resnet34", "pa"): "memory 85.0 implies 16.9M binary weights, model has 21.3M [4.4]",
    ("resnet50", None): "FLOPs 3.86e9 = ResNet50 v1 (stride in 1x1); timm/tv are v1.5 [4.1]",
    ("resnet50", "bireal"): "FLOPs: v1 vs v1.5 (see the ResNet50 row) [4.1, 4.3]",
    ("resnet50", "abc"): "memory follows neither policy; FLOPs = PA's [4.4]",
    ("resnet50", "pa"): "FLOPs: v1 vs v1.5, plus ~15 real ops per output [4.1, 4.2]",
}


@dataclass
class PaperRow(_Row):
    """Our analytic numbers for one Table 7 row beside the published ones."""

    memory_saving: float | None
    flops: float
    speedup: float | None
    paper_memory_bits: float
    paper_memory_saving: float | None
    paper_flops: float
    paper_speedup: float | None
    note: str = ""

    @property
    def memory_diff(self) -> float:
        """Relative difference ours / paper - 1."""
        return self.memory_bits / self.paper_memory_bits - 1.0

    @property
    def flops_diff(self) -> float:
        return self.flops / self.paper_flops - 1.0

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["memory_diff"] = self.memory_diff
        d["flops_diff"] = self.flops_diff
        return d


def paper_comparison(
    models: Sequence[str] = ("resnet18", "resnet34", "resnet50"),
    *,
    input_size: int = 224,
    family: str = "torchvision",
) -> list[PaperRow]:
    """Table 7: each model full precision and under Bi-Real (1,1), ABC (5,5) and PA (4,5).

    The architectures are built with random weights (``family:model``, torchvision by default:
    the paper's ResNets are torchvision's) and profiled at ``input_size``.
    """
    from binarize_cli.load.models import create_architecture

    rows: list[PaperRow] = []
    size = normalize_input_size(input_size)
    for model in models:
        arch = model.split(":", 1)[-1]
        spec = model if ":" in model else f"{family}:{model}"
        loaded = create_architecture(spec, num_classes=1000)
        fp = profile_model(loaded.model, size, model_name=loaded.spec)
        for scheme, m, n, name in PAPER_CONFIGS:
            if scheme is None:
                prof = fp
            else:
                built = build_binarized(spec, scheme, m, n, fp_model=loaded)
                prof = profile_model(
                    built.model, size, decisions=built.decisions, model_name=built.spec
                )
            key = (arch, scheme)
            paper = PAPER_TABLE7.get(key)
            if paper is None:
                continue
            label = f"{name} {arch}".strip() if name else arch
            rows.append(
                PaperRow(
                    label=label.replace("resnet", "ResNet"),
                    model=loaded.spec,
                    scheme=scheme,
                    m=m,
                    n=n,
                    memory_bits=prof.memory_bits,
                    memory_saving=fp.memory_bits / prof.memory_bits if scheme else None,
                    flops=prof.flops,
                    speedup=fp.flops / prof.flops if scheme else None,
                    paper_memory_bits=paper[0] * 1e6,
                    paper_memory_saving=paper[1],
                    paper_flops=paper[2],
                    paper_speedup=paper[3],
                    note=PAPER_NOTES.get(key, ""),
                )
            )
    return rows


# --------------------------------------------------------------------------------------
# Figure data (--plot)

#: The paper's Fig. 4 / Fig. 5 layers (ResNet18 group2/block1/conv1 and conv2).
PAPER_WEIGHT_LAYER = "layer2.0.conv1"
PAPER_ACTIVATION_LAYER = "layer2.0.conv2"


@dataclass
class LayerSamples:
    """A binarized layer's real tensor and its approximation, for a histogram figure."""

    layer: str
    scheme: str
    bases: int
    original: torch.Tensor
    approx: torch.Tensor


@dataclass
class PlotData:
    """What ``--plot`` draws: weight and activation samples, accuracy-memory points, the
    fine-tune's per-epoch record and its kept epoch, and the run's sensitivity table with
    each layer's chosen bases (``chosen``: name -> ``[M, N]`` or None; ``default_bases``
    for the layers it does not name: an older run's M, N)."""

    weights: LayerSamples | None
    activations: LayerSamples | None
    points: list[Any]  # plots.AccuracyPoint
    epochs: list[dict[str, Any]] = field(default_factory=list)
    kept_epoch: int | None = None
    sensitivity: SensitivityTable | None = None
    chosen: dict[str, Any] = field(default_factory=dict)
    default_bases: tuple[int, int] | None = None


def default_plot_layers(model: nn.Module) -> tuple[str, str]:
    """Layers for the weight and activation figures: the paper's (ResNet18 layer2.0.conv1
    and layer2.0.conv2) when present and binarized, else the middle binarized layer and the
    next one (with real activations skipped for the activation figure)."""
    binarized = [(n, m) for n, m in model.named_modules() if isinstance(m, BinarizedConv2d)]
    if not binarized:
        raise BadInputError("the model has no binarized layer to plot")
    names = [n for n, _ in binarized]
    w_layer = PAPER_WEIGHT_LAYER if PAPER_WEIGHT_LAYER in names else names[len(names) // 2]
    with_acts = [n for n, m in binarized if m.activation_bases > 0]
    if PAPER_ACTIVATION_LAYER in with_acts:
        a_layer = PAPER_ACTIVATION_LAYER
    elif with_acts:
        after = [n for n in with_acts if names.index(n) > names.index(w_layer)]
        a_layer = after[0] if after else with_acts[-1]
    else:
        a_layer = ""
    return w_layer, a_layer


def layer_samples(
    model: nn.Module,
    batch: torch.Tensor | None,
    *,
    weight_layer: str | None = None,
    activation_layer: str | None = None,
) -> tuple[LayerSamples | None, LayerSamples | None]:
    """``(W, W_hat)`` of ``weight_layer`` and ``(A, A_hat)`` of ``activation_layer``'s input on
    ``batch`` (``None`` without a batch or when the layer keeps real activations)."""
    modules = dict(model.named_modules())
    default_w, default_a = default_plot_layers(model)
    weight_layer = weight_layer or default_w
    activation_layer = activation_layer if activation_layer is not None else default_a
    for name in (weight_layer, activation_layer):
        if name and not isinstance(modules.get(name), BinarizedConv2d):
            raise BadInputError(f"layer {name!r} is not a binarized convolution of the model")
    wl = modules[weight_layer]
    assert isinstance(wl, BinarizedConv2d)
    with torch.no_grad():
        w = LayerSamples(
            weight_layer,
            wl.scheme_name,
            wl.weight_bases,
            wl.weight.detach().clone(),
            wl.quantized_weight().detach().clone(),
        )
    a: LayerSamples | None = None
    if batch is not None and activation_layer:
        al = modules[activation_layer]
        assert isinstance(al, BinarizedConv2d)
        captured: list[torch.Tensor] = []
        hook = al.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        with evaluating(model, hooks=[hook]):
            model(batch)
        x = captured[0]
        with torch.no_grad():
            a = LayerSamples(
                activation_layer,
                al.scheme_name,
                al.activation_bases,
                x,
                al.activation_quantizer(x).detach(),
            )
    return w, a


def accuracy_points(reports: Sequence[Report]) -> list[Any]:
    """Accuracy-memory points: each run's fine-tuned model and each model's FP baseline."""
    from binarize_cli.analyze.plots import AccuracyPoint

    points: list[AccuracyPoint] = []
    for row in compare_reports(reports):
        if row.top1 is None:
            continue
        if row.scheme is None:
            label = f"{row.model} FP"
        else:
            label = f"{row.label}: {row.scheme} M={row.m} N={row.n}"
        points.append(AccuracyPoint(label, row.memory_bits, row.top1, row.scheme is None))
    return points


def plot_data(
    run: Any,
    reports: Sequence[Report],
    *,
    batch: torch.Tensor | None = None,
    weight_layer: str | None = None,
    activation_layer: str | None = None,
) -> PlotData:
    """Everything ``--plot`` draws for a loaded run and the compared runs' reports.

    The activation figure needs a batch of the run's data; when it cannot be loaded, only
    the weight and accuracy figures are drawn.
    """
    if batch is None:
        try:
            batch = run_batch(run.meta)
        except BinarizeError:
            batch = None
    w, a = layer_samples(
        run.model, batch, weight_layer=weight_layer, activation_layer=activation_layer
    )
    return PlotData(
        weights=w,
        activations=a,
        points=accuracy_points(reports),
        epochs=list(run.meta.finetune_epochs),
        kept_epoch=run.meta.finetune_kept_epoch,
        sensitivity=SensitivityTable.load(run.path),
        chosen=dict(run.meta.layer_bases or {}),
        default_bases=(run.meta.M, run.meta.N),
    )
