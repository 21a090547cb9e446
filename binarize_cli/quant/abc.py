"""ABC-Net: linear combinations of binary weight and activation bases.

Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network" (NIPS 2017), as
restated in seeds 000/001/004. Both approximations read their bits as {-1,+1}
(:attr:`Domain.PLUS_MINUS_ONE`, bit 1 = +1), so inference is XNOR+popcount.

**Weights** (ABC eq. 1-5). With ``W_c = W - mean(W)`` and the layer's population std
(``correction=0``: defined for a single weight)::

    B_m   = sign(W_c + u_m std(W)),     u_m = -1 + (m-1) * 2/(M-1)   (M = 1: u_1 = 0)
    alpha = argmin_a ||vec(W) - sum_m a_m vec(B_m)||^2                (eq. 3)
    W_hat = sum_m alpha_m B_m

``sign(0) = +1``; bit ``m`` is evaluated as ``W_c >= -u_m std`` (the threshold form; the
stored planes make this exact for every consumer). ``alpha`` is the least-squares solution,
recomputed from the current latent weight on every forward (nothing is cached), in float64
and in closed form over the buckets below (:func:`_nested_scales`: no eigendecomposition,
so no host synchronisation on a GPU), keeping the *minimum-norm* solution, so duplicate or
constant bases (tiny tensors, a constant weight) give finite, optimal scales. One ``alpha``
per layer (the paper "approximates weights as a whole"), scales shape ``[M]``. The bases are
nested thresholds, so each weight falls in one of ``M + 1`` buckets: the fit comes from
per-bucket counts and sums and ``W_hat`` is a table lookup (a few passes over the weight,
not ``M`` planes' worth of arithmetic).

*Backward.* The seeds' ``dC/dW = sum_m alpha_m dC/dB_m`` is ambiguous: read literally with
``dC/dB_m = alpha_m dC/dW_hat`` it scales the gradient by ``sum_m alpha_m^2`` (~ var(W),
1e-4 for a typical layer), and with ``dC/dB_m`` taken before the ``alpha`` multiply it scales
it by ``sum_m alpha_m`` (the largest level, again a weight-sized number). Both would make
the learning rate depend on the layer's weight scale. We use the well-scaled reading: since
``W_hat ~= W`` the straight-through estimator is the identity, clipped to the band where the
approximation tracks the weight,

    dC/dW = dC/dW_hat * 1[|W - mean(W)| <= c std(W)],      c = 3 by default

(``mean``/``std`` are treated as constants; option ``weight_clip_std``, ``inf`` disables the
clip). The outermost thresholds sit at ``mean +- std``, so ``c = 3`` lets every weight that
can still cross a threshold move, and freezes only the far tails (0.3% of a Gaussian).

**Activations** (ABC eq. 6-9). With trainable shifts ``v_n`` and scales ``beta_n``::

    A_n   = H_{v_n}(R) = 2 * 1[clip(R + v_n, 0, 1) >= 0.5] - 1  =  +1 iff R + v_n >= 0.5
    R_hat = sum_n beta_n A_n

i.e. plane ``n`` is a threshold: ``A_n = +1 iff R >= t_n`` with ``t_n = 0.5 - v_n``
(computed in ``v``'s dtype, float32, then cast to the activation dtype); this module, its bit
planes and the runtime all evaluate that comparison. Backward (paper, straight-through
through ``h_v = clip(R + v, 0, 1)``)::

    dC/dR      = sum_n beta_n * dC/dR_hat * 1[-v_n <= R < 1 - v_n]
    dC/dv_n    = beta_n * sum(dC/dR_hat * 1[-v_n <= R < 1 - v_n])
    dC/dbeta_n = sum(dC/dR_hat * A_n)

(the paper's window ``0 <= R + v_n <= 1``, half-open at the measure-zero right end), i.e.
the exact gradient of the ramp surrogate ``sum_n beta_n clip(R + v_n, 0, 1)`` for ``R`` and
``v`` (slope 1, as in the paper; a ramp matching the step's height 2 would have slope 2),
and the exact gradient of the forward for ``beta``. Forward and backward are per-bucket
table lookups over the sorted thresholds and window ends: one comparison pass per edge
(:func:`~binarize_cli.quant.base.threshold_scan`), the bucket saved as one byte per input.

**Calibration** (the cure for the seeds' random initialisation of ``v`` and ``beta``).
Note the levels of ``sum_n beta_n A_n`` always satisfy ``L_lowest = -L_highest``: without
a plane that is +1 on all data (a constant, i.e. an offset) the approximation cannot map
the zero mass of a post-ReLU input to 0 while keeping positive levels. Calibration
therefore chooses the thresholds by least squares over calibration samples, where a
"below all data" threshold (the constant plane) is one of the candidates:
:func:`search_activation_shifts` starts from thresholds spread over the sample quantiles
and runs coordinate descent over a quantile grid of candidate thresholds, scoring each
set by the residual of the least-squares fit of ``beta``; then :func:`fit_activation_scales`
fits ``beta`` exactly on the samples with the forward's own planes. Before calibration the
quantizer is a uniform quantizer of [-1, 1] (thresholds at ``-1 + (2n-1)/N``, ``beta = 1/N``;
N = 1 is ``sign``).

Accounting: ABC (and Bi-Real) keep the 1x1 downsample convolutions real-valued
(``binarize_downsample=False``); see BRIEF section 3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from binarize_cli.core.errors import SchemeError
from binarize_cli.quant import fused
from binarize_cli.quant.base import (
    MAX_SEARCH_SAMPLES,
    ActivationQuantizer,
    BitPlanes,
    Domain,
    Scheme,
    WeightQuantizer,
    calibration_samples,
    mean_std,
    needs_autograd,
    register_scheme,
    scratch,
    search_samples,
    take,
    threshold_scan,
)

__all__ = [
    "ABCActivationQuantizer",
    "ABCActivationSTE",
    "ABCWeightQuantizer",
    "ABCWeightSTE",
    "ABC_SCHEME",
    "DEFAULT_WEIGHT_CLIP_STD",
    "abc_activation",
    "abc_activation_planes",
    "abc_weight",
    "activation_thresholds",
    "abc_weight_planes",
    "fit_activation_scales",
    "least_squares_scales",
    "search_activation_shifts",
    "weight_shifts",
]

#: Default straight-through window for ABC weights, in units of std(W) around mean(W).
DEFAULT_WEIGHT_CLIP_STD = 3.0
#: Eigenvalues below this fraction of the largest are treated as zero (rank deficiency).
_RTOL = 1e-10


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def weight_shifts(m: int) -> list[float]:
    """The shifts ``u_m = -1 + (m-1) * 2/(M-1)``, ``m = 1..M`` (ABC eq. 4); ``[0.0]`` for M = 1."""
    if m < 1:
        raise SchemeError(f"ABC needs at least one weight base (got M={m}); use -M 1 or more")
    if m == 1:
        return [0.0]
    return [-1.0 + i * 2.0 / (m - 1) for i in range(m)]


def _solve_gram(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Minimum-norm solution of ``gram @ c = rhs`` for symmetric PSD ``gram`` (batched).

    ``gram [..., P, P]``, ``rhs [..., P]``; float64. Uses the pseudo-inverse through an
    eigendecomposition, zeroing eigenvalues below ``_RTOL`` times the largest, with no
    data-dependent control flow.
    """
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = evals.abs().amax(dim=-1, keepdim=True) * _RTOL
    keep = evals > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    proj = (evecs.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1)
    return (evecs @ (inv * proj).unsqueeze(-1)).squeeze(-1)


