"""`binarize run`: evaluate a packed file with the bitwise runtime (the model runs without torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from binarize_cli.commands._common import choice_option, console, data_spec, option


def run(
    packed_file: Annotated[
        Path,
        typer.Argument(help="A packed .safetensors file from `binarize export --target packed`."),
    ],
    data: Annotated[
        str, typer.Option(help="Data spec to evaluate on.", callback=data_spec)
    ] = "digits",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per runtime call.")] = 64,
    samples: Annotated[
        int | None,
        option(help="Evaluate only the first N validation images.", default="all"),
    ] = None,
    kernel: Annotated[
        str, choice_option("Bitwise kernel: auto (C if it builds), c or numpy; any case.")
    ] = "auto",
) -> None:
    """Evaluate a packed model with the bitwise runtime alone (no torch in the model path)."""
    from binarize_cli.export.packed import evaluate_packed_file

    result = evaluate_packed_file(
        packed_file, data, batch_size=batch_size, samples=samples, backend=kernel
    )
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    acc = result.accuracy
    console.print(
        f"{result.file}: top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%  "
        f"on {acc.samples} images of {result.data}  "
        f"({acc.images_per_s:.1f} images/s, kernel {result.backend})"
    )
