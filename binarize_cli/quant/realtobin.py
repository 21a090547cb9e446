"""Real-to-Bin: XNOR-style sign weights and activations plus a data-driven channel gate.

Martinez, Yang, Bulat & Tzimiropoulos, "Training binary neural networks with real-to-binary
convolutions" (ICLR 2020, arXiv 2003.11535), presented in seed 004's lecture. Docs:
docs/schemes-abc-baselines.md, section "Real-to-Bin". This module is the layer (section 4.3
of the paper, the "data-driven channel re-scaling"); the attention-matching loss and the
progressive teacher-student recipe are the fine-tuning side (``--distill``).

**Forward** (paper eq. 5)::

    A * W  ~=  (sign(A - t) (x) sign(W)) . alpha . G(A; W_G)

* ``sign(W)`` with the XNOR-Net scale ``alpha_c = mean|W_c|`` per output channel, and
  ``sign(A - t)`` with the calibrated threshold ``t``: the ``bireal`` quantizers of
  :mod:`binarize_cli.quant.single` (:class:`SignWeightQuantizer` ``scaled=True``,
  :class:`SignActivationQuantizer` ``backward="approx"``), reused as they are. ``alpha`` is
  analytic (recomputed from the latent weight at every forward), not a trained parameter.
* ``G`` is the gating branch (:class:`ChannelGate`), computed from the layer's *real-valued*
  input ``A`` (the tensor the activation quantizer receives, before its sign)::

      z = mean_{h,w} A                       [B, C_in]     global average pool
      u = ReLU(W_1 z)                        [B, C_in / r] W_1: [C_in / r, C_in]
      G = 2 sigmoid(W_2 u)                   [B, C_out]    W_2: [C_out, C_in / r]

  and multiplies the binary convolution's output channel-wise (``[B, C_out, 1, 1]``
  broadcast over the positions). ``r = 8`` (:data:`GATE_REDUCTION`, the value of the
  authors' reference implementation in Larq Zoo, ``scaling_r = 8``); the hidden width is
  ``max(1, C_in // r)``. Like the reference, both linear maps have no bias.
* The factor 2 (:data:`GATE_GAIN`): the paper's gate is a plain sigmoid, a factor in (0, 1)
  next to a learned scale. We post-convert a trained network, and the converted layer must
  start out computing what the ``xnor``/``bireal`` layer computes (the calibrated model must
  not lose accuracy to an untrained gate). With ``W_2 = 0`` at conversion,
  ``2 sigmoid(0) = 1`` exactly, so ``alpha . G = alpha`` for every input; the gate then
  learns to amplify or attenuate a channel in (0, 2) around 1 (the constant 2 is a
  reparametrisation of the paper's learned scale). ``W_1`` starts He-normal
  (``kaiming_normal_``, fan-in, as the reference's ``he_normal``) so that ``u != 0`` and
  ``W_2`` receives a gradient from the first step.
* The bias, when the converted convolution has one, is scaled by ``G`` too
  (``conv(A_hat, W_hat, b) . G``; ResNet-style convolutions have none).

**Backward.** Weights: the clipped identity STE ``1[|W| <= 1]`` of ``xnor``/``bireal``
(``alpha`` carries no gradient of its own). Activations: ``dL/dA`` is the sum of the
ApproxSign surrogate through the sign, ``dL/dA_hat * max(0, 2 - 2|A - t|)``, and the exact
gradient through the gate (``G`` is an ordinary differentiable function of ``A``). The gate's
parameters get exact gradients (autograd).

**Options.** None (scheme options are ignored, as for the other sign schemes).

**Layers.** As ``bireal``: ``M = 1``, ``N`` in {0, 1} (``-N 0`` keeps the activations real,
the gate stays), the 1x1 downsample convolutions stay real-valued (the reference's shortcut
is a full-precision convolution), and grouped/depthwise convolutions are gated like any
other (the gate's linear maps see all ``C_in`` and produce all ``C_out`` channels).

**Export.** The gate is ``mean``, ``linear``, ``relu``, ``linear``, ``sigmoid``, ``mul`` (by
2), ``reshape`` and ``mul`` in the packed graph (ops of the table; docs/format.md) and the
same operators in ONNX; its parameters are stored as float32 and counted as real memory, its
two matrix products as full-precision MACs (docs/accounting.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.quant.base import (
    ActivationQuantizer,
    Domain,
    Scheme,
    WeightQuantizer,
    register_scheme,
)
from binarize_cli.quant.single import (
    SignActivationQuantizer,
    SignWeightQuantizer,
    single_validator,
)

__all__ = [
    "GATE_GAIN",
    "GATE_REDUCTION",
    "REALTOBIN_SCHEME",
    "ChannelGate",
    "gate_hidden",
]

#: The gate's reduction ratio ``r``: hidden width ``C_in // r`` (the reference's ``scaling_r``).
GATE_REDUCTION = 8
#: ``G = GATE_GAIN * sigmoid(.)``: 2 makes the zero-initialised gate exactly 1.
GATE_GAIN = 2.0

_validate = single_validator("realtobin")


def gate_hidden(in_channels: int, reduction: int = GATE_REDUCTION) -> int:
    """The gate's hidden width ``max(1, in_channels // reduction)``."""
    return max(1, in_channels // reduction)


class ChannelGate(nn.Module):
    """Real-to-Bin's data-driven channel re-scaling ``G(A; W_G)`` (module doc).

    ``forward(A)`` maps a real input ``[B, C_in, H, W]`` to ``2 sigmoid(W_2 ReLU(W_1
    mean_hw A))`` shaped ``[B, C_out, 1, 1]``. Parameters ``reduce_weight`` (``W_1``,
    ``[hidden, C_in]``, He-normal) and ``expand_weight`` (``W_2``, ``[C_out, hidden]``, zero:
    the gate starts at exactly 1).
    """

    def __init__(self, in_channels: int, out_channels: int, *, reduction: int = GATE_REDUCTION):
        super().__init__()
        if in_channels < 1 or out_channels < 1 or reduction < 1:
            raise ValueError(
                f"a channel gate needs positive sizes (got {in_channels} -> {out_channels}, "
                f"r = {reduction})"
            )
        hidden = gate_hidden(in_channels, reduction)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.reduce_weight = nn.Parameter(torch.empty(hidden, in_channels))
        self.expand_weight = nn.Parameter(torch.zeros(out_channels, hidden))
        nn.init.kaiming_normal_(self.reduce_weight, nonlinearity="relu")

    @property
    def hidden(self) -> int:
        return int(self.reduce_weight.shape[0])

    def macs(self) -> int:
        """Multiply-accumulates per sample of one call: the two linear maps."""
        return self.hidden * (self.in_channels + self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=(2, 3))
        u = F.relu(F.linear(z, self.reduce_weight))
        g = GATE_GAIN * torch.sigmoid(F.linear(u, self.expand_weight))
        return g.unsqueeze(-1).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.hidden} -> {self.out_channels}"


def _make_weight_quantizer(m: int, options: dict[str, Any]) -> WeightQuantizer:
    _validate(m, 1)
    return SignWeightQuantizer(scaled=True)


def _make_activation_quantizer(n: int, options: dict[str, Any]) -> ActivationQuantizer:
    _validate(1, n)
    return SignActivationQuantizer(backward="approx")


def _make_gate(in_channels: int, out_channels: int, options: dict[str, Any]) -> nn.Module:
    return ChannelGate(in_channels, out_channels)


REALTOBIN_SCHEME = register_scheme(
    Scheme(
        name="realtobin",
        description="Real-to-Bin: Bi-Real's sign weights x per-channel mean|W| and sign "
        "activations, output re-scaled channel-wise by a gate on the real input",
        make_weight_quantizer=_make_weight_quantizer,
        make_activation_quantizer=_make_activation_quantizer,
        default_m=1,
        default_n=1,
        binarize_downsample=False,
        weight_domain=Domain.PLUS_MINUS_ONE,
        activation_domain=Domain.PLUS_MINUS_ONE,
        validate=_validate,
        make_gate=_make_gate,
    )
)
