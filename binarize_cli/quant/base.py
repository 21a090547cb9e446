"""The scheme contract: weight and activation quantizers, their bit-plane form, the registry.

A *scheme* (PA, ABC, BNN, XNOR, Bi-Real, DoReFa) is a pair of quantizers:

* a :class:`WeightQuantizer` that maps a latent real weight tensor ``W`` to its approximation
  ``W_hat`` (forward) with the scheme's surrogate gradient (backward), and
* an :class:`ActivationQuantizer` that maps a real input activation ``A`` to ``A_hat``.

Both approximations are linear combinations of binary planes (PA eq. 15 and 17, ABC eq. 1-2)::

    W_hat = sum_i alpha_i * P_i        A_hat = sum_j beta_j * Q_j

where each plane is stored as a {0,1} bit tensor and read either as {0,1}
(``Domain.ZERO_ONE``: PA's AND+popcount form, eq. 20) or as {-1,+1}
(``Domain.PLUS_MINUS_ONE``: 2*bit - 1, the XNOR+popcount form, eq. 21).
:meth:`BitPlanes.reconstruct` turns the planes back into a float tensor, and every quantizer
guarantees ``bit_planes(x).reconstruct() == forward(x)`` (to float rounding): the PyTorch
simulation, the packed runtime and the ONNX export all compute the same function.

Training never runs the M x N binary convolutions: by linearity (PA eq. 19)
``sum_ij alpha_i beta_j conv(P_i, Q_j) = conv(W_hat, A_hat)``, so one convolution on the
reconstructed tensors is exact. See :mod:`binarize_cli.quant.layers`.

A new scheme is one module that calls :func:`register_scheme`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from binarize_cli.core.errors import BadInputError, SchemeError

#: Most calibration samples a threshold / range search looks at (a deterministic stride beyond).
MAX_SEARCH_SAMPLES = 1 << 20


class Domain(enum.StrEnum):
    """How a stored bit is read: {0,1} (AND+popcount) or {-1,+1} (XNOR+popcount)."""

    ZERO_ONE = "zero_one"
    PLUS_MINUS_ONE = "plus_minus_one"


@dataclass
class BitPlanes:
    """An exact multiple-binary decomposition ``value = sum_p scales[p] * read(planes[p])``.

    Attributes:
        planes: bool tensor of shape ``[P, *value_shape]``.
        scales: float tensor of shape ``[P]`` (one scale per plane, the papers' layer-wise
            alpha/beta) or ``[P, C]`` with ``C = value_shape[0]`` (per-output-channel scales,
            XNOR-Net / Bi-Real weights).
        domain: how a bit is read, see :class:`Domain`.
    """

    planes: torch.Tensor
    scales: torch.Tensor
    domain: Domain

    @property
    def num_planes(self) -> int:
        return int(self.planes.shape[0])

    def signed_planes(self) -> torch.Tensor:
        """Planes as float values in the scheme's domain: {0,1} or {-1,+1}."""
        p = self.planes.to(self.scales.dtype)
        return p if self.domain is Domain.ZERO_ONE else 2.0 * p - 1.0

    def reconstruct(self) -> torch.Tensor:
        """``sum_p scales[p] * read(planes[p])`` as a float tensor of ``value_shape``."""
        p = self.signed_planes()
        extra = p.dim() - self.scales.dim()
        s = self.scales.reshape(*self.scales.shape, *([1] * extra))
        return (s * p).sum(dim=0)


