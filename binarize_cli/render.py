"""Rich tables for ``binarize report``, built from :mod:`binarize_cli.analyze.report`'s data.

Nothing here computes a figure: every number comes from a :class:`~binarize_cli.analyze.report.Report`,
:class:`~binarize_cli.analyze.report.CompareRow` or :class:`~binarize_cli.analyze.report.PaperRow`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich import box
from rich.console import Group, RenderableType
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


def layer_table(profile: ModelProfile, *, errors: bool = False) -> Table:
    """The per-layer table (Larq's model summary): conv/linear rows, the parameter-only
    layers (batch norm, ...) folded into one row, and the totals as the footer. ``--json``
    lists every row."""
    compute = [r for r in profile.layers if _is_compute_row(r)]
    rest = [r for r in profile.layers if not _is_compute_row(r)]
    table = Table(title="Layers", show_footer=True, header_style="bold", box=box.SIMPLE_HEAD)
    table.add_column("layer", footer="total", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("prec.", no_wrap=True)
    table.add_column("M", justify="right")
    table.add_column("N", justify="right")
    table.add_column("why", ratio=1, min_width=10)
    table.add_column(
        "params",
        justify="right",
        no_wrap=True,
        footer=f"{sum(r.fp_params for r in profile.layers):,}",
    )
    table.add_column("Mbit", justify="right", no_wrap=True, footer=mbit(profile.memory_bits))
    table.add_column("MACs", justify="right", no_wrap=True, footer=sci(profile.macs))
    table.add_column("BOPs", justify="right", no_wrap=True, footer=sci(profile.bops))
    table.add_column("FLOPs", justify="right", no_wrap=True, footer=sci(profile.flops))
    if errors:
        table.add_column("W err", justify="right", no_wrap=True)
        table.add_column("A err", justify="right", no_wrap=True)
    for r in compute:
        cells = [
            r.name,
            r.kind,
            _shape_text(r),
            _precision(r),
            "-" if r.m is None else str(r.m),
            "-" if r.n is None else str(r.n),
            r.reason,
            f"{r.fp_params:,}",
            mbit(r.bits),
            sci(r.macs) if r.macs else "-",
            sci(r.bops) if r.bops else "-",
            sci(r.flops) if r.macs else "-",
        ]
        if errors:
            cells += [
                "-" if r.weight_error is None else f"{r.weight_error:.3f}",
                "-" if r.activation_error is None else f"{r.activation_error:.3f}",
            ]
        table.add_row(*cells, style=None if r.binarized else "dim")
    if rest:
        modules = sorted({r.module for r in rest})
        cells = [
            f"+{len(rest)} parameter layers",
            ", ".join(modules),
            "",
            "fp32",
            "-",
            "-",
            "no MACs counted",
            f"{sum(r.fp_params for r in rest):,}",
            mbit(sum(r.bits for r in rest)),
            "-",
            "-",
            "-",
        ]
        if errors:
            cells += ["", ""]
        table.add_row(*cells, style="dim")
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
    """Top-1/top-5 of the full-precision baseline, the calibrated and the fine-tuned model."""
    table = Table(title="Accuracy", header_style="bold")
    for col in ("model", "top-1 %", "top-5 %", "top-1 gap", "top-5 gap"):
        table.add_column(col, justify="left" if col == "model" else "right")
    fp = accuracy.get("fp")
    for stage in ACCURACY_STAGES:
        acc = accuracy.get(stage)
        if acc is None:
            table.add_row(STAGE_NAMES[stage], "-", "-", "-", "-")
            continue
        gap1 = fp["top1"] - acc["top1"] if fp and stage != "fp" else None
        gap5 = fp["top5"] - acc["top5"] if fp and stage != "fp" else None
        table.add_row(STAGE_NAMES[stage], pct(acc["top1"]), pct(acc["top5"]), pct(gap1), pct(gap5))
    return table


def render_report(report: Report) -> RenderableType:
    """Header, per-layer table, totals, and accuracy for a run."""
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
        layer_table(p, errors=report.mode == "run"),
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
        title=f"{PAPER_SOURCE}, 224x224: ours vs paper",
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
