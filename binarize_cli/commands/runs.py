"""`binarize runs`: the runs under runs/ (or --root), newest first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from binarize_cli.commands._common import console, err_console
from binarize_cli.core.rundir import DEFAULT_RUNS_ROOT


def runs(
    root: Annotated[
        Path, typer.Option(help="Directory holding the run directories.")
    ] = DEFAULT_RUNS_ROOT,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the runs under ROOT, newest first: model, scheme, M, N, data, top-1s, date."""
    from binarize_cli import render
    from binarize_cli.core.rundir import list_runs

    entries = list_runs(root)
    if json_out:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        err_console.print(f"no runs under {root}/; run `binarize convert MODEL` first")
        return
    console.print(render.runs_table(entries, console.width))
