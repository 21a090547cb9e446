"""Atomic file writes and output-location checks: the one way the package writes a file that
must appear whole.

:class:`StagedFile` is the mechanism: a temporary file in the target's directory that is
renamed (``os.replace``) onto the target when its ``with`` block ends cleanly, and removed
when it ends with an exception (Ctrl-C included). The staged file is ``fsync`` ed before the
rename and the directory after it, so after a crash the target is the old file or the new
one, whole, never a mixture. :func:`atomic_write_bytes` / :func:`atomic_write_json` wrap it
for content held in memory; a writer that needs a path (``savefig``, a compiler's ``-o``)
uses :class:`StagedFile` directly.

Errors: with ``flag`` set (the default ``"-o"``), an unwritable location is a one-line
:class:`~binarize_cli.core.errors.BadInputError` naming the path and the option to change,
any other failed write (disk full) a :class:`~binarize_cli.core.errors.BinarizeError`; with
``flag=None`` the ``OSError`` propagates unchanged (caches, where a failed write is not fatal).
:func:`check_writable_dir` / :func:`check_writable_file` check an output location *before*
any work, creating nothing (a probe file is created and removed at once).

Files and directories get the usual ``0o666``/``0o777`` modes minus the umask (not the
``0o600`` of ``tempfile``). Torch-free: the torch-free runtime imports this module.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from binarize_cli.core.errors import BadInputError, BinarizeError

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


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def location_error(path: Path, exc: OSError, flag: str) -> BinarizeError:
    """A one-line error for a failed write: bad input when the location is wrong, else failure."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _LOCATION_ERRNOS:
        return BadInputError(f"cannot write to {path} ({reason}); choose another {flag}")
    return BinarizeError(
        f"writing {path} failed: {reason}; free some space or choose another {flag}"
    )


def fsync_dir(directory: Path) -> None:
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFile:
    """A temporary file next to ``path`` that becomes ``path`` when its ``with`` block ends
    cleanly.

    Creating the object creates the target's directory (parents included) and an empty
    temporary file ``.NAME.*.tmp`` there with mode ``0o666 & ~umask``; both raise ``OSError``
    on an unwritable location, before any work. ``with staged as tmp:`` yields the temporary
    path for the writer; on a clean exit the file is fsynced, renamed onto ``path`` and the
    directory fsynced; on any exception (``KeyboardInterrupt`` included) it is removed and
    ``path`` is left as it was. A writer may replace the temporary file (a linker does); its
    mode is then the writer's.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self.tmp = Path(tmp)
        try:
            os.fchmod(fd, 0o666 & ~umask())
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            _fsync_file(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, flag: str | None = "-o"
) -> None:
    """Write ``data`` to ``path`` through a :class:`StagedFile`: whole or not at all.

    An existing file is replaced only once the new one is complete. ``flag`` names the option
    to change in the one-line error for an unwritable location or a failed write; ``None``
    lets the ``OSError`` through. The temporary file is removed either way.
    """
    target = Path(path)
    try:
        with StagedFile(target) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        if flag is None:
            raise
        raise location_error(target, exc, flag) from None


def json_bytes(obj: Any) -> bytes:
    """The package's JSON file form: 2-space indent, keys in insertion order, final newline."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, flag: str | None = "-o") -> None:
    """:func:`atomic_write_bytes` of :func:`json_bytes` of ``obj``."""
    atomic_write_bytes(path, json_bytes(obj), flag=flag)


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
        raise location_error(d, exc, flag) from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def check_output_file(path: Path, hint: str, flag: str = "-o") -> None:
    """Raise BadInputError when ``path`` is a directory (``hint``: what to pass instead) or its
    directory does not exist. Nothing is created."""
    if path.is_dir():
        raise BadInputError(f"{path} is a directory; pass {hint}")
    if not path.parent.exists():
        raise BadInputError(
            f"directory {path.parent} does not exist; create it or choose another {flag}"
        )


def check_writable_file(path: str | os.PathLike[str], flag: str = "-o") -> None:
    """Raise BadInputError unless ``path`` can be written as a file (its directory must exist)."""
    p = Path(path)
    check_output_file(p, f"a file name to {flag}", flag)
    if not p.parent.is_dir():
        raise BadInputError(f"{p.parent} is not a directory; choose another {flag}")
    check_writable_dir(p.parent, flag)
