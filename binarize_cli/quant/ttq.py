"""Trained Ternary Quantization (TTQ): ternary weights with two trained scales per layer.

Zhu, Han, Mao & Dally, "Trained Ternary Quantization" (ICLR 2017), presented in seed 004's
lecture. Docs: docs/schemes-abc-baselines.md, section "TTQ".

**Forward** (paper eq. 6 and 9). Per layer, with the latent full-precision weight ``W``
(the layer's ``weight``) and the threshold factor ``t`` (scheme option ``ttq_threshold``,
default 0.05)::

    delta = t * max|W|
    W_t   = +W_p  where W > delta           (I_p)
             0    where |W| <= delta        (I_z)
            -W_n  where W < -delta          (I_n)

``W_p`` and ``W_n`` are the layer's two trained scales (``nn.Parameter`` s ``w_p`` and
``w_n``, shape ``[1]``). ``delta`` is recomputed from the current latent weight on every
forward, as in the paper. The paper first normalises ``W`` to [-1, 1] (divides by
``max|W|``) and thresholds at ``t``: the same sets.

**Backward** (paper eq. 7-8), ``g = dL/dW_t``::

    dL/dW_p = sum_{I_p} g
    dL/dW_n = -sum_{I_n} g          (the exact derivative of the forward; the paper prints
                                      eq. 7 without the minus, a sign convention for the
                                      magnitude W_n: with it, descent moves W_n the wrong way)
    dL/dW   = W_p g on I_p,   g on I_z,   W_n g on I_n

``delta`` is a constant in the backward (its dependence on ``max|W|`` carries no gradient,
as in the paper). The latent gradient is the exact gradient of the piecewise-linear
surrogate ``W_p W`` / ``W`` / ``W_n W`` on the three (fixed) sets.

**Initialisation** (the paper trains from scratch or from a pretrained model and leaves the
initial scales open). We post-convert a trained network, so :meth:`TTQWeightQuantizer.calibrate`
sets each scale to the least-squares optimum for the initial sets:
``W_p = mean(W over I_p)``, ``W_n = mean(-W over I_n)`` (the minimiser of
``||W - W_t||^2`` for fixed sets). An empty set (a weight without positive, or negative,
entries beyond ``delta``) takes the other set's scale; an all-zero weight keeps 1. The
scales are not constrained to stay positive while training (the paper does not say to).

**Activations.** Full precision by default (``-N 0``, the paper's setting). With ``-N > 0``
the activations use PA's activation quantizer (:class:`binarize_cli.quant.pa.PAActivationQuantizer`,
N {0,1} planes, trainable endpoints and levels, calibrated from data), configured by PA's
activation options ``lambda_a``, ``lambda_delta``, ``signed_activations``.

**Planes.** Two {0,1} planes (:attr:`Domain.ZERO_ONE`), ``[W > delta, W < -delta]`` with
scales ``[+W_p, -W_n]``: ``W_t = W_p P_1 - W_n P_2`` exactly. Accounting: 2 bits per weight
plus the two scales (the scales are the quantizer's parameters: counted once). ``-M`` must
be 2. The 1x1 downsample convolutions are quantized (the paper keeps only the first and the
last layer in full precision).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from binarize_cli.core.errors import SchemeError
from binarize_cli.quant.base import (
    ActivationQuantizer,
    BitPlanes,
    Domain,
    Scheme,
    WeightQuantizer,
    needs_autograd,
    register_scheme,
)
from binarize_cli.quant.pa import PA_SCHEME

__all__ = [
    "ACTIVATION_OPTION_KEYS",
    "DEFAULT_THRESHOLD",
    "OPTION_KEYS",
    "TTQWeightFunction",
    "TTQWeightQuantizer",
    "TTQ_SCHEME",
    "initial_scales",
    "ternary_sets",
    "ternary_threshold",
    "ternary_weight",
]

#: The paper's threshold factor ``t`` (``delta = t * max|W|``).
DEFAULT_THRESHOLD = 0.05
#: PA's activation options, passed to PA's activation quantizer when ``-N > 0``.
ACTIVATION_OPTION_KEYS = ("lambda_a", "lambda_delta", "signed_activations")
#: Keys accepted in the scheme options dict (recipes' ``scheme_options``).
OPTION_KEYS = ("ttq_threshold", *ACTIVATION_OPTION_KEYS)


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def ternary_threshold(weight: torch.Tensor, t: float) -> torch.Tensor:
    """``delta = t * max|W|`` (a 0-d tensor in the weight's dtype, no gradient)."""
    w = weight.detach()
    if w.numel() == 0:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    return t * w.abs().amax()


def ternary_sets(weight: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The bool masks ``(I_p, I_n) = (W > delta, W < -delta)``; the rest is the zero set."""
    w = weight.detach()
    delta = ternary_threshold(w, t)
    return w > delta, w < -delta


def ternary_weight(
    weight: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor, t: float
) -> torch.Tensor:
    """``W_t``: ``+W_p`` on ``I_p``, 0 on the zero set, ``-W_n`` on ``I_n`` (forward only)."""
    pos, neg = ternary_sets(weight, t)
    wp = w_p.detach().to(weight.dtype).reshape(())
    wn = w_n.detach().to(weight.dtype).reshape(())
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    return torch.where(pos, wp, torch.where(neg, -wn, zero))


def initial_scales(weight: torch.Tensor, t: float) -> tuple[float, float]:
    """``(W_p, W_n)`` minimising ``||W - W_t||^2`` for the sets of ``weight``: the mean of
    ``W`` over ``I_p`` and of ``-W`` over ``I_n``; an empty set takes the other's value,
    both empty (an all-zero weight) give ``(1, 1)``."""
    w = weight.detach().double()
    pos, neg = ternary_sets(w, t)
    wp = float(w[pos].mean()) if bool(pos.any()) else None
    wn = float(-w[neg].mean()) if bool(neg.any()) else None
    if wp is None and wn is None:
        return 1.0, 1.0
    return (wp if wp is not None else wn), (wn if wn is not None else wp)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------


class TTQWeightFunction(torch.autograd.Function):
    """``(W, W_p, W_n) -> W_t`` with the paper's gradients (eq. 7-8, module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weight: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor, t: float
    ) -> torch.Tensor:
        pos, neg = ternary_sets(weight, t)
        ctx.save_for_backward(pos, neg, w_p, w_n)
        return ternary_weight(weight, w_p, w_n, t)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        pos, neg, w_p, w_n = ctx.saved_tensors
        wp = w_p.detach().to(grad.dtype).reshape(())
        wn = w_n.detach().to(grad.dtype).reshape(())
        one = torch.ones((), dtype=grad.dtype, device=grad.device)
        grad_w = grad * torch.where(pos, wp, torch.where(neg, wn, one))
        grad_wp = grad[pos].sum().reshape(w_p.shape).to(w_p.dtype)
        grad_wn = (-grad[neg].sum()).reshape(w_n.shape).to(w_n.dtype)
        return grad_w, grad_wp, grad_wn, None


# --------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------


class TTQWeightQuantizer(WeightQuantizer):
    """TTQ's ternary weight ``{-W_n, 0, +W_p}`` as two {0,1} planes (``M = 2``).

    Args:
        threshold: the factor ``t`` of ``delta = t * max|W|``, ``0 <= t < 1``.

    Parameters ``w_p`` and ``w_n`` (shape ``[1]``, default 1) are set from the weight by
    :meth:`calibrate` (least squares for the initial sets) and then trained.
    """

    num_bases = 2
    #: The parameters are the planes' scales (counted once by the accounting).
    scale_parameters = True

    def __init__(self, *, threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        self.threshold = _check_threshold(threshold)
        self.w_p = nn.Parameter(torch.ones(1))
        self.w_n = nn.Parameter(torch.ones(1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not needs_autograd(weight, self.w_p, self.w_n):
            return ternary_weight(weight, self.w_p, self.w_n, self.threshold)
        return TTQWeightFunction.apply(weight, self.w_p, self.w_n, self.threshold)

    @torch.no_grad()
    def bit_planes(self, weight: torch.Tensor) -> BitPlanes:
        """Planes ``[W > delta, W < -delta]``, scales ``[+W_p, -W_n]`` in the weight's dtype."""
        pos, neg = ternary_sets(weight, self.threshold)
        scales = torch.cat([self.w_p.detach(), -self.w_n.detach()]).to(weight.dtype)
        return BitPlanes(
            planes=torch.stack([pos, neg]),
            scales=scales.to(weight.device),
            domain=Domain.ZERO_ONE,
        )

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        """``W_p``, ``W_n`` = the least-squares scales of the weight's sets (:func:`initial_scales`)."""
        wp, wn = initial_scales(weight, self.threshold)
        self.w_p.fill_(wp)
        self.w_n.fill_(wn)

    def extra_repr(self) -> str:
        return f"t={self.threshold:g}"


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def _check_threshold(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and 0 <= value < 1):
        raise SchemeError(
            f"scheme option ttq_threshold must be a number in [0, 1) (got {value!r}): "
            "delta = ttq_threshold * max|W|"
        )
    return float(value)


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise SchemeError(
            f"unknown TTQ option(s) {', '.join(unknown)}; TTQ accepts: {', '.join(OPTION_KEYS)}"
        )
    return options


def _validate(m: int, n: int) -> None:
    if m != 2:
        raise SchemeError(
            f"scheme 'ttq' has ternary weights stored as two planes: -M must be 2 (got {m})"
        )
    if n != 0:
        PA_SCHEME.check(2, n)


def _make_weight_quantizer(m: int, options: dict[str, Any]) -> WeightQuantizer:
    opts = _check_options(options)
    _validate(m, 0)
    return TTQWeightQuantizer(threshold=opts.get("ttq_threshold", DEFAULT_THRESHOLD))


def _make_activation_quantizer(n: int, options: dict[str, Any]) -> ActivationQuantizer:
    opts = _check_options(options)
    return PA_SCHEME.activation_quantizer(
        n, {k: v for k, v in opts.items() if k in ACTIVATION_OPTION_KEYS}
    )


TTQ_SCHEME = register_scheme(
    Scheme(
        name="ttq",
        description="Trained Ternary Quantization: {-W_n, 0, +W_p} weights with trained "
        "scales, delta = t max|W| (-M 2); activations full precision or PA's (-N)",
        make_weight_quantizer=_make_weight_quantizer,
        make_activation_quantizer=_make_activation_quantizer,
        default_m=2,
        default_n=0,
        binarize_downsample=True,
        weight_domain=Domain.ZERO_ONE,
        activation_domain=Domain.ZERO_ONE,
        validate=_validate,
    )
)
