"""An activation quantizer as an element-wise step function: the one record shared by the
step-function search (:mod:`binarize_cli.export.steps`), the packed writer, the ONNX exporter
and the bitwise runtime. NumPy only.

Every activation quantizer of the built-in schemes is a staircase of its input ``x``:

* PA (eq. 10, 17-18): ``A_hat = sum_j beta_j V_j`` with the piece indicators
  ``V_j = [v_j <= x < v_{j+1}]`` of the sorted endpoints; the thresholds are the endpoints.
* ABC (eq. 2-3): ``A_hat = sum_n beta_n H_{v_n}(R)``, plane ``n`` is ``R + v_n >= 0.5``; one
  threshold per plane (the first float32 where that holds).
* sign schemes (BNN, XNOR-Net, Bi-Real): one threshold; DoReFa: its ``2^N - 1`` rounding
  points, the planes the binary digits of the level index.

:class:`Staircase` holds the thresholds and, per piece, the quantizer's output value
(``levels``, what the ONNX graph selects) and/or its bit-plane code (``codes``, ``scales``,
``domain``: what the packed file stores and the runtime's kernels pack).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

ZERO_ONE = "zero_one"
PLUS_MINUS_ONE = "plus_minus_one"
#: How a stored bit ``b`` is read: ``b`` ({0,1}) or ``2b - 1`` ({-1,+1}).
DOMAINS = (ZERO_ONE, PLUS_MINUS_ONE)
#: Most planes a code may have (one 32-bit mask per piece).
MAX_PLANES = 32


def piece_index(x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``#{k : x >= thresholds[k]}`` elementwise (NaN -> 0, as ``>=`` is false for NaN)."""
    x = np.asarray(x)
    idx = np.searchsorted(thresholds, x, side="right")
    if np.issubdtype(x.dtype, np.floating):
        nan = np.isnan(x)
        if nan.any():
            idx[nan] = 0
    return idx


def read_bits(bits: np.ndarray, domain: str, dtype: np.dtype | type) -> np.ndarray:
    """Stored bits as values: ``b`` in ``zero_one``, ``2b - 1`` in ``plus_minus_one``."""
    p = np.asarray(bits).astype(dtype)
    return p if domain == ZERO_ONE else 2 * p - 1


@dataclass(frozen=True, eq=False)
class Staircase:
    """An element-wise step function of ``x`` with ``L`` pieces.

    Pieces: ``x`` lies in piece ``l(x) = #{k : x >= thresholds[k]}``; ``thresholds``
    (``L - 1`` of them, strictly increasing, float32 in files: the first float of each new
    piece) are **inclusive on the right**: a value exactly on ``thresholds[k]`` belongs to the
    piece above it (a quantizer that tests ``x > v`` has its threshold at ``nextafter(v)``);
    NaN is in piece 0.

    Values, one or both of:

    * ``levels`` (``[L]``, float32): the quantizer's own output on each piece, bit for bit
      (``f(x) = levels[l(x)]``; the ONNX ``GreaterOrEqual`` + ``Where`` chain);
    * the bit-plane code: ``codes`` (``uint8 {0,1} [L, N]``, plane ``j``'s bit on each
      piece), ``scales`` (``beta``, ``[N]``) and ``domain``; then
      ``f(x) = sum_j scales[j] read(codes[l(x), j])`` with ``read(b) = b`` (``zero_one``) or
      ``2b - 1`` (``plus_minus_one``) — PA eq. 17 / ABC eq. 2 (the packed file, the runtime).

    Arrays keep the dtype they are given (the writers give float32; the kernels cast).
    """

    thresholds: np.ndarray
    levels: np.ndarray | None = None
    codes: np.ndarray | None = None
    scales: np.ndarray | None = None
    domain: str = ZERO_ONE

    def __post_init__(self) -> None:
        t = np.asarray(self.thresholds)
        object.__setattr__(self, "thresholds", t)
        pieces = t.size + 1
        if t.ndim != 1:
            raise ValueError("step thresholds must be a 1-D array")
        if t.size > 1 and not np.all(np.diff(t) > 0):
            raise ValueError("step thresholds must be strictly increasing")
        if self.levels is not None:
            object.__setattr__(self, "levels", np.asarray(self.levels))
            if self.levels.shape != (pieces,):
                raise ValueError("a staircase needs one level per piece (thresholds + 1)")
        if (self.codes is None) != (self.scales is None):
            raise ValueError("a bit-plane code needs both codes and scales")
        if self.codes is not None:
            object.__setattr__(self, "codes", np.asarray(self.codes, dtype=np.uint8))
            object.__setattr__(self, "scales", np.asarray(self.scales).reshape(-1))
            if self.codes.ndim != 2 or self.codes.shape[0] != pieces:
                raise ValueError("activation codes must have one row per piece (thresholds + 1)")
            if self.codes.shape[1] != self.scales.size:  # type: ignore[union-attr]
                raise ValueError("activation codes and scales disagree on the number of planes")
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; expected one of {DOMAINS}")

    @property
    def num_pieces(self) -> int:
        return int(self.thresholds.size) + 1

    @property
    def num_planes(self) -> int:
        return 0 if self.scales is None else int(self.scales.size)

    def _code(self) -> np.ndarray:
        if self.codes is None:
            raise ValueError("this staircase has no bit-plane code")
        return self.codes

    @cached_property
    def masks(self) -> np.ndarray:
        """``uint32 [L]``: the code of each piece as a word, bit ``j`` = plane ``j``."""
        codes = self._code().astype(np.uint32)
        if codes.shape[1] > MAX_PLANES:
            raise ValueError(f"at most {MAX_PLANES} activation planes are supported")
        shifts = np.arange(codes.shape[1], dtype=np.uint32)
        return (codes << shifts).sum(axis=1, dtype=np.uint32)

    def pieces(self, x: np.ndarray) -> np.ndarray:
        """``l(x)`` elementwise."""
        return piece_index(x, self.thresholds)

    def planes(self, x: np.ndarray) -> np.ndarray:
        """Bit planes ``bool [N, *x.shape]`` (the oracle form; the kernels pack directly)."""
        return np.moveaxis(self._code()[self.pieces(x)].astype(bool), -1, 0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``f(x)``: ``levels[l(x)]`` when the levels are known, else the code's
        ``sum_j scales[j] read(plane_j)`` in ``x``'s dtype."""
        if self.levels is not None:
            return self.levels[self.pieces(x)]
        x = np.asarray(x)
        p = read_bits(self.planes(x), self.domain, x.dtype)
        return np.tensordot(np.asarray(self.scales).astype(x.dtype), p, axes=1)
