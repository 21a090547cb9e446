"""Rich tables for ``binarize report``, built from :mod:`binarize_cli.analyze.report`'s data.

Nothing here computes a figure: every number comes from a :class:`~binarize_cli.analyze.report.Report`,
:class:`~binarize_cli.analyze.report.CompareRow` or :class:`~binarize_cli.analyze.report.PaperRow`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from binarize_cli.analyze.profile import LayerProfile, ModelProfile
from binarize_cli.analyze.report import (
    ACCURACY_STAGES,
    PAPER_SOURCE,
    CompareRow,
    PaperRow,
    Report,
)
from binarize_cli.core.metadata import GAP_DEFINITION, accuracy_gap
from binarize_cli.core.rundir import RunEntry

STAGE_NAMES = {"fp": "full precision", "calibrated": "calibrated", "binarized": "fine-tuned"}


def mbit(bits: float) -> str:
    """Megabits: two decimals, or two significant digits below 0.1 Mbit (small layers)."""
    v = bits / 1e6
    return f"{v:,.2f}" if v >= 0.1 or v == 0 else f"{v:.2g}"


def sci(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits - 1}e}".replace("e+0", "e").replace("e+", "e")


def ratio(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}x"


def pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def signed_pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def shape(s: tuple[int, ...] | None) -> str:
    return "x".join(str(v) for v in s) if s else "-"


def _precision(row: LayerProfile) -> str:
    return "binary" if row.binarized else "fp32"


def _shape_text(row: LayerProfile) -> str:
    """``C_in->C_out @HxW`` (output spatial size), or the raw shapes for other layers."""
    if row.input_shape is None or row.output_shape is None:
        return "-"
    i, o = row.input_shape, row.output_shape
    if len(i) >= 2 and len(o) >= 2 and len(o) == len(i):
        return f"{i[0]}->{o[0]} @{shape(o[1:])}"
    return f"{shape(i)}->{shape(o)}"


def _is_compute_row(row: LayerProfile) -> bool:
    return row.binarized or row.macs > 0


#: The narrowest a wrapping column (a reason, a note) gets.
WRAP_MIN_WIDTH = 10


@dataclass(frozen=True)
class Col:
    """A column of a fitted table: ``key`` names it in rows and drop orders, ``header`` is
    shown; a ``wrap`` column folds its text onto more lines, the others never shorten."""

    key: str
    header: str = ""
    right: bool = False
    wrap: bool = False
    footer: str = ""


Cell = str | Text
Row = tuple[dict[str, Cell], str | None]  # cells by column key, row style


def _grid(
    title: str,
    cols: Sequence[Col],
    rows: Sequence[Row],
    *,
    probe: bool,
    footer: bool,
    simple: bool,
    fold_all: bool = False,
) -> Table:
    table = Table(
        title=title,
        header_style="bold",
        show_footer=footer,
        box=box.SIMPLE_HEAD if simple else box.HEAVY_HEAD,
    )
    for c in cols:
        table.add_column(
            c.header or c.key,
            footer=c.footer,
            justify="right" if c.right else "left",
            no_wrap=not (c.wrap or fold_all),
            overflow="fold",
            ratio=1 if c.wrap and not probe else None,
            min_width=WRAP_MIN_WIDTH if c.wrap else None,
        )
    for cells, style in rows:
        values = [cells.get(c.key, "") for c in cols]
        if probe:  # wrapping cells at their narrowest: the table's least width
            values = [
                (v[:WRAP_MIN_WIDTH] if isinstance(v, str) else v) if c.wrap else v
                for c, v in zip(cols, values, strict=True)
            ]
        table.add_row(*values, style=style)
    return table


def _fits(
    title: str, cols: Sequence[Col], rows: Sequence[Row], width: int, *, footer: bool, simple: bool
) -> bool:
    """Whether the table can be drawn in ``width`` characters with no cell shortened."""
    probe = _grid(title, cols, rows, probe=True, footer=footer, simple=simple)
    measure = Console(width=100_000)
    return Measurement.get(measure, measure.options, probe).maximum <= width


def fitted_table(
    title: str,
    cols: Sequence[Col],
    rows: Sequence[Row],
    *,
    width: int | None,
    drop: Sequence[str],
    caption: str = "",
    footer: bool = False,
    simple: bool = True,
) -> Table:
    """A table of ``cols`` that fits ``width`` characters with no cell shortened: columns are
    dropped in ``drop`` order (keys) until it does, and the caption names them (the full
    data stays in ``--json``, and on a terminal wide enough nothing is dropped). Wrapping
    columns count at :data:`WRAP_MIN_WIDTH`; if the table is still too wide, every cell
    folds onto more lines (never cut to "…"). ``width`` None: every column."""
    kept = list(cols)
    dropped: list[str] = []
    for key in drop:
        if width is None or _fits(title, kept, rows, width, footer=footer, simple=simple):
            break
        for c in [c for c in kept if c.key == key]:
            kept.remove(c)
            dropped.append(c.header or c.key)
    # Still too wide with every optional column gone: cells fold onto more lines.
    fold_all = width is not None and not _fits(
        title, kept, rows, width, footer=footer, simple=simple
    )
    table = _grid(title, kept, rows, probe=False, footer=footer, simple=simple, fold_all=fold_all)
    notes = [caption] if caption else []
    if dropped:
        notes.append(f"not shown at this width: {', '.join(dropped)} (see --json)")
    if notes:
        table.caption = "; ".join(notes)
    return table


#: Layers-table columns dropped, in this order, until it fits the console.
DROP_ORDER = (
    "flops",
    "macs",
    "kind",
    "why",
    "m",
    "n",
    "params",
    "a_err",
    "w_err",
    "bops",
    "sens",
)


def _layer_cells(r: LayerProfile, errors: bool) -> dict[str, Cell]:
    cells: dict[str, Cell] = {
        "layer": r.name,
        "kind": r.kind,
        "shape": _shape_text(r),
        "prec": _precision(r),
        "m": "-" if r.m is None else str(r.m),
        "n": "-" if r.n is None else str(r.n),
        "why": r.reason,
        "params": f"{r.fp_params:,}",
        "mbit": mbit(r.bits),
        "macs": sci(r.macs) if r.macs else "-",
        "bops": sci(r.bops) if r.bops else "-",
        "flops": sci(r.flops) if r.macs else "-",
    }
    if errors:
        cells["w_err"] = "-" if r.weight_error is None else f"{r.weight_error:.3f}"
        cells["a_err"] = "-" if r.activation_error is None else f"{r.activation_error:.3f}"
        cells["sens"] = "-" if r.sensitivity_error is None else f"{r.sensitivity_error:.2g}"
    return cells


def layer_table(profile: ModelProfile, *, errors: bool = False, width: int | None = None) -> Table:
    """The per-layer table (Larq's model summary): conv/linear rows, the parameter-only
    layers (batch norm, ...) folded into one row, and the totals as the footer; with
    ``errors``, each layer's weight and activation approximation errors ("W err", "A err":
    ``||W - W_hat|| / ||W||`` and ``||A - A_hat|| / ||A||``, Frobenius norms).

    When the run measured its sensitivity, a "sens." column: the network's relative logit
    error with the layer alone binarized at its own bases (docs/sensitivity.md).

    With ``width``, columns go in :data:`DROP_ORDER` until the table fits without
    shortening a cell (:func:`fitted_table`). ``--json`` lists every row and field."""
    compute = [r for r in profile.layers if _is_compute_row(r)]
    rest = [r for r in profile.layers if not _is_compute_row(r)]
    cols = [
        Col("layer", footer="total"),
        Col("kind"),
        Col("shape"),
        Col("prec", "prec."),
        Col("m", "M", right=True),
        Col("n", "N", right=True),
        Col("why", wrap=True),
        Col("params", right=True, footer=f"{sum(r.fp_params for r in profile.layers):,}"),
        Col("mbit", "Mbit", right=True, footer=mbit(profile.memory_bits)),
        Col("macs", "MACs", right=True, footer=sci(profile.macs)),
        Col("bops", "BOPs", right=True, footer=sci(profile.bops)),
        Col("flops", "FLOPs", right=True, footer=sci(profile.flops)),
    ]
    if errors:
        cols += [Col("w_err", "W err", right=True), Col("a_err", "A err", right=True)]
    sens = errors and any(r.sensitivity_error is not None for r in profile.layers)
    if sens:
        cols.append(Col("sens", "sens.", right=True))
    rows: list[Row] = [(_layer_cells(r, errors), None if r.binarized else "dim") for r in compute]
    if rest:
        folded: dict[str, Cell] = {
            "layer": f"+{len(rest)} parameter layers",
            "kind": ", ".join(sorted({r.module for r in rest})),
            "prec": "fp32",
            "m": "-",
            "n": "-",
            "why": "no MACs counted",
            "params": f"{sum(r.fp_params for r in rest):,}",
            "mbit": mbit(sum(r.bits for r in rest)),
            "macs": "-",
            "bops": "-",
            "flops": "-",
        }
        rows.append((folded, "dim"))
    caption = "W err, A err: relative approximation errors (docs/accounting.md)" if errors else ""
    if sens:
        caption += "; sens.: relative logit error, this layer alone binarized (docs/sensitivity.md)"
    return fitted_table(
        "Layers", cols, rows, width=width, drop=DROP_ORDER, caption=caption, footer=True
    )


def totals_table(profile: ModelProfile) -> Table:
    """Full precision against binarized: parameters, memory, FLOPs, BOPs."""
    table = Table(title="Totals (paper 4.6.1 accounting)", header_style="bold")
    table.add_column("")
    table.add_column("full precision", justify="right")
    table.add_column("binarized", justify="right")
    table.add_column("ratio", justify="right")
    fp_params = sum(r.fp_params for r in profile.layers)
    table.add_row(
        "parameters (32-bit / binary values)",
        f"{fp_params:,} / 0",
        f"{profile.params_real:,} / {profile.params_binary:,}",
        "",
    )
    table.add_row(
        "memory (Mbit)",
        mbit(profile.fp_memory_bits),
        mbit(profile.memory_bits),
        ratio(profile.memory_saving),
    )
    table.add_row("FLOPs", sci(profile.fp_flops), sci(profile.flops), ratio(profile.speedup))
    table.add_row("BOPs", "0", sci(profile.bops), "")
    return table


def accuracy_table(
    accuracy: dict[str, dict[str, float] | None], *, fine_tuned: bool = True
) -> Table:
    """Top-1/top-5 of the full-precision baseline, the calibrated and the fine-tuned model
    (not shown when the run did not fine-tune: ``--epochs 0``), and their gaps
    (:func:`~binarize_cli.core.metadata.accuracy_gap`)."""
    table = Table(title="Accuracy", header_style="bold", caption=GAP_DEFINITION)
    for col in ("model", "top-1 %", "top-5 %", "top-1 gap", "top-5 gap"):
        table.add_column(col, justify="left" if col == "model" else "right")
    fp = accuracy.get("fp")
    for stage in ACCURACY_STAGES if fine_tuned else ACCURACY_STAGES[:2]:
        acc = accuracy.get(stage)
        if acc is None:
            table.add_row(STAGE_NAMES[stage], "-", "-", "-", "-")
            continue
        gap1 = accuracy_gap(fp["top1"], acc["top1"]) if fp and stage != "fp" else None
        gap5 = accuracy_gap(fp["top5"], acc["top5"]) if fp and stage != "fp" else None
        table.add_row(STAGE_NAMES[stage], pct(acc["top1"]), pct(acc["top5"]), pct(gap1), pct(gap5))
    return table


def render_report(report: Report, width: int | None = None) -> RenderableType:
    """Header, per-layer table, totals, and accuracy for a run; ``width``: the console's,
    which the per-layer table fits by dropping columns (:func:`layer_table`)."""
    p = report.profile
    head = Text()
    head.append(f"{p.model}", style="bold")
    if p.scheme:
        head.append(f"  scheme {p.scheme}  M={p.m}  N={p.n}")
    head.append(f"  input {shape(p.input_size)}")
    if report.run_dir is not None:
        head.append(f"  run {report.run_dir}")
    parts: list[RenderableType] = [
        head,
        layer_table(p, errors=report.mode == "run", width=width),
        totals_table(p),
    ]
    if report.accuracy is not None:
        parts.append(accuracy_table(report.accuracy, fine_tuned=report.fine_tuned))
    for w in list(p.warnings) + list(report.warnings):
        parts.append(Text(f"warning: {w}", style="yellow"))
    return Group(*parts)


#: ``--compare`` columns dropped, in this order, until the table fits the console.
COMPARE_DROP_ORDER = ("top5_gap", "top5", "flops", "speedup", "model", "data", "mbit")


def compare_table(rows: Sequence[CompareRow], width: int | None = None) -> Table:
    """``--compare``: scheme, M, N, memory, FLOPs, top-1/top-5 and the gaps (Tables 3, 6);
    with ``width``, fitted by :func:`fitted_table` (:data:`COMPARE_DROP_ORDER`)."""
    cols = [
        Col("run"),
        Col("model"),
        Col("data"),
        Col("scheme"),
        Col("m", "M", right=True),
        Col("n", "N", right=True),
        Col("mbit", "Mbit", right=True),
        Col("saving", right=True),
        Col("flops", "FLOPs", right=True),
        Col("speedup", right=True),
        Col("top1", "top-1 %", right=True),
        Col("top5", "top-5 %", right=True),
        Col("top1_gap", "top-1 gap", right=True),
        Col("top5_gap", "top-5 gap", right=True),
    ]
    grid: list[Row] = [
        (
            {
                "run": r.label,
                "model": r.model,
                "data": r.data or "-",
                "scheme": r.scheme or "full precision",
                "m": "-" if r.m is None else str(r.m),
                "n": "-" if r.n is None else ("fp" if r.n == 0 else str(r.n)),
                "mbit": mbit(r.memory_bits),
                "saving": ratio(r.memory_saving),
                "flops": sci(r.flops),
                "speedup": ratio(r.speedup),
                "top1": pct(r.top1),
                "top5": pct(r.top5),
                "top1_gap": pct(r.gap_top1),
                "top5_gap": pct(r.gap_top5),
            },
            None,
        )
        for r in rows
    ]
    return fitted_table(
        "Runs compared",
        cols,
        grid,
        width=width,
        drop=COMPARE_DROP_ORDER,
        caption=GAP_DEFINITION,
        simple=False,
    )


#: ``--paper`` columns dropped, in this order, until the table fits the console (after the
#: notes, which then go below the table).
PAPER_DROP_ORDER = ("saving", "paper_saving", "speedup", "paper_speedup")


def paper_table(rows: Sequence[PaperRow], width: int | None = None) -> RenderableType:
    """``--paper``: our analytic numbers beside the paper's Table 7 (PA-Net, Zhu, Al-Ars &
    Pan, ECAI 2020); with ``width``, fitted by :func:`fitted_table`, each row's note then
    printed below the table."""
    cols = [
        Col("model"),
        Col("mbit", "Mbit", right=True),
        Col("paper_mbit", "paper", right=True),
        Col("mbit_diff", "diff", right=True),
        Col("saving", right=True),
        Col("paper_saving", "paper", right=True),
        Col("flops", "FLOPs", right=True),
        Col("paper_flops", "paper", right=True),
        Col("flops_diff", "diff", right=True),
        Col("speedup", right=True),
        Col("paper_speedup", "paper", right=True),
        Col("note", wrap=True),
    ]
    grid: list[Row] = []
    for r in rows:
        mem_ok = abs(r.memory_diff) <= 0.005
        flops_ok = abs(r.flops_diff) <= 0.005
        cells: dict[str, Cell] = {
            "model": r.label,
            "mbit": mbit(r.memory_bits),
            "paper_mbit": f"{r.paper_memory_bits / 1e6:.1f}",
            "mbit_diff": Text(signed_pct(r.memory_diff), style="green" if mem_ok else "red"),
            "saving": ratio(r.memory_saving),
            "paper_saving": ratio(r.paper_memory_saving),
            "flops": sci(r.flops),
            "paper_flops": sci(r.paper_flops),
            "flops_diff": Text(signed_pct(r.flops_diff), style="green" if flops_ok else "red"),
            "speedup": ratio(r.speedup),
            "paper_speedup": ratio(r.paper_speedup),
            "note": r.note,
        }
        grid.append((cells, None))
    title = f"{PAPER_SOURCE}, 224x224: ours vs paper"
    if width is None or _fits(title, cols, grid, width, footer=False, simple=False):
        notes: list[Text] = []
    else:  # the notes go below the table, one line each
        cols = [c for c in cols if c.key != "note"]
        notes = [Text(f"{r.label}: {r.note}") for r in rows if r.note]
    table = fitted_table(
        title,
        cols,
        grid,
        width=width,
        drop=PAPER_DROP_ORDER,
        caption="differences explained in docs/accounting.md",
        simple=False,
    )
    return Group(table, *notes) if notes else table


#: ``binarize runs`` columns dropped, in this order, until the table fits the console.
RUNS_DROP_ORDER = ("model", "calib.", "data", "fp")


def runs_table(entries: Sequence[RunEntry], width: int | None = None) -> RenderableType:
    """``binarize runs``: one row per run directory, newest first, as
    :func:`~binarize_cli.core.rundir.list_runs` orders them (scheme as ``name M/N``, top-1
    accuracies in %, the date ``created``); a damaged one is named in the table and its
    error printed below it. With ``width``, fitted by :func:`fitted_table`
    (:data:`RUNS_DROP_ORDER`; ``--json`` has every field)."""
    cols = [
        Col("run"),
        Col("model"),
        Col("scheme"),
        Col("data"),
        Col("fp", right=True),
        Col("calib.", right=True),
        Col("binarized", right=True),
        Col("date"),
    ]
    grid: list[Row] = []
    for e in entries:
        if e.meta is None:
            grid.append(({"run": e.path.name, "model": "error (below)", "scheme": "error"}, "red"))
            continue
        m = e.meta
        top1 = {s: m.accuracy.stage(s) for s in ACCURACY_STAGES}
        cells: dict[str, Cell] = {
            "run": e.path.name,
            "model": m.model,
            "scheme": f"{m.scheme} {m.M}/{m.N}",
            "data": m.data,
            "fp": pct(None if top1["fp"] is None else top1["fp"].top1),
            "calib.": pct(None if top1["calibrated"] is None else top1["calibrated"].top1),
            "binarized": pct(None if top1["binarized"] is None else top1["binarized"].top1),
            "date": (m.created or "-")[:10],
        }
        grid.append((cells, None))
    table = fitted_table(
        "Runs (newest first)",
        cols,
        grid,
        width=width,
        drop=RUNS_DROP_ORDER,
        caption="top-1 %: fp full precision, calib. calibrated, binarized fine-tuned",
    )
    errors = [Text(f"{e.path.name}: {e.error}", style="red") for e in entries if e.meta is None]
    return Group(table, *errors)
