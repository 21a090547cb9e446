"""PA-Net: the piecewise approximation scheme (seed 002, section 3), exact to the paper.

Layout (Brevitas habit): pure tensor ops -> ``torch.autograd.Function`` -> ``nn.Module``.
See ``docs/schemes-pa.md`` for the derivations, the paper's misprints and every choice the
paper leaves open.

Weights (eq. 6-9), ``M`` even.  Endpoints ``u_k = mean(W) + c_k std(W)`` (``k = 1..M``,
population std, both recomputed from the current latent weight every forward).  The
``M + 1`` pieces are half-open, ``[u_k, u_{k+1})`` (a value exactly on ``u_k`` belongs to the
piece on its right)::

    piece 1          W < u_1                   -> alpha_1
    piece i          u_{i-1} <= W < u_i        -> alpha_i          i = 2 .. M/2
    zero piece       u_{M/2} <= W < u_{M/2+1}  -> 0
    piece i          u_i <= W < u_{i+1}        -> alpha_i          i = M/2+1 .. M-1
    piece M          W >= u_M                  -> alpha_M

``alpha_k`` is the mean of the weights in piece ``k`` (eq. 7), recomputed every forward and a
constant in backward.  An empty piece gets the midpoint of its interval (the finite endpoint
for the two outer pieces): finite, and inside the piece's interval, so the levels stay
monotone whenever the zero piece straddles 0.  Backward (eq. 8-9): ``M`` segments split at
``s_k = (u_k + u_{k+1}) / 2`` (half-open ``[s_{k-1}, s_k)``, outer ones unbounded); on the
segment around ``u_k`` the slope is ``lambda_W * (level right of u_k - level left of u_k)``,
with ``lambda_W = (M - 1) / (u_M - u_1)`` unless given.

Activations (eq. 10-14), ``N >= 1``.  Trainable endpoints ``v_1 < ... < v_N`` and levels
``beta_1..beta_N``: ``A < v_1 -> 0``, ``v_i <= A < v_{i+1} -> beta_i``, ``A >= v_N -> beta_N``.
Backward: slope ``lambda_A * (beta_i - beta_{i-1})`` (``beta_0 = 0``) on the segment
``[t_{i-1}, t_i)`` around ``v_i``, 0 outside ``[t_0, t_N)``, with ``t_i = (v_i + v_{i+1})/2``,
``t_N = v_N + lambda_Delta`` and ``t_0 = 2 v_1 - t_1`` (the paper's ``2.0 v_0 - s_1`` is a
misprint).  ``dC/dbeta_i`` = sum of the upstream gradient over piece ``i`` (eq. 13, exact);
``dC/dv_i = -lambda_A (beta_i - beta_{i-1}) * sum of the upstream gradient over [t_{i-1}, t_i)``
(eq. 14 with the sign the paper drops: moving ``v_i`` right lowers the output).

Inference (eq. 15-19): ``W_hat = sum_i alpha_i T_i`` and ``A_hat = sum_j beta_j V_j`` with
{0,1} piece-indicator planes (:meth:`PAWeightQuantizer.bit_planes`,
:meth:`PAActivationQuantizer.bit_planes`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import torch
from torch import nn

from binarize_cli.core.errors import SchemeError
from binarize_cli.quant import fused
from binarize_cli.quant.base import (
    ActivationQuantizer,
    BitPlanes,
    Domain,
    Scheme,
    ThresholdScan,
    WeightQuantizer,
    calibration_samples,
    exporting,
    mean_std,
    needs_autograd,
    register_scheme,
    take,
    threshold_scan,
)

__all__ = [
    "MAX_BASES",
    "TABLE1_ENDPOINTS",
    "GAUSSIAN_ENDPOINTS",
    "PAActivationFunction",
    "PAActivationQuantizer",
    "PAWeightFunction",
    "PAWeightQuantizer",
    "OPTION_KEYS",
    "PA_SCHEME",
    "activation_mse",
    "activation_surrogate",
    "calibrate_activation",
    "default_weight_endpoints",
    "gaussian_lloyd_endpoints",
    "gaussian_pa_mse",
    "pa_activation_forward",
    "pa_weight_forward",
    "piece_index",
    "quantize_activation",
    "quantize_weight",
    "relu_gaussian_levels",
    "validate_weight_endpoints",
    "weight_endpoints",
    "weight_levels",
    "weight_surrogate",
]

#: Largest M (weight endpoints) and N (activation endpoints) accepted.
MAX_BASES = 64

#: Table 1 of the paper: endpoint multipliers ``c_k`` (``u_k = mean + c_k std``) for M = 8.
TABLE1_ENDPOINTS: tuple[float, ...] = (-1.5, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5)

#: Default endpoint multipliers for M != 8: the thresholds of the (M+1)-level Lloyd-Max
#: quantizer of N(0, 1) (zero level in the middle, levels = piece means), rounded to 4
#: decimals.  Regenerate with ``round(c, 4) for c in gaussian_lloyd_endpoints(m)``;
#: tests check this table against that function.
# fmt: off
GAUSSIAN_ENDPOINTS: dict[int, tuple[float, ...]] = {
    2: (-0.612, 0.612),
    4: (-1.2444, -0.3823, 0.3823, 1.2444),
    6: (-1.6108, -0.8744, -0.2803, 0.2803, 0.8744, 1.6108),
    10: (
        -2.0592, -1.4357, -0.9656, -0.5599, -0.1837,
        0.1837, 0.5599, 0.9656, 1.4357, 2.0592,
    ),
    12: (
        -2.2145, -1.6229, -1.1841, -0.8126, -0.476, -0.1569,
        0.1569, 0.476, 0.8126, 1.1841, 1.6229, 2.2145,
    ),
    14: (
        -2.3437, -1.7763, -1.3605, -1.013, -0.7029, -0.4143, -0.1369,
        0.1369, 0.4143, 0.7029, 1.013, 1.3605, 1.7763, 2.3437,
    ),
    16: (
        -2.4539, -1.9057, -1.5077, -1.1782, -0.8874, -0.6201, -0.3669, -0.1215,
        0.1215, 0.3669, 0.6201, 0.8874, 1.1782, 1.5077, 1.9057, 2.4539,
    ),
}
# fmt: on

_STD_NORMAL = NormalDist()


# --------------------------------------------------------------------------------------
# Endpoint rules for the weights (the Gaussian model behind "mean and std", paper 3.1)
# --------------------------------------------------------------------------------------


def _pdf(x: float) -> float:
    return 0.0 if math.isinf(x) else math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))  # erfc: accurate in both tails, handles inf


def _mass(a: float, b: float) -> float:
    """``P(a <= X < b)`` for ``X ~ N(0, 1)``, without cancellation in the upper tail."""
    if a >= 0.0:
        return _cdf(-a) - _cdf(-b)
    return _cdf(b) - _cdf(a)


def _gaussian_centroid(a: float, b: float) -> float:
    """``E[X | a <= X < b]`` for ``X ~ N(0, 1)``."""
    p = _mass(a, b)
    if p <= 0.0:  # numerically empty tail: the finite bound is the best estimate
        return a if math.isfinite(a) else b
    return (_pdf(a) - _pdf(b)) / p


def _lloyd_positive_levels(
    count: int, *, tol: float = 1e-13, max_iter: int = 100_000
) -> list[float]:
    """Lloyd-Max on the positive half-line of N(0,1) with a fixed level 0 below ``count`` levels.

    Thresholds are midpoints of adjacent levels (0 included: the first is ``levels[0] / 2``),
    every level is the centroid of its interval.  Returns the ``count`` positive levels.
    """
    # Start from the asymptotically optimal point density (prop. to pdf^(1/3), i.e. the
    # quantiles of N(0, 3)): few iterations even for large counts.
    levels = [
        math.sqrt(3.0) * _STD_NORMAL.inv_cdf(0.5 + (i + 1) / (2 * count + 1)) for i in range(count)
    ]
    for _ in range(max_iter):
        th = [levels[0] / 2.0] + [(levels[i] + levels[i + 1]) / 2.0 for i in range(count - 1)]
        bounds = [*th, math.inf]
        new = [_gaussian_centroid(bounds[i], bounds[i + 1]) for i in range(count)]
        delta = max(abs(x - y) for x, y in zip(new, levels, strict=True))
        levels = new
        if delta < tol:
            break
    return levels


@functools.cache
def gaussian_lloyd_endpoints(m: int) -> tuple[float, ...]:
    """Endpoint multipliers ``c_1..c_M`` minimising ``E[(W - W_hat)^2]`` for ``W ~ N(0, 1)``.

    ``W_hat`` is PA's approximation with piece means as levels (eq. 7) and a zero piece
    mapped to 0 (eq. 6).  By symmetry the zero piece's mean is 0, so this is the classic
    (M+1)-level Lloyd-Max quantizer of a Gaussian (J. Max, 1960): each endpoint is the
    midpoint of its two neighbouring levels and each level is the centroid of its piece.
    Exact to ~1e-13 (pure Python, cached).  M = 2, 4, 6 give +-0.6120; +-0.3823, +-1.2444;
    +-0.2803, +-0.8744, +-1.6108 (Max's table).
    """
    _check_m(m)
    h = m // 2
    pos = _lloyd_positive_levels(h)
    th = [pos[0] / 2.0] + [(pos[i] + pos[i + 1]) / 2.0 for i in range(h - 1)]
    return tuple([-t for t in reversed(th)] + th)


def gaussian_pa_mse(endpoints: Sequence[float]) -> float:
    """Expected ``E[(W - W_hat)^2]`` of PA's weight approximation for ``W ~ N(0, 1)``.

    Levels are the piece means (eq. 7); the zero piece maps to 0.  Used to compare endpoint
    rules (Table 1 for M=8: 0.0349; the Lloyd-Max endpoints for M=8: 0.0279).
    """
    c = validate_weight_endpoints(endpoints, len(endpoints))
    m = len(c)
    bounds = [-math.inf, *c, math.inf]
    total = 0.0
    for k in range(m + 1):
        a, b = bounds[k], bounds[k + 1]
        p = _mass(a, b)
        ex = _pdf(a) - _pdf(b)  # E[X 1{a<=X<b}]
        ex2 = (
            p
            + (a * _pdf(a) if math.isfinite(a) else 0.0)
            - (b * _pdf(b) if math.isfinite(b) else 0.0)
        )
        level = 0.0 if k == m // 2 else (ex / p if p > 0 else 0.0)
        total += ex2 - 2.0 * level * ex + level * level * p
    return total


def default_weight_endpoints(m: int) -> tuple[float, ...]:
    """The endpoint multipliers used when none are given: Table 1 for M = 8, else Lloyd-Max.

    The paper gives only Table 1 (M = 8) and the rule "almost uniformly sampled from -2 std
    to 2 std except those near 0".  For other M we use :func:`gaussian_lloyd_endpoints`
    rounded to 4 decimals (:data:`GAUSSIAN_ENDPOINTS`): the endpoints that minimise the
    reconstruction error of PA itself on Gaussian weights, which is the model the paper uses
    to justify mean/std endpoints.  For M <= 8 they lie inside +-2 std and are denser near 0
    (except the narrow zero piece), i.e. the paper's description.
    """
    _check_m(m)
    if m == 8:
        return TABLE1_ENDPOINTS
    if m in GAUSSIAN_ENDPOINTS:
        return GAUSSIAN_ENDPOINTS[m]
    return tuple(round(c, 4) for c in gaussian_lloyd_endpoints(m))


def validate_weight_endpoints(endpoints: Sequence[float], m: int) -> tuple[float, ...]:
    """Check user endpoint multipliers: length M, finite, strictly increasing, M/2 each side of 0."""
    try:
        c = tuple(float(x) for x in endpoints)
    except (TypeError, ValueError):
        raise SchemeError(
            f"PA weight_endpoints must be a list of numbers (got {endpoints!r})"
        ) from None
    if len(c) != m:
        raise SchemeError(
            f"PA weight_endpoints needs exactly M = {m} values (got {len(c)}): one multiplier of std(W) per endpoint"
        )
    if not all(math.isfinite(x) for x in c):
        raise SchemeError(f"PA weight_endpoints must be finite (got {list(c)})")
    if any(b <= a for a, b in zip(c, c[1:], strict=False)):
        raise SchemeError(f"PA weight_endpoints must be strictly increasing (got {list(c)})")
    neg = sum(1 for x in c if x < 0)
    pos = sum(1 for x in c if x > 0)
    if neg != m // 2 or pos != m // 2:
        raise SchemeError(
            f"PA weight_endpoints needs M/2 = {m // 2} negative and {m // 2} positive values around the zero piece (got {list(c)})"
        )
    return c


def _check_m(m: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 2 or m % 2 or m > MAX_BASES:
        raise SchemeError(
            f"PA needs an even -M >= 2 (got {m}): the weight endpoints come in M/2 negative "
            f"and M/2 positive around the zero piece; try -M 4 or -M 8 (at most {MAX_BASES})"
        )


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > MAX_BASES:
        raise SchemeError(
            f"PA activations need 1 <= -N <= {MAX_BASES} (got {n}); use -N 0 for full-precision activations"
        )


# --------------------------------------------------------------------------------------
# Shared tensor helpers
# --------------------------------------------------------------------------------------


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _onnx_exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


def _exporting() -> bool:
    """Under ONNX export, tracing or ``torch.compile``: avoid ``bincount`` (no export, graph break)."""
    return exporting()


def piece_index(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Number of ``bounds`` that are ``<= x``, elementwise (``bounds`` sorted, 1-D).

    Equals ``torch.bucketize(x, bounds, right=True)``: index ``k`` means
    ``bounds[k-1] <= x < bounds[k]``.  Computed as a sum of comparisons in uint8 (bool viewed
    as uint8 avoids a type-promotion copy), several times faster than ``bucketize`` on CPU, and
    exported to ONNX as ``GreaterOrEqual``/``Add``.  NaN lands in piece 0.
    """
    k = bounds.shape[0]
    b = bounds.to(torch.promote_types(x.dtype, bounds.dtype))
    if k >= 255:
        return torch.bucketize(x, b, right=True)
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    if _onnx_exporting():  # the tracer has no view(dtype)
        idx = (x >= b[0]).to(torch.uint8)
        for i in range(1, k):
            idx = idx + (x >= b[i]).to(torch.uint8)
        return idx
    idx = (x >= b[0]).view(torch.uint8).clone()
    for i in range(1, k):
        idx += (x >= b[i]).view(torch.uint8)
    return idx


def _bin_sums(
    idx: torch.Tensor, values: torch.Tensor | None, size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``out[k] = sum(values[idx == k])`` (or the count when ``values`` is None), deterministic.

    CPU: one ``bincount`` pass.  Elsewhere (CUDA ``bincount`` with weights uses float atomics,
    nondeterministic) and under export: one masked sum per bin.
    """
    flat = idx.reshape(-1)
    if flat.device.type == "cpu" and not _exporting():
        w = None if values is None else values.reshape(-1).to(dtype)
        out = torch.bincount(flat, weights=w, minlength=size)
        return out.to(dtype)
    src = torch.ones_like(flat, dtype=dtype) if values is None else values.reshape(-1).to(dtype)
    zero = torch.zeros((), dtype=dtype, device=flat.device)
    return torch.stack([torch.where(flat == k, src, zero).sum() for k in range(size)])


# --------------------------------------------------------------------------------------
# Weights: pure ops (eq. 6-9)
# --------------------------------------------------------------------------------------


def weight_endpoints(weight: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """``u_k = mean(W) + c_k * std(W)`` (population std), in the accumulation dtype."""
    acc = _acc_dtype(weight)
    mean, std = mean_std(weight.detach().to(acc))
    return mean + multipliers.detach().to(device=weight.device, dtype=acc) * std


def _piece_levels(counts: torch.Tensor, sums: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The ``M + 1`` levels of eq. 6-7 from the per-piece counts and sums of the weights.

    ``levels[M/2] = 0`` (the zero piece); ``levels[k]`` for the others is the mean of the
    weights in piece ``k``; an empty piece gets the midpoint of its interval
    ``[u_k, u_{k+1})``, or the finite endpoint for the two unbounded outer pieces.
    """
    m = u.shape[0]
    counts = counts.to(u.dtype)
    sums = sums.to(u.dtype)
    lo = torch.cat([u[:1], u])
    hi = torch.cat([u, u[-1:]])
    fill = (lo + hi) / 2.0
    means = torch.where(counts > 0, sums / counts.clamp_min(1.0), fill)
    keep = torch.arange(m + 1, device=u.device) != m // 2
    return torch.where(keep, means, torch.zeros_like(means))


def _weight_scan(
    weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor | None = None
) -> tuple[ThresholdScan, torch.Tensor]:
    """One pass per bound over the weight: the scan over ``u`` (or over the interleaved
    ``u_1 <= s_1 <= u_2 <= ... <= u_M`` when the split points ``s`` are given) and the levels.

    With ``s``, ``j = #{bounds <= W}`` holds both indices: the piece of eq. 6 is
    ``ceil(j / 2)`` and the backward segment of eq. 8-9 is ``floor(j / 2)`` (``s_k`` is the
    float midpoint of ``u_k`` and ``u_{k+1}``, so the bounds stay sorted).
    """
    m = u.shape[0]
    bounds = u if s is None else _interleave(u, s)
    step = 1 if s is None else 2
    scan = threshold_scan(weight, bounds, stats=range(0, step * m, step))
    return scan, _piece_levels(scan.counts, scan.sums, u)


def weight_levels(weight: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Piece index (0..M) of every weight and the ``M + 1`` piece levels (eq. 6-7).

    ``levels[M/2] = 0`` (the zero piece); ``levels[k]`` for the others is the mean of the
    weights in piece ``k`` (eq. 7).  An empty piece gets the midpoint of its interval
    ``[u_k, u_{k+1})``, or the finite endpoint for the two unbounded outer pieces.
    Returns ``(idx, levels)`` with ``idx`` uint8 and ``levels`` in the accumulation dtype.
    """
    scan, levels = _weight_scan(weight, u)
    return scan.int_index().to(torch.uint8).reshape(weight.shape), levels


def pa_weight_forward(weight: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """``W_hat`` (eq. 6), no autograd: the pure op behind :class:`PAWeightFunction`."""
    u = weight_endpoints(weight, multipliers)
    scan, levels = _weight_scan(weight, u)
    return take(levels.to(weight.dtype), scan.int_index()).reshape(weight.shape)


def _lambda_w(u: torch.Tensor, lambda_w: float | None) -> torch.Tensor:
    """``lambda_W``: the given value, or ``(M - 1) / (u_M - u_1)`` (one over the mean endpoint gap)."""
    if lambda_w is not None:
        return u.new_tensor(float(lambda_w))
    span = u[-1] - u[0]
    m = u.shape[0]
    return torch.where(
        span > 0, (m - 1) / span.clamp_min(torch.finfo(u.dtype).tiny), torch.zeros_like(span)
    )


def _split_points(u: torch.Tensor) -> torch.Tensor:
    """``s_k = (u_k + u_{k+1}) / 2``, ``k = 1..M-1``: where eq. 8-9's segments meet."""
    return (u[:-1] + u[1:]) / 2.0


def _pairs(table: torch.Tensor) -> torch.Tensor:
    """``[a, a, b, b, ...]``: each entry twice (``repeat_interleave(2)`` without its device sync)."""
    return table.unsqueeze(1).expand(-1, 2).reshape(-1)


def weight_surrogate(
    u: torch.Tensor, levels: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward segments and slopes of eq. 8-9.

    Returns ``(s, slopes)``: the ``M - 1`` split points ``s_k = (u_k + u_{k+1}) / 2`` and the
    ``M`` slopes ``lambda_W * (levels[k+1] - levels[k])`` of the segments
    ``[s_{k-1}, s_k)`` (``s_0 = -inf``, ``s_M = +inf``) around ``u_k``.
    """
    slopes = lam * (levels[1:] - levels[:-1])
    return _split_points(u), slopes


def _weight_forward_body(
    w: torch.Tensor, multipliers: torch.Tensor, lambda_w: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 6-9 on a flat float32 weight in one graph of three loops: the mean and std
    (``u_k = mean + c_k std``, eq. 6), the per-piece counts and sums of eq. 7 over ``u``,
    and the lookup of ``W_hat`` over ``u`` (piece ``#{u <= W}``, eq. 6).  Returns ``W_hat``
    (flat), the split points ``s`` and the ``M`` slopes of eq. 8-9 (the backward's: segment
    ``#{s <= W}``).  The tables between the loops are materialised: inductor would otherwise
    recompute them per vector of weights.

    The lookups compare each weight with the ``M`` endpoints here and the ``M - 1`` split
    points in the backward, not with the ``2M - 1`` interleaved bounds of the eager path
    (:func:`_weight_scan`): ``#{u <= W} = ceil(j / 2)`` and ``#{s <= W} = floor(j / 2)`` for
    ``j`` the count over the interleaved bounds, so the levels are the same, with fewer
    comparisons per weight."""
    mean, std = fused.mean_std(w)
    u = fused.materialize(mean + multipliers.to(w.dtype) * std)
    levels = _piece_levels(*fused.bucket_counts_sums(w, u, w), u)
    s, slopes = weight_surrogate(u, levels, _lambda_w(u, lambda_w))
    out = fused.select(w, u, fused.materialize(levels).to(w.dtype))
    return out, *(fused.materialize(t, output=True) for t in (s, slopes))  # type: ignore[return-value]


_WEIGHT_FORWARD = fused.Kernel(_weight_forward_body, own_graph=True)


class PAWeightFunction(torch.autograd.Function):
    """Autograd form of PA's weight approximation: forward eq. 6-7, backward eq. 8-9.

    ``apply(weight, multipliers, lambda_w)``; ``lambda_w`` is a float (``lambda_W``, in
    1/weight units) or None for ``(M - 1) / (u_M - u_1)``.  Endpoints, levels and
    ``lambda_W`` are constants in backward (the paper's treatment).

    Implementation: the forward counts ``j`` = how many of the interleaved bounds
    ``u_1 <= s_1 <= u_2 <= ... <= s_{M-1} <= u_M`` are ``<= W`` (one pass per bound, which
    also yields the per-piece counts and sums of eq. 7).  The piece of eq. 6 is
    ``ceil(j / 2)`` and the segment of eq. 8-9 is ``floor(j / 2)``, so the forward is one
    table lookup and the backward another on the saved ``j`` (one uint8 per weight).  With
    the fused kernels (:func:`binarize_cli.quant.fused.enabled`) the forward looks the piece
    up as ``#{u <= W}`` and the backward recomputes the segment ``#{s <= W}`` from the saved
    weight instead, inside the same loop as the product with the gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, multipliers: torch.Tensor, lambda_w: float | None
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.fused = fused.enabled(weight)
        if ctx.fused:
            out, splits, slopes = _WEIGHT_FORWARD(fused.flat(weight), multipliers, lambda_w)
            ctx.save_for_backward(weight, splits, slopes)
            return out.view(weight.shape)
        u = weight_endpoints(weight, multipliers)
        scan, levels = _weight_scan(weight, u, _split_points(u))
        _, slopes = weight_surrogate(u, levels, _lambda_w(u, lambda_w))
        j = scan.int_index()
        ctx.save_for_backward(j.to(torch.uint8), _pairs(slopes))
        return take(_pairs(levels)[1:-1].to(weight.dtype), j).reshape(weight.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if ctx.fused:  # the slope of segment #{s <= W} (eq. 8-9)
            weight, splits, slopes = ctx.saved_tensors
            return fused.lookup_grad(weight, splits, slopes, grad_out), None, None
        j, slope_of_j = ctx.saved_tensors
        return take(slope_of_j.to(grad_out.dtype), j, grad_out), None, None


def quantize_weight(
    weight: torch.Tensor, multipliers: torch.Tensor, lambda_w: float | None = None
) -> torch.Tensor:
    """``W_hat`` with PA's surrogate gradient (autograd only when a gradient is needed)."""
    if needs_autograd(weight) and not _onnx_exporting():
        return PAWeightFunction.apply(weight, multipliers, lambda_w)
    return pa_weight_forward(weight, multipliers)


# --------------------------------------------------------------------------------------
# Activations: pure ops (eq. 10-14)
# --------------------------------------------------------------------------------------


def activation_levels(beta: torch.Tensor, zero_piece: int | torch.Tensor = 0) -> torch.Tensor:
    """The ``N + 1`` piece levels: ``beta`` with the level 0 inserted at piece ``zero_piece``.

    ``zero_piece = 0`` is eq. 10 (``[0, beta_1, ..., beta_N]``, everything below ``v_1`` maps
    to 0). ``zero_piece = K > 0`` is the signed layout for inputs that are not behind a ReLU
    (MobileNetV2's linear bottlenecks): ``[beta_1, ..., beta_K, 0, beta_{K+1}, ..., beta_N]``
    with ``beta_1 < ... < beta_K < 0``; the zero piece ``[v_K, v_{K+1})`` holds 0.
    ``zero_piece`` may be a tensor (the quantizer's buffer): no host read, no graph break.
    """
    n = beta.shape[0]
    piece = torch.arange(n + 1, device=beta.device)
    k = torch.as_tensor(zero_piece, device=beta.device)
    src = (piece - (piece > k).long()).clamp_max(n - 1)  # beta slot of each piece but K
    return torch.where(piece == k, torch.zeros_like(beta[:1]), beta.index_select(0, src))


def _drop_zero_piece(pieces: torch.Tensor, zero_piece: int | torch.Tensor) -> torch.Tensor:
    """``pieces`` (``N + 1`` per-piece values) without the zero piece's: one per ``beta``."""
    n = pieces.shape[0] - 1
    slot = torch.arange(n, device=pieces.device)
    k = torch.as_tensor(zero_piece, device=pieces.device)
    return pieces.index_select(0, slot + (slot >= k).long())


def pa_activation_forward(
    x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, zero_piece: int | torch.Tensor = 0
) -> torch.Tensor:
    """``A_hat`` (eq. 10) for sorted endpoints ``v``: piece ``j`` (``v_j <= A < v_{j+1}``) maps
    to ``activation_levels(beta, zero_piece)[j]``; with ``zero_piece = 0``: 0 below ``v_1``,
    ``beta_i`` on ``[v_i, v_{i+1})``."""
    idx = threshold_scan(x, v).int_index()
    return take(activation_levels(beta, zero_piece).to(x.dtype), idx).reshape(x.shape)


def activation_surrogate(
    v: torch.Tensor,
    beta: torch.Tensor,
    lambda_a: float | None,
    lambda_delta: float | None,
    zero_piece: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward segments and slopes of eq. 11-12 for sorted endpoints ``v``.

    Returns ``(t, slopes)``: ``t_0..t_N`` and the ``N`` slopes
    ``lambda_A * (L_i - L_{i-1})`` on ``[t_{i-1}, t_i)``, ``L`` the piece levels of
    :func:`activation_levels` (eq. 10 layout: ``L_i = beta_i``, ``L_0 = 0``).

    * ``t_i = (v_i + v_{i+1}) / 2`` for ``i = 1..N-1``; ``t_N = v_N + lambda_Delta``;
      ``t_0 = 2 v_1 - t_1`` (the paper's ``t_0 = 2.0 v_0 - s_1`` is a misprint: there is no
      ``v_0`` and ``s_1`` is a weight split point).  For ``N = 1``, ``t_1 = t_N``, so the
      single segment is ``[v_1 - lambda_Delta, v_1 + lambda_Delta)``.
    * In eq. 10's layout (``zero_piece = 0``) with ``v_1 > 0``, ``t_0`` is raised to the
      smallest positive normal number when it falls at or below 0: the first segment never
      holds ``A <= 0``.  Behind a ReLU, half or more of the inputs are exact zeros; they map to
      0 and stay 0 for any small move of ``v_1``, so the true ``dC/dv_1`` has no term from them,
      but the mirrored segment would count them all (2.2-3.5x the finite difference on
      ``ReLU(N(0, 1))``, N = 3..7; see docs/schemes-pa.md, "The first segment and ReLU zeros").
    * ``lambda_delta=None``: mirror the rule for ``t_0`` at the top, ``t_N = 2 v_N - t_{N-1}``
      (``lambda_Delta = (v_N - v_{N-1}) / 2``); for ``N = 1``, ``lambda_Delta = |v_1|``
      (segment ``[0, 2 v_1)``).
    * ``lambda_a=None``: ``lambda_A = N / (t_N - t_0)``, one over the mean segment width,
      so that the surrogate's average slope is ~1 (0 if the segments are empty).
    """
    n = v.shape[0]
    if n >= 2:
        mids = (v[:-1] + v[1:]) / 2.0
        delta = (v[-1] - mids[-1]) if lambda_delta is None else v.new_tensor(float(lambda_delta))
    else:
        mids = v[:0]
        delta = v[0].abs() if lambda_delta is None else v.new_tensor(float(lambda_delta))
    t_top = (v[-1] + delta).reshape(1)
    t_first = mids[:1] if n >= 2 else t_top
    t_zero = 2.0 * v[:1] - t_first
    # eq. 10 layout: the first segment stops at 0 (exclusive); a tensor test, no host read
    eq10 = torch.as_tensor(zero_piece, device=v.device) == 0
    floor = torch.minimum(v[:1], torch.full_like(t_zero, torch.finfo(v.dtype).tiny))
    t_zero = torch.where(eq10 & (v[:1] > 0), torch.maximum(t_zero, floor), t_zero)
    t = torch.cat([t_zero, mids, t_top])
    if lambda_a is None:
        width = t[-1] - t[0]
        lam = torch.where(
            width > 0, n / width.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(width)
        )
    else:
        lam = v.new_tensor(float(lambda_a))
    levels = activation_levels(beta, zero_piece)
    return t, lam * (levels[1:] - levels[:-1])


def _interleave(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[t_0, v_1, t_1, v_2, ..., v_N, t_N]`` (sorted: ``t_{i-1} <= v_i <= t_i``)."""
    n = v.shape[0]
    out = t.new_empty(2 * n + 1)
    out[0::2] = t
    out[1::2] = v
    return out


def _activation_forward_body(
    x: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    k: torch.Tensor,
    lambda_a: float | None,
    lambda_delta: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 10 on a flat input for sorted ``v``, in one graph: the tables of eq. 10-12 and one
    loop of lookups (piece ``#{v <= A}``, eq. 10).  Returns ``A_hat`` (flat), the interleaved
    bounds ``t_0, v_1, t_1, ..., v_N, t_N`` (the backward's per-bucket sums), the slope of
    each segment ``#{t <= A}`` (0 outside ``[t_0, t_N)``, eq. 11) and the ``N`` slopes.
    Over the interleaved bounds' count ``j`` the piece is ``floor(j / 2)`` and the segment
    ``ceil(j / 2)``: the lookups compare with ``v`` or ``t`` alone, fewer comparisons per
    element for the same levels."""
    t, slopes = activation_surrogate(v, beta, lambda_a, lambda_delta, k)
    zero = slopes.new_zeros(1)
    grad_table = torch.cat([zero, slopes, zero])
    levels = fused.materialize(activation_levels(beta, k))
    out = fused.select(x, v, levels.to(x.dtype))
    tables = (_interleave(t, v), grad_table, slopes)
    return (out, *(fused.materialize(t, output=True) for t in tables))  # type: ignore[return-value]


def _activation_backward_body(
    x: torch.Tensor,
    bounds: torch.Tensor,
    grad_table: torch.Tensor,
    slopes: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 11-14 in one loop over the flat saved input and upstream gradient ``g``:
    ``dA_hat/dA * g`` and the per-bucket sums of ``g`` over the interleaved bounds, which give
    ``dC/dbeta`` (eq. 13: pieces pair buckets ``2p, 2p + 1``) and ``dC/dv`` (eq. 14: segments
    pair ``2i - 1, 2i``), as :class:`PAActivationFunction`'s eager backward.  ``grad_table``
    holds the slope of each segment ``#{t <= A}``, ``t = bounds[0::2]``."""
    grad_x = fused.select(x, bounds[0::2], grad_table.to(g.dtype)) * g
    sums = fused.bucket_sums(x, bounds, g).to(slopes.dtype)
    grad_b = _drop_zero_piece(sums[0::2] + sums[1::2], k)
    return grad_x, -slopes * (sums[1:-1:2] + sums[2::2]), grad_b


_ACTIVATION_FORWARD = fused.Kernel(_activation_forward_body)
_ACTIVATION_BACKWARD = fused.Kernel(_activation_backward_body)


class PAActivationFunction(torch.autograd.Function):
    """Autograd form of PA's activation approximation: forward eq. 10, backward eq. 11-14.

    ``apply(x, v, beta, lambda_a, lambda_delta, zero_piece)`` with ``v`` sorted ascending.
    Gradients:

    * ``dA_hat/dA``: the slope of :func:`activation_surrogate` on the segment of ``A``;
    * ``dC/dbeta_i = sum(g over piece i)`` (eq. 13; the exact derivative of eq. 10);
    * ``dC/dv_i = -lambda_A (L_i - L_{i-1}) sum(g over [t_{i-1}, t_i))`` (eq. 14, sign
      corrected; ``L`` the piece levels, ``L_i = beta_i`` in the eq. 10 layout).  ``t``, ``lambda_A`` and ``lambda_Delta`` are constants in backward.

    Implementation: the forward counts ``j`` = how many of the interleaved bounds
    ``t_0 <= v_1 <= t_1 <= ... <= v_N <= t_N`` are ``<= A`` (one uint8 per element, the only
    tensor saved for backward).  Because the bounds interleave, the piece of eq. 10 is
    ``floor(j / 2)`` and the segment of eq. 11 is ``ceil(j / 2)``, so the backward is one
    table lookup for ``dA_hat/dA`` and one histogram of the upstream gradient over ``j`` for
    both ``dC/dbeta`` and ``dC/dv``.  With the fused kernels
    (:func:`binarize_cli.quant.fused.enabled`) the input is saved instead of ``j`` and the
    backward's lookup and histogram are one loop that recomputes ``j``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        v: torch.Tensor,
        beta: torch.Tensor,
        lambda_a: float | None,
        lambda_delta: float | None,
        zero_piece: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        k = torch.as_tensor(zero_piece, device=beta.device)
        ctx.dtypes = (v.dtype, beta.dtype)
        ctx.fused = fused.enabled(x)
        if ctx.fused:
            args = (fused.flat(x), v.detach(), beta.detach(), k, lambda_a, lambda_delta)
            out, bounds, grad_table, slopes = _ACTIVATION_FORWARD(*args)
            ctx.save_for_backward(x, bounds, grad_table, slopes, k)
            return out.view(x.shape)
        t, slopes = activation_surrogate(v.detach(), beta.detach(), lambda_a, lambda_delta, k)
        bounds = _interleave(t, v.detach())
        levels = activation_levels(beta.detach(), k)
        j = threshold_scan(x, bounds).int_index()
        ctx.save_for_backward(j.to(torch.uint8), slopes, k)
        return take(_pairs(levels).to(x.dtype), j).reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        if ctx.fused:
            x, bounds, grad_table, slopes, k = ctx.saved_tensors
            if need_v or need_b:
                args = (fused.flat(x), bounds, grad_table, slopes, k, fused.flat(grad_out))
                grad_x, grad_v, grad_b = _ACTIVATION_BACKWARD(*args)
                grad_x = grad_x.view(x.shape)
            else:
                grad_x = fused.lookup_grad(x, bounds[0::2].contiguous(), grad_table, grad_out)
                grad_v = grad_b = None
            return (
                grad_x if need_x else None,
                grad_v if need_v else None,
                grad_b if need_b else None,
                None,
                None,
                None,
            )
        j, slopes, k = ctx.saved_tensors
        v_dtype, beta_dtype = ctx.dtypes
        grad_x = grad_v = grad_b = None
        acc = _acc_dtype(grad_out)
        if need_x:
            zero = slopes.new_zeros(1)
            table = torch.cat([zero, _pairs(slopes), zero])  # slope of ceil(j/2)
            grad_x = take(table.to(grad_out.dtype), j, grad_out)
        if need_v or need_b:
            n = slopes.shape[0]
            sums = _bin_sums(j, grad_out, 2 * n + 2, acc)
            if need_b:  # piece p = floor(j/2): j in {2p, 2p+1}; the zero piece has no beta
                grad_b = _drop_zero_piece(sums[0::2] + sums[1::2], k).to(beta_dtype)
            if need_v:  # segment i = ceil(j/2): j in {2i-1, 2i}
                seg = sums[1:-1:2] + sums[2::2]
                grad_v = (-slopes.to(acc) * seg).to(v_dtype)
        return grad_x, grad_v, grad_b, None, None, None


def quantize_activation(
    x: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    lambda_a: float | None = None,
    lambda_delta: float | None = None,
    zero_piece: int | torch.Tensor = 0,
) -> torch.Tensor:
    """``A_hat`` with PA's surrogate gradients; ``v`` must be sorted ascending."""
    v = v.to(x.dtype)
    beta = beta.to(x.dtype)
    if needs_autograd(x, v, beta) and not _onnx_exporting():
        return PAActivationFunction.apply(x, v, beta, lambda_a, lambda_delta, zero_piece)
    return pa_activation_forward(x, v, beta, zero_piece)


# --------------------------------------------------------------------------------------
# Activation calibration (Lloyd-Max with the lowest level fixed at 0)
# --------------------------------------------------------------------------------------


def relu_gaussian_levels(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Data-free ``(v, beta)``: the MSE-optimal PA activation quantizer for ``ReLU(N(0, 1))``.

    Paper 3.2 normalises activations by batch norm; behind a ReLU that is a half-normal
    with a point mass at 0.  The initial value of :class:`PAActivationQuantizer` before
    :meth:`~PAActivationQuantizer.calibrate` replaces it with the same fit on real data.
    """
    _check_n(n)
    beta = _lloyd_positive_levels(n)
    v = [beta[0] / 2.0] + [(beta[i] + beta[i + 1]) / 2.0 for i in range(n - 1)]
    return tuple(v), tuple(beta)


def activation_mse(
    samples: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, zero_piece: int = 0
) -> float:
    """``mean((A - A_hat)^2)`` of eq. 10 on ``samples`` (``v`` sorted)."""
    s = samples.detach().reshape(-1).to(torch.float64)
    a_hat = pa_activation_forward(
        s, v.detach().to(torch.float64), beta.detach().to(torch.float64), zero_piece
    )
    return float(((s - a_hat) ** 2).mean())


def calibrate_activation(
    samples: torch.Tensor, n: int, *, zero_piece: int = 0, max_iter: int = 1000, tol: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints ``v`` and levels ``beta`` minimising ``mean((A - A_hat)^2)`` on ``samples``.

    Lloyd-Max with the level of piece ``zero_piece`` fixed at 0 (eq. 10 is ``zero_piece=0``:
    everything below ``v_1`` maps to 0; ``K > 0`` is the signed layout of
    :func:`activation_levels`).  Start from the ``(i - 1/2)/K`` quantiles of the negative
    samples and the ``(i - 1/2)/(N - K)`` quantiles of the positive ones, then alternate
    ``v_i = (L_{i-1} + L_i) / 2`` (nearest level) and ``L_p = mean of the samples in
    [v_p, v_{p+1})`` for every piece but the zero one (centroid; an empty piece keeps its
    level, which stays inside its interval).  Each step cannot raise the MSE.  Levels are kept
    strictly increasing and on their side of 0.  With no sample on a side that needs levels,
    the levels there are ``+-i * s`` (``s`` = std of the samples, or 1).

    Returns float64 tensors ``(v, beta)`` of shape ``[N]`` on the CPU.  Raises
    :class:`~binarize_cli.core.errors.BadInputError` for an empty or non-finite sample.
    """
    _check_n(n)
    if not 0 <= zero_piece <= n:
        raise SchemeError(f"zero_piece must be in [0, N={n}] (got {zero_piece})")
    s = _sorted_samples(samples)
    return _lloyd_max(s, n, zero_piece, max_iter=max_iter, tol=tol)


def calibrate_signed_activation(
    samples: torch.Tensor, n: int, *, max_iter: int = 1000, tol: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`calibrate_activation` with the zero piece chosen from the data: ``(v, beta, K)``.

    Inputs behind a ReLU have no negative samples, so only ``K = 0`` (eq. 10, the paper's
    layout) is considered.  Otherwise every ``K = 0..N`` whose sides both have samples is
    fitted and the one with the least ``mean((A - A_hat)^2)`` is kept (ties go to the smaller
    ``K``).  The paper places every binarized convolution behind a ReLU; MobileNetV2 and
    EfficientNet feed 1x1 convolutions from linear bottlenecks, where eq. 10 would map the
    whole negative half to 0.
    """
    _check_n(n)
    s = _sorted_samples(samples)
    negatives = int((s < 0).sum())
    positives = int((s > 0).sum())
    candidates = [0] + (
        [k for k in range(1, n + 1) if k == n or positives > 0] if negatives > 0 else []
    )
    best: tuple[float, int, torch.Tensor, torch.Tensor] | None = None
    for k in candidates:
        v, beta = _lloyd_max(s, n, k, max_iter=max_iter, tol=tol)
        mse = activation_mse(s, v, beta, k)
        if best is None or mse < best[0]:
            best = (mse, k, v, beta)
    assert best is not None
    return best[2], best[3], best[1]


def _sorted_samples(samples: torch.Tensor) -> torch.Tensor:
    """The calibration samples (checked by :func:`calibration_samples`, as for every scheme),
    sorted, in float64 on the CPU."""
    s = calibration_samples(samples).to(device="cpu", dtype=torch.float64)
    return torch.sort(s).values


def _side_levels(side: torch.Tensor, count: int, fallback_step: float) -> torch.Tensor:
    """``count`` initial levels > 0: quantiles ``(i - 1/2)/count`` of ``side`` (sorted, > 0)."""
    if count == 0:
        return side.new_zeros(0)
    if side.numel() == 0:
        return torch.arange(1, count + 1, dtype=torch.float64) * fallback_step
    q = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return side[(q * side.numel()).long().clamp_max(side.numel() - 1)]


def _lloyd_max(
    s: torch.Tensor, n: int, zero_piece: int, *, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    k = zero_piece
    pos = s[s > 0]
    neg = -s[s < 0].flip(0)  # magnitudes, ascending
    spread = float(s.std(correction=0)) if s.numel() > 1 else 0.0
    step = spread if spread > 0 else 1.0
    scale = float(s.abs().max()) if float(s.abs().max()) > 0 else step
    eps = 1e-6 * scale
    upper = _strictly_increasing(_side_levels(pos, n - k, step), eps)
    lower = _strictly_increasing(_side_levels(neg, k, step), eps)
    levels = torch.cat([-lower.flip(0), s.new_zeros(1), upper])
    fixed = torch.zeros(n + 1, dtype=torch.bool)
    fixed[k] = True
    prefix = torch.cat([s.new_zeros(1), torch.cumsum(s, 0)])
    total = s.numel()
    for _ in range(max_iter):
        v = (levels[:-1] + levels[1:]) / 2.0
        bounds = torch.searchsorted(s, v, right=False)  # first sample >= v_i
        lo = torch.cat([bounds.new_zeros(1), bounds])
        hi = torch.cat([bounds, bounds.new_tensor([total])])
        counts = (hi - lo).to(torch.float64)
        sums = prefix[hi] - prefix[lo]
        new = torch.where((counts > 0) & ~fixed, sums / counts.clamp_min(1.0), levels)
        up = _strictly_increasing(new[k + 1 :], eps)
        down = _strictly_increasing(-new[:k].flip(0), eps)
        new = torch.cat([-down.flip(0), s.new_zeros(1), up])
        done = float((new - levels).abs().max()) <= tol * scale
        levels = new
        if done:
            break
    v = (levels[:-1] + levels[1:]) / 2.0
    return v, torch.cat([levels[:k], levels[k + 1 :]])


def _strictly_increasing(beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Levels ``> 0`` and strictly increasing (gaps of at least ``eps``)."""
    out = beta.clone()
    if out.numel() == 0:
        return out
    out[0] = max(float(out[0]), eps)
    for i in range(1, out.numel()):
        if out[i] <= out[i - 1]:
            out[i] = out[i - 1] + eps
    return out


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


def _positive_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise SchemeError(
            f"PA option {name} must be a positive number or null (got {value!r})"
        ) from None
    if isinstance(value, bool) or not math.isfinite(f) or f <= 0:
        raise SchemeError(f"PA option {name} must be a positive number or null (got {value!r})")
    return f


class PAWeightQuantizer(WeightQuantizer):
    """PA weight approximation (eq. 6-9) with ``M`` bit planes per weight.

    Args:
        m: number of endpoints, even, ``2 <= M <= 64``; ``M + 1`` pieces, ``M`` planes.
        endpoints: the multipliers ``c_1..c_M`` (``u_k = mean(W) + c_k std(W)``); default
            :func:`default_weight_endpoints` (Table 1 for M = 8, the Gaussian Lloyd-Max
            endpoints otherwise).  Stored in the persistent buffer ``endpoint_multipliers``.
        lambda_w: ``lambda_W`` of eq. 8.  The paper's slope ``lambda_W * (level gap)`` gives
            it units of 1/weight, and the paper gives no value.  None (default) uses
            ``(M - 1) / (u_M - u_1)``, one over the mean gap between consecutive endpoints,
            recomputed per layer and per forward: level gaps are about endpoint gaps, so the
            surrogate's slope is ~1 on Gaussian-like weights at every layer scale.  A float
            is used as is for every layer (the paper's form).
    """

    def __init__(
        self, m: int, *, endpoints: Sequence[float] | None = None, lambda_w: float | None = None
    ) -> None:
        super().__init__()
        _check_m(m)
        c = (
            default_weight_endpoints(m)
            if endpoints is None
            else validate_weight_endpoints(endpoints, m)
        )
        self.num_bases = m
        self.lambda_w = _positive_or_none("lambda_w", lambda_w)
        self.register_buffer("endpoint_multipliers", torch.tensor(c, dtype=torch.float64))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return quantize_weight(weight, self.endpoint_multipliers, self.lambda_w)

    @torch.no_grad()
    def endpoints(self, weight: torch.Tensor) -> torch.Tensor:
        """``u_1..u_M`` for this weight."""
        return weight_endpoints(weight, self.endpoint_multipliers)

    @torch.no_grad()
    def alphas(self, weight: torch.Tensor) -> torch.Tensor:
        """``alpha_1..alpha_M`` (eq. 7) for this weight, in its dtype."""
        _, levels = weight_levels(weight, self.endpoints(weight))
        h = self.num_bases // 2
        return torch.cat([levels[:h], levels[h + 1 :]]).to(weight.dtype)

    @torch.no_grad()
    def bit_planes(self, weight: torch.Tensor) -> BitPlanes:
        """``T_1..T_M`` (eq. 16): piece indicators, the zero piece has no plane; scales alpha."""
        w = weight.detach()
        idx, levels = weight_levels(w, self.endpoints(w))
        h = self.num_bases // 2
        ids = [k for k in range(self.num_bases + 1) if k != h]
        planes = torch.stack([idx == k for k in ids])
        scales = levels[ids].to(w.dtype)
        return BitPlanes(planes=planes, scales=scales, domain=Domain.ZERO_ONE)

    def extra_repr(self) -> str:
        c = ", ".join(f"{x:g}" for x in self.endpoint_multipliers.tolist())
        lam = "(M-1)/(u_M-u_1)" if self.lambda_w is None else f"{self.lambda_w:g}"
        return f"M={self.num_bases}, endpoints=[{c}] x std, lambda_w={lam}"


class PAActivationQuantizer(ActivationQuantizer):
    """PA activation approximation (eq. 10-14) with ``N`` bit planes per activation.

    Trainable ``v`` (endpoints, ``[N]``) and ``beta`` (levels, ``[N]``), initialised
    data-free by :func:`relu_gaussian_levels` and from data by :meth:`calibrate`.

    Crossing endpoints: the forward always uses ``sort(v)``; ``beta_i`` is the level of the
    piece that starts at the i-th smallest endpoint.  If an optimizer step makes two
    endpoints cross, the function stays continuous (the piece between them had zero width)
    and the gradients flow back to the stored slots through the sort.  :meth:`bit_planes`
    and the export use the same sorted endpoints.

    Args:
        n: number of endpoints/levels, ``1 <= N <= 64``.
        lambda_a: ``lambda_A`` of eq. 11/14 (1/activation units); None (default) =
            ``N / (t_N - t_0)``, one over the mean segment width (slope ~1).
        lambda_delta: ``lambda_Delta`` of eq. 12 (activation units); None (default) =
            mirror of the ``t_0`` rule, see :func:`activation_surrogate`.
        signed: allow :meth:`calibrate` to pick the signed layout (some levels below 0, see
            :func:`calibrate_signed_activation`) when the input has negative samples; False
            keeps eq. 10's layout everywhere.  The chosen layout is the persistent buffer
            ``zero_piece`` (0 = eq. 10), saved with the model.
    """

    def __init__(
        self,
        n: int,
        *,
        lambda_a: float | None = None,
        lambda_delta: float | None = None,
        signed: bool = True,
    ) -> None:
        super().__init__()
        _check_n(n)
        self.num_bases = n
        self.lambda_a = _positive_or_none("lambda_a", lambda_a)
        self.lambda_delta = _positive_or_none("lambda_delta", lambda_delta)
        self.signed = bool(signed)
        v0, b0 = relu_gaussian_levels(n)
        self.v = nn.Parameter(torch.tensor(v0, dtype=torch.float32))
        self.beta = nn.Parameter(torch.tensor(b0, dtype=torch.float32))
        self.register_buffer("zero_piece", torch.zeros((), dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Files written before the signed layout existed have no zero_piece: eq. 10's layout.
        state_dict.setdefault(prefix + "zero_piece", torch.zeros((), dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def zero_level_piece(self) -> int:
        """``K``: the piece whose level is 0 (0 = eq. 10's layout)."""
        return int(self.zero_piece)

    def sorted_endpoints(self) -> torch.Tensor:
        """``sort(v)`` (differentiable): the endpoints the forward uses."""
        return torch.sort(self.v).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activation(
            x,
            self.sorted_endpoints(),
            self.beta,
            self.lambda_a,
            self.lambda_delta,
            self.zero_piece,
        )

    @torch.no_grad()
    def bit_planes(self, x: torch.Tensor) -> BitPlanes:
        """``V_1..V_N`` (eq. 18): indicators of every piece but the zero one; scales ``beta``."""
        x = x.detach()
        v = self.sorted_endpoints().to(x.dtype)
        idx = piece_index(x, v)
        k = self.zero_level_piece
        pieces = [j for j in range(self.num_bases + 1) if j != k]
        planes = torch.stack([idx == j for j in pieces])
        return BitPlanes(
            planes=planes, scales=self.beta.detach().to(x.dtype), domain=Domain.ZERO_ONE
        )

    @torch.no_grad()
    def calibrate(self, samples: torch.Tensor) -> None:
        """Set ``v``, ``beta`` (and the layout ``zero_piece``) from sampled input activations:
        :func:`calibrate_signed_activation`, or :func:`calibrate_activation` (eq. 10's layout)
        when ``signed`` is False."""
        if self.signed:
            v, beta, k = calibrate_signed_activation(samples, self.num_bases)
        else:
            (v, beta), k = calibrate_activation(samples, self.num_bases), 0
        self.v.copy_(v.to(self.v))
        self.beta.copy_(beta.to(self.beta))
        self.zero_piece.fill_(k)

    def extra_repr(self) -> str:
        lam_a = "N/(t_N-t_0)" if self.lambda_a is None else f"{self.lambda_a:g}"
        lam_d = "mirror" if self.lambda_delta is None else f"{self.lambda_delta:g}"
        k = self.zero_level_piece
        layout = "eq. 10" if k == 0 else f"signed, {k} negative levels"
        return f"N={self.num_bases}, lambda_a={lam_a}, lambda_delta={lam_d}, layout={layout}"


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------

#: Keys accepted in the scheme options dict (recipes' ``scheme_options``).
OPTION_KEYS = ("lambda_w", "lambda_a", "lambda_delta", "weight_endpoints", "signed_activations")


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise SchemeError(
            f"unknown PA option(s) {', '.join(unknown)}; PA accepts: {', '.join(OPTION_KEYS)}"
        )
    return options


def _make_weight_quantizer(m: int, options: dict[str, Any]) -> PAWeightQuantizer:
    opts = _check_options(options)
    return PAWeightQuantizer(
        m, endpoints=opts.get("weight_endpoints"), lambda_w=opts.get("lambda_w")
    )


def _make_activation_quantizer(n: int, options: dict[str, Any]) -> PAActivationQuantizer:
    opts = _check_options(options)
    signed = opts.get("signed_activations", True)
    if not isinstance(signed, bool):
        raise SchemeError(f"PA option signed_activations must be true or false (got {signed!r})")
    return PAActivationQuantizer(
        n, lambda_a=opts.get("lambda_a"), lambda_delta=opts.get("lambda_delta"), signed=signed
    )


def _validate(m: int, n: int) -> None:
    _check_m(m)
    if n != 0:
        _check_n(n)


PA_SCHEME = register_scheme(
    Scheme(
        name="pa",
        description="PA-Net piecewise approximation (seed 002): M {0,1} weight planes, N {0,1} activation planes",
        make_weight_quantizer=_make_weight_quantizer,
        make_activation_quantizer=_make_activation_quantizer,
        default_m=4,
        default_n=5,
        binarize_downsample=True,
        weight_domain=Domain.ZERO_ONE,
        activation_domain=Domain.ZERO_ONE,
        validate=_validate,
    )
)
