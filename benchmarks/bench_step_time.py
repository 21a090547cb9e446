"""Training step time: full precision vs PA (4,5) vs ABC (5,5) on timm resnet18, one process.

A training step is forward + backward + Adam update on a random batch. Each configuration
is timed in the same process, interleaved round by round so slow drifts of a shared machine
hit every configuration alike; the reported figure is the median step time and its ratio to
the full-precision median. Targets (issue 16): PA <= 1.3x, ABC <= 1.5x full precision.

Eager rows train the binarized models as ``convert`` does without ``--compile``: the
quantizers run their fused kernels (``binarize_cli.quant.fused``). ``--unfused`` adds rows
with ``BINARIZE_FUSED=0`` (the eager quantizer path, one pass per threshold) for the same
models in the same process, so the kernels' gain is measured, not remembered.
``--compile`` adds a ``torch.compile`` (inductor, ``fullgraph=True``, ``dynamic=False``, the
inductor options of ``convert --compile``: ``binarize_cli.convert.training.compile_options``)
row beside each eager one, the full-precision model compiled too: compiled rows are compared
with compiled full precision, eager with eager. A further row compiles full precision with
inductor's default options, for comparison (on the CPU ``convert --compile`` turns inductor's
layout optimisation off). ``--device cuda`` (or ``cuda:N``) runs on a
GPU, synchronising around every timed step; the default is the CPU.

On the CPU the whole process runs as ``convert`` and ``binarize_cli.api.finetune`` train:
inside ``binarize_cli.core.heap.retained_heap`` (glibc keeps freed memory for the next step
instead of returning it and faulting fresh pages in). ``--system-heap`` leaves glibc's
defaults, for comparison (a separate run: the setting is per process).

Usage::

    python benchmarks/bench_step_time.py [--sizes 32 224] [--batch 64] [--rounds 5]
        [--warmup 2] [--device cpu|cuda|cuda:N] [--unfused] [--compile] [--system-heap]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import timm
import torch
from _cmdline import shown_args

from binarize_cli.convert.calibrate import calibrate_model
from binarize_cli.convert.surgery import binarize_model
from binarize_cli.convert.training import compile_options
from binarize_cli.core.heap import retained_heap
from binarize_cli.quant import fused

CONFIGS = (("full precision", None, 0, 0), ("PA", "pa", 4, 5), ("ABC", "abc", 5, 5))
TARGETS = {"pa": 1.3, "abc": 1.5}


def device_of(name: str) -> torch.device:
    """The benchmark's device; one clear line (SystemExit) when CUDA is asked but absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(
            f"bench_step_time: unknown --device {name!r}; use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"bench_step_time: --device {name} needs a GPU, but torch.cuda.is_available() is "
                f"False (torch {torch.__version__}); run on a CUDA machine or use --device cpu"
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise SystemExit(
                f"bench_step_time: --device {name}: only {torch.cuda.device_count()} GPU(s) visible"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise SystemExit(f"bench_step_time: unknown --device {name!r}; use cpu, cuda or cuda:N")
    return device


def build(scheme: str | None, m: int, n: int, size: int, batch: int) -> torch.nn.Module:
    """resnet18 (10 classes), binarized and calibrated on the CPU when ``scheme`` is given."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    if scheme is None:
        return model
    reference = copy.deepcopy(model).eval()
    result = binarize_model(model, scheme, m, n, first_conv="conv1", classifier="fc")
    calibrate_model(result.model, reference, [torch.randn(min(batch, 16), 3, size, size)])
    return result.model


@contextlib.contextmanager
def unfused_quantizers(on: bool):
    """``BINARIZE_FUSED=0`` while the block runs (when ``on``): the eager quantizer path."""
    if not on:
        yield
        return
    old = os.environ.get(fused.ENV)
    os.environ[fused.ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[fused.ENV]
        else:
            os.environ[fused.ENV] = old


#: How a row runs its model: eager, compiled as ``convert --compile`` compiles, or compiled
#: with inductor's default options.
EAGER, COMPILED, INDUCTOR_DEFAULTS = "eager", "compiled", "compiled, inductor defaults"


def step_fn(
    model: torch.nn.Module,
    size: int,
    batch: int,
    device: torch.device,
    mode: str,
    unfused: bool = False,
) -> Callable[[], float]:
    """A timed training step (seconds) of ``model`` on a fixed random batch on ``device``
    (``mode`` one of :data:`EAGER`, :data:`COMPILED`, :data:`INDUCTOR_DEFAULTS`; the eager
    quantizer path when ``unfused``)."""
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = model
    if mode != EAGER:
        options = compile_options(device) if mode == COMPILED else {}
        forward = torch.compile(model, fullgraph=True, dynamic=False, options=options or None)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        with unfused_quantizers(unfused):
            sync()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            opt.step()
            sync()
            return time.perf_counter() - start

    return step


Row = tuple[str, str | None, int, int, str, bool]


def rows(compile_too: bool, unfused_too: bool = False) -> list[Row]:
    """``(label, scheme, M, N, mode, unfused)`` for every timed configuration."""
    out: list[Row] = []
    for mode in (EAGER, COMPILED) if compile_too else (EAGER,):
        for name, scheme, m, n in CONFIGS:
            label = name if scheme is None else f"{name} (M={m}, N={n})"
            out.append((label + ("" if mode == EAGER else f", {mode}"), scheme, m, n, mode, False))
            if unfused_too and scheme is not None and mode == EAGER:
                out.append((label + ", unfused", scheme, m, n, EAGER, True))
    if compile_too:
        out.append((f"full precision, {INDUCTOR_DEFAULTS}", None, 0, 0, INDUCTOR_DEFAULTS, False))
    return out


def reference(label: str, mode: str) -> str:
    """The label of the full-precision row a row's ratio is taken against (the row itself for
    full precision compiled with inductor's defaults)."""
    if mode == INDUCTOR_DEFAULTS:
        return label
    return "full precision" + ("" if mode == EAGER else f", {mode}")


def measure(
    size: int,
    batch: int,
    rounds: int,
    warmup: int,
    device: torch.device,
    compile_too: bool,
    unfused_too: bool = False,
) -> dict[str, float]:
    """Median step time per configuration label (warm-up steps also compile)."""
    steps = {
        label: step_fn(build(s, m, n, size, batch), size, batch, device, mode, unfused)
        for label, s, m, n, mode, unfused in rows(compile_too, unfused_too)
    }
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            times[label].append(step())
    return {label: statistics.median(t) for label, t in times.items()}


def machine(device: torch.device) -> str:
    cpu = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device}); host {cpu}"
    return f"{cpu}, {platform.processor() or platform.platform()}"


