"""`binarize verify`: PyTorch simulation vs bitwise runtime vs ONNX on the same images."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from binarize_cli.commands._common import RunDirArgument, console, data_spec, option


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def verify(
    run_dir: RunDirArgument = None,
    data: Annotated[
        str | None,
        option(help="Data spec.", default="the run's data", callback=data_spec),
    ] = None,
    samples: Annotated[int, typer.Option(help="Images to compare.")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    onnx: Annotated[
        bool, typer.Option("--onnx/--no-onnx", help="Also export and compare ONNX.")
    ] = True,
) -> None:
    """Check that the PyTorch model, the bitwise runtime and ONNX agree."""
    from binarize_cli.export.verify import verify_run

    result = verify_run(run_dir, data=data, samples=samples, onnx=onnx)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    agree, diff, rel = result.top1_agreement, result.max_abs_logit_diff, result.max_rel_logit_diff
    f32 = result.float32
    console.print(f"verify {result.run or ''} on {result.samples} images (kernel {result.backend})")
    console.print(
        f"  runtime (float64 vs PyTorch float64 replay): top-1 agreement {agree.runtime:.1f}%, "
        f"max |logit diff| {diff.runtime:.3g} ({rel.runtime:.2g} of the logit scale)"
    )
    console.print(
        f"  runtime (float32 vs PyTorch float32):        top-1 agreement {f32.top1_agreement:.1f}%, "
        f"max |logit diff| {f32.max_abs_logit_diff:.3g} ({f32.max_rel_logit_diff:.2g}); "
        f"PyTorch float32 vs float64: {f32.pytorch_vs_float64:.3g}"
    )
    console.print(
        f"  onnx    (float32 vs the float64 replay):     top-1 agreement {_fmt(agree.onnx, '.1f')}%, "
        f"max |logit diff| {_fmt(diff.onnx, '.3g')}"
    )
    for note in result.notes:
        console.print(f"  note: {note}")
