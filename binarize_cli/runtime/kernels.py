"""Bitwise kernels of the packed runtime: a NumPy backend and a compiled C backend.

Both backends implement the same four operations on the same layouts (see ``_kernel.c`` and
``docs/runtime.md``):

``quantize_pack(x, thresholds, masks, n_planes, groups, pad)``
    Activation quantization and bit packing. Every input value ``x`` falls in piece
    ``#{k : x >= thresholds[k]}`` (PA eq. 18: the piece indicators of ``v``; ABC: the
    thresholds ``0.5 - v_n``; sign; DoReFa's rounding points); ``masks[piece]`` says which of
    the ``N`` planes are 1 (bit ``j`` = plane ``j``). Result: ``uint32 [B, Hp, Wp, N, G*Cwg]``,
    the zero-padded input with the ``Cg`` channels of each group packed into ``Cwg =
    ceil(Cg / 32)`` words (channel ``c`` is bit ``c % 32`` of word ``c // 32``).
``im2col(act, ...)``
    The transposed bit im2col of one group: ``uint32 [N, Kw, Qp]``, ``Kw = kh*kw*Cwg`` words
    per output pixel (tap-major, then channel words), ``Qp`` = the ``Q = B*Ho*Wo`` output
    pixels rounded up to 16 (zero columns).
``bgemm(wts, O, M, cols, phi, op, cmul, cadd)``
    ``out[o, q] = sum_ij phi[o, i, j] * (cmul * count(o, i, j, q) + cadd)`` in float32, with
    ``count(o, i, j, q) = sum_k popcount(op(wts[o*M + i, k], cols[j, k, q]))`` and ``op`` AND
    ({0,1} planes, PA eq. 20) or XNOR ({-1,+1} planes, eq. 21).
``bgemm_counts(wts, O, M, cols, op)``
    The exact integer ``count`` as ``int32 [O, M, N, Qp]``.

:func:`get_backend` picks the C backend when it builds and loads (``BINARIZE_KERNEL=numpy``
forces NumPy, ``=c`` makes a failed build an error), else NumPy. NumPy's ``bitwise_count``
(NumPy >= 2.0) is the portable popcount. Nothing here imports torch.
"""

from __future__ import annotations

import ctypes
import math
import os
from typing import NamedTuple

import numpy as np

from binarize_cli.runtime._build import KernelLibrary, load_kernel
from binarize_cli.runtime.bits import pack_bits
from binarize_cli.runtime.staircase import piece_index

WORD_BITS = 32
LANES = 16
OP_AND = 0
OP_XNOR = 1


def words_for(channels: int) -> int:
    """32-bit words that hold ``channels`` bits."""
    return (channels + WORD_BITS - 1) // WORD_BITS


