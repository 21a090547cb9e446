"""Single-binary and low-bit baselines: BNN, XNOR-Net (BWN), Bi-Real Net, DoReFa-Net.

They make ``report --compare`` meaningful (PA vs ABC vs single-binary on one model). All
follow the same contract as PA/ABC: ``forward`` is the training-time simulation with the
paper's surrogate gradient, ``bit_planes`` its exact plane decomposition. ``sign(0) = +1``
everywhere (bit 1 = +1 in :attr:`Domain.PLUS_MINUS_ONE`).

``bnn`` (Courbariaux et al. 2016; seeds 003, 004)
    ``W_hat = sign(W)``, ``A_hat = sign(A - t)``; no scaling. Backward: the clipped STE
    ``dC/dx = dC/dx_hat * 1[|x| <= 1]`` (the derivative of ``hardtanh``) for both, with
    ``x = W`` and ``x = A - t``.
``xnor`` (Rastegari et al. 2016; seed 004)
    ``W_hat = alpha_c sign(W)`` with one scale per output channel ``alpha_c = mean|W_c|``
    (the L2-optimal scale for fixed signs; scales shape ``[1, C_out]``); ``A_hat = sign(A - t)``
    with the clipped STE. ``-N 0`` keeps activations real: that is BWN, the weight-only form.
    XNOR-Net's activation scaling map ``K`` (the channel-mean of ``|A|`` box-filtered over
    each receptive field) is dropped: it is a data-dependent real-valued spatial map
    computed in full precision at inference, outside the bit-plane contract (planes with
    per-layer or per-output-channel scales), its layer-constant part is absorbed by the
    batch norm after the convolution, and later work (Bi-Real Net, XNOR-Net++) drops it
    with little or no loss.
``bireal`` (Liu et al. 2018; seed 004)
    Weights as ``xnor``; ``A_hat = sign(A - t)`` with the ApproxSign backward
    ``dC/dA = dC/dA_hat * max(0, 2 - 2|A - t|)`` (``2 + 2u`` on ``[-1, 0)``, ``2 - 2u`` on
    ``[0, 1)``, 0 elsewhere; the derivative of the piecewise-quadratic ApproxSign).
``dorefa`` (Zhou et al. 2016; seed 004), ``M`` = weight bits, ``N`` = activation bits
    Weights (DoReFa eq. 9): ``x = tanh(W) / (2 max|tanh(W)|) + 1/2``, ``n = round(L x)``,
    ``W_q = 2 n / L - 1`` with ``L = 2^k - 1``. Since ``2n/L - 1 = sum_b (2^b / L)(2 bit_b - 1)``
    over the bits of ``n``, ``W_q`` is exactly a {-1,+1} plane decomposition with scales
    ``2^b / L``. ``W_q`` lives in [-1, 1]; because we post-convert pretrained weights we keep
    the layer's weight magnitude with one real scale ``s = mean|W| / mean|W_q|`` (treated
    as a constant in the backward), ``W_hat = s W_q``, planes scaled ``s 2^b / L``.
    Backward: straight-through on the rounding only, i.e. the exact gradient of
    ``s tanh(W) / max|tanh(W)|`` (through the max too, as autograd does in the reference).
    Activations: ``A_hat = r * quantize_k(clip(A / r, 0, 1))`` = {0,1} planes (the bits of
    ``n = round(L clip(A / r, 0, 1))``) with scales ``r 2^b / L``; STE
    ``dC/dA = dC/dA_hat * 1[0 <= A <= r]``. The paper's range is ``r = 1``.
    ``round(y)`` is ``floor(y + 0.5)`` (half up, not NumPy/PyTorch half-to-even) everywhere.

**Weight backward.** ``xnor``/``bireal`` use the identity STE clipped to ``|W| <= 1``, not the
literal ``alpha_c * 1[|W| <= 1]`` (plus the ``1/n`` term from ``alpha``'s own derivative):
``W_hat ~= W`` so the identity is the well-scaled reading (the literal one shrinks the
gradient by ``alpha ~ 0.05`` for pretrained weights, an implicit 20x smaller learning rate),
the same choice as ABC. ``bnn`` uses the paper's ``1[|W| <= 1]``. ``bnn`` weights have no
scale at all: after conversion the following batch norm's statistics must be re-estimated
(the calibrate stage does).

**Activation threshold ``t`` (calibration).** In BNN, XNOR-Net and Bi-Real Net the sign
follows a batch norm whose shift sets the effective threshold. A post-converted ReLU network
feeds the convolution a *non-negative* input, where ``sign(A)`` with ``sign(0) = +1`` is +1
everywhere: the layer would see a constant. So the sign schemes carry a threshold buffer
``t`` (default 0, the papers' sign) that :meth:`SignActivationQuantizer.calibrate` sets to
the optimal 1-bit split of the calibration samples (two-level k-means, exact on the sorted
samples: the threshold minimising the residual of the best affine reading ``a + b A_hat`` of
the bit; the affine part is absorbed by the next batch norm). For zero-centred symmetric
inputs it lands near 0, i.e. the papers' sign. The STE windows are centred on ``t``.
Likewise DoReFa's fixed activation range [0, 1] assumes a bounded activation function; the
``dorefa`` activation quantizer carries a range buffer ``clip_max`` (default 1, the paper)
that calibration sets to the MSE-optimal clipping range of the samples. Both are buffers
(saved, not trained); weights need no calibration.

**Downsample convolutions** (``binarize_downsample``): ``bireal`` keeps the 1x1 shortcut
convolutions real-valued (Bi-Real's design and the PA paper's Table 7 accounting); ``bnn``
and ``xnor`` follow the same convention so the single-binary baselines are compared on an
equal footing (the 1x1 shortcuts are ~1-2% of a ResNet's MACs but sensitive to
binarization). ``dorefa`` binarizes them: DoReFa-Net's reference ResNet quantizes every
convolution except the first and the last, shortcuts included.

Validation: ``bnn``/``xnor``/``bireal`` need ``M = 1`` and ``N`` in {0, 1}; ``dorefa`` needs
``1 <= M <= 16`` and ``0 <= N <= 16``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from binarize_cli.core.errors import SchemeError
from binarize_cli.quant.base import (
    MAX_SEARCH_SAMPLES,
    ActivationQuantizer,
    BitPlanes,
    Domain,
    Scheme,
    WeightQuantizer,
    needs_autograd,
    register_scheme,
    search_samples,
)

__all__ = [
    "BIREAL_SCHEME",
    "BNN_SCHEME",
    "DOREFA_SCHEME",
    "DoReFaActivationQuantizer",
    "DoReFaActivationSTE",
    "DoReFaWeightQuantizer",
    "MAX_DOREFA_BITS",
    "RoundSTE",
    "SignActivationQuantizer",
    "SignActivationSTE",
    "SignWeightQuantizer",
    "SignWeightSTE",
    "XNOR_SCHEME",
    "approx_sign",
    "channel_scales",
    "dorefa_activation",
    "dorefa_activation_planes",
    "dorefa_weight",
    "dorefa_weight_planes",
    "optimal_clip_range",
    "optimal_sign_threshold",
    "round_half_up",
    "sign_weight_planes",
    "single_validator",
]

#: Largest DoReFa bit width (integer levels stay exact in float32).
MAX_DOREFA_BITS = 16
#: Most calibration samples the range search looks at (deterministic stride).
_MAX_RANGE_SAMPLES = 1 << 14
_RANGE_GRID = 48

SignBackward = Literal["clipped", "approx"]


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def round_half_up(y: torch.Tensor) -> torch.Tensor:
    """``floor(y + 0.5)``: the rounding of every DoReFa quantizer here (and the runtime)."""
    return torch.floor(y + 0.5)


def approx_sign(u: torch.Tensor) -> torch.Tensor:
    """Bi-Real's ApproxSign (the surrogate whose derivative is the ``bireal`` backward)."""
    poly = torch.where(u < 0, 2 * u + u * u, 2 * u - u * u)
    return torch.where(u < -1, -1.0, torch.where(u >= 1, 1.0, poly)).to(u.dtype)


