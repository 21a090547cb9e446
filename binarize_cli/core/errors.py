"""Typed errors raised by the library; the CLI turns them into one line on stderr.

Every error carries an exit code: 2 for bad input (the user can fix the command line or the
files it names), 1 for a failure while doing valid work. Messages name what is wrong and
what to do, in one line.
"""

from __future__ import annotations


class BinarizeError(Exception):
    """Base class: a failure while doing valid work (exit code 1)."""

    exit_code: int = 1


class BadInputError(BinarizeError):
    """The user's input is wrong: arguments, files, data (exit code 2)."""

    exit_code = 2


class UnknownModelError(BadInputError):
    """A model name that neither timm nor torchvision knows."""


class CheckpointError(BadInputError):
    """A checkpoint that is missing, corrupt, unsafe or of another architecture."""


class DataError(BadInputError):
    """A data spec that is unknown, or a data path that is missing or mis-laid."""


class SchemeError(BadInputError):
    """An unknown scheme or an invalid (M, N) for a scheme."""


class RecipeError(BadInputError):
    """A recipe file with unknown keys or wrong types."""


class RunDirError(BadInputError):
    """A directory that is not a binarize run, or no run to act on."""


class RunMetadataError(RunDirError):
    """A ``binarize.json`` that is not JSON, lacks a key or holds a value of the wrong type."""


class PreprocessingError(BadInputError):
    """A preprocessing record (``core.preprocess``) with a missing, unknown or invalid field."""


class FormatError(BadInputError):
    """A packed file of another format or format version."""


class TrainingDivergedError(BinarizeError):
    """Non-finite loss or weights during fine-tuning."""
