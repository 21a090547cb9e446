"""Convert a model with the Python API instead of the CLI.

    python examples/convert_in_code.py [MODEL] [--data SPEC] [--epochs E] [-o RUN_DIR]

Builds the same run directory as `binarize convert`, then prints its accuracy table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from binarize_cli.convert.pipeline import run_convert
from binarize_cli.core.metadata import ACCURACY_STAGES
from binarize_cli.core.settings import merge_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--baseline-epochs", type=int, default=4)
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/example-pa-M4N5"))
    args = parser.parse_args()

    settings = merge_settings(
        None,
        {
            "model": args.model,
            "scheme": "pa",
            "M": 4,
            "N": 5,
            "data": args.data,
            "epochs": args.epochs,
            "baseline_epochs": args.baseline_epochs,
        },
    )
    result = run_convert(settings, out_dir=args.output)
    binarized = [d.name for d in result.decisions if d.binarized]
    print(f"binarized {len(binarized)} layers; run written to {result.run_dir}")
    for stage in ACCURACY_STAGES:
        acc = result.meta.accuracy.stage(stage)
        if acc is not None:
            print(f"{stage:>11}: top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%")


if __name__ == "__main__":
    main()
