"""Typed run metadata: the ``binarize.json`` record of a run directory, read and written here only.

:class:`RunMetadata` is the file, field for field and in the file's key order (so
``RunMetadata.load(p).to_dict()`` is the file's content and :meth:`RunMetadata.save` writes
the bytes ``convert`` always wrote: 2-space indented JSON and a final newline):

* ``format`` (``"binarize-run"``), ``format_version`` (:data:`SCHEMA_VERSION`);
* the contract keys (BRIEF section 2): ``model``, ``scheme``, ``M``, ``N``, ``data``,
  ``recipe``, ``accuracy`` (:class:`RunAccuracy`: ``fp``, ``calibrated``, ``binarized``, each
  ``top1``/``top5`` in percent), ``timings`` (:class:`RunTimings`: ``baseline_epoch_s``,
  ``baseline_cached``, ``finetune_epoch_s``, ``calibrate_s``);
* what rebuilds the model without the network and reproduces its input: ``weights``,
  ``finetune_epochs``, ``num_classes``, ``keep``, ``scheme_options``, ``first_conv``,
  ``classifier``, ``policy``, ``input_size``, ``mean``, ``std``; and ``world_size``,
  ``created``, ``binarize_version``;
* ``finetune_kept_epoch`` (optional, absent from older files): the 1-based fine-tune epoch
  whose weights the run holds (the best by the selection score, see
  :mod:`binarize_cli.convert.finetune`); null when nothing was fine-tuned;
* provenance added later (optional, absent from older files): ``weights_file`` and
  ``weights_sha256`` (the checkpoint or cached hub file the weights were read from, and its
  SHA-256; null for random weights), ``notes`` (what ``convert`` changed on its own and
  said while running, such as a classifier reset for another number of classes);
* ``preprocessing`` (optional, after ``std``): the record that turned the data's stored
  images into the model's input (:class:`~binarize_cli.core.preprocess.Preprocessing`'s
  JSON form, checked on reading). A file without it is written back without it, so an
  older file's round trip changes no byte either.
* ``device`` (optional, after ``world_size``; absent from older files and written only when
  known): the torch device the run trained and evaluated on (``"cpu"``, ``"cuda:0"``), the
  resolved ``convert --device``; ``recipe`` holds what was asked (``device``, ``workers``,
  ``amp``, ``compile``).
* per-layer bases (optional, absent from older files, which rebuild with the run-level ``M``,
  ``N`` everywhere): ``layer_bases`` maps every layer the policy binarizes to its ``[M, N]``,
  or to null where a per-layer choice keeps it full precision; ``allocation`` records how
  ``--policy auto`` chose them (policy, budgets, predicted memory bits and operations, the
  summed measured error), null for a uniform run.

Schema version. The file has carried ``format_version`` since the first release; it *is* the
schema version (:data:`SCHEMA_VERSION`, 1), so no second key is added. A file without it (or
without ``format``) is read as version 1; another version is refused. Reading requires the
keys in :data:`REQUIRED_KEYS`; every other key takes its default when absent (files written
by older releases, hand-made runs in tests), and unknown keys are ignored. A malformed file
(not JSON, a missing key, a value of the wrong type) is a one-line
:class:`~binarize_cli.core.errors.RunMetadataError` (exit 2) naming the file and the key.

Values are kept as read (an integer ``top1`` stays an integer), so a load/save round trip
changes no byte. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from binarize_cli.core.errors import PreprocessingError, RunMetadataError
from binarize_cli.core.files import atomic_write_json
from binarize_cli.core.preprocess import Preprocessing

META_FILE = "binarize.json"
RUN_FORMAT = "binarize-run"
#: The version of the ``binarize.json`` layout, stored under ``format_version``.
SCHEMA_VERSION = 1
#: Keys a run record must have (the rest default when absent).
REQUIRED_KEYS = (
    "model",
    "scheme",
    "M",
    "N",
    "data",
    "recipe",
    "accuracy",
    "timings",
    "num_classes",
)
#: The evaluations a run records, in pipeline order.
ACCURACY_STAGES = ("fp", "calibrated", "binarized")

Check = Callable[[Any], bool]

#: The one definition of "gap", as every table, JSON key and doc states it.
GAP_DEFINITION = (
    "gap = full-precision accuracy - this model's accuracy, in percentage points "
    "(positive: accuracy lost)"
)


def accuracy_gap(fp: float | None, value: float | None) -> float | None:
    """The gap (:data:`GAP_DEFINITION`): ``fp - value`` in percentage points, positive when
    the model lost accuracy against its full-precision baseline; ``None`` when either is
    missing or not a number."""
    if fp is None or value is None or math.isnan(fp) or math.isnan(value):
        return None
    return float(fp) - float(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_object(v: Any) -> bool:
    return isinstance(v, dict)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _list_of(check: Check) -> Check:
    # JSON gives lists; a mapping built in Python (a test's run, an API caller) may hold tuples.
    return lambda v: isinstance(v, list | tuple) and all(check(x) for x in v)


def _or_null(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _name_or_names(v: Any) -> bool:
    return _is_str(v) or _list_of(_is_str)(v)


def _size(v: Any) -> bool:
    return _is_int(v) or _list_of(_is_int)(v)


def _layer_table(v: Any) -> bool:
    pair = _list_of(_is_int)
    return isinstance(v, dict) and all(
        _is_str(k) and (x is None or (pair(x) and len(x) == 2)) for k, x in v.items()
    )


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if _is_number(v):
        return "a number"
    if isinstance(v, str):
        return "a string"
    return "a list" if isinstance(v, list | tuple) else "an object"


def _get(
    data: Mapping[str, Any],
    key: str,
    check: Check,
    what: str,
    source: str | os.PathLike[str],
    where: str = "",
) -> Any:
    """``data[key]`` after checking it (an error when absent)."""
    name = f"{where}{key}"
    if key not in data:
        raise RunMetadataError(
            f"{source} lacks key {name}; it was not written by `binarize convert`"
        )
    value = data[key]
    if not check(value):
        raise RunMetadataError(
            f"{source}: {name} must be {what}, not {_json_kind(value)}; rerun `binarize convert`"
        )
    return value


def _checked(
    data: Mapping[str, Any],
    checks: Mapping[str, tuple[Check, str]],
    source: str | os.PathLike[str],
    where: str = "",
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The entries of ``data`` named in ``checks``, each checked; a key in ``required`` must be
    there, the others are left to the dataclass defaults when absent."""
    return {
        key: _get(data, key, check, what, source, where)
        for key, (check, what) in checks.items()
        if key in data or key in required
    }


