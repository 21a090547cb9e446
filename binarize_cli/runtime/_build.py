"""Build and load the optional C kernel (``_kernel.c``) with the system C compiler.

The shared library is compiled at first use into a cache directory
(``$BINARIZE_CACHE/kernels``, default ``~/.cache/binarize/kernels``) under a name that hashes
the source, the compiler flags, the compiler's version and the machine, so a changed source
or another CPU gets its own build. Compilation writes to a temporary name that is renamed
into place (:class:`binarize_cli.core.files.StagedFile`; concurrent processes are safe).
Anything that fails (no compiler, a compile error, a library that does not load) makes
:func:`load_kernel` return ``None`` with a reason, and the runtime uses the NumPy backend.

``BINARIZE_CC`` names the compiler (default ``cc``); ``BINARIZE_KERNEL_FLAGS`` replaces the
architecture flags (default ``-march=native``; the tests use it to build the AVX2 and the
portable paths on an AVX-512 machine).

This module imports the standard library and the torch-free :mod:`binarize_cli.core.files`
only (no NumPy, no torch).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from binarize_cli.core.files import StagedFile

SOURCE = Path(__file__).with_name("_kernel.c")
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-std=c99")
DEFAULT_ARCH_FLAGS = ("-march=native",)
KERNEL_VERSION = 3

_u32p = ctypes.POINTER(ctypes.c_uint32)
_i32p = ctypes.POINTER(ctypes.c_int32)
_f32p = ctypes.POINTER(ctypes.c_float)
_f64p = ctypes.POINTER(ctypes.c_double)
_int = ctypes.c_int


def cache_dir() -> Path:
    """Where compiled kernels live: ``$BINARIZE_CACHE/kernels`` or ``~/.cache/binarize/kernels``."""
    root = os.environ.get("BINARIZE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "binarize"
    return base / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("BINARIZE_CC", "cc")
    return shutil.which(cc)


def _arch_flags(override: tuple[str, ...] | None) -> tuple[str, ...]:
    if override is not None:
        return override
    env = os.environ.get("BINARIZE_KERNEL_FLAGS")
    if env is not None:
        return tuple(env.split())
    return DEFAULT_ARCH_FLAGS


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=20)
        return (out.stdout.splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError):
        return cc


@dataclass
class KernelLibrary:
    """A loaded kernel: the ctypes library, its SIMD level (2 AVX-512, 1 AVX2, 0 C), its path."""

    lib: ctypes.CDLL
    simd: int
    path: Path
    flags: tuple[str, ...]

    @property
    def simd_name(self) -> str:
        return {2: "avx512-vpopcntdq", 1: "avx2", 0: "portable-c"}.get(self.simd, "unknown")


def _declare(lib: ctypes.CDLL) -> None:
    lib.bk_version.restype = _int
    lib.bk_simd.restype = _int
    qp_args = [
        _int,
        _int,
        _int,
        _int,
        _int,
        _int,
        _int,  # B C H W Cg Cwg Wt
        _f64p,
        _int,
        _u32p,
        _int,  # thr nthr codes N
        _int,
        _int,
        _int,
        _int,
        _u32p,  # ph pw Hp Wp act
    ]
    lib.bk_quantize_pack_f32.argtypes = [_f32p, *qp_args]
    lib.bk_quantize_pack_f32.restype = None
    lib.bk_quantize_pack_f64.argtypes = [_f64p, *qp_args]
    lib.bk_quantize_pack_f64.restype = None
    lib.bk_im2col.argtypes = [_u32p] + [_int] * 16 + [_u32p]
    lib.bk_im2col.restype = None
    lib.bk_bgemm_f32.argtypes = [
        _u32p,
        _int,
        _int,
        _u32p,
        _int,
        _int,
        _int,
        _f32p,
        _int,
        _int,
        _int,
        _f32p,
        _int,
    ]
    lib.bk_bgemm_f32.restype = _int
    lib.bk_bgemm_counts.argtypes = [_u32p, _int, _int, _u32p, _int, _int, _int, _int, _i32p, _int]
    lib.bk_bgemm_counts.restype = _int


def build_kernel(arch_flags: tuple[str, ...] | None = None) -> tuple[Path | None, str]:
    """Compile ``_kernel.c`` (or reuse the cached build); returns ``(path, "")`` or ``(None, why)``."""
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set BINARIZE_CC)"
    flags = (*BASE_FLAGS, *_arch_flags(arch_flags))
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join(flags).encode(),
                _compiler_id(cc).encode(),
                platform.machine().encode(),
                platform.system().encode(),
                str(KERNEL_VERSION).encode(),
            ]
        )
    ).hexdigest()[:20]
    target = cache_dir() / f"bitconv-{key}.so"
    if target.is_file():
        return target, ""
    try:
        staged = StagedFile(target)  # the compiler writes it; it becomes `target` whole
    except OSError as exc:
        return None, f"cannot write the kernel cache {target.parent}: {exc.strerror}"
    try:
        with staged as tmp:
            subprocess.run(
                [cc, *flags, str(SOURCE), "-o", str(tmp)],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
    except subprocess.CalledProcessError as exc:
        first = (exc.stderr.strip().splitlines() or ["compile error"])[0]
        return None, f"C kernel did not compile: {first[:200]}"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"C kernel did not compile: {exc}"
    return target, ""


_LOADED: dict[tuple[str, ...] | None, KernelLibrary | str] = {}


def load_kernel(arch_flags: tuple[str, ...] | None = None) -> tuple[KernelLibrary | None, str]:
    """The compiled kernel (built on first use, cached per process), or ``(None, reason)``."""
    key = _arch_flags(arch_flags)
    cached = _LOADED.get(key)
    if isinstance(cached, KernelLibrary):
        return cached, ""
    if isinstance(cached, str):
        return None, cached
    path, why = build_kernel(key)
    if path is None:
        _LOADED[key] = why
        return None, why
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        if lib.bk_version() != KERNEL_VERSION:
            raise OSError("kernel version mismatch")
        result = KernelLibrary(lib=lib, simd=int(lib.bk_simd()), path=path, flags=key)
    except (OSError, AttributeError) as exc:
        why = f"C kernel did not load: {exc}"
        _LOADED[key] = why
        return None, why
    _LOADED[key] = result
    return result, ""
