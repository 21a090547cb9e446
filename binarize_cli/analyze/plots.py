"""Figures for ``binarize report --plot`` (matplotlib, Agg backend: no display needed).

* :func:`weight_histogram`: a layer's full-precision weights ``W`` and their approximation
  ``W_hat = sum_i alpha_i T_i`` on the same bins (paper Fig. 4, which uses ResNet18
  group2/block1/conv1 with M = 8);
* :func:`activation_histogram`: a layer's real input activations ``A`` and
  ``A_hat = sum_j beta_j V_j`` (paper Fig. 5: ResNet18 group2/block1/conv2, N = 5);
* :func:`accuracy_memory`: top-1 against memory across compared runs (full-precision
  baselines included), the trade-off of the paper's Tables 3 and 7 in one picture;
* :func:`sensitivity_map`: each layer's measured output error at every candidate (M, N)
  (docs/sensitivity.md), the run's chosen bases marked.

Each returns a :class:`matplotlib.figure.Figure` (tests inspect its artists);
:func:`save_figure` writes a PNG atomically (no partial files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from binarize_cli.core.files import StagedFile  # noqa: E402

#: Histogram bins of the distribution figures.
BINS = 121
FP_COLOR = "#4c72b0"
APPROX_COLOR = "#dd8452"

#: What the histograms accept: a tensor or an array of any shape (flattened).
Values = torch.Tensor | np.ndarray


def _as_array(x: Values, limit: int = 2_000_000) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.reshape(-1).astype(np.float64)
    if a.size > limit:  # deterministic subsample of very large activation tensors
        a = a[:: int(np.ceil(a.size / limit))]
    return a


@dataclass(frozen=True)
class _Quantity:
    """What a distribution figure shows: the weights (``W``, ``M``) or activations (``A``, ``N``)."""

    title: str  # "Weights" -> "Weights of layer2.0.conv1 (pa M=4)"
    value: str  # the x axis: "<value> value"
    symbol: str  # the legend: "full precision W", "approximation W_hat (pa M=4)"
    bases: str  # "M" or "N"
    log: bool  # log counts


_WEIGHTS = _Quantity("Weights", "weight", "W", "M", log=False)
_ACTIVATIONS = _Quantity("Input activations", "activation", "A", "N", log=True)


def _distribution(
    q: _Quantity, original: Values, approx: Values, layer: str, scheme: str, count: int | None
) -> Figure:
    """``original`` and ``approx`` of one layer on shared bins, titled with the relative
    error and the number of distinct approximated values; a ``None`` count (or an empty
    scheme) is left out of the title and legend."""
    what = f"{scheme} {q.bases}={count}" if count is not None else scheme
    approx_label = f"approximation {q.symbol}_hat ({what})".replace(" ()", "")
    a, b = _as_array(original), _as_array(approx)
    lo = float(min(a.min(initial=0.0), b.min(initial=0.0)))
    hi = float(max(a.max(initial=0.0), b.max(initial=0.0)))
    if hi <= lo:
        hi = lo + 1.0
    bins = np.linspace(lo, hi, BINS + 1)
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(a, bins=bins, color=FP_COLOR, alpha=0.55, label=f"full precision {q.symbol}", log=q.log)
    ax.hist(b, bins=bins, color=APPROX_COLOR, alpha=0.75, label=approx_label, log=q.log, rwidth=0.6)
    rel = (
        float(np.linalg.norm(a - b) / np.linalg.norm(a))
        if a.shape == b.shape and np.any(a)
        else None
    )
    levels = np.unique(b).size
    info = f"{levels} distinct approximated values"
    if rel is not None:
        info += f", relative error {rel:.3f}"
    title = f"{q.title} of {layer} ({what})".replace(" ()", "")
    ax.set_title(f"{title}\n{info}", fontsize=10)
    ax.set_xlabel(f"{q.value} value")
    ax.set_ylabel("count" + (" (log)" if q.log else ""))
    ax.legend()
    return fig


def weight_histogram(
    weight: Values, approx: Values, *, layer: str = "", scheme: str = "", m: int | None = None
) -> Figure:
    """Histogram of ``W`` and ``W_hat`` on shared bins (paper Fig. 4)."""
    return _distribution(_WEIGHTS, weight, approx, layer, scheme, m)


def activation_histogram(
    activation: Values, approx: Values, *, layer: str = "", scheme: str = "", n: int | None = None
) -> Figure:
    """Histogram of ``A`` and ``A_hat`` on shared bins, log counts (paper Fig. 5)."""
    return _distribution(_ACTIVATIONS, activation, approx, layer, scheme, n)


@dataclass
class AccuracyPoint:
    """One point of :func:`accuracy_memory`."""

    label: str
    memory_bits: float
    top1: float
    full_precision: bool = False


def accuracy_memory(points: Sequence[AccuracyPoint], *, title: str = "") -> Figure:
    """Top-1 accuracy against memory (Mbit, log scale); full-precision baselines as squares."""
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    groups = (
        ([p for p in points if not p.full_precision], "o", APPROX_COLOR, "binarized"),
        ([p for p in points if p.full_precision], "s", FP_COLOR, "full precision"),
    )
    for pts, marker, color, label in groups:
        if not pts:
            continue
        ax.scatter(
            [p.memory_bits / 1e6 for p in pts],
            [p.top1 for p in pts],
            marker=marker,
            color=color,
            label=label,
            zorder=3,
        )
        for p in pts:
            ax.annotate(
                p.label,
                (p.memory_bits / 1e6, p.top1),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.12)  # room for the point labels
    ax.set_xlabel("memory (Mbit, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Accuracy against memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def training_curve(epochs: Sequence[Mapping[str, Any]], *, kept: int | None = None) -> Figure:
    """The fine-tune's per-epoch record (``binarize.json``'s ``finetune_epochs``, the rows
    of ``metrics.csv``): loss on the left; training (running), selection-subset and
    validation top-1 on the right; the kept epoch marked by a dashed line."""
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    x = list(range(1, len(epochs) + 1))
    loss_ax.plot(x, [e.get("loss", np.nan) for e in epochs], marker="o", color=FP_COLOR)
    loss_ax.set_ylabel("training loss")
    series = (
        ("top1", "train (running)"),
        ("select_top1", "selection subset"),
        ("val_top1", "validation"),
    )
    for key, label in series:
        values = [e.get(key) for e in epochs]
        if any(v is not None for v in values):
            acc_ax.plot(x, [np.nan if v is None else v for v in values], marker="o", label=label)
    acc_ax.set_ylabel("top-1 accuracy (%)")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("fine-tune epoch")
        ax.set_xticks(x)
        ax.grid(True, alpha=0.3)
        if kept is not None:
            ax.axvline(kept, color=APPROX_COLOR, linestyle="--", alpha=0.7, label="kept")
    fig.suptitle(f"Fine-tuning ({len(epochs)} epochs" + (f", epoch {kept} kept)" if kept else ")"))
    return fig


def sensitivity_map(
    table: Any, chosen: Mapping[str, Sequence[int] | None], *, default: Sequence[int] | None = None
) -> Figure:
    """A heat map of a :class:`~binarize_cli.convert.sensitivity.SensitivityTable`: one row
    per layer, one column per candidate ``M/N`` (``fp`` first: error 0), colour
    ``log10(output_error)``; a box marks each layer's ``chosen`` bases (``default`` for a
    layer ``chosen`` does not name)."""
    layers = list(table.layers)
    keys = sorted({c.bases for r in layers for c in r.candidates if c.bases is not None})
    columns: list[tuple[int, int] | None] = [None, *keys]
    grid = np.full((len(layers), len(columns)), np.nan)
    for i, row in enumerate(layers):
        for j, key in enumerate(columns):
            c = row.at(key)
            if c is not None and key is not None:
                grid[i, j] = np.log10(max(c.output_error, 1e-12))
    fig = Figure(figsize=(1.2 + 0.5 * len(columns), 1.2 + 0.28 * len(layers)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log10 relative logit error")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(["fp" if k is None else f"{k[0]}/{k[1]}" for k in columns], rotation=90)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([r.name for r in layers], fontsize=7)
    ax.set_xlabel("candidate M/N (N 0: real activations)")
    for i, row in enumerate(layers):
        pick = chosen.get(row.name, default)
        key = None if pick is None else (int(pick[0]), int(pick[1]))
        if key in columns:
            j = columns.index(key)
            ax.add_patch(
                matplotlib.patches.Rectangle(
                    (j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5
                )
            )
    ax.set_title(f"Per-layer sensitivity ({table.scheme}, {table.images} images); box: chosen")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG at ``path``, atomically (:class:`~binarize_cli.core.files.StagedFile`)."""
    path = Path(path)
    with StagedFile(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "model"


def write_figures(data: object, out_dir: str | Path) -> list[Path]:
    """Draw and save a :class:`binarize_cli.analyze.report.PlotData`; returns the files written.

    Files: ``weights_<layer>.png``, ``activations_<layer>.png`` (when a data batch was
    available), ``accuracy_memory.png`` (when accuracies are known),
    ``training_curve.png`` (when the run fine-tuned) and ``sensitivity.png`` (when the run
    measured its sensitivity).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        from binarize_cli.core.errors import BadInputError

        raise BadInputError(f"--plot {out} is a file; pass a directory for the figures")
    figures: list[tuple[Figure, Path]] = []
    w = getattr(data, "weights", None)
    if w is not None:
        fig = weight_histogram(w.original, w.approx, layer=w.layer, scheme=w.scheme, m=w.bases)
        figures.append((fig, out / f"weights_{_slug(w.layer)}.png"))
    a = getattr(data, "activations", None)
    if a is not None:
        fig = activation_histogram(a.original, a.approx, layer=a.layer, scheme=a.scheme, n=a.bases)
        figures.append((fig, out / f"activations_{_slug(a.layer)}.png"))
    points = list(getattr(data, "points", None) or [])
    if points:
        figures.append((accuracy_memory(points), out / "accuracy_memory.png"))
    epochs = list(getattr(data, "epochs", None) or [])
    if epochs:
        kept = getattr(data, "kept_epoch", None)
        figures.append((training_curve(epochs, kept=kept), out / "training_curve.png"))
    table = getattr(data, "sensitivity", None)
    if table is not None:
        chosen = getattr(data, "chosen", None) or {}
        figures.append(
            (
                sensitivity_map(table, chosen, default=getattr(data, "default_bases", None)),
                out / "sensitivity.png",
            )
        )
    return [save_figure(fig, path) for fig, path in figures]
