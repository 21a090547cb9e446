"""core.files: whole-or-nothing writes, fsync of the file and its directory, error mapping."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from binarize_cli.core import files
from binarize_cli.core.errors import BadInputError, BinarizeError
from binarize_cli.core.files import StagedFile, atomic_write_bytes, atomic_write_json, json_bytes


def _fsynced(monkeypatch) -> list[tuple[str, bool]]:
    """Record (path, is_directory) for every fsync."""
    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, stat.S_ISDIR(os.fstat(fd).st_mode)))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_writes_whole_and_fsyncs_the_file_then_the_directory(tmp_path, monkeypatch) -> None:
    calls = _fsynced(monkeypatch)
    target = tmp_path / "sub" / "out.bin"  # the directory is created
    atomic_write_bytes(target, b"payload")
    assert target.read_bytes() == b"payload"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]
    assert calls[-1] == (str(target.parent), True)
    assert calls[-2][1] is False and Path(calls[-2][0]).name.startswith(".out.bin.")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~files.umask()


def test_json_form(tmp_path) -> None:
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, None]})
    assert (tmp_path / "a.json").read_bytes() == json_bytes({"b": 1, "a": [1.5, None]})
    assert json_bytes({"b": 1}) == b'{\n  "b": 1\n}\n'


def test_an_error_inside_the_block_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "f.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), StagedFile(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_a_writer_may_replace_the_staged_file(tmp_path) -> None:
    # A linker unlinks its output and creates a new file (with its own mode).
    target = tmp_path / "lib.so"
    with StagedFile(target) as tmp:
        tmp.unlink()
        tmp.write_bytes(b"\x7fELF")
        tmp.chmod(0o755)
    assert target.read_bytes() == b"\x7fELF"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["lib.so"]


def test_an_unwritable_location_is_one_line_bad_input(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BadInputError) as exc:
        atomic_write_bytes(blocker / "out.bin", b"data", flag="--plot")
    message = str(exc.value)
    assert "\n" not in message and "choose another --plot" in message
    # flag=None: the OSError itself (callers for which a failed write is not fatal).
    with pytest.raises(FileExistsError):
        atomic_write_bytes(blocker / "out.bin", b"data", flag=None)


def test_a_failed_write_is_a_failure(tmp_path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(BinarizeError) as exc:
        atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert not isinstance(exc.value, BadInputError) and exc.value.exit_code == 1
    assert "No space left on device" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_files_module_is_torch_free() -> None:
    code = (
        "import sys, binarize_cli.core.files, binarize_cli.core.metadata, "
        "binarize_cli.runtime._build; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "False"
