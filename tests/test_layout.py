"""The package layout is a contract: one room per stage, imports only flow down the pipeline.

docs/architecture.md draws the rooms; this test holds the code to that drawing. Every
``binarize_cli`` import (module level or inside a function) is read with ``ast`` and checked
against :data:`MAY_IMPORT`, the same rule each subpackage's ``__init__`` docstring states.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "binarize_cli"

#: Room -> the rooms it may import besides itself (never the package root, which serves the API).
#: ``runtime`` is torch-free: of ``core`` it may use only the torch-free modules.
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "runtime": {"core.errors", "core.files"},
    "load": {"core"},
    "quant": {"core"},
    "convert": {"core", "load", "quant"},
    "analyze": {"core", "load", "quant", "convert"},
    "export": {"core", "load", "quant", "convert", "runtime"},
}
#: The top floor (CLI, commands, rendering, the public API) may import any room.
TOP = {"__main__", "cli", "commands", "render", "api"}
ROOMS = set(MAY_IMPORT) | TOP


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module below binarize_cli)`` for every binarize_cli import in a file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "binarize_cli":
                found += [(node.lineno, alias.name) for alias in node.names]
            elif node.module.startswith("binarize_cli."):
                found.append((node.lineno, node.module.removeprefix("binarize_cli.")))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name.removeprefix("binarize_cli."))
                for a in node.names
                if a.name.startswith("binarize_cli.")
            ]
    return found


def _allowed(room: str, target: str) -> bool:
    head = target.split(".")[0]
    if room in TOP or head == room:
        return True
    allowed = MAY_IMPORT[room]
    return head in allowed or ".".join(target.split(".")[:2]) in allowed


def test_every_module_lives_in_a_known_room() -> None:
    rooms = {_room(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert rooms <= ROOMS, f"modules outside the layout: {sorted(rooms - ROOMS)}"


def test_at_most_eight_modules_directly_under_the_package() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


@pytest.mark.parametrize("room", sorted(MAY_IMPORT))
def test_room_imports_only_what_its_rule_allows(room: str) -> None:
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports binarize_cli.{target}"
        for path in sorted((PACKAGE / room).rglob("*.py"))
        for line, target in _imports(path)
        if not _allowed(room, target)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("room", sorted(MAY_IMPORT) + ["commands"])
def test_room_docstring_says_what_it_owns_and_may_import(room: str) -> None:
    module = importlib.import_module(f"binarize_cli.{room}")
    doc = module.__doc__ or ""
    assert doc.startswith(f"{room}: ") or room == "commands", doc[:80]
    assert "May import" in doc


def test_the_rule_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself can fail: a runtime module importing torch-side code is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from binarize_cli.quant.layers import BinarizedConv2d\n")
    assert [t for _, t in _imports(bad)] == ["quant.layers"]
    assert not _allowed("runtime", "quant.layers")
    assert not _allowed("runtime", "core.rundir")
    assert _allowed("runtime", "core.errors")
    assert not _allowed("core", "convert.surgery")
    assert not _allowed("convert", "__version__")  # the root imports the API: use core.version
