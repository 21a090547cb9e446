"""`binarize report`: memory, FLOPs/BOPs and accuracy, full precision vs binarized.

Modes (the library does the work: :mod:`binarize_cli.analyze.report`, tables in
:mod:`binarize_cli.render`, figures in :mod:`binarize_cli.analyze.plots`):

* ``binarize report MODEL --scheme pa -M 4 -N 5 --input-size 224``: analytic (random
  weights, no data);
* ``binarize report [RUN_DIR]``: a run (default: the most recent under ./runs), with
  accuracies and per-layer approximation errors;
* ``--compare RUN_DIR`` (repeatable; RUN_DIR, when given, comes first): one table across runs;
* ``--paper``: ResNet18/34/50 beside the paper's Table 7;
* ``--plot DIR``: PNG figures of a run (weight and activation histograms, accuracy/memory).

The command function runs past 80 lines only because Typer reads `report`'s options from its
parameter list (one annotated parameter per option); its body is short.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from binarize_cli.commands._common import console, err_console, lower_choice, option
from binarize_cli.core.errors import BadInputError


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _emit_json(obj: Any) -> None:
    typer.echo(json.dumps(_clean(obj), indent=2))


def _is_run_target(target: str | None) -> bool:
    """No target (the most recent run), an existing path, or something path-like is a run;
    a name, or a ``family:name`` spec, is a model for analytic mode."""
    if target is None:
        return True
    if Path(target).exists():
        return True
    if ":" in target:
        return False
    return "/" in target or "\\" in target or target.startswith(".")


def report(
    target: Annotated[
        str | None,
        typer.Argument(
            help="A run directory, or a model name for analytic mode.",
            show_default="the most recent run under runs/",
        ),
    ] = None,
    scheme: Annotated[
        str | None,
        option(help="Scheme for analytic mode (any case).", default="pa", callback=lower_choice),
    ] = None,
    m: Annotated[
        int | None, option("-M", help="Weight bases (analytic mode).", default="the scheme's")
    ] = None,
    n: Annotated[
        int | None,
        option(
            "-N",
            help="Activation bases; 0 = full precision (analytic mode).",
            default="the scheme's",
        ),
    ] = None,
    input_size: Annotated[
        int | None,
        option(
            help="Input resolution (analytic mode; for a run, profiles at this size "
            "instead of the run's).",
            default="the model's; a run's own",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    compare: Annotated[
        list[Path] | None,
        option(help="Run directories to compare in one table (repeatable).", default="none"),
    ] = None,
    plot: Annotated[
        Path | None,
        option(
            help="Write PNG figures of the run into this directory: weight and activation "
            "histograms against their approximations, accuracy against memory.",
            default="no figures",
        ),
    ] = None,
    paper: Annotated[
        bool, typer.Option("--paper", help="ResNet18/34/50 beside the paper's Table 7.")
    ] = False,
) -> None:
    """Report memory, FLOPs/BOPs and accuracy, full precision vs binarized."""
    from binarize_cli import render
    from binarize_cli.analyze import report as lib

    if input_size is not None and input_size < 1:
        raise BadInputError(f"--input-size must be a positive integer (got {input_size})")
    if plot is not None:
        from binarize_cli.core.files import check_writable_dir

        if plot.exists() and not plot.is_dir():
            raise BadInputError(f"--plot {plot} is a file; pass a directory for the figures")
        check_writable_dir(plot, "--plot")

    if paper:
        paper_rows = lib.paper_comparison(input_size=input_size or 224)
        _show(
            json_out,
            lambda: {"paper": [r.to_dict() for r in paper_rows]},
            lambda: render.paper_table(paper_rows, console.width),
            None,
        )
    elif compare:
        from binarize_cli.convert.rebuild import load_run

        paths: list[str | Path] = ([target] if target is not None else []) + list(compare)
        runs = [load_run(p) for p in paths]
        reports = [lib.report_for_run(r, input_size=input_size, errors=False) for r in runs]
        rows = lib.compare_reports(reports)
        figures = _figures(plot, runs[0], reports)
        _show(
            json_out,
            lambda: {"runs": [r.to_dict() for r in rows]},
            lambda: render.compare_table(rows, console.width),
            figures,
        )
    else:
        rep, figures = _single_report(target, scheme, m, n, input_size, plot)
        _show(json_out, rep.to_dict, lambda: render.render_report(rep, console.width), figures)


def _single_report(
    target: str | None,
    scheme: str | None,
    m: int | None,
    n: int | None,
    input_size: int | None,
    plot: Path | None,
) -> tuple[Any, list[Path] | None]:
    """A run's report (and its figures with ``--plot``), or a model's analytic report."""
    from binarize_cli.analyze import report as lib

    if _is_run_target(target):
        given = [flag for flag, v in (("--scheme", scheme), ("-M", m), ("-N", n)) if v is not None]
        if given:
            raise BadInputError(
                f"{', '.join(given)} apply to analytic mode (a MODEL name), not to a run directory; "
                "drop them or pass a model name"
            )
        from binarize_cli.convert.rebuild import load_run

        run = load_run(target)
        rep = lib.report_for_run(run, input_size=input_size)
        return rep, _figures(plot, run, [rep])
    if plot is not None:
        raise BadInputError(
            "--plot needs a run directory (trained weights and real activations), "
            "not a model name; run `binarize convert` first"
        )
    return lib.analytic_report(target or "", scheme or "pa", m, n, input_size=input_size), None


def _figures(plot: Path | None, run: Any, reports: list[Any]) -> list[Path] | None:
    """``--plot``: the run's figures (and the reports' accuracy-memory points) written into
    ``plot``; ``None`` without ``--plot``."""
    if plot is None:
        return None
    from binarize_cli.analyze.plots import write_figures
    from binarize_cli.analyze.report import plot_data

    return write_figures(plot_data(run, reports), plot)


def _show(
    json_out: bool,
    data: Callable[[], dict[str, Any]],
    table: Callable[[], Any],
    figures: list[Path] | None,
) -> None:
    """``--json``: ``data()`` plus ``figures`` (as strings, when ``--plot`` wrote some) on
    stdout; else ``table()`` on stdout and one ``wrote FILE`` line per figure on stderr."""
    if json_out:
        out = data()
        if figures is not None:
            out["figures"] = [str(f) for f in figures]
        _emit_json(out)
    else:
        console.print(table())
        for f in figures or []:
            err_console.print(f"wrote {f}")
