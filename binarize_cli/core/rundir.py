"""Run directories: where `convert` leaves its result and `report`/`export`/`verify` find it.

A run directory holds exactly two files:

* ``model.safetensors``: the converted model's state dict (latent weights, quantizer
  endpoints/levels, batch-norm statistics);
* ``binarize.json``: what was run and what it measured. Contract keys (BRIEF section 2):
  ``model``, ``scheme``, ``M``, ``N``, ``data``, ``recipe``, ``accuracy`` (``fp``,
  ``calibrated``, ``binarized``, each ``top1``/``top5``), ``timings`` (``baseline_epoch_s``,
  ``finetune_epoch_s``, ``calibrate_s``); plus what is needed to rebuild the model without
  the network: ``num_classes``, ``keep``, ``scheme_options``, ``input_size``, ``mean``,
  ``std``, ``first_conv``, ``classifier``.

Both files are written to temporary names and renamed into place, ``binarize.json`` last, so a
directory with a ``binarize.json`` is always complete.

Writing safely (used by every command that writes): :func:`atomic_write_bytes` writes a
temporary file in the target's directory and ``os.replace`` s it into place, so a file appears
whole or not at all, and an existing file is either kept or replaced, never half-overwritten.
:func:`check_writable_dir` / :func:`check_writable_file` check an output location *before*
any work, creating nothing (a probe file is created and removed at once), and raise a one-line
:class:`~binarize_cli.core.errors.BadInputError` naming the path and the option to change.
Files and directories get the usual ``0o666``/``0o777`` modes minus the umask (not the
``0o600``/``0o700`` of ``tempfile``).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from binarize_cli.core.errors import BadInputError, BinarizeError, RunDirError

META_FILE = "binarize.json"
WEIGHTS_FILE = "model.safetensors"
RUN_FORMAT = "binarize-run"
RUN_FORMAT_VERSION = 1
DEFAULT_RUNS_ROOT = Path("runs")

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


@dataclass
class Run:
    """A loaded run: its directory, its metadata and the rebuilt model (eval mode)."""

    path: Path
    meta: dict[str, Any]
    model: nn.Module


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


def read_meta(path: Path) -> dict[str, Any]:
    """Read and check ``binarize.json``."""
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(
            f"{meta_path} is unreadable or not JSON ({exc.__class__.__name__}); rerun `binarize convert`"
        ) from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{meta_path} is not a binarize run record")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise RunDirError(
            f"{meta_path} lacks keys {', '.join(missing)}; it was not written by `binarize convert`"
        )
    version = meta.get("format_version", RUN_FORMAT_VERSION)
    if version != RUN_FORMAT_VERSION:
        raise RunDirError(
            f"{meta_path} has run format version {version}; this binarize reads version {RUN_FORMAT_VERSION}"
        )
    return meta


def build_model_from_meta(meta: Mapping[str, Any]) -> nn.Module:
    """Rebuild the converted architecture (random weights) described by a run's metadata."""
    from binarize_cli.convert.surgery import binarize_model
    from binarize_cli.load.models import create_architecture

    loaded = create_architecture(str(meta["model"]), num_classes=int(meta["num_classes"]))
    result = binarize_model(
        loaded.model,
        str(meta["scheme"]),
        int(meta["M"]),
        int(meta["N"]),
        keep=tuple(meta.get("keep") or ()),
        first_conv=meta.get("first_conv", loaded.first_conv),
        classifier=meta.get("classifier", loaded.classifier),
        options=dict(meta.get("scheme_options") or {}),
    )
    return result.model


def load_run(path: str | Path | None) -> Run:
    """Load a run directory: metadata plus the converted model with its weights, in eval mode."""
    from safetensors.torch import load_file

    run_path = resolve_run(path)
    meta = read_meta(run_path)
    model = build_model_from_meta(meta)
    try:
        state = load_file(str(run_path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise RunDirError(
            f"{run_path / WEIGHTS_FILE} is corrupt ({exc}); rerun `binarize convert`"
        ) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = ", ".join((list(missing) + list(unexpected))[:3])
        raise RunDirError(
            f"{run_path / WEIGHTS_FILE} does not match its binarize.json (first keys: {first})"
        )
    model.eval()
    return Run(path=run_path, meta=meta, model=model)


#: errno values that mean "this location cannot be written" (the user picks another).
_LOCATION_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EISDIR,
}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _location_error(path: Path, exc: OSError, flag: str) -> BinarizeError:
    """A one-line error for a failed write: bad input when the location is wrong, else failure."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _LOCATION_ERRNOS:
        return BadInputError(f"cannot write to {path} ({reason}); choose another {flag}")
    return BinarizeError(
        f"writing {path} failed: {reason}; free some space or choose another {flag}"
    )


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(directory: str | os.PathLike[str], flag: str = "-o") -> None:
    """Raise BadInputError unless files can be created in ``directory``.

    A directory that does not exist yet is checked through its nearest existing ancestor
    (where it would be created). Nothing is left behind: a probe file is created and removed.
    """
    d = Path(directory)
    base = _nearest_existing(d)
    if not base.is_dir():
        raise BadInputError(
            f"cannot write into {d}: {base} is not a directory; choose another {flag}"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".binarize-probe.", dir=base)
    except OSError as exc:
        raise _location_error(d, exc, flag) from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def check_writable_file(path: str | os.PathLike[str], flag: str = "-o") -> None:
    """Raise BadInputError unless ``path`` can be written as a file (its directory must exist)."""
    p = Path(path)
    if p.is_dir():
        raise BadInputError(f"{p} is a directory; pass a file name to {flag}")
    if not p.parent.is_dir():
        if p.parent.exists():
            raise BadInputError(f"{p.parent} is not a directory; choose another {flag}")
        raise BadInputError(
            f"directory {p.parent} does not exist; create it or choose another {flag}"
        )
    check_writable_dir(p.parent, flag)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: some filesystems cannot fsync directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, flag: str = "-o") -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename.

    The file appears whole or not at all; an existing file is replaced only once the new one
    is complete. An unwritable location raises a one-line BadInputError (``flag`` names the
    option to change), a failed write (disk full) a BinarizeError; the temporary file is
    removed either way.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _location_error(path, exc, flag) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _location_error(path, exc, flag) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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


def write_run(path: Path, state: Mapping[str, Any], meta: dict[str, Any]) -> Path:
    """Write a complete run directory atomically.

    Both files are written into a fresh sibling directory which is then renamed into place;
    an existing run at ``path`` is moved aside first and removed only after the new one is in
    place, so ``path`` is never a half-written run: it is the old complete run, the new one,
    or (for a process killed between the two renames) missing, with the old run in
    ``.NAME.*.old`` where :func:`recover_moved_aside` finds it. An unwritable location is a
    one-line BadInputError.
    """
    full_meta = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **meta}
    missing = [k for k in REQUIRED_KEYS if k not in full_meta]
    if missing:
        raise ValueError(f"run metadata lacks {missing}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent)
        )
    except OSError as exc:
        raise _location_error(path, exc, "-o") from None
    recover_moved_aside(path)
    remove_stale_staging(path)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; a run dir gets normal permissions
    try:
        save_state_dict_atomic(staging / WEIGHTS_FILE, state, metadata={"format": RUN_FORMAT})
        atomic_write_json(staging / META_FILE, full_meta)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
        os.replace(staging, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
