"""The bitwise convolution of a binarized layer (PA eq. 15-21), as the runtime executes it.

Weights ``W_hat[o] = sum_i alpha_i[o] read(T_i[o])`` and activations
``A_hat = sum_j beta_j read(V_j)`` are sums of bit planes read either as {0,1} (``zero_one``)
or as {-1,+1} (``plus_minus_one``: ``read(b) = 2b - 1``). By linearity (eq. 19)

    conv(W_hat, A_hat)[o, p] = sum_ij alpha_i[o] beta_j D_ij[o, p],
    D_ij[o, p] = sum over the receptive field of read(T_i) * read(V_j)

where the field holds the ``K = kh*kw*Cg`` (tap, channel) positions of output pixel ``p``
and zero-padded positions contribute the real value 0 (``A_hat`` is padded after the
activation approximation, see :mod:`binarize_cli.quant.layers`). Every ``D_ij`` is an integer computed
from popcounts (``docs/runtime.md`` has the derivation):

* {0,1} weights, {0,1} activations (PA): ``D = popcount(T AND V)`` (eq. 20). Padded
  positions hold V = 0, which is exact.
* {-1,+1} both (ABC, BNN, XNOR-Net, Bi-Real): with ``X = popcount(XNOR(T, V))`` over the
  ``Kt = 32 * Kw`` stored bits (channel-padding bits are 0 on both sides, so they count as
  ``Z = Kt - K`` equal bits), ``D = 2 X - Kt - Z + E`` where
  ``E[o, i, p] = sum over the padded positions of p of (2 T - 1)`` is the *border
  correction*: a padded position holds V = 0 (read as -1), so XNOR credited it with
  ``-read(T)`` instead of 0. ``E`` depends only on the weights and the geometry; it is
  computed once per input size and is zero away from the border. (Eq. 21 as printed,
  ``N - 2 bitcount(XNOR)``, is ``-x.y``; the dot product is ``2 bitcount(XNOR) - N`` =
  ``N - 2 bitcount(XOR)``.)
* {-1,+1} weights, {0,1} activations (DoReFa): ``D = 2 popcount(T AND V) - popcount(V)``.
* {0,1} weights, {-1,+1} activations: ``D = 2 popcount(T AND V) - S_T[o, i, p]`` with
  ``S_T`` = the popcount of ``T`` over the *valid* (unpadded) positions of ``p``.

The kernel returns ``sum_ij phi_ij (cmul * count + cadd)`` with ``phi_ij = alpha_i beta_j``,
where ``cmul * count + cadd`` is the exact integer ``D`` away from the border (XNOR:
``cmul = 2, cadd = -(Kt + Z)``), so no large float terms cancel; the per-pixel terms
(border correction, ``popcount(V)``, ``S_T``) are added here in the layer's float dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from binarize_cli.runtime import ops
from binarize_cli.runtime.bits import unpack_planes
from binarize_cli.runtime.kernels import (
    OP_AND,
    OP_XNOR,
    WORD_BITS,
    Backend,
    conv_output_size,
    pack_channel_words,
    words_for,
)
from binarize_cli.runtime.staircase import PLUS_MINUS_ONE, ZERO_ONE, Staircase, read_bits


@dataclass
class _Geometry:
    ho: int
    wo: int
    corr: np.ndarray | None  # [O, P] per-pixel weight term (or None)


@dataclass
class BinaryConv2d:
    """A binarized convolution ready to run: packed weight words plus the activation code.

    Args:
        planes: bool ``[M, O, Cg, kh, kw]`` weight planes; ``alpha``: ``[O, M]`` scales;
        weight_domain; bias ``[O]`` or None; act: the activation step function with its
        bit-plane code (None: N = 0, the activation stays real and the layer is one float
        convolution with ``W_hat``).
    """

    planes: np.ndarray
    alpha: np.ndarray
    weight_domain: str
    bias: np.ndarray | None
    act: Staircase | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    _geometry: dict[tuple[int, int], _Geometry] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        m, o, cg, kh, kw = self.planes.shape
        self.m, self.o, self.cg, self.kh, self.kw = m, o, cg, kh, kw
        self.og = o // self.groups
        self.cwg = words_for(cg)
        self.taps = kh * kw
        self.kwords = self.taps * self.cwg
        self.alpha = np.asarray(self.alpha, dtype=np.float64).reshape(o, m)
        self.bias64 = None if self.bias is None else np.asarray(self.bias, dtype=np.float64)
        # W_hat for the N = 0 path and for reference use.
        w = read_bits(self.planes, self.weight_domain, np.float64)
        self.w_hat = np.einsum("om,mochw->ochw", self.alpha, w)
        if self.act is None:
            return
        # Weight words per group: rows (o_local, i), words (tap, channel word).
        t = self.planes.transpose(1, 0, 3, 4, 2)  # [O, M, kh, kw, Cg]
        words = pack_channel_words(t).reshape(o, m, self.kwords)
        self.wts = [
            np.ascontiguousarray(
                words[g * self.og : (g + 1) * self.og].reshape(self.og * m, self.kwords)
            )
            for g in range(self.groups)
        ]
        self.tapcount = self.planes.sum(axis=2).transpose(1, 0, 2, 3).reshape(o, m, self.taps)
        if self.act.codes is None:
            raise ValueError("a binarized layer's activation step function needs its plane code")
        self.act.masks  # noqa: B018 - checks the plane count once, here
        n = self.act.num_planes
        self.n = n
        self.beta = np.asarray(self.act.scales, dtype=np.float64)
        self.thresholds = np.ascontiguousarray(self.act.thresholds, dtype=np.float64)
        self.phi64 = self.alpha[:, :, None] * self.beta[None, None, :]  # [O, M, N]
        self.phi32 = self.phi64.astype(np.float32)
        ad = self.act.domain
        self.op = (
            OP_XNOR if (self.weight_domain == PLUS_MINUS_ONE and ad == PLUS_MINUS_ONE) else OP_AND
        )
        kt = WORD_BITS * self.kwords
        k = self.taps * cg
        if self.op == OP_XNOR:
            # Interior dot product D = 2 X - Kt - Z, an exact integer formed before any float
            # multiply (Z = channel-padding bits, 0 on both sides, counted equal by XNOR).
            z = kt - k
            self.cmul, self.cadd = 2, -(kt + z)
        elif self.weight_domain == ZERO_ONE and ad == ZERO_ONE:
            self.cmul, self.cadd = 1, 0
        else:
            self.cmul, self.cadd = 2, 0
        self.alpha_sum = self.alpha.sum(axis=1)  # [O]
        self.beta_sum = float(self.beta.sum())

    # ---------------------------------------------------------------------------------
    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        return (
            conv_output_size(h, self.kh, self.stride[0], self.padding[0], self.dilation[0]),
            conv_output_size(w, self.kw, self.stride[1], self.padding[1], self.dilation[1]),
        )

    def _valid(self, h: int, w: int, ho: int, wo: int) -> np.ndarray:
        """``valid[t, p]``: tap ``t`` of output pixel ``p`` reads a real (unpadded) input pixel."""
        oy = np.arange(ho) * self.stride[0] - self.padding[0]
        ox = np.arange(wo) * self.stride[1] - self.padding[1]
        ky = np.arange(self.kh) * self.dilation[0]
        kx = np.arange(self.kw) * self.dilation[1]
        iy = ky[:, None] + oy[None, :]  # [kh, Ho]
        ix = kx[:, None] + ox[None, :]  # [kw, Wo]
        vy = (iy >= 0) & (iy < h)
        vx = (ix >= 0) & (ix < w)
        valid = vy[:, None, :, None] & vx[None, :, None, :]  # [kh, kw, Ho, Wo]
        return valid.reshape(self.taps, ho * wo)

    def _geometry_for(self, h: int, w: int) -> _Geometry:
        key = (h, w)
        geo = self._geometry.get(key)
        if geo is not None:
            return geo
        ho, wo = self.output_hw(h, w)
        if ho <= 0 or wo <= 0:
            raise ValueError(f"input {h}x{w} is too small for a {self.kh}x{self.kw} convolution")
        assert self.act is not None
        valid = self._valid(h, w, ho, wo).astype(np.float64)
        ad = self.act.domain
        corr: np.ndarray | None = None
        if self.op == OP_XNOR:
            # Border correction: sum_i alpha_i[o] * E_i[o, p] times sum_j beta_j.
            e_w = 2.0 * self.tapcount - self.cg  # [O, M, T]
            pad = 1.0 - valid
            if pad.any():
                corr = self.beta_sum * np.einsum("om,omt,tp->op", self.alpha, e_w, pad)
        elif self.weight_domain == ZERO_ONE and ad == PLUS_MINUS_ONE:
            # - sum_j beta_j * sum_i alpha_i[o] * S_T[o, i, p] (valid-position weight counts).
            corr = -self.beta_sum * np.einsum(
                "om,omt,tp->op", self.alpha, self.tapcount.astype(np.float64), valid
            )
        geo = _Geometry(ho=ho, wo=wo, corr=corr)
        self._geometry[key] = geo
        return geo

    # ---------------------------------------------------------------------------------
    def __call__(self, x: np.ndarray, backend: Backend) -> np.ndarray:
        dtype = x.dtype
        if self.act is None:
            return ops.conv2d(
                x,
                self.w_hat.astype(dtype),
                self.bias,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
        b, c, h, w = x.shape
        if c != self.cg * self.groups:
            raise ValueError(f"expected {self.cg * self.groups} input channels, got {c}")
        geo = self._geometry_for(h, w)
        ho, wo = geo.ho, geo.wo
        p = ho * wo
        q = b * p
        be = backend
        stride = self.stride
        if self.kh == self.kw == 1 and self.padding == (0, 0) and stride != (1, 1):
            # A strided 1x1 convolution (downsample) reads every s-th pixel only: quantize
            # and pack just those.
            x = np.ascontiguousarray(x[:, :, :: stride[0], :: stride[1]])
            stride = (1, 1)
        act = be.quantize_pack(
            x, self.thresholds, self.act.masks, self.n, self.groups, self.padding
        )
        out = np.empty((b, self.o, p), dtype=dtype)
        for g in range(self.groups):
            osl = slice(g * self.og, (g + 1) * self.og)
            cols = be.im2col(act, g, self.cwg, (self.kh, self.kw), stride, self.dilation, (ho, wo))
            if dtype == np.float32:
                s = be.bgemm(
                    self.wts[g],
                    self.og,
                    self.m,
                    cols,
                    self.phi32[osl],
                    self.op,
                    self.cmul,
                    self.cadd,
                )
            else:
                cnt = be.bgemm_counts(self.wts[g], self.og, self.m, cols, self.op)
                vals = self.cmul * cnt.astype(np.float64) + self.cadd
                s = np.einsum("omnq,omn->oq", vals, self.phi64[osl], optimize=True)
            s = s[:, :q].astype(dtype, copy=False)
            if self.weight_domain == PLUS_MINUS_ONE and self.act.domain == ZERO_ONE:
                # - (sum_i alpha_i[o]) * sum_j beta_j popcount(V_j over the field of q)
                sa = np.bitwise_count(cols[:, :, :q]).sum(axis=1, dtype=np.int64)  # [N, Q]
                sab = self.beta @ sa  # [Q]
                s = s - np.outer(self.alpha_sum[osl], sab).astype(dtype)
            y = s.reshape(self.og, b, p)
            if geo.corr is not None:
                y = y + geo.corr[osl, None, :].astype(dtype)
            out[:, osl] = y.transpose(1, 0, 2)
        if self.bias is not None:
            out += self.bias.astype(dtype)[None, :, None]
        return out.reshape(b, self.o, ho, wo)

    # ---------------------------------------------------------------------------------
    def reference(self, x: np.ndarray) -> np.ndarray:
        """Float oracle: ``conv(W_hat, A_hat)`` with float64 arithmetic (tests)."""
        a = x if self.act is None else self.act(x.astype(np.float64))
        return ops.conv2d(
            a.astype(np.float64),
            self.w_hat,
            self.bias64,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


def from_tensors(
    *,
    weight_planes: np.ndarray,
    weight_scales: np.ndarray,
    weight_shape: tuple[int, int, int, int],
    weight_domain: str,
    bias: np.ndarray | None,
    act: Staircase | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> BinaryConv2d:
    """Build from the file's tensors: packed planes ``uint8 [M, ceil(n/8)]`` (LSB-first,
    C-order over ``weight_shape``), scales ``[M]`` (one per plane) or ``[M, O]`` (per
    output channel)."""
    o = int(weight_shape[0])
    m = int(weight_planes.shape[0])
    planes = unpack_planes(weight_planes, weight_shape)
    scales = np.asarray(weight_scales, dtype=np.float64)
    if scales.shape == (m,):
        alpha = np.broadcast_to(scales[None, :], (o, m))
    elif scales.shape == (m, o):
        alpha = scales.T
    else:
        raise ValueError(
            f"weight scales of shape {scales.shape} fit neither [M] nor [M, O] (M={m}, O={o})"
        )
    if math.prod(weight_shape) == 0:
        raise ValueError("empty weight")
    return BinaryConv2d(
        planes=planes,
        alpha=np.ascontiguousarray(alpha),
        weight_domain=weight_domain,
        bias=None if bias is None else np.asarray(bias, dtype=np.float32),
        act=act,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
