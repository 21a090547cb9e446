"""Full-precision operators of the packed runtime, in NumPy (NCHW, the input's float dtype).

Semantics follow PyTorch's (``F.conv2d``, ``F.max_pool2d`` with ``ceil_mode``,
``F.avg_pool2d`` with ``count_include_pad``, ``F.adaptive_avg_pool2d``, ...) so that the
runtime computes what the PyTorch model computes, to float rounding. Convolutions run as an
im2col matrix product (BLAS) or, for depthwise convolutions, as a sum over kernel taps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """``v`` as an ``(h, w)`` pair of ints (an int is used for both)."""
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def pad2d(x: np.ndarray, ph: int, pw: int, value: float = 0.0) -> np.ndarray:
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(
    xp: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> np.ndarray:
    """Strided view ``[B, C, Ho, Wo, kh, kw]`` of the (already padded) input."""
    kh, kw = kernel
    dh, dw = dilation
    sh, sw = stride
    ho, wo = out_hw
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    win = win[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw, ::dh, ::dw]
    return win


def _taps(xp: np.ndarray, *window: tuple[int, int]) -> list[np.ndarray]:
    """The ``kh * kw`` strided views ``[B, C, Ho, Wo]`` of the padded input, one per kernel tap
    (``window`` as :func:`_windows`; a loop over taps of whole-array operations is much faster
    than reducing a window view)."""
    win = _windows(xp, *window)
    return [win[..., ky, kx] for ky in range(win.shape[4]) for kx in range(win.shape[5])]


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> np.ndarray:
    """``F.conv2d`` with zero padding (weight ``[O, C/groups, kh, kw]``)."""
    b, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    weight = weight.astype(x.dtype, copy=False)
    if kh == 1 and kw == 1 and ph == 0 and pw == 0 and groups == 1:
        xs = x[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]
        out = np.matmul(weight.reshape(o, c), xs.reshape(b, c, ho * wo))
        out = out.reshape(b, o, ho, wo)
    else:
        xp = pad2d(x, ph, pw)
        win = _windows(xp, (kh, kw), (sh, sw), (dh, dw), (ho, wo))  # [B, C, Ho, Wo, kh, kw]
        if groups == 1:
            cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)
            out = cols @ weight.reshape(o, -1).T
            out = out.reshape(b, ho, wo, o).transpose(0, 3, 1, 2)
        elif cg == 1:
            # Depthwise (channel multiplier o / c): a sum over the kernel taps.
            mult = o // c
            out = np.zeros((b, o, ho, wo), dtype=x.dtype)
            wk = weight.reshape(c, mult, kh, kw)
            for ky in range(kh):
                for kx in range(kw):
                    tap = win[:, :, :, :, ky, kx]  # [B, C, Ho, Wo]
                    out += (tap[:, :, None] * wk[None, :, :, ky, kx, None, None]).reshape(
                        b, o, ho, wo
                    )
        else:
            og = o // groups
            cols = win.reshape(b, groups, cg, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
            cols = cols.reshape(groups, b * ho * wo, cg * kh * kw)
            wg = weight.reshape(groups, og, cg * kh * kw)
            out = np.matmul(cols, wg.transpose(0, 2, 1))  # [G, BHW, og]
            out = out.reshape(groups, b, ho, wo, og).transpose(1, 0, 4, 2, 3).reshape(b, o, ho, wo)
    if bias is not None:
        out = out + bias.astype(x.dtype, copy=False)[None, :, None, None]
    return np.ascontiguousarray(out)


def affine_channels(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Eval-mode batch norm folded to ``x * scale[c] + shift[c]`` (channel axis 1)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.astype(x.dtype, copy=False).reshape(shape) + shift.astype(
        x.dtype, copy=False
    ).reshape(shape)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    out = x @ weight.astype(x.dtype, copy=False).T
    if bias is not None:
        out = out + bias.astype(x.dtype, copy=False)
    return out


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def clip(x: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    return np.clip(x, lo, hi)


def leaky_relu(x: np.ndarray, slope: float) -> np.ndarray:
    return np.where(x >= 0, x, x * x.dtype.type(slope))


def sigmoid(x: np.ndarray) -> np.ndarray:
    # Numerically stable in both tails.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def hardsigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(x / 6 + 0.5, 0, 1).astype(x.dtype, copy=False)


def hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3, 0, 6) / 6


def _pool_out(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (a last window must start inside the input or left pad)."""
    eff = d * (k - 1) + 1
    num = size + 2 * p - eff
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def maxpool2d(
    x: np.ndarray,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
) -> np.ndarray:
    b, c, h, w = x.shape
    kh, kw = pair(kernel)
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    ho = _pool_out(h, kh, sh, ph, dh, ceil_mode)
    wo = _pool_out(w, kw, sw, pw, dw, ceil_mode)
    need_h = (ho - 1) * sh + (kh - 1) * dh + 1
    need_w = (wo - 1) * sw + (kw - 1) * dw + 1
    xp = np.full((b, c, max(need_h, h + 2 * ph), max(need_w, w + 2 * pw)), -np.inf, dtype=x.dtype)
    xp[:, :, ph : ph + h, pw : pw + w] = x
    out: np.ndarray | None = None
    for tap in _taps(xp, (kh, kw), (sh, sw), (dh, dw), (ho, wo)):
        out = tap.copy() if out is None else np.maximum(out, tap, out=out)
    assert out is not None
    return out


