"""Shared pieces of the command modules: the consoles and option helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions

#: The width of piped or redirected output (logs, docs, CI) when ``COLUMNS`` is not set.
PIPE_WIDTH = 160


class _Console(Console):
    """A console whose width is decided at each print: ``COLUMNS`` when set, else
    :data:`PIPE_WIDTH` for piped output (so per-layer tables keep every column), else the
    terminal's width. Tables fold or drop columns to fit it (:mod:`binarize_cli.render`)."""

    @property  # type: ignore[override]
    def size(self) -> ConsoleDimensions:
        dims = Console.size.fget(self)  # type: ignore[attr-defined]
        columns = os.environ.get("COLUMNS", "")
        if columns.isdigit() and int(columns) > 0:
            return ConsoleDimensions(int(columns), dims.height)
        if not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


#: stdout console for tables and results; stderr for progress and warnings.
console = _Console()
err_console = _Console(stderr=True)


def lower_choice(value: str | None) -> str | None:
    """Option callback for a choice (``--scheme``, ``--target``, ``--kernel``): choices are
    case-insensitive, the command sees the lower-case value."""
    return None if value is None else value.strip().lower()


def data_spec(value: str | None) -> str | None:
    """Option callback for ``--data``: the data-set name (before any ``:PATH``) is
    case-insensitive and lower-cased; a path keeps its case."""
    if value is None:
        return None
    name, sep, rest = value.strip().partition(":")
    return name.lower() + sep + rest


#: The optional RUN_DIR argument of ``export`` and ``verify`` (default: the latest run).
RunDirArgument = Annotated[
    Path | None,
    typer.Argument(help="Run directory.", show_default="the most recent run under runs/"),
]


def option(*flags: str, help: str, default: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` whose ``--help`` shows ``default`` as its default: the value an
    unset option becomes (options default to None so recipes are not overridden)."""
    return typer.Option(*flags, help=help, show_default=default, **kwargs)


def choice_option(help: str) -> Any:
    """A case-insensitive choice option (:func:`lower_choice`); ``help`` lists the choices."""
    return typer.Option(help=help, callback=lower_choice)
