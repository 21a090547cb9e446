"""Run directories: where `convert` leaves its result and `report`/`export`/`verify` find it.

A run directory holds:

* ``model.safetensors``: the converted model's state dict (latent weights, quantizer
  endpoints/levels, batch-norm statistics);
* ``binarize.json``: what was run and what it measured, a
  :class:`~binarize_cli.core.metadata.RunMetadata` (keys and schema version there);
* ``metrics.csv`` (absent from runs of older releases): one row per fine-tune epoch, columns in
  :data:`binarize_cli.convert.finetune.METRICS_COLUMNS`; a header alone when nothing was
  fine-tuned.

The files are written into a staging directory that is renamed into place, so a directory
with a ``binarize.json`` is always complete (:func:`write_run`). Every file goes through
:mod:`binarize_cli.core.files` (whole or not at all).
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from binarize_cli.core.errors import BinarizeError, RunDirError
from binarize_cli.core.files import atomic_write_bytes, fsync_dir, location_error, umask
from binarize_cli.core.metadata import ACCURACY_STAGES, META_FILE, RUN_FORMAT, RunMetadata

WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.csv"
DEFAULT_RUNS_ROOT = Path("runs")


def is_run_dir(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def find_latest_run(root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """The most recently completed run under ``root`` (by ``binarize.json`` mtime)."""
    # Hidden siblings (``.NAME.*.staging``/``.old``, ``.NAME.partial``) are work areas, never runs.
    candidates = [
        p.parent
        for p in root.glob(f"*/{META_FILE}")
        if not p.parent.name.startswith(".") and is_run_dir(p.parent)
    ]
    if not candidates:
        raise RunDirError(
            f"no run found under {root}/; run `binarize convert MODEL` first or pass a run directory"
        )
    return max(candidates, key=lambda p: (p / META_FILE).stat().st_mtime)


def resolve_run(path: str | Path | None) -> Path:
    """A run directory from a user argument; ``None`` means the most recent run."""
    if path is None:
        return find_latest_run()
    p = Path(path)
    recover_moved_aside(p)
    if not p.exists():
        raise RunDirError(f"run directory {p} does not exist")
    if not p.is_dir():
        raise RunDirError(
            f"{p} is not a directory; pass a run directory written by `binarize convert`"
        )
    if not (p / META_FILE).is_file():
        raise RunDirError(
            f"{p} is not a binarize run (no {META_FILE}); pass a directory written by `binarize convert`"
        )
    if not (p / WEIGHTS_FILE).is_file():
        raise RunDirError(f"{p} is an incomplete run (no {WEIGHTS_FILE}); rerun `binarize convert`")
    return p


@dataclass
class RunEntry:
    """One directory under a runs root, as ``binarize runs`` lists it: its metadata, or the
    one-line error that kept it from being read (``meta`` is then ``None``)."""

    path: Path
    meta: RunMetadata | None
    error: str | None
    mtime: float

    def to_dict(self) -> dict[str, Any]:
        """The listing's JSON row: path, the run's identity and top-1s, ``created``; or the
        path and its ``error``."""
        d: dict[str, Any] = {"run_dir": str(self.path)}
        if self.meta is None:
            d["error"] = self.error
            return d
        m = self.meta
        d.update(model=m.model, scheme=m.scheme, M=m.M, N=m.N, data=m.data)
        for stage in ACCURACY_STAGES:
            acc = m.accuracy.stage(stage)
            d[f"{stage}_top1"] = None if acc is None else acc.top1
        d["created"] = m.created
        return d


def list_runs(root: Path = DEFAULT_RUNS_ROOT) -> list[RunEntry]:
    """Every directory directly under ``root`` (hidden work areas excepted), newest first:
    by ``created`` in ``binarize.json`` (ISO 8601), else by modification time. A directory
    that is not a complete, readable run is listed with its error instead of raising. A
    missing ``root`` has no runs; a ``root`` that is not a directory is a RunDirError."""
    if not root.exists():
        return []
    if not root.is_dir():
        raise RunDirError(f"{root} is not a directory; pass --root DIR holding run directories")
    entries: list[RunEntry] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        mtime = 0.0
        try:
            mtime = path.stat().st_mtime
            resolve_run(path)
            meta = RunMetadata.load(path)
            mtime = (path / META_FILE).stat().st_mtime
        except (BinarizeError, OSError) as exc:
            entries.append(RunEntry(path, None, " ".join(str(exc).split()), mtime))
            continue
        entries.append(RunEntry(path, meta, None, mtime))
    return sorted(entries, key=_when, reverse=True)


def _when(entry: RunEntry) -> float:
    """The sort key of :func:`list_runs`: ``created`` as a timestamp, else the mtime."""
    if entry.meta is not None and entry.meta.created:
        try:
            return datetime.datetime.fromisoformat(entry.meta.created).timestamp()
        except ValueError:
            pass
    return entry.mtime


def save_state_dict_atomic(
    path: Path, state: Mapping[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Save a tensor dict as safetensors atomically (contiguous copies, shared storage broken)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def recover_moved_aside(path: Path) -> bool:
    """Put back a complete run that :func:`write_run` moved aside and could not replace.

    :func:`write_run` replaces an existing run by renaming it to ``.NAME.*.old`` and the new
    one into place; a process killed between the two renames leaves no ``NAME`` but a complete
    ``.NAME.*.old``. If ``path`` is missing, the newest such run is renamed back. Returns
    whether something was recovered.
    """
    if path.exists() or not path.parent.is_dir():
        return False
    olds = [d for d in path.parent.glob(f".{path.name}.*.old") if is_run_dir(d)]
    if not olds:
        return False
    newest = max(olds, key=lambda d: (d / META_FILE).stat().st_mtime)
    try:
        os.replace(newest, path)
    except OSError:
        return False
    return True


#: A ``.NAME.*.staging`` sibling older than this is left over from a killed writer.
STALE_STAGING_S = 3600.0


def remove_stale_staging(path: Path, *, older_than_s: float = STALE_STAGING_S) -> list[Path]:
    """Delete ``.NAME.*.staging`` work dirs next to ``path`` left by a writer killed mid-write.

    Only dirs untouched for ``older_than_s`` go (a run is staged in seconds), so a concurrent
    writer's fresh staging dir is never removed. Returns what was removed.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.*.staging"))
    except OSError:
        return removed
    for candidate in candidates:
        try:
            if candidate.is_dir() and now - candidate.stat().st_mtime > older_than_s:
                shutil.rmtree(candidate)
                removed.append(candidate)
        except OSError:
            continue
    return removed


def write_run(
    path: Path,
    state: Mapping[str, Any],
    meta: RunMetadata,
    *,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a complete run directory atomically (the weights, ``binarize.json`` and
    ``extra_files``, name -> content, such as ``metrics.csv``).

    All files are written into a fresh sibling directory which is then renamed into place;
    an existing run at ``path`` is moved aside first and removed only after the new one is in
    place, so ``path`` is never a half-written run: it is the old complete run, the new one,
    or (for a process killed between the two renames) missing, with the old run in
    ``.NAME.*.old`` where :func:`recover_moved_aside` finds it. An unwritable location is a
    one-line BadInputError.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent)
        )
    except OSError as exc:
        raise location_error(path, exc, "-o") from None
    recover_moved_aside(path)
    remove_stale_staging(path)
    os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes 0700; a run dir gets normal permissions
    try:
        save_state_dict_atomic(staging / WEIGHTS_FILE, state, metadata={"format": RUN_FORMAT})
        for name, content in (extra_files or {}).items():
            atomic_write_bytes(staging / name, content)
        meta.save(staging / META_FILE)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
        os.replace(staging, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
