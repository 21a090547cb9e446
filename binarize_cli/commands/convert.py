"""`binarize convert`: load, baseline, surgery, calibrate, fine-tune, save (issue: convert)."""

from __future__ import annotations

from binarize_cli.errors import NotImplementedYetError


def convert(model: str) -> None:
    """Convert MODEL into a multiple-binary network."""
    raise NotImplementedYetError("`binarize convert` is not implemented yet")