def avgpool2d(
    x: np.ndarray,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None = None,
) -> np.ndarray:
    """``F.avg_pool2d``: windows clipped to the padded input; divisor per PyTorch's rules."""
    b, c, h, w = x.shape
    kh, kw = pair(kernel)
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    ho = _pool_out(h, kh, sh, ph, 1, ceil_mode)
    wo = _pool_out(w, kw, sw, pw, 1, ceil_mode)
    need_h = (ho - 1) * sh + kh
    need_w = (wo - 1) * sw + kw
    hp, wp = max(need_h, h + 2 * ph), max(need_w, w + 2 * pw)
    xp = np.zeros((b, c, hp, wp), dtype=x.dtype)
    xp[:, :, ph : ph + h, pw : pw + w] = x
    sums = np.zeros((b, c, ho, wo), dtype=x.dtype)
    for tap in _taps(xp, (kh, kw), (sh, sw), (1, 1), (ho, wo)):
        sums += tap
    if divisor_override:
        return sums / x.dtype.type(divisor_override)
    ys = np.arange(ho) * sh - ph
    xs = np.arange(wo) * sw - pw
    if count_include_pad:
        # Window clipped to the padded extent [-p, size + p).
        hcount = np.minimum(ys + kh, h + ph) - ys
        wcount = np.minimum(xs + kw, w + pw) - xs
    else:
        hcount = np.minimum(ys + kh, h) - np.maximum(ys, 0)
        wcount = np.minimum(xs + kw, w) - np.maximum(xs, 0)
    div = (hcount[:, None] * wcount[None, :]).astype(x.dtype)
    return sums / div


def _adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def adaptive_pool2d(x: np.ndarray, output_size: Sequence[int | None], mode: str) -> np.ndarray:
    """``F.adaptive_avg_pool2d`` / ``adaptive_max_pool2d`` (``None`` keeps that size)."""
    b, c, h, w = x.shape
    oh = h if output_size[0] is None else int(output_size[0])
    ow = w if output_size[1] is None else int(output_size[1])
    reduce = np.mean if mode == "avg" else np.max
    if (oh, ow) == (1, 1):
        return reduce(x, axis=(2, 3), keepdims=True).astype(x.dtype, copy=False)
    out = np.empty((b, c, oh, ow), dtype=x.dtype)
    for i, (y0, y1) in enumerate(_adaptive_bounds(h, oh)):
        for j, (x0, x1) in enumerate(_adaptive_bounds(w, ow)):
            out[:, :, i, j] = reduce(x[:, :, y0:y1, x0:x1], axis=(2, 3))
    return out


def flatten(x: np.ndarray, start_dim: int, end_dim: int) -> np.ndarray:
    nd = x.ndim
    s = start_dim % nd
    e = end_dim % nd
    shape = x.shape[:s] + (-1,) + x.shape[e + 1 :]
    return x.reshape(shape)


def gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    """``F.gelu``: the erf form (``approximate="none"``, ``math.erf`` element by element: NumPy
    has no erf) or the tanh form."""
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
        return (0.5 * x * (1 + np.tanh(inner))).astype(x.dtype, copy=False)
    erf = np.frompyfunc(math.erf, 1, 1)(x / math.sqrt(2.0)).astype(x.dtype)
    return (0.5 * x * (1 + erf)).astype(x.dtype, copy=False)


