"""Sensitivity-aware conversion (Fashion-MNIST): uniform bases vs ``--policy auto``, several seeds.

Protocol (issue #15):

1. one full-precision baseline per model, trained to its plateau (``--baseline-epochs``,
   cached, ``--baseline-seed``); every other row starts from it;
2. for each seed in ``--seeds``: a *control* (the baseline fine-tuned ``--epochs`` more with
   the fine-tuning optimiser and schedule, no binarization), each uniform configuration of
   ``--configs``, and ``--policy auto`` at the memory of the uniform configuration
   ``--auto-at`` (auto without a budget spends at most that configuration's memory), all
   through the real `binarize convert` pipeline; the seed moves the calibration samples, the
   sensitivity batches and the fine-tuning order;
3. each row is the mean and sample standard deviation over the seeds; memory and binary
   operations are `binarize report`'s accounting of the run;
4. a frontier (``--frontier``, first seed only, calibrated models, no fine-tuning): uniform
   configurations and ``auto`` at each of their memories, drawn as accuracy vs memory.

Every finished run is appended to ``RUNS_DIR/results.jsonl`` and reused by a rerun with the
same protocol (an interrupted benchmark continues where it stopped).

Usage::

    python benchmarks/bench_sensitivity.py --model resnet18 --baseline-epochs 8 --epochs 1 \\
        --seeds 0 1 2 --configs pa:4:5 pa:8:7 abc:5:5 --auto-at pa:4:5 \\
        --frontier pa:2:3 pa:4:5 pa:6:5 pa:8:7 --out FILE
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _cmdline import shown_args

from binarize_cli.analyze.report import run_report
from binarize_cli.convert.distributed import DistContext
from binarize_cli.convert.pipeline import (
    build_reference,
    finetune_student,
    load_inputs,
    run_convert,
)
from binarize_cli.convert.training import evaluate
from binarize_cli.core.settings import ConvertSettings, merge_settings

Config = tuple[str, int, int]

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: Targets by model: (label, kind, threshold). ``auto_gap``: auto's mean top-1 within
#: ``threshold`` points of the control's mean.
TARGETS: dict[str, list[tuple[str, str, float]]] = {
    "resnet18": [
        ("`auto` within 0.3 point of the control", "auto_gap", 0.3),
        ("PA at equal or less memory beats ABC (5,5)", "pa_beats_abc", 0.0),
        ("accuracy rises with the budget (frontier, auto)", "rises", 0.0),
    ],
    "mobilenetv2_100": [("`auto` within 1.5 points of the control", "auto_gap", 1.5)],
}


def parse_config(text: str) -> Config:
    scheme, m, n = text.split(":")
    return scheme, int(m), int(n)


def label(config: Config) -> str:
    scheme, m, n = config
    return f"{scheme.upper()} ({m},{'FP' if n == 0 else n})"


#: The arguments that define a run (``Results`` reuses a run only under the same values).
PROTOCOL_KEYS = (
    "model",
    "data",
    "baseline_epochs",
    "baseline_lr",
    "baseline_seed",
    "epochs",
    "lr",
    "batch_size",
    "calib_batches",
)


def add_protocol_args(parser: argparse.ArgumentParser) -> None:
    """The protocol's arguments (:data:`PROTOCOL_KEYS`) and ``--runs-dir``, shared with
    ``bench_schemes.py``, whose runs live in the same ``results.jsonl``."""
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--baseline-epochs", type=int, default=8)
    parser.add_argument("--baseline-lr", type=float, default=2e-3)
    parser.add_argument("--baseline-seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-sensitivity"))


def protocol_of(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed protocol, checked against the issue's limit on fine-tune epochs."""
    if args.epochs > 2:
        raise SystemExit("the issue's protocol allows at most 2 fine-tune epochs")
    return {k: getattr(args, k) for k in PROTOCOL_KEYS}


def settings_for(args: argparse.Namespace, seed: int, **over: Any) -> ConvertSettings:
    """The `convert` settings of one run of this benchmark."""
    return merge_settings(
        None,
        {
            "model": args.model,
            "data": args.data,
            "epochs": args.epochs,
            "baseline_epochs": args.baseline_epochs,
            "baseline_lr": args.baseline_lr,
            "baseline_seed": args.baseline_seed,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "calib_batches": args.calib_batches,
            "seed": seed,
            **over,
        },
    )


