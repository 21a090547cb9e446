"""`binarize run`: evaluate a packed file with the torch-free runtime (issue: packed runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from binarize_cli.errors import NotImplementedYetError


def run(
    packed_file: Annotated[Path, typer.Argument(help="A packed .safetensors file from `binarize export --target packed`.")],
    data: Annotated[str, typer.Option(help="Data spec to evaluate on.")] = "digits",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate a packed model with the bitwise runtime alone (no torch)."""
    raise NotImplementedYetError("`binarize run` is not implemented yet (packed runtime issue)")