def padded_columns(q: int) -> int:
    """``q`` rounded up to a multiple of 16 (the kernel's pixel vector)."""
    return max(LANES, ((q + LANES - 1) // LANES) * LANES)


def pack_channel_words(bits: np.ndarray) -> np.ndarray:
    """Pack a bool array ``[..., C]`` into ``uint32 [..., ceil(C/32)]`` (bit c%32 of word c//32)."""
    c = bits.shape[-1]
    cw = words_for(c)
    if cw * WORD_BITS != c:
        pad = np.zeros((*bits.shape[:-1], cw * WORD_BITS - c), dtype=bool)
        bits = np.concatenate([bits.astype(bool, copy=False), pad], axis=-1)
    packed = pack_bits(bits, axis=-1)
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)


#: An activation code as the kernels take it: float64 thresholds, uint32 piece masks.
_Code = tuple[np.ndarray, np.ndarray]


class Window(NamedTuple):
    """The geometry of one im2col: kernel, stride, dilation (``(h, w)`` pairs), output size."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    out_hw: tuple[int, int]


def _check_shapes(wts: np.ndarray, o: int, m: int, cols: np.ndarray) -> tuple[int, int, int]:
    n, kw, qp = cols.shape
    if wts.shape != (o * m, kw):
        raise ValueError(f"weights {wts.shape} do not match O*M={o * m} rows of {kw} words")
    if qp % LANES:
        raise ValueError("column count must be a multiple of 16")
    return n, kw, qp


class Backend:
    """The four operations of the module docstring, on their layouts.

    This class allocates the results and checks the shapes; a backend fills them in
    ``_pack`` (quantize and pack into the zeroed, padded ``act``), ``_im2col`` (every column
    of the zeroed ``cols``), ``_counts`` (the exact counts into the zeroed ``out``) and, when it
    has a faster fused path, ``_bgemm``.
    """

    name = ""
    simd = ""

    def quantize_pack(
        self,
        x: np.ndarray,
        thresholds: np.ndarray,
        masks: np.ndarray,
        n_planes: int,
        groups: int,
        pad: tuple[int, int],
    ) -> np.ndarray:
        b, c, h, w = x.shape
        ph, pw = pad
        cwg = words_for(c // groups)
        act = np.zeros((b, h + 2 * ph, w + 2 * pw, n_planes, groups * cwg), dtype=np.uint32)
        thr = np.ascontiguousarray(thresholds, dtype=np.float64)
        self._pack(act, x, (thr, np.ascontiguousarray(masks, dtype=np.uint32)), groups)
        return act

    def im2col(
        self,
        act: np.ndarray,
        group: int,
        cwg: int,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        dilation: tuple[int, int],
        out_hw: tuple[int, int],
    ) -> np.ndarray:
        (kh, kw), (ho, wo) = kernel, out_hw
        n = act.shape[3]
        cols = np.zeros((n, kh * kw * cwg, padded_columns(act.shape[0] * ho * wo)), np.uint32)
        self._im2col(cols, act, group * cwg, cwg, Window(kernel, stride, dilation, out_hw))
        return cols

    def bgemm_counts(
        self, wts: np.ndarray, o: int, m: int, cols: np.ndarray, op: int
    ) -> np.ndarray:
        n, _, qp = _check_shapes(wts, o, m, cols)
        out = np.zeros((o, m, n, qp), dtype=np.int32)
        self._counts(out, np.ascontiguousarray(wts, np.uint32), cols, op)
        return out

    def bgemm(
        self,
        wts: np.ndarray,
        o: int,
        m: int,
        cols: np.ndarray,
        phi: np.ndarray,
        op: int,
        cmul: int = 1,
        cadd: int = 0,
    ) -> np.ndarray:
        n, _, qp = _check_shapes(wts, o, m, cols)
        f = np.ascontiguousarray(phi, dtype=np.float32).reshape(o, m, n)
        return self._bgemm(np.ascontiguousarray(wts, np.uint32), cols, f, (op, cmul, cadd))

    def _bgemm(
        self, wts: np.ndarray, cols: np.ndarray, phi: np.ndarray, how: tuple[int, int, int]
    ) -> np.ndarray:
        """``out[o, q] = sum_ij phi[o, i, j] (cmul * count + cadd)`` from the exact counts."""
        op, cmul, cadd = how
        counts = self.bgemm_counts(wts, phi.shape[0], phi.shape[1], cols, op)
        vals = (cmul * counts + cadd).astype(np.float32)
        return np.einsum("omnq,omn->oq", vals, phi, optimize=True)

    def _pack(self, act: np.ndarray, x: np.ndarray, code: _Code, groups: int) -> None:
        raise NotImplementedError

    def _im2col(self, cols: np.ndarray, act: np.ndarray, w0: int, cwg: int, win: Window) -> None:
        raise NotImplementedError

    def _counts(self, out: np.ndarray, wts: np.ndarray, cols: np.ndarray, op: int) -> None:
        raise NotImplementedError


class NumpyBackend(Backend):
    """Portable backend: NumPy ``bitwise_count`` on 64-bit words."""

    name = "numpy"
    simd = "numpy"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def _pack(self, act: np.ndarray, x: np.ndarray, code: _Code, groups: int) -> None:
        b, c, h, w = x.shape
        n_planes = act.shape[3]
        ph, pw = (act.shape[1] - h) // 2, (act.shape[2] - w) // 2
        cg = c // groups
        thr, masks = code
        m = masks[piece_index(x, thr)]  # [B, C, H, W] uint32
        bits = ((m[..., None] >> np.arange(n_planes, dtype=np.uint32)) & 1).astype(bool)
        # [B, G, Cg, H, W, N] -> [B, H, W, N, G, Cg]
        bits = bits.reshape(b, groups, cg, h, w, n_planes).transpose(0, 3, 4, 5, 1, 2)
        words = pack_channel_words(bits).reshape(b, h, w, n_planes, act.shape[4])
        act[:, ph : ph + h, pw : pw + w] = words

    def _im2col(self, cols: np.ndarray, act: np.ndarray, w0: int, cwg: int, win: Window) -> None:
        b, n = act.shape[0], act.shape[3]
        (kh, kw), (sh, sw), (dh, dw), (ho, wo) = win
        sub = act[..., w0 : w0 + cwg]
        taps = [
            sub[
                :,
                ky * dh : ky * dh + (ho - 1) * sh + 1 : sh,
                kx * dw : kx * dw + (wo - 1) * sw + 1 : sw,
            ]
            for ky in range(kh)
            for kx in range(kw)
        ]
        t = np.stack(taps)  # [T, B, Ho, Wo, N, Cwg]
        q = b * ho * wo
        cols[:, :, :q] = t.transpose(4, 0, 5, 1, 2, 3).reshape(n, kh * kw * cwg, q)

    @staticmethod
    def _as64(wts: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """View pairs of 32-bit words as 64-bit words (a zero word appended when Kw is odd)."""
        kw = wts.shape[1]
        extra = kw % 2
        if extra:
            wts = np.concatenate([wts, np.zeros((wts.shape[0], 1), np.uint32)], axis=1)
            cols = np.concatenate(
                [cols, np.zeros((cols.shape[0], 1, cols.shape[2]), np.uint32)], axis=1
            )
        w64 = np.ascontiguousarray(wts).view(np.uint64)  # [R, Kw/2]
        # cols [N, Kw, Qp] -> [N, Kw/2, Qp] pairing consecutive k words (little-endian pairs)
        c = cols.reshape(cols.shape[0], -1, 2, cols.shape[2]).transpose(0, 1, 3, 2)
        c64 = np.ascontiguousarray(c).view(np.uint64)[..., 0]
        return w64, c64, extra

    def _counts(self, out: np.ndarray, wts: np.ndarray, cols: np.ndarray, op: int) -> None:
        n, _, qp = cols.shape
        w64, c64, extra = self._as64(wts, cols)
        r, k64 = w64.shape
        rows = out.reshape(r, n, qp)
        budget = 1 << 21  # elements per temporary
        kb = max(1, min(k64, budget // max(1, qp)))
        rb = max(1, budget // max(1, kb * qp))
        for j in range(n):
            for r0 in range(0, r, rb):
                acc = rows[r0 : r0 + rb, j]
                for k0 in range(0, k64, kb):
                    wk = w64[r0 : r0 + rb, k0 : k0 + kb, None]
                    ck = c64[j, None, k0 : k0 + kb, :]
                    x = ~(wk ^ ck) if op == OP_XNOR else wk & ck
                    acc += np.bitwise_count(x).sum(axis=1, dtype=np.int32)
        if op == OP_XNOR and extra:
            out -= WORD_BITS  # the appended zero word XNOR zero word counted 32 ones


def _ptr(a: np.ndarray, ctype: type) -> ctypes._Pointer:  # type: ignore[name-defined]
    return a.ctypes.data_as(ctypes.POINTER(ctype))


class CBackend(Backend):
    """The compiled kernel (``_kernel.c``) through ctypes; ``threads`` worker threads."""

    name = "c"

    def __init__(self, kernel: KernelLibrary, threads: int | None = None) -> None:
        self.kernel = kernel
        self.lib = kernel.lib
        self.simd = kernel.simd_name
        self.threads = max(1, threads or default_threads())

    def _pack(self, act: np.ndarray, x: np.ndarray, code: _Code, groups: int) -> None:
        b, c, h, w = x.shape
        _, hp, wp, n_planes, words = act.shape
        thr, masks = code
        args = (
            b, c, h, w, c // groups, words // groups, words,
            _ptr(thr, ctypes.c_double), int(thr.size), _ptr(masks, ctypes.c_uint32), n_planes,
            (hp - h) // 2, (wp - w) // 2, hp, wp, _ptr(act, ctypes.c_uint32), self.threads,
        )  # fmt: skip
        if x.dtype == np.float64:
            xc = np.ascontiguousarray(x)
            self.lib.bk_quantize_pack_f64(_ptr(xc, ctypes.c_double), *args)
        else:
            xc = np.ascontiguousarray(x, dtype=np.float32)
            self.lib.bk_quantize_pack_f32(_ptr(xc, ctypes.c_float), *args)

    def _im2col(self, cols: np.ndarray, act: np.ndarray, w0: int, cwg: int, win: Window) -> None:
        b, hp, wp, n, wt = act.shape
        (kh, kw), (sh, sw), (dh, dw), (ho, wo) = win
        a = np.ascontiguousarray(act, dtype=np.uint32)
        self.lib.bk_im2col(
            _ptr(a, ctypes.c_uint32), b, hp, wp, n, wt, w0, cwg, kh, kw,
            sh, sw, dh, dw, ho, wo, cols.shape[2], _ptr(cols, ctypes.c_uint32),
        )  # fmt: skip

    def _bgemm(
        self, wts: np.ndarray, cols: np.ndarray, phi: np.ndarray, how: tuple[int, int, int]
    ) -> np.ndarray:
        op, cmul, cadd = how
        (o, m, n), (_, kw, qp) = phi.shape, cols.shape
        c = np.ascontiguousarray(cols, dtype=np.uint32)
        out = np.empty((o, qp), dtype=np.float32)
        rc = self.lib.bk_bgemm_f32(
            _ptr(wts, ctypes.c_uint32), o, m, _ptr(c, ctypes.c_uint32), n, kw, qp,
            _ptr(phi, ctypes.c_float), op, cmul, cadd, _ptr(out, ctypes.c_float), self.threads,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"bk_bgemm_f32 failed ({rc})")
        return out

    def _counts(self, out: np.ndarray, wts: np.ndarray, cols: np.ndarray, op: int) -> None:
        o, m, n, qp = out.shape
        c = np.ascontiguousarray(cols, dtype=np.uint32)
        rc = self.lib.bk_bgemm_counts(
            _ptr(wts, ctypes.c_uint32), o, m, _ptr(c, ctypes.c_uint32), n, cols.shape[1], qp, op,
            _ptr(out, ctypes.c_int32), self.threads,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"bk_bgemm_counts failed ({rc})")


def default_threads() -> int:
    """``BINARIZE_THREADS``, else the CPUs this process may use."""
    env = os.environ.get("BINARIZE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def get_backend(
    name: str | None = None,
    *,
    threads: int | None = None,
    arch_flags: tuple[str, ...] | None = None,
) -> NumpyBackend | CBackend:
    """``"auto"`` (default; ``BINARIZE_KERNEL`` overrides): C if it builds, else NumPy.

    ``"c"`` raises ``RuntimeError`` when the C kernel is unavailable; ``"numpy"`` never builds.
    """
    choice = (name or os.environ.get("BINARIZE_KERNEL") or "auto").lower()
    if choice not in ("auto", "c", "numpy"):
        raise ValueError(f"unknown kernel backend {choice!r}; choose auto, c or numpy")
    if choice == "numpy":
        return NumpyBackend(threads)
    kernel, why = load_kernel(arch_flags)
    if kernel is None:
        if choice == "c":
            raise RuntimeError(why)
        backend = NumpyBackend(threads)
        backend.fallback_reason = why  # type: ignore[attr-defined]
        return backend
    return CBackend(kernel, threads)


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """PyTorch's convolution output size ``floor((size + 2p - d(k-1) - 1) / s) + 1``."""
    return math.floor((size + 2 * pad - dilation * (kernel - 1) - 1) / stride) + 1
