"""Calibration rules: tensor vs output-aware, calibrated (no training) accuracy and logit error.

For each configuration (scheme, M, N) the same full-precision baseline is converted twice,
calibrated once by each rule (``convert --calibration tensor|output``) on the same
calibration batches ``convert`` uses, and measured on the validation split without any
fine-tuning:

* ``top1``: calibrated top-1 (%), as ``convert --epochs 0`` reports it;
* ``logit_error``: ``||z - z_fp||^2 / ||z_fp||^2`` over the validation images, ``z_fp`` the
  full-precision baseline's logits;
* ``layer_error``: the binarized layers' relative output errors
  (:func:`binarize_cli.convert.calibrate.layer_output_errors`), summed, on the first 256
  calibration images;
* ``seconds``: the calibration's wall time.

The baseline comes from the cache ``convert`` keeps (trained on first use).

Usage::

    python benchmarks/bench_calibration.py [--model resnet18] [--data digits]
        [--configs pa:4:5 pa:8:7 abc:5:5] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from _cmdline import shown_args

from binarize_cli.convert import distributed
from binarize_cli.convert.calibrate import OUTPUT_IMAGES, calibrate_model, layer_output_errors
from binarize_cli.convert.pipeline import (
    _calibration_batches,
    _calibration_loader,
    binarize_student,
    build_reference,
    load_inputs,
    prepare,
)
from binarize_cli.convert.training import evaluate
from binarize_cli.core.modes import evaluating
from binarize_cli.core.settings import CALIBRATION_RULES, ConvertSettings


def logit_error(model: torch.nn.Module, fp: torch.nn.Module, loader, device: str) -> float:
    num = den = 0.0
    with evaluating(model), evaluating(fp):
        for x, _ in loader:
            x = x.to(device)
            z, z_fp = model(x).double(), fp(x).double()
            num += float((z - z_fp).pow(2).sum())
            den += float(z_fp.pow(2).sum())
    return num / den


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--configs", nargs="+", default=["pa:4:5", "pa:8:7", "abc:5:5"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    ctx = distributed.setup()
    rows = []
    torch.backends.mkldnn.deterministic = True
    for spec in args.configs:
        scheme, m, n = spec.split(":")
        settings = ConvertSettings(
            model=args.model, data=args.data, scheme=scheme, M=int(m), N=int(n), epochs=0
        )
        settings.seed = args.seed
        with tempfile.TemporaryDirectory() as tmp:
            plan = prepare(settings, out_dir=Path(tmp) / "run")
        torch.manual_seed(args.seed)
        inputs = load_inputs(settings)
        reference = build_reference(settings, inputs, ctx)
        batches = _calibration_batches(
            _calibration_loader(settings, inputs.data), settings.calib_batches
        )
        images = [x for x, _ in batches]
        for rule in CALIBRATION_RULES:
            student = binarize_student(plan, inputs, reference, ctx.device).model
            stats = calibrate_model(student, reference.model, images, seed=args.seed, rule=rule)
            probe = torch.cat(images)[:OUTPUT_IMAGES].split(32)
            row = {
                "scheme": scheme,
                "M": int(m),
                "N": int(n),
                "rule": rule,
                "top1": evaluate(student, reference.val_loader, device=ctx.device).top1,
                "logit_error": logit_error(
                    student, reference.model, reference.val_loader, ctx.device
                ),
                "layer_error": sum(layer_output_errors(student, probe).values()),
                "seconds": stats.seconds,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": ["python", "benchmarks/bench_calibration.py", *shown_args(argv)],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
