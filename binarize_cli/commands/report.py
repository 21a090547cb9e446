"""`binarize report`: memory, FLOPs/BOPs and accuracy (issue: report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from binarize_cli.errors import NotImplementedYetError


def report(
    target: Annotated[
        str | None, typer.Argument(help="A run directory, or a model name for analytic mode; default: the most recent run.")
    ] = None,
    scheme: Annotated[str, typer.Option(help="Scheme for analytic mode.")] = "pa",
    m: Annotated[int | None, typer.Option("-M", help="Weight bases (analytic mode).")] = None,
    n: Annotated[int | None, typer.Option("-N", help="Activation bases; 0 = full precision (analytic mode).")] = None,
    input_size: Annotated[int | None, typer.Option(help="Input resolution (analytic mode).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    compare: Annotated[list[Path] | None, typer.Option(help="Run directories to compare in one table.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write PNG figures into this directory.")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="ResNet18/34/50 beside the paper's Table 7.")] = False,
) -> None:
    """Report memory, FLOPs/BOPs and accuracy, full precision vs binarized."""
    raise NotImplementedYetError("`binarize report` is not implemented yet (report issue)")