def markdown(
    results: dict[int, dict[str, float]],
    batch: int,
    command: str,
    device: torch.device,
    compile_too: bool,
    unfused_too: bool = False,
    heap: str = "glibc defaults",
) -> str:
    lines = [
        "## Training step time (issue 16)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine(device)}",
        f"- command: `{command}`",
        f"- C heap: {heap}",
        "- target: binarized step <= 1.3x (PA) / 1.5x (ABC) the full-precision step, same "
        "process, interleaved; compiled rows against full precision compiled with the same "
        "inductor options (those of `convert --compile`); unfused rows (BINARIZE_FUSED=0, the "
        "eager quantizer path) and full precision with inductor's default options for "
        "comparison, no target",
        "",
        "| input | batch | configuration | median step (s) | ratio to FP | target met |",
        "|---|---|---|---|---|---|",
    ]
    for size, res in results.items():
        for label, scheme, _m, _n, mode, unfused in rows(compile_too, unfused_too):
            ratio = res[label] / res[reference(label, mode)]
            target = scheme is not None and not unfused
            met = "" if not target else ("yes" if ratio <= TARGETS[str(scheme)] else "no")
            lines.append(
                f"| {size}x{size} | {batch} | {label} | {res[label]:.3f} | {ratio:.2f}x | {met} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps (at least 1).")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--compile", action="store_true", help="Add torch.compile rows beside the eager ones."
    )
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="Add rows with BINARIZE_FUSED=0 (the eager quantizer path) for comparison.",
    )
    parser.add_argument(
        "--system-heap",
        action="store_true",
        help="Leave glibc's allocator at its defaults (convert keeps freed memory on the CPU).",
    )
    parser.add_argument("--out", default=None, help="Write the markdown section here.")
    args = parser.parse_args()
    device = device_of(args.device)
    with retained_heap(device.type == "cpu" and not args.system_heap) as retained:
        results = {
            size: measure(
                size,
                args.batch,
                args.rounds,
                max(args.warmup, 1),
                device,
                args.compile,
                args.unfused,
            )
            for size in args.sizes
        }
    heap = "freed memory retained, as convert trains" if retained else "glibc defaults"
    text = markdown(
        results,
        args.batch,
        "python " + " ".join([sys.argv[0], *shown_args(None)]),
        device,
        args.compile,
        args.unfused,
        heap,
    )
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
