"""The lecture's schemes side by side (Fashion-MNIST resnet18): one row per scheme, one seed.

Issue #18 asks for seed 004's whole table on one model under the protocol of
:mod:`bench_sensitivity` (issue #15): one cached full-precision baseline trained to its
plateau, a full-precision control fine-tuned as long as every other row, then for each
configuration of ``--configs`` a real `binarize convert` run (calibration, ``--epochs`` of
fine-tuning with distillation, the best epoch kept). Memory and binary operations are
`binarize report`'s accounting of each run.

A configuration is ``scheme:M:N`` with optional ``:key=value,key=value`` settings (recipe
keys, e.g. ``realtobin:1:1:distill=attention,progressive=true``). A ``progressive`` run
trains three stages of ``--epochs / 3`` each, so every row sees the same number of epochs.

Runs are shared with :mod:`bench_sensitivity` (same ``results.jsonl`` and protocol): the
control and the PA/ABC rows of its first seed are reused, not rerun.

Usage::

    python benchmarks/bench_schemes.py --model resnet18 --baseline-epochs 8 --epochs 1 \\
        --seed 0 --configs bnn:1:1 xnor:1:1 bireal:1:1 dorefa:1:1 ttq:2:0 pa:4:5 abc:5:5 \\
        [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch
from _cmdline import shown_args
from bench_sensitivity import (
    Results,
    add_protocol_args,
    control_run,
    converted_run,
    protocol_of,
)

#: What each scheme is called in seed 004's table.
NAMES = {
    "bnn": "BNN",
    "xnor": "XNOR-Net",
    "bireal": "Bi-Real",
    "dorefa": "DoReFa",
    "realtobin": "Real-to-Bin",
    "ttq": "TTQ",
    "pa": "PA",
    "abc": "ABC",
}


def parse(text: str) -> tuple[str, int, int, dict[str, Any]]:
    """``scheme:M:N[:k=v,...]`` -> ``(scheme, M, N, settings)`` (values read as TOML, a bare word as a string)."""
    parts = text.split(":", 3)
    if len(parts) < 3:
        raise SystemExit(f"bench_schemes: config {text!r} is not scheme:M:N[:key=value,...]")
    scheme, m, n = parts[0], int(parts[1]), int(parts[2])
    extra: dict[str, Any] = {}
    if len(parts) == 4 and parts[3]:
        for item in parts[3].split(","):
            key, _, value = item.partition("=")
            try:  # true, 0.5, "x" as TOML; a bare word as itself
                extra[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                extra[key] = value
    return scheme, m, n, extra


def key_of(scheme: str, m: int, n: int, extra: dict[str, Any]) -> str:
    """The run's name; the plain form equals bench_sensitivity's, so its runs are reused."""
    suffix = "".join(f"-{k}_{v}".lower() for k, v in sorted(extra.items()))
    return f"{scheme}-M{m}N{n}{suffix}"


def title(scheme: str, m: int, n: int, extra: dict[str, Any]) -> str:
    name = NAMES.get(scheme, scheme)
    extras = ", ".join(f"{k} {v}".lower() for k, v in sorted(extra.items()))
    return f"{name} ({m},{'FP' if n == 0 else n})" + (f", {extras}" if extras else "")


def measure(args: argparse.Namespace, results: Results) -> list[tuple[str, dict[str, Any]]]:
    def once(key: str, fn: Any) -> dict[str, Any]:
        row = results.get(key)
        if row is None:
            print(f"[{time.strftime('%H:%M:%S')}] running {key}", flush=True)
            row = results.add(key, fn())
        return row

    seed = args.seed
    rows = [("control", once(f"control/seed{seed}", lambda: control_run(args, seed)))]
    for text in args.configs:
        scheme, m, n, extra = parse(text)
        over = dict(extra)
        if over.get("progressive"):
            over["epochs"] = args.epochs / 3
        name = key_of(scheme, m, n, extra)
        row = once(
            f"{name}/seed{seed}",
            lambda nm=name, sc=scheme, mm=m, nn=n, ov=over: converted_run(
                args, seed, nm, scheme=sc, M=mm, N=nn, **ov
            ),
        )
        rows.append((title(scheme, m, n, extra), row))
    return rows


def markdown(args: argparse.Namespace, rows: list[tuple[str, dict[str, Any]]], command: str) -> str:
    control = rows[0][1]
    minutes = sum(float(r.get("seconds", 0.0)) for _, r in rows) / 60
    lines = [
        f"## The lecture's schemes side by side on {args.data}: {args.model} (issue #18)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {platform.platform()}",
        f"- command: `{command}` ({minutes:.0f} min: the runs' wall times, summed; rows reused "
        "from the sensitivity benchmark were timed there)",
        f"- protocol: as the sensitivity benchmark (timm {args.model}, random init, one baseline "
        f"trained {args.baseline_epochs} epochs; every row {args.epochs:g} epoch(s) of Adam "
        f"(lr {args.lr}, cosine), batch {args.batch_size}, distillation from the baseline, the "
        f"best epoch kept), one seed ({args.seed}); a `progressive` row trains three stages of "
        f"{args.epochs / 3:.3g} epoch each; memory and BOPs from `binarize report`",
        "",
        "| scheme (M,N) | memory (Mbit) | BOPs (G) | calibrated top-1 | top-1 | gap to control "
        "| step time / FP step |",
        "|---|---|---|---|---|---|---|",
        f"| full precision (baseline, plateau) | - | - | - | {control['baseline_top1']:.2f} | "
        f"{control['top1'] - control['baseline_top1']:+.2f} | 1.00 |",
        f"| full precision (control: +{args.epochs:g} epoch(s)) | - | - | - | "
        f"{control['top1']:.2f} | 0.00 | - |",
    ]
    for name, r in rows[1:]:
        ratio = f"{r['step_ratio']:.2f}" if r.get("step_ratio") else "-"
        lines.append(
            f"| {name} | {r['memory_bits'] / 1e6:.3f} | {r['bops'] / 1e9:.3f} | "
            f"{r['calibrated']:.2f} | {r['top1']:.2f} | {control['top1'] - r['top1']:+.2f} | "
            f"{ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["bnn:1:1", "xnor:1:1", "bireal:1:1", "dorefa:1:1", "ttq:2:0", "pa:4:5", "abc:5:5"],
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", default=None, help="Write the markdown section here.")
    args = parser.parse_args()
    protocol = protocol_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Results(args.runs_dir / "results.jsonl", protocol)
    rows = measure(args, results)
    command = "python " + " ".join([sys.argv[0], *shown_args(None)])
    text = markdown(args, rows, command)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
