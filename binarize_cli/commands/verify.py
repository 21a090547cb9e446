"""`binarize verify`: PyTorch simulation vs bitwise runtime vs ONNX (issue: packed runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from binarize_cli.errors import NotImplementedYetError


def verify(
    run_dir: Annotated[Path | None, typer.Argument(help="Run directory; default: the most recent run.")] = None,
    data: Annotated[str | None, typer.Option(help="Data spec; default: the run's data.")] = None,
    samples: Annotated[int, typer.Option(help="Images to compare.")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check that the PyTorch model, the bitwise runtime and ONNX agree."""
    raise NotImplementedYetError("`binarize verify` is not implemented yet (packed runtime issue)")
