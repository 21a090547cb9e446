"""binarize: post-convert pretrained image CNNs into multiple-binary networks (ABC-Net, PA-Net).

The Python API (docs/api.md) lives in :mod:`binarize_cli.api`; ``summary``, ``binarize``,
``finetune``, ``evaluate``, ``Binarized`` and ``Summary`` are also reachable here, imported on
first use so that ``import binarize_cli`` stays light (the bitwise runtime imports this package
without torch). ``export`` is not: ``binarize_cli.export`` is the export subpackage, so the
function is ``binarize_cli.api.export``.
"""

from typing import Any

from binarize_cli.core.version import __version__

#: The API names served from :mod:`binarize_cli.api` on first access.
API_NAMES = ("Binarized", "Summary", "binarize", "evaluate", "finetune", "summary")

__all__ = ["__version__", *API_NAMES]


def __getattr__(name: str) -> Any:
    if name in API_NAMES:
        from binarize_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'binarize_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API_NAMES])
