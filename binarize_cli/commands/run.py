"""`binarize run`: evaluate a packed file with the bitwise runtime (the model runs without torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from binarize_cli.commands._common import choice_option, console, data_spec, err_console, option


def run(
    packed_file: Annotated[
        Path,
        typer.Argument(help="A packed .safetensors file from `binarize export --target packed`."),
    ],
    data: Annotated[
        str | None,
        option(
            help="Data spec to evaluate on, made with the file's preprocessing.",
            default="the data the file was converted on",
            callback=data_spec,
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per runtime call.")] = 64,
    samples: Annotated[
        int | None,
        option(help="Evaluate only the first N validation images.", default="all"),
    ] = None,
    kernel: Annotated[
        str, choice_option("Bitwise kernel: auto (C if it builds), c or numpy; any case.")
    ] = "auto",
    save_logits: Annotated[
        Path | None,
        option(
            "--save-logits",
            help="Also write the logits (float32 [samples, classes], validation order) as .npy.",
            default="not written",
        ),
    ] = None,
) -> None:
    """Evaluate a packed model with the bitwise runtime alone (no torch in the model path).

    Without --data it evaluates on the data the file records, with the preprocessing the
    file records (the images `convert` evaluated); with --data the file's preprocessing is
    applied to that data.
    """
    from binarize_cli.export.packed import evaluate_packed_file

    result = evaluate_packed_file(
        packed_file,
        data,
        batch_size=batch_size,
        samples=samples,
        backend=kernel,
        logits_file=save_logits,
    )
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for note in result.notes:
        err_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    console.print(result.input_line(), markup=False, highlight=False, soft_wrap=True)
    acc = result.accuracy
    console.print(
        f"{result.file}: top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%  "
        f"on {acc.samples} images of {result.data}  "
        f"({acc.images_per_s:.1f} images/s, kernel {result.backend})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if result.logits_file:
        console.print(f"wrote logits to {result.logits_file}", markup=False, soft_wrap=True)
