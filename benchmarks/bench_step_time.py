"""Training step time: full precision vs PA (4,5) vs ABC (5,5) on timm resnet18, one process.

A training step is forward + backward + Adam update on a random batch. Each configuration
is timed in the same process, interleaved round by round so slow drifts of a shared machine
hit every configuration alike; the reported figure is the median step time and its ratio to
the full-precision median. Target (schemes issue): binarized step <= 1.3x full precision.

Usage::

    python benchmarks/bench_step_time.py [--sizes 32 224] [--batch 64] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import statistics
import sys
import time

import timm
import torch
from _cmdline import shown_args

from binarize_cli.convert.calibrate import calibrate_model
from binarize_cli.convert.surgery import binarize_model

CONFIGS = (("full precision", None, 0, 0), ("PA", "pa", 4, 5), ("ABC", "abc", 5, 5))
TARGET = 1.3


def build(scheme: str | None, m: int, n: int, size: int, batch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    if scheme is None:
        return model
    reference = copy.deepcopy(model).eval()
    result = binarize_model(model, scheme, m, n, first_conv="conv1", classifier="fc")
    calibrate_model(result.model, reference, [torch.randn(min(batch, 16), 3, size, size)])
    return result.model


def step_fn(model: torch.nn.Module, size: int, batch: int):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    model.train()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def measure(size: int, batch: int, rounds: int, warmup: int) -> dict[str, float]:
    steps = {name: step_fn(build(s, m, n, size, batch), size, batch) for name, s, m, n in CONFIGS}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(step())
    return {name: statistics.median(t) for name, t in times.items()}


def markdown(results: dict[int, dict[str, float]], batch: int, command: str) -> str:
    lines = [
        "## Training step time (schemes issue)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.platform()}",
        f"- command: `{command}`",
        f"- target: binarized step <= {TARGET}x the full-precision step (same process, interleaved)",
        "",
        "| input | batch | configuration | median step (s) | ratio to FP | target met |",
        "|---|---|---|---|---|---|",
    ]
    for size, res in results.items():
        fp = res["full precision"]
        for name, _s, m, n in CONFIGS:
            label = name if _s is None else f"{name} (M={m}, N={n})"
            ratio = res[name] / fp
            met = "" if _s is None else ("yes" if ratio <= TARGET else "no")
            lines.append(
                f"| {size}x{size} | {batch} | {label} | {res[name]:.3f} | {ratio:.2f}x | {met} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="Write the markdown section here.")
    args = parser.parse_args()
    results = {size: measure(size, args.batch, args.rounds, args.warmup) for size in args.sizes}
    text = markdown(results, args.batch, "python " + " ".join([sys.argv[0], *shown_args(None)]))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
