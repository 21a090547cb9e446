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
import threading
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
    centered = torch.sub(x, mean, out=scratch(x, "centered"))  # out=None: a fresh tensor
    var = torch.dot(centered, centered) / x.numel()
    return mean, var.sqrt()


def exporting() -> bool:
    """Under ONNX export, tracing or ``torch.compile``: the quantizers use functional ops
    (no ``out=`` buffers, no ``bincount``) that export and trace without graph breaks."""
    return bool(
        torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()
    )


class _Scratch(threading.local):
    """Per-thread reusable buffers for the quantizers' full-size temporaries (CPU only)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}


_SCRATCH = _Scratch()


def scratch(like: torch.Tensor, slot: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A flat tensor of ``like.numel()`` elements for a temporary that dies before the
    quantizer returns, or None off the eager CPU path (then allocate as usual).

    On the CPU it is a view of a per-thread buffer kept per ``slot`` and dtype and grown to
    the largest size asked: a fresh large tensor costs a page fault per 4 KiB (glibc hands
    big blocks back to the system on free), which made the quantizers' full-size temporaries
    cost more than their arithmetic.  The next call with the same slot overwrites it, so
    nothing that outlives the call (an output, a tensor saved for backward) may live there.
    CUDA's caching allocator needs no such help; export and compile want functional ops.
    """
    if like.device.type != "cpu" or exporting():
        return None
    dtype = like.dtype if dtype is None else dtype
    n = like.numel()
    key = (slot, dtype)
    buf = _SCRATCH.buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buffers[key] = torch.empty(n, dtype=dtype)
    return buf[:n]


def _buffer(like: torch.Tensor, slot: str) -> torch.Tensor:
    """A :func:`scratch` buffer shaped like ``like`` (flat), or a fresh one."""
    buf = scratch(like, slot)
    return torch.empty_like(like.reshape(-1)) if buf is None else buf


def converted(src: torch.Tensor, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """``src`` flattened and cast to ``dtype``, in a :func:`scratch` buffer when there is one."""
    flat = src.reshape(-1)
    buf = scratch(flat, slot, dtype)
    return flat.to(dtype) if buf is None else buf.copy_(flat)


@dataclass
class ThresholdScan:
    """What :func:`threshold_scan` returns.

    Attributes:
        index: ``#{bounds <= x}`` per element, flat, as floats (the integers 0..K exactly);
            on the CPU it lives in a :func:`scratch` buffer that the next scan overwrites.
        counts: float64 ``[S + 1]`` for ``S = len(stats)``: how many elements lie in each
            piece cut by the ``stats`` bounds (below the first, between consecutive ones, at
            or above the last); empty when no ``stats``.
        sums: float64 ``[S + 1]``: the sum of ``values`` over each of those pieces.
    """

    index: torch.Tensor
    counts: torch.Tensor
    sums: torch.Tensor

    def int_index(self) -> torch.Tensor:
        """``index`` as flat int32 (what ``index_select`` takes), in a :func:`scratch` buffer."""
        return converted(self.index, torch.int32, "int_index")


#: Elements per chunk of the CPU scan: its index, mask and input stay in cache across the
#: bounds (halves the scan's time on a large activation; one chunk up to this size).
_SCAN_CHUNK = 1 << 17


_Scan = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]


def _scan_functional(
    flat: torch.Tensor, vals: torch.Tensor, b: torch.Tensor, wanted: list[int]
) -> _Scan:
    """:func:`threshold_scan`'s index and its ``>= bound`` counts and sums (one chunk),
    functional ops only."""
    index = flat.new_zeros(flat.shape)
    counts, sums = [], []
    for k in range(b.shape[0]):
        mask = (flat >= b[k]).to(flat.dtype)
        index = index + mask
        if k in wanted:
            counts.append(mask.sum(dtype=torch.float64))
            sums.append((mask * vals).sum())
    return index, counts, sums


