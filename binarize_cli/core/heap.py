"""Keep freed memory in the process while a model trains on the CPU (glibc's ``malloc``).

A training step frees and allocates the same large tensors every step: activations, their
gradients, and in a binarized model the quantized weights and inputs. glibc hands large
blocks back to the kernel when they are freed (``munmap`` for blocks above its mmap
threshold, a trim of the heap's top above its trim threshold), so the next step's tensors
land on fresh pages: one page fault and one zeroed 4 KiB page per page touched. Measured
(``benchmarks/bench_step_time.py``, timm resnet18, batch 64, this repository's CPU machine):
a full-precision step at 224x224 took about 0.94 million minor page faults (3.7 GB of fresh
pages), a PA step 1.1 million; at 32x32 a few thousand to 16,000 per step, depending on where
the heap's top happened to lie.  Allocators built for this (jemalloc, tcmalloc; PyTorch's CPU
tuning guide recommends them) keep freed memory for reuse. :func:`retained_heap` does the same
with glibc's own knobs, for the duration of a ``with`` block:

* ``mallopt(M_MMAP_MAX, 0)``: every block comes from the heap, none from its own mapping;
* ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)``: freed memory at the heap's top stays.

On exit it sets glibc's steady-state values back (``M_MMAP_MAX`` 65536, mmap threshold
32 MiB, trim threshold 64 MiB: glibc's dynamic thresholds at their ceiling; ``mallopt``
cannot restore the dynamic adjustment itself) and calls ``malloc_trim(0)``, so what training
freed goes back to the system. The process's peak resident memory is unchanged (the blocks
were in use at the peak anyway); between steps the memory stays mapped instead of being
returned and faulted in again.

Nothing happens (the block runs as is) when the C library is not glibc (macOS, musl), when
``BINARIZE_RETAIN_HEAP=0``, or when the user chose the allocator's behaviour already: any
``MALLOC_*`` variable or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``, or jemalloc /
tcmalloc / mimalloc in ``LD_PRELOAD``. Calls nest (only the outermost block changes anything). Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Iterator

__all__ = ["ENV", "retained_heap", "why_not"]

#: Environment variable: ``0`` leaves the C allocator as it is.
ENV = "BINARIZE_RETAIN_HEAP"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

_RETAIN = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
#: glibc's defaults / dynamic ceilings on 64-bit: DEFAULT_MMAP_MAX, DEFAULT_MMAP_THRESHOLD_MAX
#: and twice that for the trim threshold (what the dynamic scheme reaches after large frees).
_RELEASE = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
_CUSTOM_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_lock = threading.Lock()
_depth = 0
_active = False


def why_not() -> str | None:
    """Why :func:`retained_heap` would leave the allocator alone here (None: it would not)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return f"{ENV}=0"
    tuned = sorted(k for k in os.environ if k.startswith("MALLOC_"))
    if tuned:
        return f"{tuned[0]} is set"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _CUSTOM_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    return None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        lib = ctypes.CDLL(name)
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return lib


def _apply(lib: ctypes.CDLL, settings: tuple[tuple[int, int], ...]) -> bool:
    """Every setting, even after one is refused; whether glibc accepted them all."""
    return all([lib.mallopt(param, value) == 1 for param, value in settings])


@contextlib.contextmanager
def retained_heap(enabled: bool = True) -> Iterator[bool]:
    """Run the body with glibc keeping freed memory for reuse (see the module docstring).

    Yields whether the allocator keeps freed memory during the body. ``enabled=False`` (a run
    on a GPU, where the large tensors are not the C heap's) runs the body as is. Thread-safe
    and re-entrant: only the outermost block changes and restores the allocator.
    """
    global _depth, _active
    lib = _libc() if enabled and why_not() is None else None
    if lib is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _active = _apply(lib, _RETAIN)
        active = _active
    try:
        yield active
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:  # also after a partly refused change: nothing stays half-set
                _apply(lib, _RELEASE)
                lib.malloc_trim(0)
                _active = False
