"""The package version, in one place (the package root, run metadata and packed files read it)."""

__version__ = "0.1.0"
