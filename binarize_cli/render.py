"""Rich tables for ``binarize report``, built from :mod:`binarize_cli.analyze.report`'s data.

Nothing here computes a figure: every number comes from a :class:`~binarize_cli.analyze.report.Report`,
:class:`~binarize_cli.analyze.report.CompareRow` or :class:`~binarize_cli.analyze.report.PaperRow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from binarize_cli.analyze.profile import LayerProfile, ModelProfile
from binarize_cli.analyze.report import ACCURACY_STAGES, CompareRow, PaperRow, Report
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


@dataclass(frozen=True)
class _LayerColumn:
    """One column of the Layers table: header, footer, cell of a row, and of the folded
    parameter-layers row."""

    header: str
    cell: Callable[[LayerProfile], str]
    rest: str = ""
    footer: str = ""
    right: bool = False
    wrap: bool = False


#: Columns dropped, in this order, until the Layers table fits the console (the full table
#: stays in ``--json`` and on a wide terminal).
DROP_ORDER = ("FLOPs", "MACs", "kind", "why", "M", "N", "params", "A err", "W err", "BOPs")


def _layer_columns(profile: ModelProfile, errors: bool) -> list[_LayerColumn]:
    rest = [r for r in profile.layers if not _is_compute_row(r)]
    columns = [
        _LayerColumn("layer", lambda r: r.name, f"+{len(rest)} parameter layers", "total"),
        _LayerColumn("kind", lambda r: r.kind, ", ".join(sorted({r.module for r in rest}))),
        _LayerColumn("shape", _shape_text),
        _LayerColumn("prec.", _precision, "fp32"),
        _LayerColumn("M", lambda r: "-" if r.m is None else str(r.m), "-", right=True),
        _LayerColumn("N", lambda r: "-" if r.n is None else str(r.n), "-", right=True),
        _LayerColumn("why", lambda r: r.reason, "no MACs counted", wrap=True),
        _LayerColumn(
            "params",
            lambda r: f"{r.fp_params:,}",
            f"{sum(r.fp_params for r in rest):,}",
            f"{sum(r.fp_params for r in profile.layers):,}",
            right=True,
        ),
        _LayerColumn(
            "Mbit",
            lambda r: mbit(r.bits),
            mbit(sum(r.bits for r in rest)),
            mbit(profile.memory_bits),
            right=True,
        ),
        _LayerColumn(
            "MACs", lambda r: sci(r.macs) if r.macs else "-", "-", sci(profile.macs), True
        ),
        _LayerColumn(
            "BOPs", lambda r: sci(r.bops) if r.bops else "-", "-", sci(profile.bops), True
        ),
        _LayerColumn(
            "FLOPs", lambda r: sci(r.flops) if r.macs else "-", "-", sci(profile.flops), True
        ),
    ]
    if errors:
        columns += [
            _LayerColumn(
                "W err",
                lambda r: "-" if r.weight_error is None else f"{r.weight_error:.3f}",
                right=True,
            ),
            _LayerColumn(
                "A err",
                lambda r: "-" if r.activation_error is None else f"{r.activation_error:.3f}",
                right=True,
            ),
        ]
    return columns


#: The narrowest the wrapping "why" column of the Layers table gets.
WHY_MIN_WIDTH = 10


def _build_layer_table(
    profile: ModelProfile, columns: Sequence[_LayerColumn], *, probe: bool = False
) -> Table:
    """The Layers table with ``columns``; ``probe``: wrapping cells cut to their minimum
    width, so that the table's natural width is the narrowest it can be drawn without
    shortening a cell."""
    compute = [r for r in profile.layers if _is_compute_row(r)]
    rest = [r for r in profile.layers if not _is_compute_row(r)]
    table = Table(title="Layers", show_footer=True, header_style="bold", box=box.SIMPLE_HEAD)
    for c in columns:
        table.add_column(
            c.header,
            footer=c.footer,
            justify="right" if c.right else "left",
            no_wrap=not c.wrap,
            overflow="fold",
            ratio=1 if c.wrap and not probe else None,
            min_width=WHY_MIN_WIDTH if c.wrap else None,
        )

    def cells(values: list[str]) -> list[str]:
        if not probe:
            return values
        return [v[:WHY_MIN_WIDTH] if c.wrap else v for c, v in zip(columns, values, strict=True)]

    for r in compute:
        table.add_row(*cells([c.cell(r) for c in columns]), style=None if r.binarized else "dim")
    if rest:
        table.add_row(*cells([c.rest for c in columns]), style="dim")
    return table


def _fits(profile: ModelProfile, columns: Sequence[_LayerColumn], width: int) -> bool:
    """Whether the Layers table with ``columns`` can be drawn in ``width`` characters with
    every cell whole (the wrapping column at its minimum)."""
    probe = _build_layer_table(profile, columns, probe=True)
    measure_console = Console(width=100_000)
    return Measurement.get(measure_console, measure_console.options, probe).maximum <= width


def layer_table(profile: ModelProfile, *, errors: bool = False, width: int | None = None) -> Table:
    """The per-layer table (Larq's model summary): conv/linear rows, the parameter-only
    layers (batch norm, ...) folded into one row, and the totals as the footer; with
    ``errors``, each layer's weight and activation approximation errors.

    With ``width``, columns are dropped in :data:`DROP_ORDER` until the table fits in
    ``width`` characters without shortening any cell (the "why" column wraps); the table's
    caption names what was dropped. ``--json`` lists every row and field."""
    columns = _layer_columns(profile, errors)
    dropped: list[str] = []
    for name in DROP_ORDER:
        if width is None or _fits(profile, columns, width):
            break
        if name in {c.header for c in columns}:
            columns = [c for c in columns if c.header != name]
            dropped.append(name)
    table = _build_layer_table(profile, columns)
    if dropped:
        table.caption = f"not shown at this width: {', '.join(dropped)} (see --json)"
    return table


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


def accuracy_table(accuracy: dict[str, dict[str, float] | None]) -> Table:
    """Top-1/top-5 of the full-precision baseline, the calibrated and the fine-tuned model,
    and their gaps (:func:`~binarize_cli.core.metadata.accuracy_gap`)."""
    table = Table(title="Accuracy", header_style="bold", caption=GAP_DEFINITION)
    for col in ("model", "top-1 %", "top-5 %", "top-1 gap", "top-5 gap"):
        table.add_column(col, justify="left" if col == "model" else "right")
    fp = accuracy.get("fp")
    for stage in ACCURACY_STAGES:
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
        parts.append(accuracy_table(report.accuracy))
    for w in list(p.warnings) + list(report.warnings):
        parts.append(Text(f"warning: {w}", style="yellow"))
    return Group(*parts)


def compare_table(rows: Sequence[CompareRow]) -> Table:
    """``--compare``: scheme, M, N, memory, FLOPs, top-1/top-5 and the gaps (Tables 3, 6)."""
    table = Table(title="Runs compared", header_style="bold")
    for col in (
        "run",
        "model",
        "data",
        "scheme",
        "M",
        "N",
        "Mbit",
        "saving",
        "FLOPs",
        "speedup",
        "top-1 %",
        "top-5 %",
        "top-1 gap",
        "top-5 gap",
    ):
        table.add_column(
            col, justify="left" if col in ("run", "model", "data", "scheme") else "right"
        )
    for r in rows:
        table.add_row(
            r.label,
            r.model,
            r.data or "-",
            r.scheme or "full precision",
            "-" if r.m is None else str(r.m),
            "-" if r.n is None else ("fp" if r.n == 0 else str(r.n)),
            mbit(r.memory_bits),
            ratio(r.memory_saving),
            sci(r.flops),
            ratio(r.speedup),
            pct(r.top1),
            pct(r.top5),
            pct(r.gap_top1),
            pct(r.gap_top5),
        )
    return table


def paper_table(rows: Sequence[PaperRow]) -> Table:
    """``--paper``: our analytic numbers beside the paper's Table 7."""
    table = Table(
        title="Table 7 (seed 002), 224x224: ours vs paper",
        caption="differences explained in docs/accounting.md",
        header_style="bold",
    )
    for col in (
        "model",
        "Mbit",
        "paper",
        "diff",
        "saving",
        "paper",
        "FLOPs",
        "paper",
        "diff",
        "speedup",
        "paper",
        "note",
    ):
        table.add_column(col, justify="left" if col in ("model", "note") else "right")
    for r in rows:
        mem_ok = abs(r.memory_diff) <= 0.005
        flops_ok = abs(r.flops_diff) <= 0.005
        table.add_row(
            r.label,
            mbit(r.memory_bits),
            f"{r.paper_memory_bits / 1e6:.1f}",
            Text(signed_pct(r.memory_diff), style="green" if mem_ok else "red"),
            ratio(r.memory_saving),
            ratio(r.paper_memory_saving),
            sci(r.flops),
            sci(r.paper_flops),
            Text(signed_pct(r.flops_diff), style="green" if flops_ok else "red"),
            ratio(r.speedup),
            ratio(r.paper_speedup),
            r.note,
        )
    return table


#: ``binarize runs`` columns dropped, in this order, until the table fits the console.
RUNS_DROP_ORDER = ("model", "calib.", "data", "fp")


def _run_cells(e: RunEntry) -> dict[str, str]:
    if e.meta is None:
        return {"run": e.path.name, "model": "error (below)", "scheme": "error"}
    m = e.meta
    top1 = {s: m.accuracy.stage(s) for s in ACCURACY_STAGES}
    return {
        "run": e.path.name,
        "model": m.model,
        "scheme": f"{m.scheme} {m.M}/{m.N}",
        "data": m.data,
        "fp": pct(None if top1["fp"] is None else top1["fp"].top1),
        "calib.": pct(None if top1["calibrated"] is None else top1["calibrated"].top1),
        "binarized": pct(None if top1["binarized"] is None else top1["binarized"].top1),
        "date": (m.created or "-")[:10],
    }


def _runs_grid(entries: Sequence[RunEntry], columns: Sequence[str]) -> Table:
    table = Table(title="Runs (newest first)", header_style="bold", box=box.SIMPLE_HEAD)
    for col in columns:
        right = col in ("fp", "calib.", "binarized")
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    for e in entries:
        cells = _run_cells(e)
        table.add_row(*(cells.get(c, "") for c in columns), style=None if e.meta else "red")
    return table


def runs_table(entries: Sequence[RunEntry], width: int | None = None) -> RenderableType:
    """``binarize runs``: one row per run directory, newest first, as
    :func:`~binarize_cli.core.rundir.list_runs` orders them (scheme as ``name M/N``, top-1
    accuracies in %, the date ``created``); a damaged one is named in the table and its
    error printed below it. With ``width``, columns go in :data:`RUNS_DROP_ORDER` until the
    table fits without shortening a cell (``--json`` has every field)."""
    columns = ["run", "model", "scheme", "data", "fp", "calib.", "binarized", "date"]
    dropped: list[str] = []
    measure_console = Console(width=100_000)
    for name in RUNS_DROP_ORDER:
        grid = _runs_grid(entries, columns)
        if (
            width is None
            or Measurement.get(measure_console, measure_console.options, grid).maximum <= width
        ):
            break
        columns.remove(name)
        dropped.append(name)
    table = _runs_grid(entries, columns)
    notes = "top-1 %: fp full precision, calib. calibrated, binarized fine-tuned"
    if dropped:
        notes += f"; not shown at this width: {', '.join(dropped)} (see --json)"
    table.caption = notes
    errors = [Text(f"{e.path.name}: {e.error}", style="red") for e in entries if e.meta is None]
    return Group(table, *errors)