def prelu(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``F.prelu``: ``weight`` per channel (axis 1) or one value for all."""
    w = weight.astype(x.dtype, copy=False)
    if w.size > 1:
        w = w.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, w * x)


def slice_dims(
    x: np.ndarray,
    dims: Sequence[int],
    starts: Sequence[int],
    stops: Sequence[int],
    steps: Sequence[int],
) -> np.ndarray:
    """``x[..., start:stop:step, ...]`` on each of ``dims`` (a contiguous copy)."""
    index = [slice(None)] * x.ndim
    for d, a, b, s in zip(dims, starts, stops, steps, strict=True):
        index[d] = slice(a, b, s)
    return np.ascontiguousarray(x[tuple(index)])


def pad(x: np.ndarray, pads: Sequence[int], value: float) -> np.ndarray:
    """``F.pad(x, pads, value=value)`` (constant mode): pairs from the last dim backwards;
    a negative amount crops."""
    widths = [(0, 0)] * x.ndim
    crop = [slice(None)] * x.ndim
    for i in range(len(pads) // 2):
        d = x.ndim - 1 - i
        before, after = int(pads[2 * i]), int(pads[2 * i + 1])
        widths[d] = (max(before, 0), max(after, 0))
        crop[d] = slice(max(-before, 0), x.shape[d] - max(-after, 0))
    x = x[tuple(crop)]
    return np.pad(x, widths, constant_values=value)


def _nearest_index(out: int, size: int, scale_factor: float | None) -> np.ndarray:
    """PyTorch's nearest source index: ``min(floor(i * r), size - 1)`` computed in float32
    (for float32 and float64 images alike)."""
    r = np.float32(1.0 / scale_factor) if scale_factor else np.float32(size) / np.float32(out)
    idx = np.floor(np.arange(out, dtype=np.float32) * r).astype(np.int64)
    return np.minimum(idx, size - 1)


def _linear_weights(
    out: int, size: int, align_corners: bool, scale_factor: float | None, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear source indices and weights along one axis: ``(i0, i1, lambda1)``."""
    i = np.arange(out, dtype=dtype)
    if align_corners:
        r = (size - 1) / (out - 1) if out > 1 else 0.0
        src = i * dtype.type(r)
    else:
        r = 1.0 / scale_factor if scale_factor else size / out
        src = np.maximum((i + dtype.type(0.5)) * dtype.type(r) - dtype.type(0.5), 0)
    i0 = src.astype(np.int64)
    lam = (src - i0).astype(dtype)
    i1 = np.where(i0 < size - 1, i0 + 1, i0)
    return i0, i1, lam


def resize(
    x: np.ndarray,
    size: Sequence[int],
    mode: str,
    align_corners: bool,
    scale_factor: Sequence[float] | None = None,
) -> np.ndarray:
    """``F.interpolate(x, size, mode=nearest|bilinear, align_corners)`` on ``[B, C, H, W]``;
    ``scale_factor`` as given to PyTorch (it then maps pixels with ``1 / scale_factor``)."""
    _, _, h, w = x.shape
    oh, ow = int(size[0]), int(size[1])
    fh, fw = (None, None) if not scale_factor else (float(scale_factor[0]), float(scale_factor[1]))
    if mode == "nearest":
        rows, cols = _nearest_index(oh, h, fh), _nearest_index(ow, w, fw)
        return np.ascontiguousarray(x[:, :, rows][:, :, :, cols])
    if mode != "bilinear":
        raise ValueError(f"resize mode {mode!r} is not nearest or bilinear")
    h0, h1, lh = _linear_weights(oh, h, align_corners, fh, x.dtype)
    w0, w1, lw = _linear_weights(ow, w, align_corners, fw, x.dtype)
    lh, lw = lh[:, None], lw
    one = x.dtype.type(1)
    rows = (one - lh) * x[:, :, h0] + lh * x[:, :, h1]
    return np.ascontiguousarray((one - lw) * rows[:, :, :, w0] + lw * rows[:, :, :, w1])


def softmax(x: np.ndarray, dim: int) -> np.ndarray:
    """``F.softmax`` along ``dim`` (the maximum subtracted first)."""
    e = np.exp(x - x.max(axis=dim, keepdims=True))
    return e / e.sum(axis=dim, keepdims=True)
