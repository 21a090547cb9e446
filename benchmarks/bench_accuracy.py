"""Accuracy on Fashion-MNIST: full precision vs PA and ABC, timm resnet18 at 32x32.

Protocol (convert issue):

1. the full-precision baseline is trained to its plateau (``--baseline-epochs``, cached);
2. a *control*: the baseline given the same extra epochs as the binarized runs, with the
   fine-tuning optimiser and schedule, so a gap measures binarization, not extra training;
3. each configuration (PA (4,FP), (4,5), (8,7), ABC (5,5) by default) is converted from the
   same baseline with the real `binarize convert` pipeline and fine-tuned ``--epochs``.

Targets: PA (4,5) within 1.0 point top-1 of the control, PA (8,7) within 0.5, PA beats ABC at
fewer bases, accuracy rises with M and N. The markdown table says which targets hold.

Usage::

    python benchmarks/bench_accuracy.py [--baseline-epochs 10] [--epochs 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
from _cmdline import shown_args

from binarize_cli.convert.distributed import DistContext
from binarize_cli.convert.pipeline import (
    build_reference,
    finetune_student,
    load_inputs,
    run_convert,
)
from binarize_cli.convert.training import evaluate
from binarize_cli.core.metadata import accuracy_gap
from binarize_cli.core.settings import ConvertSettings, merge_settings

CONFIGS = (("pa", 4, 5), ("abc", 5, 5), ("pa", 8, 7), ("pa", 4, 0))


def bench_settings(args: argparse.Namespace, **scheme: object) -> ConvertSettings:
    """The `convert` settings of this benchmark (``scheme``: ``scheme``, ``M``, ``N``)."""
    return merge_settings(
        None,
        {
            "model": args.model,
            **scheme,
            "data": args.data,
            "epochs": args.epochs,
            "baseline_epochs": args.baseline_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "baseline_lr": args.baseline_lr,
            "seed": args.seed,
            "calib_batches": args.calib_batches,
            "distill": args.distill,
        },
    )


def control_run(args: argparse.Namespace) -> dict[str, float]:
    """The baseline fine-tuned ``--epochs`` more with the fine-tuning recipe (no binarization).

    The `convert` pipeline's own stages on one CPU process: load, baseline (the binarized
    runs' cached one), fine-tune a copy without a teacher, evaluate.
    """
    settings = bench_settings(args)
    ctx = DistContext()
    inputs = load_inputs(settings)
    reference = build_reference(settings, inputs, ctx)
    base = reference.baseline
    model = copy.deepcopy(reference.model)
    state = finetune_student(settings, model, inputs.data, ctx)
    acc = evaluate(model, reference.val_loader).to_dict()
    return {
        "baseline_top1": base.accuracy.top1,
        "baseline_top5": base.accuracy.top5,
        "baseline_epoch_s": sum(base.epoch_times) / max(1, len(base.epoch_times)),
        "control_top1": acc["top1"],
        "control_top5": acc["top5"],
        "control_epoch_s": sum(state.epoch_seconds) / max(1, len(state.epoch_seconds)),
    }


def binarized_run(args: argparse.Namespace, scheme: str, m: int, n: int, out: Path) -> dict:
    settings = bench_settings(args, scheme=scheme, M=m, N=n)
    # The benchmark's own run directories: a rerun replaces them.
    result = run_convert(settings, out_dir=out / f"{scheme}-M{m}N{n}", overwrite=True)
    return result.meta.to_dict()


def markdown(
    args: argparse.Namespace, control: dict, runs: list[dict], command: str, seconds: float
) -> str:
    c1, c5 = control["control_top1"], control["control_top5"]
    lines = [
        "## Accuracy on Fashion-MNIST (convert issue)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        f"- command: `{command}` ({seconds / 60:.0f} min)",
        f"- model: timm {args.model}, random init, trained on the full 60k/10k split at 32x32; "
        f"baseline {args.baseline_epochs} epochs (lr {args.baseline_lr}); every other row {args.epochs} "
        f"epochs of Adam (lr {args.lr}, cosine), batch {args.batch_size}"
        + (", distillation from the baseline" if args.distill else ""),
        "- targets: PA (4,5) within 1.0 point top-1 of the control, PA (8,7) within 0.5, "
        "PA beats ABC at fewer bases, accuracy rises with M and N",
        "",
        "| model | M | N | calibrated top-1 | top-1 | top-5 | gap to control (top-1; control - model) "
        "| epoch time / FP epoch |",
        "|---|---|---|---|---|---|---|---|",
        f"| full precision (baseline, plateau) | - | - | - | {control['baseline_top1']:.2f} | "
        f"{control['baseline_top5']:.2f} | {accuracy_gap(c1, control['baseline_top1']):+.2f} | 1.00 |",
        f"| full precision (control: +{args.epochs} epochs) | - | - | - | {c1:.2f} | {c5:.2f} | 0.00 | "
        f"{control['control_epoch_s'] / control['baseline_epoch_s']:.2f} |",
    ]
    by_cfg = {}
    for meta in runs:
        acc = meta["accuracy"]
        ft = meta["timings"]["finetune_epoch_s"]
        ratio = (sum(ft) / len(ft)) / control["control_epoch_s"] if ft else float("nan")
        n_label = "FP" if meta["N"] == 0 else str(meta["N"])
        lines.append(
            f"| {meta['scheme'].upper()} | {meta['M']} | {n_label} | {acc['calibrated']['top1']:.2f} | "
            f"{acc['binarized']['top1']:.2f} | {acc['binarized']['top5']:.2f} | "
            f"{accuracy_gap(c1, acc['binarized']['top1']):+.2f} | {ratio:.2f} |"
        )
        by_cfg[(meta["scheme"], meta["M"], meta["N"])] = acc["binarized"]["top1"]
    lines += ["", "Targets:", ""]

    def check(label: str, ok: bool | None) -> None:
        lines.append(f"- {label}: {'met' if ok else ('not measured' if ok is None else 'MISSED')}")

    pa45, pa87, abc55, pa4fp = (
        by_cfg.get(k) for k in (("pa", 4, 5), ("pa", 8, 7), ("abc", 5, 5), ("pa", 4, 0))
    )
    check("PA (4,5) within 1.0 point of the control", None if pa45 is None else c1 - pa45 <= 1.0)
    check("PA (8,7) within 0.5 point of the control", None if pa87 is None else c1 - pa87 <= 0.5)
    check("PA (4,5) beats ABC (5,5)", None if pa45 is None or abc55 is None else pa45 > abc55)
    check(
        "accuracy rises with M and N (PA (4,5) <= PA (8,7), PA (4,5) <= PA (4,FP))",
        None if None in (pa45, pa87, pa4fp) else (pa45 <= pa87 and pa45 <= pa4fp),
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--baseline-epochs", type=int, default=10)
    parser.add_argument("--baseline-lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-distill", dest="distill", action="store_false")
    parser.add_argument("--configs", nargs="*", default=None, help="e.g. pa:4:5 abc:5:5")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-accuracy"))
    parser.add_argument("--out", default=None, help="Write the markdown section here.")
    args = parser.parse_args()
    configs = CONFIGS
    if args.configs:
        configs = tuple(
            (c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.configs
        )
    start = time.perf_counter()
    control = control_run(args)
    print(json.dumps(control), flush=True)
    runs: list[dict] = []
    command = "python " + " ".join([sys.argv[0], *shown_args(None)])

    def write(pending: list[tuple[str, int, int]]) -> str:
        text = markdown(args, control, runs, command, time.perf_counter() - start)
        if pending:
            missing = ", ".join(f"{s.upper()} ({m},{'FP' if n == 0 else n})" for s, m, n in pending)
            text += f"\nNot measured yet (the run was still going or was stopped): {missing}.\n"
        if args.out:
            Path(args.out).write_text(text)
        return text

    text = write(list(configs))
    for i, (scheme, m, n) in enumerate(configs):
        meta = binarized_run(args, scheme, m, n, args.runs_dir)
        print(
            json.dumps({"scheme": scheme, "M": m, "N": n, "accuracy": meta["accuracy"]}), flush=True
        )
        runs.append(meta)
        text = write(list(configs[i + 1 :]))
    print(text)


if __name__ == "__main__":
    main()