def channel_scales(w: torch.Tensor) -> torch.Tensor:
    """XNOR-Net's per-output-channel scale ``alpha_c = mean|W_c|`` (shape ``[C_out]``)."""
    return w.detach().abs().flatten(1).mean(1)


def sign_weight_planes(w: torch.Tensor, *, scaled: bool) -> BitPlanes:
    """One {-1,+1} plane ``W >= 0``; scales ``[[alpha_c]]`` (``[1, C_out]``) or ``[1.0]``."""
    with torch.no_grad():
        w = w.detach()
        planes = (w >= 0).unsqueeze(0)
        scales = channel_scales(w).unsqueeze(0) if scaled else torch.ones(1, dtype=w.dtype)
    return BitPlanes(planes=planes, scales=scales.to(w.device), domain=Domain.PLUS_MINUS_ONE)


def _dorefa_weight_parts(
    w: torch.Tensor, bits: int, *, ste: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, W_q, s)``: integer levels (float), ``2n/L - 1`` and the magnitude scale."""
    levels = float(2**bits - 1)
    t = torch.tanh(w)
    peak = t.abs().amax().clamp_min(torch.finfo(t.dtype).tiny)
    x = t / (2.0 * peak) + 0.5
    n = RoundSTE.apply(x * levels) if ste else round_half_up(x * levels)
    wq = 2.0 * n / levels - 1.0
    s = (w.detach().abs().mean() / wq.detach().abs().mean()).detach()
    return n, wq, s


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``W_hat = s (2 quantize_k(tanh W / (2 max|tanh W|) + 1/2) - 1)`` (DoReFa eq. 9, rescaled).

    Differentiable with the straight-through rounding (see module doc).
    """
    _, wq, s = _dorefa_weight_parts(w, bits, ste=True)
    return s * wq


