"""Shared pieces of the command modules: the consoles."""

from __future__ import annotations

import os

from rich.console import Console


def _make_console(stderr: bool) -> Console:
    probe = Console(stderr=stderr)
    # Piped or redirected output (logs, docs, CI) gets a wide fixed width instead of rich's
    # 80-column default, so per-layer tables are not truncated; COLUMNS still wins.
    if not probe.is_terminal and "COLUMNS" not in os.environ:
        return Console(stderr=stderr, width=160)
    return probe


#: stdout console for tables and results; stderr for progress and warnings.
console = _make_console(stderr=False)
err_console = _make_console(stderr=True)
