"""Per-layer and whole-model cost accounting (Larq-style ``LayerProfile`` / ``ModelProfile``).

The rules are the PA-Net paper's (seed 002, section 4.6.1, Table 7); ``docs/accounting.md``
gives the arithmetic against the paper's numbers. In short, for every layer:

Memory (bits)::

    bits = 32 * params_real + params_binary

* ``params_binary`` is the number of stored *binary values*: a binarized convolution's latent
  weight ``W`` is stored as M bit-planes (PA eq. 15, ABC eq. 1), so it contributes
  ``M * W.numel()`` binary values (DoReFa's M-bit codes too);
* ``params_real`` counts 32-bit values: every other ``nn.Parameter`` (biases, batch-norm
  affine parameters, unbinarized layers, the activation quantizers' trainable endpoints and
  levels ``v``/``beta``), plus the per-plane weight scales ``alpha`` of a multiple-binary
  layer (M per layer, or M x C_out for per-channel schemes). The scales are computed from the
  latent weights in training, but an exported model must store them.
  Exception: a *single-plane* weight (M = 1: BNN, XNOR-Net, Bi-Real) has at most one scale
  per output channel, a per-channel linear factor that folds exactly into the following
  per-channel affine (batch norm or bias; Larq Compute Engine's fused output transform does
  this), so it is not counted (the Bi-Real paper and PA's Table 7 do not count it either);
* buffers (batch-norm running statistics, the quantizers' fixed constants) are not counted:
  at inference they fold into the affine parameters already counted (the paper's 374.1 Mbit
  for ResNet18 is exactly 11,689,512 parameters x 32).

The full-precision counterpart of a layer has ``fp_bits = 32 * fp_params``, ``fp_params`` being
its parameters before surgery (the quantizers' parameters do not exist there).

Operations::

    macs   multiply-accumulates of the layer's convolution / matrix product
    bops   = M * N * macs                 (binarized layer, N >= 1; PA eq. 19-20: M x N
                                           AND/XNOR + popcount convolutions)
    real_macs = macs - (macs if bops else 0)
    flops  = real_macs + bops / 64        (64-bit words: "bitwise AND and popcount in
                                           parallelism of 64", section 4.6.1)

* FLOPs count multiply-accumulates of convolutions and linear layers only: batch norm,
  activations, residual additions and pooling are not counted. This is the convention behind
  the paper's 1.81e9 for ResNet18 (exactly its 1,814,073,344 conv + fc MACs at 224x224).
* A binarized convolution with ``N = 0`` (binary weights, real activations; the paper's
  "N = full precision" rows) has no bitwise operations: it runs as one real convolution with
  the reconstructed ``W_hat``, so ``bops = 0`` and ``flops = macs``. Only its memory shrinks.
* A gated binarized convolution (``realtobin``: Real-to-Bin's data-driven channel
  re-scaling, :mod:`binarize_cli.quant.realtobin`) gets a second row, ``<layer>.gate`` of
  kind ``gate``: full precision, its two weight matrices as ``params_real`` (32 bits each),
  its two matrix products as ``macs`` (real FLOPs); the global average pool, sigmoid and
  channel product are not counted (as batch norm and activations are not). The gate does not
  exist in the full-precision model: ``fp_params = 0`` and ``fp_flops = 0`` on its row. The
  binarized convolution's own row is counted as ``xnor``'s.
* The scaling work of a multiple-binary layer (M x N multiply-adds of ``alpha_i beta_j`` per
  output, N comparisons per input) is not counted, as in the paper's stated rule.

Operations are measured, not derived from per-architecture formulas: :func:`profile_model`
runs one forward pass with forward hooks on every convolution and linear layer (input and
output shapes give the MACs), and a :class:`torch.utils.flop_counter.FlopCounterMode` around
it catches any matrix products done outside such modules (reported in an ``(other ops)`` row,
so the totals stay complete).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from binarize_cli.core.modes import evaluating
from binarize_cli.quant.layers import BinarizedConv2d, layer_macs
from binarize_cli.quant.realtobin import ChannelGate

#: Bits per real-valued stored value (float32).
REAL_BITS = 32
#: Bitwise operations per FLOP: a 64-bit word processes 64 binary values at once (paper 4.6.1).
BITS_PER_WORD = 64
#: Name of the synthetic row holding matrix products done outside conv/linear modules.
OTHER_OPS_ROW = "(other ops)"
#: Kind of a gated convolution's gate row (layers a scheme adds: not in the full-precision model).
GATE_KIND = "gate"


def contract_dict(row: Any) -> dict[str, Any]:
    """``dataclasses.asdict(row)`` with the fields ``m`` and ``n`` spelled ``M`` and ``N`` (the
    JSON contract's names), moved to the end."""
    d = asdict(row)
    d["M"] = d.pop("m")
    d["N"] = d.pop("n")
    return d


#: The computed columns of a layer row, appended to its dict in this order.
_DERIVED = ("precision", "bits", "fp_bits", "real_macs", "flops", "fp_flops")


@dataclass
class LayerProfile:
    """One row of the per-layer table: a module that stores parameters or multiplies.

    Attributes:
        name: qualified module name (``layer2.0.conv1``).
        module: the module's class name (``BinarizedConv2d``, ``BatchNorm2d``, ...).
        kind: the surgery decision's layer kind when known (``conv``, ``downsample``,
            ``first_conv``, ``classifier``, ...), else a kind derived from the class.
        input_shape, output_shape: per-sample shapes of the first call (no batch dim), or
            ``None`` when the module did not run in the profiling pass.
        binarized: whether the layer is a :class:`~binarize_cli.quant.layers.BinarizedConv2d`.
        reason: why it is binarized or kept full precision.
        scheme, m, n: the binarized layer's scheme and bases (``None`` when full precision).
        params_real: 32-bit stored values (see the module docstring).
        params_binary: binary stored values, ``M * weight.numel()``.
        scales: weight scales counted in ``params_real`` (0 for single-plane weights).
        fp_params: parameters of the full-precision layer.
        macs: multiply-accumulates per sample.
        bops: binary operations per sample, ``M * N * macs`` (0 when N = 0 or FP).
        weight_error, activation_error: relative approximation errors (run reports only).
        sensitivity: the run's measured candidates for this layer (``M``, ``N``,
            ``output_error``, ``loss_increase``, ``bits``, ``bops``; docs/sensitivity.md),
            when the run measured them; ``sensitivity_error``: the output error at the
            layer's own bases (full precision: 0).
    """

    name: str
    module: str
    kind: str
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    binarized: bool = False
    reason: str = "full precision"
    scheme: str | None = None
    m: int | None = None
    n: int | None = None
    params_real: int = 0
    params_binary: int = 0
    scales: int = 0
    fp_params: int = 0
    macs: int = 0
    bops: int = 0
    weight_error: float | None = None
    activation_error: float | None = None
    sensitivity: list[dict[str, Any]] | None = None
    sensitivity_error: float | None = None

    @property
    def precision(self) -> str:
        """``binary`` or ``fp`` (the table's precision column)."""
        return "binary" if self.binarized else "fp"

    @property
    def bits(self) -> int:
        """Stored bits: ``32 * params_real + params_binary``."""
        return REAL_BITS * self.params_real + self.params_binary

    @property
    def fp_bits(self) -> int:
        """Bits of the full-precision layer: ``32 * fp_params``."""
        return REAL_BITS * self.fp_params

    @property
    def real_macs(self) -> int:
        """MACs done in floating point (all of them unless the layer runs bitwise)."""
        return 0 if self.bops else self.macs

    @property
    def flops(self) -> float:
        """``real_macs + bops / 64`` (exact in float64: a dyadic rational below 2**53)."""
        return float(self.real_macs) + self.bops / BITS_PER_WORD

    @property
    def fp_flops(self) -> int:
        """FLOPs of the full-precision layer: its MACs (0 for a gate row, which the
        full-precision model does not have)."""
        return 0 if self.kind == GATE_KIND else self.macs

    def to_dict(self) -> dict[str, Any]:
        d = contract_dict(self)
        for key in ("input_shape", "output_shape"):
            if d[key] is not None:
                d[key] = list(d[key])
        d.update((key, getattr(self, key)) for key in _DERIVED)
        return d


#: The totals of :meth:`ModelProfile.totals`, in this order (then ``params``).
_TOTALS = (
    "memory_bits",
    "fp_memory_bits",
    "memory_saving",
    "flops",
    "fp_flops",
    "speedup",
    "bops",
    "macs",
)


class _Total:
    """A read-only :class:`ModelProfile` attribute: the sum of one :class:`LayerProfile`
    attribute over the rows (``sum`` in row order, so float totals are reproducible)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, profile: ModelProfile | None, owner: type | None = None) -> Any:
        if profile is None:
            return self
        return sum(getattr(row, self.attr) for row in profile.layers)


@dataclass
class ModelProfile:
    """All rows of one model plus the totals the report prints (sums of the rows).

    ``memory_saving = fp_memory_bits / memory_bits`` and ``speedup = fp_flops / flops`` are
    the paper's Table 7 ratios.
    """

    layers: list[LayerProfile]
    input_size: tuple[int, ...]
    model: str | None = None
    scheme: str | None = None
    m: int | None = None
    n: int | None = None
    warnings: list[str] = field(default_factory=list)

    memory_bits = _Total("bits")
    fp_memory_bits = _Total("fp_bits")
    flops = _Total("flops")
    fp_flops = _Total("fp_flops")
    bops = _Total("bops")
    macs = _Total("macs")
    params_real = _Total("params_real")
    params_binary = _Total("params_binary")

    @property
    def memory_saving(self) -> float:
        return self.fp_memory_bits / self.memory_bits if self.memory_bits else math.nan

    @property
    def speedup(self) -> float:
        return self.fp_flops / self.flops if self.flops else math.nan

    @property
    def binarized_layers(self) -> list[LayerProfile]:
        return [r for r in self.layers if r.binarized]

    def layer(self, name: str) -> LayerProfile:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def totals(self) -> dict[str, Any]:
        """The BRIEF section 2 keys, without ``layers``."""
        out: dict[str, Any] = {key: getattr(self, key) for key in _TOTALS}
        out["params"] = {"real": self.params_real, "binary": self.params_binary}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "scheme": self.scheme,
            "M": self.m,
            "N": self.n,
            "input_size": list(self.input_size),
            **self.totals(),
            "layers": [r.to_dict() for r in self.layers],
        }


# --------------------------------------------------------------------------------------
# Profiling


def _kind_of(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        if module.groups > 1:
            return "grouped"
        if all(k == 1 for k in module.kernel_size):
            return "pointwise"
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return "norm"
    if isinstance(module, nn.GroupNorm | nn.LayerNorm):
        return "norm"
    return "other"


def _plain_conv_forward(layer: BinarizedConv2d):  # noqa: ANN202
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(
            x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
        )
        return y if layer.gate is None else y * layer.gate(x)

    return forward


@contextlib.contextmanager
def _plain_binarized_convs(model: nn.Module) -> Iterator[None]:
    """Run binarized convolutions as plain convolutions (same shapes and MACs; a channel gate
    runs as it is), so profiling needs neither calibrated quantizers nor their cost."""
    patched = [m for m in model.modules() if isinstance(m, BinarizedConv2d)]
    for m in patched:
        m.forward = _plain_conv_forward(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _row_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that get a row: binarized convs (owning their quantizers' parameters) and
    their channel gates (``<conv>.gate``), and any other module holding parameters of its
    own or doing a conv / linear product."""
    rows: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, BinarizedConv2d):
            rows.append((name, module))
            inside.append(name)
            if module.gate is not None:
                rows.append((f"{name}.gate", module.gate))
            continue
        own = any(True for _ in module.parameters(recurse=False))
        if own or isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            rows.append((name, module))
    return rows