def _bits_of(n: torch.Tensor, bits: int) -> torch.Tensor:
    k = n.to(torch.int64)
    return torch.stack([((k >> b) & 1).bool() for b in range(bits)])


def dorefa_weight_planes(w: torch.Tensor, bits: int) -> BitPlanes:
    """The bits of ``n`` (LSB first) as {-1,+1} planes with scales ``s 2^b / (2^k - 1)``."""
    with torch.no_grad():
        n, _, s = _dorefa_weight_parts(w.detach(), bits, ste=False)
        levels = float(2**bits - 1)
        scales = torch.tensor([2.0**b / levels for b in range(bits)], dtype=w.dtype)
        return BitPlanes(
            planes=_bits_of(n, bits),
            scales=(s * scales.to(w.device)).to(w.dtype),
            domain=Domain.PLUS_MINUS_ONE,
        )


def _dorefa_activation_levels(x: torch.Tensor, clip_max: torch.Tensor, bits: int) -> torch.Tensor:
    levels = float(2**bits - 1)
    y = torch.clamp(x / clip_max.to(x.dtype), 0.0, 1.0)
    return round_half_up(y * levels)


def dorefa_activation(x: torch.Tensor, clip_max: torch.Tensor, bits: int) -> torch.Tensor:
    """``A_hat = r round(L clip(A / r, 0, 1)) / L`` with ``L = 2^k - 1`` (forward only)."""
    levels = float(2**bits - 1)
    n = _dorefa_activation_levels(x, clip_max, bits)
    return n * (clip_max.to(x.dtype) / levels)


def dorefa_activation_planes(x: torch.Tensor, clip_max: torch.Tensor, bits: int) -> BitPlanes:
    """The bits of ``n`` (LSB first) as {0,1} planes with scales ``r 2^b / (2^k - 1)``."""
    with torch.no_grad():
        x = x.detach()
        n = _dorefa_activation_levels(x, clip_max, bits)
        levels = float(2**bits - 1)
        r = clip_max.detach().to(x.dtype).reshape(())
        scales = torch.stack([r * (2.0**b / levels) for b in range(bits)])
        return BitPlanes(planes=_bits_of(n, bits), scales=scales, domain=Domain.ZERO_ONE)


def optimal_sign_threshold(samples: torch.Tensor) -> float | None:
    """The 1-bit split minimising ``min_{a,b} ||x - (a + b sign(x - t))||^2`` (2-means).

    Exact over all splits of the sorted samples (prefix sums); the threshold is placed
    midway between the two samples it separates. ``None`` when all samples are equal.
    """
    xs, _ = torch.sort(search_samples(samples, MAX_SEARCH_SAMPLES))
    count = xs.numel()
    if count < 2 or bool(xs[0] == xs[-1]):
        return None
    csum = torch.cumsum(xs, 0)
    total = csum[-1]
    left_n = torch.arange(1, count, dtype=torch.float64)
    left = csum[:-1]
    explained = left * left / left_n + (total - left) ** 2 / (count - left_n)
    valid = xs[:-1] < xs[1:]  # only split between distinct values
    explained = torch.where(valid, explained, torch.tensor(-torch.inf, dtype=torch.float64))
    i = int(torch.argmax(explained))
    return float((xs[i] + xs[i + 1]) / 2.0)