class Results:
    """Finished runs, keyed by what they ran; persisted as JSON lines."""

    def __init__(self, path: Path, protocol: dict[str, Any]) -> None:
        self.path = path
        self.protocol = protocol
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row.get("protocol") == protocol:
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def add(self, key: str, result: dict[str, Any]) -> dict[str, Any]:
        row = {"key": key, "protocol": self.protocol, **result}
        self.rows[key] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def control_run(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The baseline fine-tuned ``--epochs`` more without binarization (one CPU process)."""
    settings = settings_for(args, seed)
    ctx = DistContext()
    inputs = load_inputs(settings)
    reference = build_reference(settings, inputs, ctx)
    base = reference.baseline
    baseline_acc = evaluate(reference.model, reference.val_loader).to_dict()
    model = copy.deepcopy(reference.model)
    start = time.perf_counter()
    state = finetune_student(settings, model, inputs.data, ctx)
    seconds = time.perf_counter() - start
    acc = evaluate(model, reference.val_loader).to_dict()
    return {
        "baseline_top1": baseline_acc["top1"],
        "baseline_epochs": len(base.epoch_times),
        "top1": acc["top1"],
        "top5": acc["top5"],
        "seconds": seconds,
        "epoch_s": list(state.epoch_seconds),
    }


def converted_run(args: argparse.Namespace, seed: int, name: str, **over: Any) -> dict[str, Any]:
    """One `convert` run; its accuracy, accounting and timings."""
    settings = settings_for(args, seed, **over)
    out = args.runs_dir / f"{args.model}-{name}-seed{seed}"
    start = time.perf_counter()
    result = run_convert(settings, out_dir=out, overwrite=True)
    seconds = time.perf_counter() - start
    meta = result.meta.to_dict()
    report = run_report(out, errors=False).to_dict()
    bases = meta.get("layer_bases") or {}
    return {
        "calibrated": meta["accuracy"]["calibrated"]["top1"],
        "top1": meta["accuracy"]["binarized"]["top1"],
        "top5": meta["accuracy"]["binarized"]["top5"],
        "memory_bits": report["memory_bits"],
        "bops": report["bops"],
        "kept_epoch": meta.get("finetune_kept_epoch"),
        "step_ratio": _ratio(meta["timings"]),
        "full_precision_layers": sorted(k for k, v in bases.items() if v is None),
        "layer_bases": bases,
        "seconds": seconds,
    }


def _ratio(timings: dict[str, Any]) -> float | None:
    ft, fp = timings.get("finetune_step_s"), timings.get("fp_step_s")
    return ft / fp if ft and fp else None


def mean_sd(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def spread(values: list[float]) -> str:
    """One value, or ``min-max`` when the seeds chose differently (``auto``)."""
    lo, hi = min(values), max(values)
    return f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}-{hi:.3f}"


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean, sd = mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f}" if len(values) > 1 else f"{mean:.2f}"


def measure(args: argparse.Namespace, results: Results) -> dict[str, Any]:
    """Run (or reuse) every row; returns what the page and the plot need."""
    configs = [parse_config(c) for c in args.configs]
    auto_at = parse_config(args.auto_at) if args.auto_at else None
    rows: dict[str, list[dict[str, Any]]] = {}

    def once(key: str, fn: Any) -> dict[str, Any]:
        row = results.get(key)
        if row is None:
            print(f"[{time.strftime('%H:%M:%S')}] running {key}", flush=True)
            row = results.add(key, fn())
            print(json.dumps({k: v for k, v in row.items() if k != "layer_bases"}), flush=True)
        return row

    for seed in args.seeds:
        rows.setdefault("control", []).append(
            once(f"control/seed{seed}", lambda s=seed: control_run(args, s))
        )
        for cfg in configs:
            scheme, m, n = cfg
            name = f"{scheme}-M{m}N{n}"
            rows.setdefault(label(cfg), []).append(
                once(
                    f"{name}/seed{seed}",
                    lambda s=seed, sc=scheme, mm=m, nn=n, nm=name: converted_run(
                        args, s, nm, scheme=sc, M=mm, N=nn
                    ),
                )
            )
        if auto_at is not None:
            scheme, m, n = auto_at
            name = f"auto-{scheme}-M{m}N{n}"
            rows.setdefault("auto", []).append(
                once(
                    f"{name}/seed{seed}",
                    lambda s=seed, sc=scheme, mm=m, nn=n, nm=name: converted_run(
                        args, s, nm, scheme=sc, M=mm, N=nn, policy="auto"
                    ),
                )
            )
    frontier: dict[str, list[dict[str, Any]]] = {"uniform": [], "auto": []}
    seed = args.seeds[0]
    for cfg in (parse_config(c) for c in args.frontier):
        scheme, m, n = cfg
        for policy in ("uniform", "auto"):
            # A main row of the first seed calibrated exactly as a frontier run would
            # (calibration and the sensitivity measure come before fine-tuning): reuse it.
            main_row = rows.get("auto" if policy == "auto" else label(cfg)) or []
            if main_row and (policy == "uniform" or cfg == auto_at):
                frontier[policy].append({**main_row[0], "config": label(cfg)})
                continue
            name = f"frontier-{policy}-{scheme}-M{m}N{n}"
            row = once(
                f"{name}/seed{seed}",
                lambda s=seed, sc=scheme, mm=m, nn=n, nm=name, p=policy: converted_run(
                    args, s, nm, scheme=sc, M=mm, N=nn, policy=p, epochs=0.0
                ),
            )
            frontier[policy].append({**row, "config": label(cfg)})
    return {"rows": rows, "frontier": frontier, "auto_at": auto_at}


def check_targets(args: argparse.Namespace, data: dict[str, Any]) -> list[str]:
    rows, frontier = data["rows"], data["frontier"]
    control = statistics.fmean(r["top1"] for r in rows["control"])
    lines = []
    for text, kind, threshold in TARGETS.get(args.model, []):
        verdict = "not measured"
        detail = ""
        if kind == "auto_gap" and rows.get("auto"):
            gap = control - statistics.fmean(r["top1"] for r in rows["auto"])
            verdict = "met" if gap <= threshold else "MISSED"
            detail = f" (gap {gap:+.2f})"
        elif kind == "pa_beats_abc" and rows.get("ABC (5,5)"):
            abc = rows["ABC (5,5)"]
            abc_mem = abc[0]["memory_bits"]
            abc_top1 = statistics.fmean(r["top1"] for r in abc)
            cands = [
                (statistics.fmean(r["top1"] for r in rs), name)
                for name, rs in rows.items()
                if (name == "auto" or name.startswith("PA")) and rs[0]["memory_bits"] <= abc_mem
            ]
            if cands:
                best, name = max(cands)
                verdict = "met" if best > abc_top1 else "MISSED"
                detail = f" (best such PA row: {name}, {best:.2f} vs ABC {abc_top1:.2f})"
        elif kind == "rises" and len(frontier["auto"]) >= 2:
            pts = sorted((r["memory_bits"], r["calibrated"]) for r in frontier["auto"])
            ok = all(b[1] >= a[1] for a, b in zip(pts, pts[1:], strict=False))
            verdict = "met" if ok else "MISSED"
            detail = " (" + ", ".join(f"{m / 1e6:.2f} Mbit: {t:.2f}" for m, t in pts) + ")"
        lines.append(f"- {text}: {verdict}{detail}")
    return lines


def markdown(args: argparse.Namespace, data: dict[str, Any], command: str, seconds: float) -> str:
    rows = data["rows"]
    control = rows["control"]
    control_top1 = [r["top1"] for r in control]
    c_mean = statistics.fmean(control_top1)
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        f"## Sensitivity-aware conversion on {args.data}: {args.model} (issue #15)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {platform.platform()}",
        f"- command: `{command}` ({seconds / 60:.0f} min: the runs' wall times, summed)",
        f"- protocol: timm {args.model}, random init, data `{args.data}` (its full train/val "
        "split, at the model's input size); one baseline "
        f"trained {args.baseline_epochs} epochs (lr {args.baseline_lr}, seed {args.baseline_seed}); "
        f"every other row {args.epochs:g} epoch(s) of Adam (lr {args.lr}, cosine), batch "
        f"{args.batch_size}, distillation from the baseline, the best epoch kept; seeds {seeds} "
        "(calibration samples, sensitivity batches, fine-tuning order); mean ± sample standard "
        "deviation over the seeds; memory and BOPs from `binarize report`",
        "",
        "| row | memory (Mbit) | BOPs (G) | calibrated top-1 | top-1 | gap to control "
        "(control - row) | step time / FP step |",
        "|---|---|---|---|---|---|---|",
        f"| full precision (baseline, plateau) | - | - | - | {control[0]['baseline_top1']:.2f} | "
        f"{c_mean - control[0]['baseline_top1']:+.2f} | 1.00 |",
        f"| full precision (control: +{args.epochs:g} epoch(s)) | - | - | - | {fmt(control_top1)} "
        "| 0.00 | - |",
    ]
    for name, rs in rows.items():
        if name == "control":
            continue
        title = name
        if name == "auto" and data["auto_at"] is not None:
            title = f"PA auto at {label(data['auto_at'])}'s memory"
        gaps = [c - r["top1"] for c, r in zip(control_top1, rs, strict=False)]
        ratios = [r["step_ratio"] for r in rs if r["step_ratio"]]
        lines.append(
            f"| {title} | {spread([r['memory_bits'] / 1e6 for r in rs])} | "
            f"{spread([r['bops'] / 1e9 for r in rs])} | "
            f"{fmt([r['calibrated'] for r in rs])} | {fmt([r['top1'] for r in rs])} | "
            f"{fmt(gaps)} | {fmt(ratios)} |"
        )
    auto_rows = rows.get("auto", [])
    if auto_rows:
        fp_layers = sorted({n for r in auto_rows for n in r["full_precision_layers"]})
        lines += [
            "",
            "Layers `auto` kept full precision (any seed): "
            + (", ".join(f"`{n}`" for n in fp_layers) or "none")
            + ".",
        ]
    front = data["frontier"]
    if front["uniform"]:
        lines += [
            "",
            f"Frontier (seed {args.seeds[0]}, calibrated, no fine-tuning): `auto` at each uniform "
            "configuration's memory.",
            "",
            "| uniform configuration | memory (Mbit) | uniform calibrated top-1 "
            "| auto memory (Mbit) | auto calibrated top-1 |",
            "|---|---|---|---|---|",
        ]
        for u, a in zip(front["uniform"], front["auto"], strict=False):
            lines.append(
                f"| {u['config']} | {u['memory_bits'] / 1e6:.3f} | {u['calibrated']:.2f} | "
                f"{a['memory_bits'] / 1e6:.3f} | {a['calibrated']:.2f} |"
            )
    if args.plot:  # the page is docs/benchmarks.md: link relative to docs/
        link = os.path.relpath(Path(args.plot).resolve(), DOCS)
        lines += ["", f"![accuracy vs memory, {args.model}]({link})"]
    lines += ["", "Targets:", "", *check_targets(args, data)]
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy, style in (("uniform", "o-"), ("auto", "s-")):
        pts = sorted((r["memory_bits"] / 1e6, r["calibrated"]) for r in data["frontier"][policy])
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{policy}, calibrated")
    for name, rs in data["rows"].items():
        if name == "control":
            continue
        mean, sd = mean_sd([r["top1"] for r in rs])
        ax.errorbar(
            rs[0]["memory_bits"] / 1e6,
            mean,
            yerr=sd,
            fmt="*",
            ms=10,
            capsize=3,
            label=f"{name}, fine-tuned",
        )
    control = [r["top1"] for r in data["rows"]["control"]]
    ax.axhline(statistics.fmean(control), color="grey", ls="--", lw=1, label="FP control")
    ax.set_xlabel("weight + activation memory (Mbit, `binarize report`)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{args.model} on {args.data}: accuracy vs memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="*", default=["pa:4:5", "pa:8:7", "abc:5:5"])
    parser.add_argument("--auto-at", default="pa:4:5", help="auto at this uniform's memory")
    parser.add_argument("--frontier", nargs="*", default=[])
    parser.add_argument("--plot", default=None, help="Write the accuracy-vs-memory figure here.")
    parser.add_argument("--out", default=None, help="Write the markdown section here.")
    args = parser.parse_args()
    protocol = protocol_of(args)
    results = Results(args.runs_dir / "results.jsonl", protocol)
    data = measure(args, results)
    command = "python " + " ".join([sys.argv[0], *shown_args(None)])
    if args.plot:
        plot(args, data, Path(args.plot))
    run_seconds = sum(float(row.get("seconds", 0.0)) for row in results.rows.values())
    text = markdown(args, data, command, run_seconds)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