def _decision_fields(decision: Any) -> tuple[str | None, str | None]:
    if decision is None:
        return None, None
    if isinstance(decision, Mapping):
        return decision.get("kind"), decision.get("reason")
    return getattr(decision, "kind", None), getattr(decision, "reason", None)


def _measure(
    model: nn.Module, rows: list[tuple[str, nn.Module]], input_size: tuple[int, ...]
) -> tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...]]], dict[str, int], int]:
    """One eval-mode forward on a zero input ``[1, *input_size]`` (binarized convolutions run
    plain): per row the per-sample ``(input, output)`` shapes of its first call and its MACs
    over all calls, and the total MACs :class:`FlopCounterMode` saw (its FLOPs / 2)."""
    row_of = {id(m): name for name, m in rows}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    macs: dict[str, int] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        name = row_of[id(module)]
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if not isinstance(out, torch.Tensor):
            return
        if name not in shapes and inp is not None:
            shapes[name] = (tuple(inp.shape[1:]), tuple(out.shape[1:]))
        if inp is not None:
            calls = (
                module.macs() if isinstance(module, ChannelGate) else layer_macs(module, inp, out)
            )
            macs[name] = macs.get(name, 0) + calls

    handles = [m.register_forward_hook(hook) for _, m in rows]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    counter = FlopCounterMode(display=False)
    with evaluating(model, hooks=handles), _plain_binarized_convs(model), counter:
        model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    return shapes, macs, counter.get_total_flops() // 2  # a MAC is 2 FLOPs


