"""Writes a tiny ImageFolder (3 classes, non-square images of varied sizes) with PIL."""

import os
import sys

import numpy as np
from PIL import Image


def make(root, per_split=(("train", 10), ("val", 5)), seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(23, 17), (17, 29), (31, 20), (19, 19)]
    for split, n in per_split:
        for ci, cls in enumerate(["circle", "hbar", "vbar"]):
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            for k in range(n):
                w, h = sizes[(k + ci) % len(sizes)]
                img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
                yy, xx = np.mgrid[:h, :w]
                if ci == 0:
                    m = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
                elif ci == 1:
                    m = np.abs(yy - h / 2) < h / 6
                else:
                    m = np.abs(xx - w / 2) < w / 6
                img[m] = rng.integers(150, 255, size=3)
                mode = "L" if k % 3 == 2 else "RGB"  # some greyscale files
                Image.fromarray(img).convert(mode).save(os.path.join(d, f"{k:02d}.png"))
    return root


if __name__ == "__main__":
    make(sys.argv[1])
