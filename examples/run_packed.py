"""Export a run as packed bit-planes and evaluate it with the torch-free bitwise runtime.

    python examples/run_packed.py RUN_DIR [--samples N]

The runtime (`binarize_cli.runtime`) needs only NumPy and safetensors; torch is used here only
to load the evaluation images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from binarize_cli.core.metadata import RunMetadata
from binarize_cli.export.packed import export_packed
from binarize_cli.load.data import load_data, make_loader
from binarize_cli.runtime import load_packed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()

    packed_path = export_packed(args.run_dir)
    print(f"packed file: {packed_path} ({packed_path.stat().st_size / 1e6:.2f} MB)")
    model = load_packed(packed_path)

    meta = RunMetadata.load(args.run_dir)
    data = load_data(meta.data, **meta.data_kwargs())
    correct = seen = 0
    for images, labels in make_loader(data.val, batch_size=64, shuffle=False, seed=0):
        logits = model(images.numpy().astype(np.float32))
        correct += int((logits.argmax(axis=1) == labels.numpy()).sum())
        seen += len(labels)
        if seen >= args.samples:
            break
    print(f"bitwise runtime top-1 on {seen} images: {100.0 * correct / seen:.2f}%")


if __name__ == "__main__":
    main()