def mean_std(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and standard deviation of all elements (no gradient).

    Two passes: the mean, then ``dot(x - mean, x - mean)`` (BLAS). On CPU this is ~7x faster
    than ``torch.std_mean``, which matters because PA and ABC recompute the statistics of
    every binarized weight at every training step. Returned in the tensor's dtype.
    """
    x = tensor.detach().reshape(-1)
    if x.numel() == 0:
        nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
        return nan, nan
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or not x.is_floating_point():
        std, mean = torch.std_mean(x.float(), correction=0)
        return mean.to(tensor.dtype), std.to(tensor.dtype)
    mean = x.mean()
    centered = x - mean
    var = torch.dot(centered, centered) / x.numel()
    return mean, var.sqrt()


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a quantizer's forward must run its surrogate-gradient ``autograd.Function``:
    grad mode is on and some input requires a gradient (else the plain forward is used)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def calibration_samples(samples: torch.Tensor) -> torch.Tensor:
    """The sampled input activations given to an activation quantizer's ``calibrate``,
    flattened and detached; :class:`BadInputError` when there are none or any is NaN/inf."""
    x = samples.detach().reshape(-1)
    if x.numel() == 0:
        raise BadInputError(
            "activation calibration got no samples; give it at least one calibration batch"
        )
    if not bool(torch.isfinite(x).all()):
        raise BadInputError(
            "activation calibration samples contain NaN or inf; check the model and the data"
        )
    return x


def search_samples(samples: torch.Tensor, limit: int) -> torch.Tensor:
    """:func:`calibration_samples` as float64 on the CPU, at most ``limit`` of them: every
    ``ceil(n / limit)``-th one when there are ``n > limit`` (a deterministic stride)."""
    x = calibration_samples(samples).to("cpu", torch.float64)
    if x.numel() > limit:
        x = x[:: -(-x.numel() // limit)]
    return x


class Quantizer(nn.Module):
    """The contract of both quantizers: ``forward(x)`` is the approximation ``x_hat`` with the
    scheme's surrogate gradient, ``bit_planes(x)`` its exact plane decomposition
    (``bit_planes(x).reconstruct() == forward(x)``), ``calibrate`` sets state from data
    (default: nothing to do) and ``num_bases`` counts the planes per value."""

    #: Number of binary planes per value (M for weights, N for activations).
    num_bases: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def bit_planes(self, x: torch.Tensor) -> BitPlanes:  # pragma: no cover - interface
        """The exact plane decomposition of ``forward(x)``."""
        raise NotImplementedError

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set any state from data (default: nothing to do)."""


class WeightQuantizer(Quantizer):
    """Maps a latent weight ``W`` (``[C_out, C_in/groups, kh, kw]``) to ``W_hat``; ``num_bases``
    is the paper's M (bits per weight).

    Quantizers that need statistics recompute them from the weight they are given; nothing
    is cached across calls unless it is a registered buffer or parameter (so it is saved
    with the model). ``calibrate(weight)`` may fix data-free state from the weight.
    """

    #: True when the quantizer's parameters are its planes' scales (TTQ's ``W_p``, ``W_n``):
    #: the accounting then counts them once, as weight scales.
    scale_parameters: bool = False


class ActivationQuantizer(Quantizer):
    """Maps a real input activation ``A`` (``[B, C, H, W]``) to ``A_hat``; ``num_bases`` is the
    paper's N (0 means full precision), ``bit_planes`` scales have shape ``[N]``.

    Trainable endpoints and levels are ``nn.Parameter`` s; they must be initialised from data
    by ``calibrate(samples)`` (a 1-D tensor of sampled input activations) before use (random
    initialisation is what sank both seed re-implementations of ABC-Net).
    """


class FullPrecisionActivation(ActivationQuantizer):
    """``N = 0``: the activation stays real-valued (the paper's "N = full precision" rows)."""

    num_bases = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def bit_planes(self, x: torch.Tensor) -> BitPlanes:
        raise SchemeError("full-precision activations have no bit planes")


@dataclass(frozen=True)
class Scheme:
    """A registered binarization scheme.

    Attributes:
        name: registry key, the CLI's ``--scheme``.
        description: one line for ``--help`` and reports.
        make_weight_quantizer: ``(M, options) -> WeightQuantizer``.
        make_activation_quantizer: ``(N, options) -> ActivationQuantizer`` for ``N >= 1``
            (``N = 0`` is handled here, giving :class:`FullPrecisionActivation`).
        default_m, default_n: defaults when ``-M``/``-N`` are not given.
        binarize_downsample: whether 1x1 downsample (shortcut) convolutions are binarized
            (PA: yes, paper 4.6.1; ABC and Bi-Real accounting keep them real-valued).
        validate: raises :class:`SchemeError` for an invalid (M, N).
        weight_domain, activation_domain: how planes are read (bitwise runtime kernel choice).
    """

    name: str
    description: str
    make_weight_quantizer: Callable[[int, dict[str, Any]], WeightQuantizer]
    make_activation_quantizer: Callable[[int, dict[str, Any]], ActivationQuantizer]
    default_m: int
    default_n: int
    binarize_downsample: bool
    weight_domain: Domain
    activation_domain: Domain
    validate: Callable[[int, int], None] = field(default=lambda m, n: None)

    def check(self, m: int, n: int) -> None:
        """Validate (M, N) for this scheme; raises :class:`SchemeError`."""
        if m < 1:
            raise SchemeError(f"-M must be >= 1 (got {m}): it is the number of weight bases")
        if n < 0:
            raise SchemeError(
                f"-N must be >= 0 (got {n}): it is the number of activation bases, 0 = full precision"
            )
        self.validate(m, n)

    def weight_quantizer(self, m: int, options: dict[str, Any] | None = None) -> WeightQuantizer:
        return self.make_weight_quantizer(m, dict(options or {}))

    def activation_quantizer(
        self, n: int, options: dict[str, Any] | None = None
    ) -> ActivationQuantizer:
        if n == 0:
            return FullPrecisionActivation()
        return self.make_activation_quantizer(n, dict(options or {}))


_REGISTRY: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Add a scheme to the registry (one call per scheme module)."""
    if scheme.name in _REGISTRY:
        raise ValueError(f"scheme {scheme.name!r} registered twice")
    _REGISTRY[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    """Look a scheme up by name; an unknown name is a :class:`SchemeError` listing the known."""
    _load_builtin_schemes()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise SchemeError(f"unknown scheme {name!r}; choose one of: {known}") from None


def available_schemes() -> list[str]:
    _load_builtin_schemes()
    return sorted(_REGISTRY)


def _load_builtin_schemes() -> None:
    # Importing the package registers every built-in scheme module.
    import binarize_cli.quant  # noqa: F401
