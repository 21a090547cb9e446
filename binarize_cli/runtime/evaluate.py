"""Accuracy of a packed model on labelled batches (``binarize run``), NumPy only."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from binarize_cli.runtime.model import PackedModel


@dataclass
class Accuracy:
    """Top-1/top-5 accuracy in percent over ``samples`` images, and the runtime's speed."""

    top1: float
    top5: float
    samples: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_s"] = self.images_per_s
        return d


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the ``k`` largest logits (ties: lower index first)."""
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return int((order == labels[:, None]).any(axis=1).sum())


def evaluate_packed(
    model: PackedModel,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    max_samples: int | None = None,
    logits: list[np.ndarray] | None = None,
) -> Accuracy:
    """Top-1/top-5 of ``model`` over ``(images, labels)`` batches (NumPy arrays), the first
    ``max_samples`` images (all by default); ``logits``, when given, receives each batch's
    logits in order (concatenated: ``[samples, classes]``)."""
    n = c1 = c5 = 0
    elapsed = 0.0
    for images, labels in batches:
        if max_samples is not None and n >= max_samples:
            break
        if max_samples is not None:
            images, labels = images[: max_samples - n], labels[: max_samples - n]
        t0 = time.perf_counter()
        out = model(images)
        elapsed += time.perf_counter() - t0
        if logits is not None:
            logits.append(out)
        labels = np.asarray(labels).astype(np.int64)
        c1 += topk_correct(out, labels, 1)
        c5 += topk_correct(out, labels, 5)
        n += int(labels.shape[0])
    if n == 0:
        return Accuracy(top1=0.0, top5=0.0, samples=0, seconds=0.0)
    return Accuracy(top1=100.0 * c1 / n, top5=100.0 * c5 / n, samples=n, seconds=elapsed)