def _count_binarized(row: LayerProfile, module: BinarizedConv2d, reason: str | None) -> None:
    """Fill ``row``'s binarized fields: M binary values per weight; bias, the quantizers'
    parameters and the weight scales as real values (see the module docstring;
    :meth:`BinarizedConv2d.stored_values` holds the rule, which the allocation of
    ``--policy auto`` counts with too)."""
    m, n = module.weight_bases, module.activation_bases
    bias = module.bias.numel() if module.bias is not None else 0
    row.binarized = True
    row.reason = reason or "binarized"
    row.scheme, row.m, row.n = module.scheme_name, m, n
    row.scales = module.weight_scale_count()
    row.params_real, row.params_binary = module.stored_values()
    row.fp_params = module.weight.numel() + bias
    row.bops = m * n * row.macs


def profile_model(
    model: nn.Module,
    input_size: tuple[int, ...] = (3, 224, 224),
    *,
    decisions: Mapping[str, Any] | None = None,
    model_name: str | None = None,
) -> ModelProfile:
    """Profile ``model`` with one forward pass on a zero input of shape ``[1, *input_size]``.

    Args:
        model: any ``nn.Module``; :class:`BinarizedConv2d` layers are counted as binarized
            (M, N and the scheme read from the layer). The model's train/eval mode and
            parameters are left as they were.
        input_size: per-sample input shape, e.g. ``(3, 224, 224)``.
        decisions: optional ``name -> decision`` (surgery's ``LayerDecision`` or a mapping
            with ``kind`` and ``reason``) for the table's kind and reason columns.
        model_name: recorded in the profile.

    Returns:
        A :class:`ModelProfile` whose totals are sums of its rows.
    """
    decisions = dict(decisions or {})
    rows = _row_modules(model)
    shapes, macs, counted = _measure(model, rows, input_size)
    layers: list[LayerProfile] = []
    schemes: set[tuple[str, int, int]] = set()
    for name, module in rows:
        kind, reason = _decision_fields(decisions.get(name))
        in_shape, out_shape = shapes.get(name, (None, None))
        row = LayerProfile(
            name=name,
            module=type(module).__name__,
            kind=kind or _kind_of(module),
            input_shape=in_shape,
            output_shape=out_shape,
            macs=macs.get(name, 0),
        )
        if isinstance(module, BinarizedConv2d):
            schemes.add((module.scheme_name, module.weight_bases, module.activation_bases))
            _count_binarized(row, module, reason)
        elif isinstance(module, ChannelGate):
            row.kind = GATE_KIND
            row.reason = "channel gate (full precision)"
            row.params_real = sum(p.numel() for p in module.parameters())
        else:
            own = sum(p.numel() for p in module.parameters(recurse=False))
            row.reason = reason or "full precision"
            row.params_real = own
            row.fp_params = own
        layers.append(row)

    warnings: list[str] = []
    measured = sum(r.macs for r in layers)
    if counted > measured:
        layers.append(
            LayerProfile(
                name=OTHER_OPS_ROW,
                module="functional",
                kind="other",
                reason="matrix products outside conv/linear modules",
                macs=int(counted - measured),
            )
        )
        warnings.append(
            f"{counted - measured} MACs ran outside conv/linear modules; counted as real FLOPs"
        )
    scheme = m_val = n_val = None
    if len(schemes) == 1:
        scheme, m_val, n_val = next(iter(schemes))
    return ModelProfile(
        layers=layers,
        input_size=tuple(input_size),
        model=model_name,
        scheme=scheme,
        m=m_val,
        n=n_val,
        warnings=warnings,
    )
