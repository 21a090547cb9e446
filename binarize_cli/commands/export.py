"""`binarize export`: packed safetensors or ONNX (issues: packed runtime, ONNX export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from binarize_cli.errors import NotImplementedYetError


def export(
    run_dir: Annotated[Path | None, typer.Argument(help="Run directory; default: the most recent run.")] = None,
    target: Annotated[str, typer.Option(help="onnx | onnx-float | packed")] = "onnx",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output file.")] = None,
) -> None:
    """Export a converted run as packed bit-planes (safetensors) or ONNX."""
    raise NotImplementedYetError(f"`binarize export --target {target}` is not implemented yet")