def _nested_scales(table: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """ABC eq. 3 for nested thresholds, in closed form: the minimum-norm ``alpha`` (float64
    ``[M]``) of ``min_a sum_i counts_i (sums_i / counts_i - L_i(a))^2``, where bucket ``i``'s
    level is ``L_i = sum_m a_m (+1 if table[m, i] else -1)`` (``table`` bool ``[M, M + 1]``
    from :func:`_plane_table`: plane ``m`` is on from bucket ``f_m >= 1`` up).

    The same solution as :func:`_solve_gram` on the Gram matrix of these planes (3e-13
    relative at worst over 4,800 random and degenerate cases, scratch), without an
    eigendecomposition: ``torch.linalg.eigh`` synchronises a CUDA device with the host on
    every call, once per ABC layer per training step.  Derivation: ``L_0 = -sum a_m`` and
    ``L_M = sum a_m``, so ``L_0 = -L_M``, and the jump at boundary ``i`` is ``L_i - L_{i-1}
    = 2 sum_{f_m = i} a_m``: the levels reachable are exactly those with ``L_0 = -L_M`` and
    no jump where no plane steps (between tied cuts, buckets that no weight can fall in).
    The least squares fit is therefore every non-empty interior bucket's mean, and for the
    end pair ``L_M = (sums_M - sums_0) / (counts_0 + counts_M)``.  Minimum norm: ``k_i``
    planes that step at the same boundary (tied cuts, a constant weight) share its jump
    equally (``a_m = jump / (2 k_i)``, norm ``jump^2 / (4 k_i)``), so a run of empty buckets
    between two fitted levels spreads the difference in proportion to ``k`` (linear
    interpolation in the cumulative ``k``), and when both end buckets are empty ``L_M = -t``
    with ``t`` minimising ``(L_p - t)^2 / K_L + (t + L_q)^2 / K_R`` (``p``, ``q`` the first and
    last non-empty buckets, ``K_L``, ``K_R`` the planes stepping before ``p`` and after
    ``q``).  No data-dependent control flow: every case is a ``where``.
    """
    m, size = table.shape
    n = counts.to(torch.float64)
    s = sums.to(torch.float64)
    idx = torch.arange(size, device=n.device)
    first = (~table).sum(1)  # the boundary each plane steps at, 1..M
    k = (first[:, None] == idx[None, :]).to(torch.float64).sum(0)
    kc = torch.cumsum(k, 0)
    one = torch.ones_like(n)
    inner = (n > 0) & (idx > 0) & (idx < m)
    mean = s / torch.where(n > 0, n, one)
    ends = n[0] + n[m]
    fitted_top = (s[m] - s[0]) / torch.where(ends > 0, ends, one[0])
    # first and last non-empty interior buckets, as 1-element index tensors (no host read)
    p = torch.where(inner, idx, size).amin().clamp_max(m).reshape(1)
    q = torch.where(inner, idx, -1).amax().clamp_min(0).reshape(1)
    k_left, k_right = kc[p], kc[m] - kc[q]
    t = ((mean[p] * k_right - mean[q] * k_left) / (k_left + k_right)).squeeze(0)
    top = torch.where(ends > 0, fitted_top, -t)
    known = inner | (idx == 0) | (idx == m)
    value = torch.where(inner, mean, torch.where(idx == m, top, -top))
    prev = torch.cummax(torch.where(known, idx, 0), 0).values
    after = torch.flip(torch.cummin(torch.flip(torch.where(known, idx, m), [0]), 0).values, [0])
    span = kc[after] - kc[prev]
    frac = (kc - kc[prev]) / torch.where(span > 0, span, one)
    levels = torch.where(known, value, value[prev] + (value[after] - value[prev]) * frac)
    jumps = levels[1:] - levels[:-1]  # at boundaries 1..M
    return jumps[first - 1] / (2.0 * k[first])


def least_squares_scales(planes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``argmin_c ||target - sum_p c_p (2 planes_p - 1)||^2`` (minimum-norm), float64 ``[P]``.

    Args:
        planes: bool ``[P, *S]`` (bit 1 = +1, bit 0 = -1).
        target: float ``S`` (any shape with ``prod(S)`` elements).

    This is ABC eq. 3 for the weights and the calibration fit of ``beta`` for the
    activations. Solved on the P x P normal equations in float64; rank-deficient systems
    (duplicate, opposite or constant planes) return the minimum-norm optimum.
    """
    p = planes.shape[0]
    signed = planes.reshape(p, -1).to(torch.float64) * 2.0 - 1.0
    t = target.reshape(-1).to(device=signed.device, dtype=torch.float64)
    if signed.shape[1] != t.shape[0]:
        raise ValueError(f"planes hold {signed.shape[1]} values per plane, target {t.shape[0]}")
    return _solve_gram(signed @ signed.T, signed @ t)


def _weight_stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mean_std(w)


def _plane_table(cuts: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """bool ``[P, K]``: plane ``p`` is on in bucket ``i`` (``i = #{edges <= x}``) iff ``x >= cuts[p]``.

    ``edges`` is sorted and contains every cut, so ``x >= cut <=> i >= #{edges <= cut}``.
    """
    first = torch.bucketize(cuts, edges, right=True)
    buckets = torch.arange(edges.numel() + 1, device=edges.device)
    return buckets[None, :] >= first[:, None]


def _bucket_sums(bucket: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """float64 ``[size]``: per-bucket sums of ``values``, accumulated in float64.

    CPU eager: one ``bincount`` pass (the values widened in a scratch buffer); elsewhere
    ``index_add_``.
    """
    flat = bucket.reshape(-1)
    wide = scratch(flat, "abc_sums", torch.float64)
    if wide is None:
        out = torch.zeros(size, dtype=torch.float64, device=flat.device)
        return out.index_add_(0, flat.long(), values.reshape(-1).to(torch.float64))
    return torch.bincount(flat, weights=wide.copy_(values.reshape(-1)), minlength=size)


def _table_levels(scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``levels[i] = sum_p scales[p] * (+1 if table[p, i] else -1)``, summed in plane order.

    The same products as :meth:`BitPlanes.reconstruct`, so a lookup in this table equals
    the reconstruction to float rounding (bit for bit for the weights, in practice).
    """
    signed = 2.0 * table.to(scales.dtype) - 1.0
    return (scales[:, None] * signed).sum(dim=0)


class _WeightDecomposition:
    """Everything one ABC weight forward needs, computed in a handful of passes.

    The planes are nested thresholds of ``W_c = W - mean(W)`` (``B_m = +1 iff
    W_c >= -u_m std``, the form of eq. 4 evaluated here and by any consumer), so each
    weight falls in one of ``M + 1`` buckets and ``W_hat`` is a table lookup; the Gram
    matrix and right-hand side of eq. 3 come from per-bucket counts and sums (one
    :func:`threshold_scan` pass per threshold).  ``centered`` and ``bucket`` live in scratch
    buffers on the CPU: use them (``planes``, ``reconstruct``, the STE mask) before the next
    decomposition.
    """

    def __init__(self, w: torch.Tensor, m: int) -> None:
        w = w.detach()
        self.shape = w.shape
        self.mean, self.std = _weight_stats(w)
        self.centered = torch.sub(w.reshape(-1), self.mean, out=scratch(w, "abc_centered"))
        shifts = torch.tensor(weight_shifts(m), dtype=w.dtype, device=w.device)
        cuts = -shifts * self.std  # plane m is +1 iff centered >= cuts[m]
        edges, _ = torch.sort(cuts)
        scan = threshold_scan(self.centered, edges, stats=range(m), values=w)
        self.bucket = scan.int_index()
        self.table = _plane_table(cuts, edges)  # [M, M + 1]
        self.alpha = _nested_scales(self.table, scan.counts, scan.sums).to(w.dtype)

    def planes(self) -> torch.Tensor:
        bucket = self.bucket.reshape(self.shape)
        return torch.stack([self.table[i][bucket] for i in range(self.table.shape[0])])

    def reconstruct(self) -> torch.Tensor:
        return take(_table_levels(self.alpha, self.table), self.bucket).reshape(self.shape)


def abc_weight_planes(w: torch.Tensor, m: int) -> BitPlanes:
    """ABC weight decomposition ``W_hat = sum_m alpha_m B_m`` (eq. 1-5) of a weight tensor.

    ``planes[m] = (W - mean(W)) >= -u_m std(W)`` (so ``sign(0) = +1``), ``scales = alpha``
    (shape ``[M]``, the dtype of ``w``), domain :attr:`Domain.PLUS_MINUS_ONE`.
    """
    with torch.no_grad():
        dec = _WeightDecomposition(w, m)
        return BitPlanes(planes=dec.planes(), scales=dec.alpha, domain=Domain.PLUS_MINUS_ONE)


def abc_weight(w: torch.Tensor, m: int) -> torch.Tensor:
    """``W_hat = sum_m alpha_m B_m`` (forward only, no gradient)."""
    with torch.no_grad():
        return _WeightDecomposition(w, m).reconstruct()


def activation_thresholds(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t_n = 0.5 - v_n`` (computed in ``v``'s dtype, then cast): ``A_n = +1 iff x >= t_n``."""
    return (0.5 - v.detach()).to(dtype)


def abc_activation_planes(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The activation bit planes ``A_n = +1 iff x >= 0.5 - v_n`` as bool ``[N, *x.shape]``."""
    t = activation_thresholds(v, x.dtype)
    return torch.stack([x >= t[i] for i in range(t.shape[0])])


class _ActivationTables:
    """Per-bucket lookup tables of the ABC activation for fixed ``v``, ``beta``.

    The edges are the thresholds ``t_n`` and the STE window ends ``-v_n``, ``1 - v_n``
    (sorted, ``K = 3N + 1`` buckets); an input's bucket is ``#{edges <= x}``. Forward
    ``R_hat = levels[bucket]``; backward ``dC/dR = g * slope[bucket]`` and the parameter
    gradients are per-bucket sums of ``g``. The bucket costs one comparison pass per edge
    (:func:`~binarize_cli.quant.base.threshold_scan`).
    """

    def __init__(self, v: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype) -> None:
        v = v.detach()
        self.thresholds = activation_thresholds(v, dtype)
        lo, hi = (-v).to(dtype), (1.0 - v).to(dtype)
        self.edges, _ = torch.sort(torch.cat([self.thresholds, lo, hi]))
        self.signs = _plane_table(self.thresholds, self.edges)  # [N, K] bool
        buckets = torch.arange(self.edges.numel() + 1, device=v.device)
        start = torch.bucketize(lo, self.edges, right=True)
        stop = torch.bucketize(hi, self.edges, right=True)
        self.windows = (buckets[None, :] >= start[:, None]) & (buckets[None, :] < stop[:, None])
        self.beta = beta.detach()

    def bucket(self, x: torch.Tensor) -> torch.Tensor:
        """``#{edges <= x}`` per element, flat int32 (a scratch buffer on the CPU)."""
        return threshold_scan(x, self.edges).int_index()

    def levels(self, dtype: torch.dtype) -> torch.Tensor:
        return _table_levels(self.beta.to(dtype), self.signs)

    def slopes(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.beta.to(dtype)[:, None] * self.windows.to(dtype)).sum(dim=0)


def abc_activation(x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``R_hat = sum_n beta_n H_{v_n}(x)`` (ABC eq. 6-8), forward only, as a table lookup."""
    tables = _ActivationTables(v, beta, x.dtype)
    return take(tables.levels(x.dtype), tables.bucket(x)).reshape(x.shape)


def fit_activation_scales(samples: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Least-squares ``beta`` for fixed shifts: ``argmin_b ||x - sum_n b_n H_{v_n}(x)||^2``.

    ``samples`` is cast to ``v``'s dtype first, so the planes are exactly the forward's.
    Returns float64 ``[N]`` (minimum-norm when planes coincide).
    """
    x = calibration_samples(samples).to(device=v.device, dtype=v.dtype)
    return least_squares_scales(abc_activation_planes(x, v.detach()), x)


def search_activation_shifts(
    samples: torch.Tensor, n: int, *, grid: int = 128, max_sweeps: int = 10
) -> torch.Tensor:
    """Shifts ``v`` (float64 ``[N]``, thresholds ``0.5 - v`` ascending) fitted to samples.

    Least-squares threshold search for the ABC activation approximation:

    1. candidate thresholds: the distinct ``grid``-quantiles of the samples, each placed
       midway between two consecutive distinct sample values (so no sample sits on a
       threshold), plus a *constant* candidate ``min(x) - 1`` below all data (the plane is
       +1 everywhere: the offset that ``sum_n beta_n A_n`` otherwise lacks; its STE window
       ``[t - 0.5, t + 0.5]`` lies below the data too);
    2. start from thresholds spread evenly over the candidates (sample quantiles
       ``n/(N+1)``);
    3. coordinate descent: for each ``n`` in turn, move ``t_n`` to the candidate that
       minimises the residual ``||x - sum_n beta_n A_n||^2`` at the least-squares ``beta``
       (computed exactly on per-bin counts and sums), until a sweep changes nothing.

    The residual never increases, so the result is at least as good as the quantile
    initialisation.
    """
    if n < 1:
        raise SchemeError(f"ABC needs at least one activation base (got N={n})")
    x = search_samples(samples, MAX_SEARCH_SAMPLES)
    xs, _ = torch.sort(x)
    count = xs.numel()
    lo = xs[0]
    pos = torch.linspace(0, count - 1, grid + 1, dtype=torch.float64).round().long()
    vals = torch.unique(xs[pos])
    vals = vals[vals > lo]  # a threshold at the minimum is the constant plane on the data
    first = torch.searchsorted(xs, vals, right=False)  # first sample >= each candidate
    between = (xs[first - 1] + vals) / 2.0
    thresholds = torch.cat([(lo - 1.0).reshape(1), between])  # index 0 = constant plane
    num_bins = thresholds.numel()  # bin k holds the samples in [c_k, c_{k+1})
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), first, torch.tensor([count])])
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xs, 0)])
    counts = (bounds[1:] - bounds[:-1]).to(torch.float64)
    sums = csum[bounds[1:]] - csum[bounds[:-1]]
    sumsq = float((xs * xs).sum())
    bins = torch.arange(num_bins)

    def residuals(sets: torch.Tensor) -> torch.Tensor:  # sets: long [B, N] threshold indices
        signs = torch.where(bins[None, :, None] >= sets[:, None, :], 1.0, -1.0).double()
        gram = torch.einsum("bkn,k,bkm->bnm", signs, counts, signs)
        rhs = torch.einsum("bkn,k->bn", signs, sums)
        coeff = _solve_gram(gram, rhs)
        return sumsq - (rhs * coeff).sum(-1)

    current = torch.tensor([(i * num_bins) // (n + 1) for i in range(1, n + 1)], dtype=torch.long)
    best = float(residuals(current[None])[0])
    for _ in range(max_sweeps):
        changed = False
        for i in range(n):
            cands = current.repeat(num_bins, 1)
            cands[:, i] = bins
            errs = residuals(cands)
            j = int(torch.argmin(errs))
            if float(errs[j]) < best - 1e-12 * max(abs(best), 1e-300) and j != int(current[i]):
                current[i] = j
                best = float(errs[j])
                changed = True
        if not changed:
            break
    chosen, _ = torch.sort(thresholds[current])
    return 0.5 - chosen


# --------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------


def _weight_forward_body(
    w: torch.Tensor, shifts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1-5 on a flat float32 weight in one graph of three loops: ``mean`` and ``std``,
    the per-bucket counts and sums of eq. 3's least squares over the sorted cuts of eq. 4
    (plane ``m`` is +1 iff ``W - mean >= cuts[m] = -u_m std``), then ``alpha``
    (:func:`_nested_scales`), the level ``sum_m alpha_m B_m`` of every bucket and the lookup of
    ``W_hat``.  Returns ``W_hat`` (flat), ``mean`` and ``std`` (for the straight-through
    mask).  The tables between the loops are materialised: inductor would otherwise
    recompute them per vector of weights."""
    mean, std = fused.mean_std(w)
    cuts = -shifts.to(w.dtype) * std
    edges, _ = torch.sort(cuts)
    mean, cuts, edges = (fused.materialize(t) for t in (mean, cuts, edges))
    counts, sums = fused.bucket_counts_sums(w, edges, w, mean)
    table = _plane_table(cuts, edges)
    alpha = _nested_scales(table, counts, sums).to(w.dtype)
    levels = fused.materialize(_table_levels(alpha, table))
    out = fused.select(w - mean, edges, levels)
    return out, mean, fused.materialize(std, output=True)


_WEIGHT_FORWARD = fused.Kernel(_weight_forward_body, own_graph=True)


_SHIFTS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _shifts(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``u_m`` of eq. 4 as a tensor: made once per M, dtype and device in eager mode (a
    constant of the graph under ``torch.compile``)."""
    if torch.compiler.is_compiling():
        return torch.tensor(weight_shifts(m), dtype=dtype, device=device)
    key = (m, dtype, device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.tensor(weight_shifts(m), dtype=dtype, device=device)
    return _SHIFTS[key]


def _fused_weight(w: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W_hat`` through the fused kernels (:mod:`binarize_cli.quant.fused`): three loops
    (statistics, per-bucket sums, lookup) in one compiled call instead of one pass per
    threshold.  Also returns ``mean`` and ``std`` for the straight-through mask."""
    out, mean, std = _WEIGHT_FORWARD(fused.flat(w), _shifts(m, w.dtype, w.device))
    return out.view(w.shape), mean, std


class ABCWeightSTE(torch.autograd.Function):
    """``W -> W_hat`` (eq. 1-5) with the clipped identity straight-through backward."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, m: int, clip_std: float) -> torch.Tensor:  # type: ignore[override]
        ctx.fused = fused.enabled(w)
        if ctx.fused:
            out, mean, std = _fused_weight(w, m)
            bound = std.new_full((), math.inf) if math.isinf(clip_std) else clip_std * std
            ctx.save_for_backward(w, mean, bound)
            return out
        dec = _WeightDecomposition(w, m)
        if math.isinf(clip_std):
            mask = torch.ones_like(w, dtype=torch.bool)
        else:
            size = torch.abs(dec.centered, out=scratch(dec.centered, "abc_abs"))
            mask = (size <= clip_std * dec.std).reshape(w.shape)
        ctx.save_for_backward(mask)
        return dec.reconstruct()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if ctx.fused:
            w, mean, bound = ctx.saved_tensors
            return fused.clip_grad(w, mean, bound, grad), None, None
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0), None, None


def _activation_forward_body(
    x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 6-8's forward on a flat input in one graph: :class:`_ActivationTables` (the
    sorted edges in the input's dtype, the forward level of every bucket) and one loop of
    lookups.  Returns ``A_hat`` (flat), the edges, and the backward's tables: the slope of
    every bucket and the window and sign tables (float64) that turn per-bucket gradient
    sums into ``dC/dv``, ``dC/dbeta``."""
    tables = _ActivationTables(v, beta, x.dtype)
    edges = fused.materialize(tables.edges)
    levels = fused.materialize(tables.levels(x.dtype))
    windows = tables.windows.to(torch.float64)
    signs = tables.signs.to(torch.float64) * 2.0 - 1.0
    rest = (tables.slopes(x.dtype), windows, signs)
    out = fused.select(x, edges, levels)
    return (out, edges, *(fused.materialize(t, output=True) for t in rest))  # type: ignore[return-value]


def _activation_backward_body(
    x: torch.Tensor,
    edges: torch.Tensor,
    slopes: torch.Tensor,
    windows: torch.Tensor,
    signs: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The straight-through backward of eq. 6-8 in one loop over the flat saved input and
    upstream gradient: ``dC/dR``, and ``dC/dv``, ``dC/dbeta`` from the per-bucket sums of
    ``g`` (as :class:`ABCActivationSTE`'s eager backward)."""
    grad_x = fused.select(x, edges, slopes.to(g.dtype)) * g
    per_bucket = fused.bucket_sums(x, edges, g)
    return grad_x, beta.to(torch.float64) * (windows @ per_bucket), signs @ per_bucket


_ACTIVATION_FORWARD = fused.Kernel(_activation_forward_body)
_ACTIVATION_BACKWARD = fused.Kernel(_activation_backward_body)


class ABCActivationSTE(torch.autograd.Function):
    """``R -> sum_n beta_n H_{v_n}(R)`` (eq. 6-8) with the paper's straight-through backward.

    The forward saves each input's bucket (one uint8 per element; the tables have
    ``3N + 1 <= 255`` buckets for ``N <= 84``, else int32), not the input.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.fused = fused.enabled(x)
        if ctx.fused:  # the input is saved, its bucket recomputed in the backward's loop
            out, edges, slopes, windows, signs = _ACTIVATION_FORWARD(
                fused.flat(x), v.detach(), beta.detach()
            )
            ctx.v_dtype = v.dtype
            ctx.save_for_backward(x, beta, edges, slopes, windows, signs)
            return out.view(x.shape)
        tables = _ActivationTables(v, beta, x.dtype)
        bucket = tables.bucket(x)
        small = tables.edges.numel() < 255
        ctx.save_for_backward(bucket.to(torch.uint8) if small else bucket.clone(), v, beta)
        ctx.x_dtype = x.dtype
        return take(tables.levels(x.dtype), bucket).reshape(x.shape)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        need_x, need_v, need_beta = ctx.needs_input_grad[:3]
        if ctx.fused:
            x, beta, edges, slopes, windows, signs = ctx.saved_tensors
            args = (fused.flat(x), edges, slopes, windows, signs, beta, fused.flat(grad))
            grad_x, grad_v, grad_beta = _ACTIVATION_BACKWARD(*args)
            return (
                grad_x.view(x.shape) if need_x else None,
                grad_v.to(ctx.v_dtype) if need_v else None,
                grad_beta.to(beta.dtype) if need_beta else None,
            )
        bucket, v, beta = ctx.saved_tensors
        tables = _ActivationTables(v, beta, ctx.x_dtype)
        grad_x = take(tables.slopes(grad.dtype), bucket, grad) if need_x else None
        grad_v = grad_beta = None
        if need_v or need_beta:
            per_bucket = _bucket_sums(bucket, grad, tables.edges.numel() + 1)
            if need_v:
                inside = tables.windows.to(torch.float64) @ per_bucket
                grad_v = (beta.detach().to(torch.float64) * inside).to(v.dtype)
            if need_beta:
                signed = tables.signs.to(torch.float64) * 2.0 - 1.0
                grad_beta = (signed @ per_bucket).to(beta.dtype)
        return grad_x, grad_v, grad_beta


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class ABCWeightQuantizer(WeightQuantizer):
    """ABC weights: ``M`` sign bases at ``mean + u_m std``, least-squares ``alpha`` per forward.

    Data-free and stateless: ``alpha`` is recomputed from the latent weight every call, so
    :meth:`calibrate` has nothing to do.
    """

    def __init__(self, m: int, *, clip_std: float = DEFAULT_WEIGHT_CLIP_STD) -> None:
        super().__init__()
        weight_shifts(m)  # validates m
        if not (clip_std > 0):
            raise SchemeError(f"weight_clip_std must be > 0 (got {clip_std})")
        self.num_bases = m
        self.clip_std = float(clip_std)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not needs_autograd(weight):
            return abc_weight(weight, self.num_bases)
        return ABCWeightSTE.apply(weight, self.num_bases, self.clip_std)

    def bit_planes(self, weight: torch.Tensor) -> BitPlanes:
        return abc_weight_planes(weight, self.num_bases)

    def extra_repr(self) -> str:
        return f"M={self.num_bases}, clip_std={self.clip_std}"


class ABCActivationQuantizer(ActivationQuantizer):
    """ABC activations: ``N`` shifted sign bases with trainable shifts ``v`` and scales ``beta``.

    Parameters ``v`` and ``beta`` (shape ``[N]``) are initialised to a uniform quantizer of
    [-1, 1] and should be set from data by :meth:`calibrate`.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        if n < 1:
            raise SchemeError(f"ABC needs at least one activation base (got N={n})")
        self.num_bases = n
        thresholds = torch.tensor([-1.0 + (2 * i + 1) / n for i in range(n)])
        self.v = nn.Parameter(0.5 - thresholds)
        self.beta = nn.Parameter(torch.full((n,), 1.0 / n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_autograd(x, self.v, self.beta):
            return abc_activation(x, self.v, self.beta)
        return ABCActivationSTE.apply(x, self.v, self.beta)

    def bit_planes(self, x: torch.Tensor) -> BitPlanes:
        with torch.no_grad():
            planes = abc_activation_planes(x.detach(), self.v.detach())
            return BitPlanes(
                planes=planes,
                scales=self.beta.detach().to(x.dtype).clone(),
                domain=Domain.PLUS_MINUS_ONE,
            )

    @torch.no_grad()
    def calibrate(self, samples: torch.Tensor) -> None:
        """Shifts by least-squares threshold search, then least-squares ``beta`` (see module doc)."""
        v = search_activation_shifts(samples, self.num_bases)
        self.v.copy_(v.to(self.v.dtype))
        self.beta.copy_(fit_activation_scales(samples, self.v).to(self.beta.dtype))

    def extra_repr(self) -> str:
        return f"N={self.num_bases}"


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def _clip_option(options: dict[str, Any]) -> float:
    value = options.get("weight_clip_std", DEFAULT_WEIGHT_CLIP_STD)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SchemeError(
            f"scheme option weight_clip_std must be a positive number (got {value!r})"
        )
    return float(value)


def _make_weight_quantizer(m: int, options: dict[str, Any]) -> WeightQuantizer:
    return ABCWeightQuantizer(m, clip_std=_clip_option(options))


def _make_activation_quantizer(n: int, options: dict[str, Any]) -> ActivationQuantizer:
    return ABCActivationQuantizer(n)


ABC_SCHEME = register_scheme(
    Scheme(
        name="abc",
        description="ABC-Net: M shifted sign weight bases (least-squares alpha), "
        "N shifted sign activation bases (trainable v, beta)",
        make_weight_quantizer=_make_weight_quantizer,
        make_activation_quantizer=_make_activation_quantizer,
        default_m=5,
        default_n=5,
        binarize_downsample=False,
        weight_domain=Domain.PLUS_MINUS_ONE,
        activation_domain=Domain.PLUS_MINUS_ONE,
    )
)