def _scan_in_buffers(
    flat: torch.Tensor, vals: torch.Tensor, b: torch.Tensor, wanted: list[int]
) -> _Scan:
    """The same, eager: comparisons written into reused buffers, chunk by chunk on the CPU
    (every bound over a cache-sized chunk, then the next chunk); counts and sums per chunk
    (a chunk's float count is exact)."""
    index = _buffer(flat, "scan_index")
    mask = _buffer(flat, "scan_mask")
    n = flat.numel()
    chunk = _SCAN_CHUNK if flat.device.type == "cpu" else max(n, 1)
    counts, sums = [], []
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        xc, ic, mc, vc = flat[part], index[part], mask[part], vals[part]
        for k in range(b.shape[0]):
            m = torch.ge(xc, b[k], out=ic if k == 0 else mc)  # the first mask is the index
            if k:
                ic.add_(m)
            if k in wanted:
                counts.append(m.sum())
                sums.append(torch.dot(m, vc))
    return index, counts, sums


def threshold_scan(
    x: torch.Tensor,
    bounds: torch.Tensor,
    *,
    stats: range | tuple[int, ...] = (),
    values: torch.Tensor | None = None,
) -> ThresholdScan:
    """Piece index of every element and per-bound statistics, one pass per bound (no grad).

    ``index = #{k : bounds[k] <= x}`` (``bounds`` sorted, 1-D; NaN counts 0), compared in
    ``x``'s dtype as :func:`binarize_cli.quant.pa.piece_index` does (bounds rounded to a
    half-precision ``x``'s dtype first).  For every position ``k`` in ``stats``: the count of
    elements with ``x >= bounds[k]`` and the sum of ``values`` (default ``x``, same shape)
    over them; their differences are the counts and sums per piece.

    Why this form: on CPU a comparison that writes float 0/1 into a reused buffer is several
    times faster than one that allocates bool, the per-bound sums are one BLAS ``dot`` and
    one ``sum`` on the mask just written (no ``bincount``, which scans serially), and the
    float index converts to int32 in one pass.  Under export/compile (:func:`exporting`) the
    same math runs on functional ops.
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    b = bounds.detach().to(torch.promote_types(x.dtype, bounds.dtype))
    if dtype != x.dtype:  # compare as x's dtype would, on float32 copies
        b = b.to(x.dtype)
    b = b.to(dtype)
    flat = x.detach().reshape(-1).to(dtype)
    vals = flat if values is None else values.detach().reshape(-1).to(dtype)
    wanted = [k for k in range(b.shape[0]) if k in set(stats)]
    if exporting() or b.shape[0] == 0:
        index, counts, sums = _scan_functional(flat, vals, b, wanted)
    else:
        index, counts, sums = _scan_in_buffers(flat, vals, b, wanted)
    as64 = torch.float64
    if not wanted:
        empty = flat.new_zeros(0, dtype=as64)
        return ThresholdScan(index=index, counts=empty, sums=empty)
    per_chunk = (-1, len(wanted))
    total = flat.new_full((1,), float(flat.numel()), dtype=as64)
    zero = flat.new_zeros(1, dtype=as64)
    ge_counts = torch.stack(counts).to(as64).reshape(per_chunk).sum(0)
    ge_sums = torch.stack(sums).reshape(per_chunk).sum(0).to(as64)
    ge_counts = torch.cat([total, ge_counts, zero])
    ge_sums = torch.cat([vals.sum().reshape(1).to(as64), ge_sums, zero])
    return ThresholdScan(
        index=index,
        counts=ge_counts[:-1] - ge_counts[1:],
        sums=ge_sums[:-1] - ge_sums[1:],
    )


def take(
    table: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``table[index]`` (times ``scale`` when given) for an integer ``index``, shaped like
    ``scale`` (else flat).

    ``index_select`` with int32 indices is the fastest gather on the CPU; a uint8 index is
    widened in a :func:`scratch` buffer, and with ``scale`` the gathered values go to one too,
    so the only fresh tensor is the result.
    """
    flat = index.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = converted(flat, torch.int32, "take_index")
    if scale is None:
        return torch.index_select(table, 0, flat)
    # with grad mode on (a double backward) the product would keep ``picked``: no scratch
    buf = None if torch.is_grad_enabled() else scratch(flat, "take_values", table.dtype)
    picked = torch.index_select(table, 0, flat, out=buf)
    return scale * picked.reshape(scale.shape)


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
        make_gate: ``(in_channels, out_channels, options) -> nn.Module`` for a scheme whose
            binarized convolution rescales its output channel-wise from its real input
            (Real-to-Bin's gating branch, :mod:`binarize_cli.quant.realtobin`); ``None``
            (every other scheme): no gate.
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
    make_gate: Callable[[int, int, dict[str, Any]], nn.Module] | None = None

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
