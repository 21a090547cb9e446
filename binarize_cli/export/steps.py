"""Find where an element-wise step function changes, exactly, on the float32 line.

Both exporters need the step function of an activation quantizer as explicit thresholds:
the packed format stores ``thresholds`` and the plane code of every piece
(:func:`binarize_cli.export.packed.activation_code`), and the ONNX graph compares against the
thresholds (:func:`binarize_cli.export.onnx.activation_staircase`). They probe the
quantizer differently (bit planes vs output value and planes) but search the same way:
bisection over the float32 values in order. An interval whose two ends have different
keys is halved until it is one ulp wide. Its right end is then the first float of a new
piece. This is exact, provided that distinct pieces have distinct keys and that every key
changes at most once along the line. That holds for PA's piece indicators, ABC's and sign's
shifted signs, and DoReFa's binary digits. The search takes about 32 batched probes.
:func:`check_points` gives both exporters the same points to confirm the result on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["TooManyPieces", "check_points", "find_jumps", "float_to_ordinal", "ordinal_to_float"]


class TooManyPieces(ValueError):
    """The function has more pieces than allowed (it is probably not a step function)."""


def float_to_ordinal(x: np.ndarray | np.floating) -> np.ndarray:
    """float32 -> int64 with the same order; -0.0 and +0.0 are adjacent (-1 and 0)."""
    bits = np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def ordinal_to_float(o: np.ndarray | int) -> np.ndarray:
    """The inverse of :func:`float_to_ordinal`."""
    o = np.asarray(o, dtype=np.int64)
    bits = np.where(o >= 0, o, (-(o + 1)) | 0x80000000).astype(np.uint32)
    return bits.view(np.float32)


#: The ordinals of the most negative and most positive finite float32.
LOWEST = int(float_to_ordinal(np.float32(-np.finfo(np.float32).max)))
HIGHEST = int(float_to_ordinal(np.float32(np.finfo(np.float32).max)))


def find_jumps(
    keys_at: Callable[[np.ndarray], list[bytes]], *, max_pieces: int
) -> tuple[list[int], dict[int, bytes]]:
    """Ordinals of the first float of every new piece, sorted, and every key probed.

    ``keys_at(xs)`` returns one hashable key per float32 point in ``xs`` (a 1-D array). It
    is called once per bisection level with every pending midpoint. Raises
    :class:`TooManyPieces` once more than ``max_pieces`` pieces are found or pending.
    """
    cache: dict[int, bytes] = {}

    def probe(ordinals: list[int]) -> None:
        todo = sorted({o for o in ordinals if o not in cache})
        if todo:
            keys = keys_at(ordinal_to_float(np.array(todo, dtype=np.int64)))
            cache.update(zip(todo, keys, strict=True))

    probe([LOWEST, HIGHEST])
    intervals = [(LOWEST, HIGHEST)] if cache[LOWEST] != cache[HIGHEST] else []
    jumps: list[int] = []
    while intervals:
        probe([(a + b) // 2 for a, b in intervals if b - a > 1])
        pending: list[tuple[int, int]] = []
        for a, b in intervals:
            if b - a == 1:
                jumps.append(b)
                continue
            m = (a + b) // 2
            if cache[a] != cache[m]:
                pending.append((a, m))
            if cache[m] != cache[b]:
                pending.append((m, b))
        intervals = pending
        if len(jumps) + len(intervals) >= max_pieces:
            raise TooManyPieces(f"more than {max_pieces} pieces: not a step function")
    return sorted(jumps), cache


def check_points(thresholds: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """float32 points to confirm a found step function on: every threshold and its two float
    neighbours, the midpoints between thresholds, random points around them at many scales,
    and the signed zeros, +-1 and +-1e30."""
    t = np.asarray(thresholds, dtype=np.float32)
    rng = np.random.default_rng(seed)
    big = np.float32(np.finfo(np.float32).max)
    centre = float(np.median(t)) if t.size else 0.0
    spread = float(t.max() - t.min()) if t.size > 1 else 1.0
    points = [
        t,
        np.nextafter(t, -big),
        np.nextafter(t, big),
        (t[:-1] + t[1:]) / 2 if t.size > 1 else np.zeros(0, np.float32),
        centre + 2 * spread * rng.standard_normal(4096),
        rng.standard_normal(1024) * 10.0 ** rng.integers(-6, 6, size=1024),
        np.array([0.0, -0.0, 1.0, -1.0, 1e30, -1e30], np.float32),
    ]
    return np.concatenate([np.asarray(p, np.float32).ravel() for p in points])