def _object(value: Any, name: str, source: str | os.PathLike[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise RunMetadataError(
            f"{source}: {name} must be an object, not {_json_kind(value)}; rerun `binarize convert`"
        )
    return value


_STAGE_CHECKS: dict[str, tuple[Check, str]] = {
    "top1": (_is_number, "a number"),
    "top5": (_is_number, "a number"),
}
_TIMING_CHECKS: dict[str, tuple[Check, str]] = {
    "baseline_epoch_s": (_list_of(_is_number), "a list of numbers"),
    "baseline_cached": (_or_null(_is_bool), "true/false or null"),
    "finetune_epoch_s": (_list_of(_is_number), "a list of numbers"),
    "calibrate_s": (_or_null(_is_number), "a number or null"),
    "finetune_step_s": (_or_null(_is_number), "a number or null"),
    "fp_step_s": (_or_null(_is_number), "a number or null"),
}
#: Top-level keys other than ``accuracy``/``timings``: (check, what the message asks for).
_CHECKS: dict[str, tuple[Check, str]] = {
    "format": (_is_str, "a string"),
    "format_version": (_is_int, "an integer"),
    "model": (_is_str, "a string"),
    "weights": (_or_null(_is_str), "a string or null"),
    "scheme": (_is_str, "a string"),
    "M": (_is_int, "an integer"),
    "N": (_is_int, "an integer"),
    "data": (_is_str, "a string"),
    "recipe": (_or_null(_is_object), "an object or null"),
    "finetune_epochs": (_list_of(_is_object), "a list of objects"),
    "finetune_kept_epoch": (_or_null(_is_int), "an integer or null"),
    "num_classes": (_is_int, "an integer"),
    "keep": (_list_of(_is_str), "a list of strings"),
    "scheme_options": (_is_object, "an object"),
    "first_conv": (_or_null(_name_or_names), "a module name, a list of names or null"),
    "classifier": (_or_null(_name_or_names), "a module name, a list of names or null"),
    "policy": (_or_null(_is_object), "an object or null"),
    "input_size": (_or_null(_size), "[C, H, W] or null"),
    "mean": (_or_null(_list_of(_is_number)), "a list of numbers or null"),
    "std": (_or_null(_list_of(_is_number)), "a list of numbers or null"),
    "preprocessing": (_or_null(_is_object), "an object or null"),
    "world_size": (_is_int, "an integer"),
    "device": (_or_null(_is_str), "a string or null"),
    "created": (_or_null(_is_str), "a string or null"),
    "binarize_version": (_or_null(_is_str), "a string or null"),
    "weights_file": (_or_null(_is_str), "a string or null"),
    "weights_sha256": (_or_null(_is_str), "a string or null"),
    "notes": (_list_of(_is_str), "a list of strings"),
    "layer_bases": (_or_null(_layer_table), "an object of [M, N] or null per layer, or null"),
    "allocation": (_or_null(_is_object), "an object or null"),
}


@dataclass
class StageAccuracy:
    """Top-1/top-5 accuracy in percent of one evaluation."""

    top1: float
    top5: float

    @classmethod
    def from_dict(
        cls, value: Any, where: str, source: str | os.PathLike[str] = META_FILE
    ) -> StageAccuracy:
        d = _object(value, where, source)
        return cls(**_checked(d, _STAGE_CHECKS, source, f"{where}.", required=("top1", "top5")))


@dataclass
class RunAccuracy:
    """The three evaluations of a run (:data:`ACCURACY_STAGES`); ``None``: not measured."""

    fp: StageAccuracy | None = None
    calibrated: StageAccuracy | None = None
    binarized: StageAccuracy | None = None

    @classmethod
    def from_dict(cls, value: Any, source: str | os.PathLike[str] = META_FILE) -> RunAccuracy:
        d = _object(value, "accuracy", source)
        stages = {
            s: None if d.get(s) is None else StageAccuracy.from_dict(d[s], f"accuracy.{s}", source)
            for s in ACCURACY_STAGES
        }
        return cls(**stages)

    def stage(self, name: str) -> StageAccuracy | None:
        """The evaluation called ``name`` (one of :data:`ACCURACY_STAGES`)."""
        if name not in ACCURACY_STAGES:
            raise KeyError(name)
        result: StageAccuracy | None = getattr(self, name)
        return result


@dataclass
class RunTimings:
    """Wall times in seconds: baseline epochs (``baseline_cached``: the baseline came from the
    cache, so those are the cached run's), fine-tune epochs and calibration; and (optional,
    absent from older files) the mean fine-tune step and a full-precision reference step timed
    in the same process with the same loss and data (:attr:`step_ratio`)."""

    baseline_epoch_s: list[float] = field(default_factory=list)
    baseline_cached: bool | None = None
    finetune_epoch_s: list[float] = field(default_factory=list)
    calibrate_s: float | None = None
    finetune_step_s: float | None = None
    fp_step_s: float | None = None

    @property
    def step_ratio(self) -> float | None:
        """Fine-tune step time over the full-precision step time, both timed in the run's own
        process (``None`` when either is missing: older runs, ``--epochs 0``)."""
        if not self.finetune_step_s or not self.fp_step_s:
            return None
        return self.finetune_step_s / self.fp_step_s

    @classmethod
    def from_dict(cls, value: Any, source: str | os.PathLike[str] = META_FILE) -> RunTimings:
        return cls(
            **_checked(_object(value, "timings", source), _TIMING_CHECKS, source, "timings.")
        )


@dataclass(kw_only=True)
class RunMetadata:
    """The content of ``binarize.json`` (see the module docstring); fields in file order."""

    format: str = RUN_FORMAT
    format_version: int = SCHEMA_VERSION
    model: str
    weights: str | None = None
    scheme: str
    M: int
    N: int
    data: str
    recipe: dict[str, Any] | None
    accuracy: RunAccuracy
    timings: RunTimings
    finetune_epochs: list[dict[str, Any]] = field(default_factory=list)
    finetune_kept_epoch: int | None = None
    num_classes: int
    keep: list[str] = field(default_factory=list)
    scheme_options: dict[str, Any] = field(default_factory=dict)
    first_conv: str | list[str] | None = None
    classifier: str | list[str] | None = None
    policy: dict[str, Any] | None = None
    input_size: int | list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    preprocessing: dict[str, Any] | None = None
    world_size: int = 1
    device: str | None = None
    created: str | None = None
    binarize_version: str | None = None
    weights_file: str | None = None
    weights_sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    layer_bases: dict[str, list[int] | None] | None = None
    allocation: dict[str, Any] | None = None

    @property
    def fine_tuned(self) -> bool:
        """Whether the run fine-tuned at all (``--epochs`` > 0). With ``--epochs 0`` the
        ``binarized`` accuracy is the calibrated model's (the key is kept; tables omit it)."""
        epochs = (self.recipe or {}).get("epochs")
        return not (_is_number(epochs) and epochs == 0)

    def to_dict(self) -> dict[str, Any]:
        """The ``binarize.json`` mapping (a deep copy), keys in file order; ``preprocessing``
        and ``device`` only when recorded (older files have no such keys)."""
        out = asdict(self)
        for key in ("preprocessing", "device"):
            if out[key] is None:
                del out[key]
        return out

    def preprocessing_record(self) -> Preprocessing | None:
        """The recorded :class:`~binarize_cli.core.preprocess.Preprocessing`, or None for a
        run written before it was recorded."""
        return None if self.preprocessing is None else Preprocessing.from_dict(self.preprocessing)

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike[str] = META_FILE) -> RunMetadata:
        """Check and type a ``binarize.json`` mapping; ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise RunMetadataError(f"{source} is not a binarize run record")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise RunMetadataError(
                f"{source} lacks keys {', '.join(missing)}; it was not written by `binarize convert`"
            )
        version = data.get("format_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RunMetadataError(
                f"{source} has run format version {version}; this binarize reads version {SCHEMA_VERSION}"
            )
        meta = cls(
            **_checked(data, _CHECKS, source),
            accuracy=RunAccuracy.from_dict(data["accuracy"], source),
            timings=RunTimings.from_dict(data["timings"], source),
        )
        try:
            meta.preprocessing_record()
        except PreprocessingError as exc:
            raise RunMetadataError(f"{source}: {exc}; rerun `binarize convert`") from None
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunMetadata:
        """Read ``binarize.json`` from a run directory, or from the file itself."""
        meta_path = _meta_path(path)
        try:
            data = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunMetadataError(
                f"{meta_path} is unreadable or not JSON ({exc.__class__.__name__}); rerun `binarize convert`"
            ) from None
        return cls.from_dict(data, meta_path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``binarize.json`` atomically into a run directory (or to the file path given)."""
        meta_path = _meta_path(path)
        atomic_write_json(meta_path, self.to_dict())
        return meta_path

    def data_kwargs(self) -> dict[str, Any]:
        """``load_data`` keyword arguments that reproduce the run's preprocessing: the recorded
        ``preprocessing`` when there is one, else (older runs) the recorded ``input_size``,
        ``mean`` and ``std`` (those not recorded are left to the data spec)."""
        record = self.preprocessing_record()
        if record is not None:
            return {"preprocessing": record}
        kwargs: dict[str, Any] = {}
        for key in ("input_size", "mean", "std"):
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return kwargs


def _meta_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / META_FILE if p.is_dir() else p