def optimal_clip_range(
    samples: torch.Tensor, bits: int, *, grid: int = _RANGE_GRID
) -> float | None:
    """The range ``r`` minimising ``mean((r Q_k(clip(x / r, 0, 1)) - x)^2)``.

    Two-stage grid search: ``r = max(x) * i / grid`` for ``i = 1..grid``, then ``grid``
    points between the best one's neighbours. ``None`` when no sample is > 0.
    """
    x = search_samples(samples, _MAX_RANGE_SAMPLES)
    top = float(x.max())
    if top <= 0:
        return None
    levels = float(2**bits - 1)

    def errors(candidates: torch.Tensor) -> torch.Tensor:
        out = torch.empty(candidates.numel(), dtype=torch.float64)
        for start in range(0, candidates.numel(), 16):
            r = candidates[start : start + 16, None]
            q = round_half_up(torch.clamp(x[None, :] / r, 0.0, 1.0) * levels) * (r / levels)
            out[start : start + 16] = ((q - x[None, :]) ** 2).mean(1)
        return out

    step = top / grid
    coarse = torch.arange(1, grid + 1, dtype=torch.float64) * step
    best = float(coarse[int(torch.argmin(errors(coarse)))])
    fine = torch.linspace(max(best - step, step / grid), min(best + step, top), grid)
    fine = torch.cat([fine.double(), torch.tensor([best], dtype=torch.float64)])
    return float(fine[int(torch.argmin(errors(fine)))])


# --------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------


class RoundSTE(torch.autograd.Function):
    """``floor(y + 0.5)`` forward, identity backward (DoReFa's straight-through rounding)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return round_half_up(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class SignWeightSTE(torch.autograd.Function):
    """``W -> [alpha_c] sign(W)`` with the clipped identity STE ``1[|W| <= 1]``."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, scaled: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w.abs() <= 1)
        return sign_weight_planes(w, scaled=scaled).reconstruct()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None


