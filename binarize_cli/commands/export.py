"""`binarize export`: packed safetensors (bitwise runtime) or ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from binarize_cli.commands._common import RunDirArgument, choice_option, console, option
from binarize_cli.core.errors import BadInputError

TARGETS = ("onnx", "onnx-float", "packed")


def export(
    run_dir: RunDirArgument = None,
    target: Annotated[
        str,
        choice_option(
            "onnx (packed bit-planes unpacked in-graph) | onnx-float (plain dequantized "
            "graph) | packed (safetensors for the bitwise runtime); any case."
        ),
    ] = "onnx",
    output: Annotated[
        Path | None,
        option("-o", "--output", help="Output file.", default="inside the run directory"),
    ] = None,
) -> None:
    """Export a converted run as packed bit-planes (safetensors) or ONNX."""
    if target not in TARGETS:
        raise BadInputError(
            f"unknown export target {target!r}; choose one of: {', '.join(TARGETS)}"
        )
    from binarize_cli.core.files import check_writable_dir, check_writable_file
    from binarize_cli.core.rundir import resolve_run

    run_path = resolve_run(run_dir)
    # Check the destination before the (slow) export: one line, exit 2, nothing written.
    if output is None or output.is_dir():
        check_writable_dir(output or run_path, "-o")
    else:
        check_writable_file(output, "-o")
    if target == "packed":
        from binarize_cli.export.packed import export_packed

        written = export_packed(run_path, output)
    else:
        from binarize_cli.export.onnx import export_onnx

        written = export_onnx(run_path, output, float_weights=(target == "onnx-float"))
    size = written.stat().st_size
    console.print(f"wrote {written} ({size / 1e6:.2f} MB, target {target})")
