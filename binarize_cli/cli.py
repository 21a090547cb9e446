"""The `binarize` command line: parse, call the library, print. Nothing else lives here.

Each command is a thin function in :mod:`binarize_cli.commands`; the library raises
:class:`~binarize_cli.core.errors.BinarizeError` s, which :func:`main` turns into one line on
stderr and exit code 2 (bad input) or 1 (failure). ``BINARIZE_DEBUG=1`` shows tracebacks.

Ctrl-C exits with code 130 after the library's clean-up has run (temporary files removed,
completed fine-tune epochs kept for ``--resume``). While :func:`main` runs, SIGTERM is
treated like Ctrl-C, so ``kill PID`` or a scheduler's time limit cleans up the same way; only
SIGKILL cannot be handled (atomic writes still guarantee that nothing is half-written).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Annotated

import typer

from binarize_cli import __version__
from binarize_cli.commands import convert, export, report, run, runs, verify
from binarize_cli.core.errors import BinarizeError

app = typer.Typer(
    name="binarize",
    help="Post-convert pretrained CNNs into multiple-binary networks (PA-Net, ABC-Net), "
    "report what that buys, and export packed weights and ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain (click) help: wraps to the terminal (at most 80 columns), shows no type tag on
    # flags; ``-h`` is ``--help`` on every command (subcommands inherit the setting).
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"binarize {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """binarize: multiple-binary networks from pretrained checkpoints."""


# short_help: the one-line summaries of `binarize --help`, short enough for 80 columns.
app.command("convert", short_help="Convert a model into a multiple-binary run.")(convert.convert)
app.command("report", short_help="Memory, FLOPs/BOPs and accuracy of a run or model.")(
    report.report
)
app.command("export", short_help="Export a run as packed bit-planes or ONNX.")(export.export)
app.command("verify", short_help="Check PyTorch, the bitwise runtime and ONNX agree.")(
    verify.verify
)
app.command("run", short_help="Evaluate a packed file with the bitwise runtime.")(run.run)
app.command("runs", short_help="List the runs under runs/ (newest first).")(runs.runs)


def _error_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"binarize: error: {text}"


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    debug = os.environ.get("BINARIZE_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=False)
    except BinarizeError as exc:
        if debug:
            raise
        print(_error_line(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("binarize: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("binarize: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: bad option values, missing arguments
        if debug:
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            app(args=[*(argv or sys.argv[1:]), "--help"], standalone_mode=True)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"binarize: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except Exception as exc:  # anything unexpected: still one line unless debugging
        if debug:
            raise
        print(_error_line(exc) + " (set BINARIZE_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
