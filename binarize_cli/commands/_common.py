"""Shared pieces of the command modules: the console and option types."""

from __future__ import annotations

from rich.console import Console

#: stdout console for tables and results; stderr for progress and warnings.
console = Console()
err_console = Console(stderr=True)
