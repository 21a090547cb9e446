"""Bit packing: the one bit order of the packed format, used by every writer and reader.

Bit order (format versions 1 and 2, metadata ``bit_order = "lsb-first"``): a bit-plane tensor of
logical shape ``S`` is flattened in C (row-major) order to ``n = prod(S)`` bits; bit ``k`` of
the flat sequence is stored in byte ``k // 8`` at bit position ``k % 8`` counted from the
least significant bit. The last byte is zero-padded. A stack of ``P`` planes of shape ``S``
is packed plane by plane into a ``uint8`` array of shape ``[P, ceil(n / 8)]``.

:data:`BIT_ORDER` is the file's name for that order; NumPy's name for it (``bitorder=``) and
the shift that brings each bit of a byte to position 0 (the ONNX unpacking subgraph) are
derived from it here, and nothing else in the package calls ``np.packbits``/``np.unpackbits``.
This module imports NumPy only, so the torch-free runtime can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: The packed file's ``bit_order`` metadata value (``docs/format.md`` section 4).
BIT_ORDER = "lsb-first"
_NUMPY_BIT_ORDER = {"lsb-first": "little", "msb-first": "big"}[BIT_ORDER]


def packed_length(num_bits: int) -> int:
    """Bytes needed for ``num_bits`` bits."""
    return (num_bits + 7) // 8


def byte_shifts() -> np.ndarray:
    """``uint8 [8]``: entry ``i`` is the right shift that brings flat bit ``8 b + i`` of byte
    ``b`` to bit position 0 (``(byte >> shift) & 1``; ``0..7`` for LSB-first)."""
    shifts = np.arange(8, dtype=np.uint8)
    return shifts if _NUMPY_BIT_ORDER == "little" else shifts[::-1].copy()


def pack_bits(bits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack {0,1}/bool values along ``axis`` into ``uint8`` (``ceil(n/8)`` bytes), in
    :data:`BIT_ORDER`; the last byte is zero-padded."""
    return np.packbits(
        np.asarray(bits).astype(bool, copy=False), axis=axis, bitorder=_NUMPY_BIT_ORDER
    )


def unpack_bits(packed: np.ndarray, count: int, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` bits along ``axis`` as ``uint8`` {0,1}."""
    return np.unpackbits(
        np.asarray(packed, dtype=np.uint8), axis=axis, count=count, bitorder=_NUMPY_BIT_ORDER
    )


def pack_planes(planes: np.ndarray) -> np.ndarray:
    """Pack a ``[P, *S]`` array of {0,1}/bool into ``uint8 [P, ceil(prod(S)/8)]``."""
    p = np.asarray(planes)
    if p.ndim < 1:
        raise ValueError("planes must have a leading plane axis")
    return pack_bits(p.reshape(p.shape[0], -1), axis=1)


def unpack_planes(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_planes`: ``uint8 [P, nbytes]`` -> bool ``[P, *shape]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    n = math.prod(shape)
    if packed.ndim != 2 or packed.shape[1] != packed_length(n):
        raise ValueError(
            f"packed array of shape {packed.shape} does not hold planes of shape {tuple(shape)}"
        )
    return unpack_bits(packed, n, axis=1).reshape(packed.shape[0], *shape).astype(bool)