def _sign_activation_grad(u: torch.Tensor, grad: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "approx":
        return grad * torch.clamp(2.0 - 2.0 * u.abs(), min=0.0)
    return torch.where(u.abs() <= 1, grad, 0.0)


class SignActivationSTE(torch.autograd.Function):
    """``A -> sign(A - t)``; backward clipped STE ``1[|A - t| <= 1]`` or Bi-Real's ApproxSign."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, kind: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.kind = kind
        return torch.where(x >= threshold, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        return _sign_activation_grad(x - threshold, grad, ctx.kind), None, None


class DoReFaActivationSTE(torch.autograd.Function):
    """``A -> r Q_k(clip(A / r, 0, 1))`` with the STE ``1[0 <= A <= r]``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clip_max: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward((x >= 0) & (x <= clip_max))
        return dorefa_activation(x, clip_max, bits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None, None


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class SignWeightQuantizer(WeightQuantizer):
    """One sign base: ``sign(W)`` (``bnn``) or ``alpha_c sign(W)`` (``xnor``, ``bireal``)."""

    num_bases = 1

    def __init__(self, *, scaled: bool) -> None:
        super().__init__()
        self.scaled = bool(scaled)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not needs_autograd(weight):
            return sign_weight_planes(weight, scaled=self.scaled).reconstruct()
        return SignWeightSTE.apply(weight, self.scaled)

    def bit_planes(self, weight: torch.Tensor) -> BitPlanes:
        return sign_weight_planes(weight, scaled=self.scaled)

    def extra_repr(self) -> str:
        return f"scaled={self.scaled}"


class SignActivationQuantizer(ActivationQuantizer):
    """One sign base ``sign(A - t)``, scale 1; ``t`` is a calibrated buffer (default 0)."""

    num_bases = 1

    def __init__(self, *, backward: SignBackward = "clipped") -> None:
        super().__init__()
        if backward not in ("clipped", "approx"):
            raise ValueError(f"unknown sign backward {backward!r}")
        self.backward_kind: str = backward
        self.register_buffer("threshold", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_autograd(x):
            return torch.where(x >= self.threshold, 1.0, -1.0).to(x.dtype)
        return SignActivationSTE.apply(x, self.threshold, self.backward_kind)

    def bit_planes(self, x: torch.Tensor) -> BitPlanes:
        with torch.no_grad():
            planes = (x.detach() >= self.threshold).unsqueeze(0)
        return BitPlanes(
            planes=planes,
            scales=torch.ones(1, dtype=x.dtype, device=x.device),
            domain=Domain.PLUS_MINUS_ONE,
        )

    @torch.no_grad()
    def calibrate(self, samples: torch.Tensor) -> None:
        """Threshold = the optimal 1-bit split of the samples (unchanged if they are constant)."""
        t = optimal_sign_threshold(samples)
        if t is not None:
            self.threshold.fill_(t)

    def extra_repr(self) -> str:
        return f"backward={self.backward_kind}"


class DoReFaWeightQuantizer(WeightQuantizer):
    """DoReFa k-bit weights as ``k`` {-1,+1} planes with one real magnitude scale."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        _check_bits("weight", bits, minimum=1)
        self.num_bases = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not needs_autograd(weight):
            _, wq, s = _dorefa_weight_parts(weight, self.num_bases, ste=False)
            return s * wq
        return dorefa_weight(weight, self.num_bases)

    def bit_planes(self, weight: torch.Tensor) -> BitPlanes:
        return dorefa_weight_planes(weight, self.num_bases)

    def extra_repr(self) -> str:
        return f"bits={self.num_bases}"


class DoReFaActivationQuantizer(ActivationQuantizer):
    """DoReFa k-bit activations ``r Q_k(clip(A / r, 0, 1))`` as ``k`` {0,1} planes."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        _check_bits("activation", bits, minimum=1)
        self.num_bases = bits
        self.register_buffer("clip_max", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_autograd(x):
            return dorefa_activation(x, self.clip_max, self.num_bases)
        return DoReFaActivationSTE.apply(x, self.clip_max, self.num_bases)

    def bit_planes(self, x: torch.Tensor) -> BitPlanes:
        return dorefa_activation_planes(x, self.clip_max, self.num_bases)

    @torch.no_grad()
    def calibrate(self, samples: torch.Tensor) -> None:
        """Range = the MSE-optimal clipping range of the samples (unchanged if none is > 0)."""
        r = optimal_clip_range(samples, self.num_bases)
        if r is not None:
            self.clip_max.fill_(r)

    def extra_repr(self) -> str:
        return f"bits={self.num_bases}"


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def _check_bits(kind: str, bits: int, *, minimum: int) -> None:
    if not minimum <= bits <= MAX_DOREFA_BITS:
        flag = "-M" if kind == "weight" else "-N"
        raise SchemeError(
            f"dorefa {kind} bits must be in {minimum}..{MAX_DOREFA_BITS} (got {flag} {bits})"
        )


def single_validator(name: str) -> Callable[[int, int], None]:
    """The ``validate`` of the single-binary scheme ``name``: ``M = 1``, ``N`` in {0, 1}."""

    def validate(m: int, n: int) -> None:
        if m != 1:
            raise SchemeError(
                f"scheme {name!r} has one binary weight base: -M must be 1 (got {m}); "
                "use --scheme abc or pa for multiple bases"
            )
        if n not in (0, 1):
            raise SchemeError(
                f"scheme {name!r} has one binary activation base: -N must be 1, or 0 for "
                f"full-precision activations (got {n}); use --scheme abc or pa for more"
            )

    return validate


def _validate_dorefa(m: int, n: int) -> None:
    _check_bits("weight", m, minimum=1)
    _check_bits("activation", n, minimum=0)


def _register_sign_scheme(
    name: str, description: str, *, scaled: bool, backward: SignBackward
) -> Scheme:
    def make_weight(m: int, options: dict[str, Any]) -> WeightQuantizer:
        single_validator(name)(m, 1)
        return SignWeightQuantizer(scaled=scaled)

    def make_activation(n: int, options: dict[str, Any]) -> ActivationQuantizer:
        single_validator(name)(1, n)
        return SignActivationQuantizer(backward=backward)

    return register_scheme(
        Scheme(
            name=name,
            description=description,
            make_weight_quantizer=make_weight,
            make_activation_quantizer=make_activation,
            default_m=1,
            default_n=1,
            binarize_downsample=False,
            weight_domain=Domain.PLUS_MINUS_ONE,
            activation_domain=Domain.PLUS_MINUS_ONE,
            validate=single_validator(name),
        )
    )


BNN_SCHEME = _register_sign_scheme(
    "bnn",
    "BNN (Courbariaux): sign weights and activations, no scaling, clipped STE",
    scaled=False,
    backward="clipped",
)
XNOR_SCHEME = _register_sign_scheme(
    "xnor",
    "XNOR-Net: sign weights x per-channel mean|W|, sign activations, clipped STE (-N 0: BWN)",
    scaled=True,
    backward="clipped",
)
BIREAL_SCHEME = _register_sign_scheme(
    "bireal",
    "Bi-Real Net: sign weights x per-channel mean|W|, sign activations, ApproxSign backward",
    scaled=True,
    backward="approx",
)
DOREFA_SCHEME = register_scheme(
    Scheme(
        name="dorefa",
        description="DoReFa-Net: M-bit weights (tanh-normalised), N-bit activations, STE",
        make_weight_quantizer=lambda m, options: DoReFaWeightQuantizer(m),
        make_activation_quantizer=lambda n, options: DoReFaActivationQuantizer(n),
        default_m=2,
        default_n=2,
        binarize_downsample=True,
        weight_domain=Domain.PLUS_MINUS_ONE,
        activation_domain=Domain.ZERO_ONE,
        validate=_validate_dorefa,
    )
)
