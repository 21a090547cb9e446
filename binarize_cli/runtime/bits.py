"""Bit packing shared by the packed export, the bitwise runtime and the ONNX export.

Bit order (format version 1): a bit-plane tensor of logical shape ``S`` is flattened in C
(row-major) order to ``n = prod(S)`` bits; bit ``k`` of the flat sequence is stored in byte
``k // 8`` at bit position ``k % 8`` counted from the least significant bit (NumPy's
``packbits(..., bitorder="little")``). The last byte is zero-padded. A stack of ``P`` planes
of shape ``S`` is packed plane by plane into a ``uint8`` array of shape
``[P, ceil(n / 8)]``.

This module imports NumPy only, so the torch-free runtime can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BIT_ORDER = "little"


def packed_length(num_bits: int) -> int:
    """Bytes needed for ``num_bits`` bits."""
    return (num_bits + 7) // 8


def pack_planes(planes: np.ndarray) -> np.ndarray:
    """Pack a ``[P, *S]`` array of {0,1}/bool into ``uint8 [P, ceil(prod(S)/8)]``."""
    p = np.asarray(planes)
    if p.ndim < 1:
        raise ValueError("planes must have a leading plane axis")
    flat = p.reshape(p.shape[0], -1).astype(bool, copy=False)
    return np.packbits(flat, axis=1, bitorder=BIT_ORDER)


def unpack_planes(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_planes`: ``uint8 [P, nbytes]`` -> bool ``[P, *shape]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    n = math.prod(shape)
    if packed.ndim != 2 or packed.shape[1] != packed_length(n):
        raise ValueError(
            f"packed array of shape {packed.shape} does not hold planes of shape {tuple(shape)}"
        )
    bits = np.unpackbits(packed, axis=1, count=n, bitorder=BIT_ORDER)
    return bits.reshape(packed.shape[0], *shape).astype(bool)
