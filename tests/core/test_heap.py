"""binarize_cli.core.heap: glibc keeps freed memory while a model trains on the CPU, and gives
it back afterwards; the user's own allocator choice is left alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from binarize_cli.core import heap

GLIBC = heap.why_not() is None

# Each probe runs in a fresh interpreter: glibc's thresholds are per process, and once set
# they are no longer adjusted dynamically, so the test process's own state proves nothing.
PROBE = """
import resource, sys
import torch
from binarize_cli.core.heap import retained_heap

def faults_per_step(warmup=3, steps=4):
    # minor page faults per "training step" (a few large tensors made, used and freed, 64 MiB
    # the largest: above glibc's largest dynamic mmap threshold), after warm-up
    def step():
        xs = [torch.ones(n) for n in (1 << 24, 1 << 22, 3 << 20, 1 << 21)]
        return sum(float(x.sum()) for x in xs)
    for _ in range(warmup):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

def rss_mib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20
"""


def _run(body: str) -> str:
    code = PROBE + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason=f"needs glibc's malloc ({heap.why_not()})")
def test_freed_memory_is_reused_inside_and_faulted_in_afresh_outside() -> None:
    default = float(_run("print(faults_per_step())"))
    retained = float(
        _run("with retained_heap() as on:\n    assert on\n    print(faults_per_step())")
    )
    # the 64 MiB tensor alone is 16384 pages: glibc's defaults map and unmap it every step
    assert default > 16_000
    assert retained < 100


@pytest.mark.skipif(not GLIBC, reason=f"needs glibc's malloc ({heap.why_not()})")
def test_the_memory_goes_back_to_the_system_on_exit() -> None:
    body = """
    with retained_heap():
        base = rss_mib()
        blocks = [torch.ones(1 << 22) for _ in range(32)]  # 512 MiB in 16 MiB blocks
        del blocks
        kept = rss_mib() - base
    print(kept, rss_mib() - base)
    """
    kept, after = map(float, _run(body).split())
    assert kept > 400  # freed, but kept for the next step
    assert after < 100  # given back when training is over


def test_nesting_changes_the_allocator_once_and_restores_it() -> None:
    with heap.retained_heap() as outer:
        with heap.retained_heap() as inner:
            assert inner == outer == GLIBC
        assert heap._active == GLIBC  # the inner exit did not restore
    assert heap._depth == 0 and not heap._active
    with heap.retained_heap(enabled=False) as on:
        assert on is False and heap._depth == 0


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (heap.ENV, "0", f"{heap.ENV}=0"),
        ("MALLOC_ARENA_MAX", "2", "MALLOC_ARENA_MAX is set"),
        ("MALLOC_TRIM_THRESHOLD_", "0", "MALLOC_TRIM_THRESHOLD_ is set"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0", "GLIBC_TUNABLES sets glibc.malloc"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc is preloaded"),
    ],
)
def test_a_users_own_allocator_choice_is_left_alone(monkeypatch, name, value, reason) -> None:
    monkeypatch.setenv(name, value)
    assert heap.why_not() == reason
    with heap.retained_heap() as on:
        assert on is False and heap._depth == 0
