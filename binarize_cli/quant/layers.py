"""The binarized convolution module that graph surgery puts in place of ``nn.Conv2d``.

Forward (PA eq. 19, ABC eq. 3): with ``W_hat = sum_i alpha_i P_i`` and
``A_hat = sum_j beta_j Q_j``,

    conv(W, A) ~= sum_ij alpha_i beta_j conv(P_i, Q_j) = conv(W_hat, A_hat)

so training runs ONE convolution on the reconstructed tensors plus cheap element-wise
quantizer ops, never the M x N binary convolutions (the seed implementations' ~10x cost).
The bitwise form is what :mod:`binarize_cli.runtime` executes at inference; it computes the
same numbers (tests prove it).

Zero padding is applied to ``A_hat`` after the activation approximation, i.e. padded
positions hold the real value 0: exact in the {0,1} domain (all planes 0), and corrected
explicitly by the runtime in the {-1,+1} domain.

A scheme with a channel gate (Real-to-Bin, :mod:`binarize_cli.quant.realtobin`) gives the
layer a ``gate`` submodule that maps the layer's *real* input ``A`` (before the activation
quantizer) to per-sample, per-output-channel factors ``G(A)`` of shape ``[B, C_out, 1, 1]``;
the layer's output is then ``conv(A_hat, W_hat, bias) * G(A)`` (the bias, when the layer has
one, is scaled too). Without a gate (every other scheme) ``gate`` is ``None``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.quant.base import ActivationQuantizer, Scheme, WeightQuantizer


class BinarizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight and input pass through a scheme's quantizers.

    Keeps the latent real-valued ``weight`` (and ``bias``) as parameters; the quantizers own
    the scheme's trainable endpoints/levels. ``scheme_name``, ``weight_bases`` (M) and
    ``activation_bases`` (N) are recorded for reports and export. ``gate`` is the scheme's
    channel gate (module doc) or ``None``.
    """

    #: Whether the forward pass applies the weight / the activation quantizer; ``False``
    #: bypasses it (the latent weight, the real input), as the first stages of the
    #: progressive teacher-student schedule need (:mod:`binarize_cli.convert.progressive`).
    #: Plain attributes (set per layer), not saved state.
    quantize_weights: bool = True
    quantize_activations: bool = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        weight_quantizer: WeightQuantizer,
        activation_quantizer: ActivationQuantizer,
        scheme_name: str,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        gate: nn.Module | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )
        self.weight_quantizer = weight_quantizer
        self.activation_quantizer = activation_quantizer
        self.scheme_name = scheme_name
        self.gate = gate

    @property
    def weight_bases(self) -> int:
        return int(self.weight_quantizer.num_bases)

    @property
    def activation_bases(self) -> int:
        return int(self.activation_quantizer.num_bases)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        scheme: Scheme,
        m: int,
        n: int,
        options: dict[str, Any] | None = None,
    ) -> BinarizedConv2d:
        """Build from an existing convolution, copying its weight and bias (timm's swap habit)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported")
        opts = dict(options or {})
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            weight_quantizer=scheme.weight_quantizer(m, opts),
            activation_quantizer=scheme.activation_quantizer(n, opts),
            scheme_name=scheme.name,
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            gate=(
                scheme.make_gate(conv.in_channels, conv.out_channels, opts)
                if scheme.make_gate is not None
                else None
            ),
        )
        new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight_quantizer.calibrate(new.weight.detach())
        new.train(conv.training)
        return new

    def quantized_weight(self) -> torch.Tensor:
        """``W_hat``: the approximated weight (differentiable); the latent weight itself
        while ``quantize_weights`` is off."""
        return self.weight_quantizer(self.weight) if self.quantize_weights else self.weight

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``A_hat``: the approximated input (differentiable); ``x`` itself while
        ``quantize_activations`` is off."""
        return self.activation_quantizer(x) if self.quantize_activations else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # Mixed precision (convert --amp): the quantizers see float32 and keep float32
            # thresholds and scales; only the convolution below runs in the reduced type.
            with torch.autocast(x.device.type, enabled=False):
                x_hat = self.quantized_input(x.to(self.weight.dtype))
                w_hat = self.quantized_weight()
        else:
            x_hat = self.quantized_input(x)
            w_hat = self.quantized_weight()
        y = F.conv2d(x_hat, w_hat, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y if self.gate is None else y * self.gate(x)

    def weight_scale_count(self) -> int:
        """Weight scales an export must store: ``alpha``'s size (M per layer, or M x C_out for
        per-channel schemes); 0 for a single-plane weight (M = 1), whose per-channel factor
        folds into the following affine (docs/accounting.md)."""
        if self.weight_bases <= 1:
            return 0
        # The scales' shape ([P] or [P, C_out]) depends on the output channels only, so the
        # quantizer is asked on a thin slice of the weight (all output channels, few inputs):
        # the full decomposition of a large layer costs seconds.
        weight = self.weight.detach()
        thin = weight[:, : min(weight.shape[1], 4)]
        with torch.no_grad():
            try:
                planes = self.weight_quantizer.bit_planes(thin)
            except Exception:  # a quantizer that needs the real shape: decompose all of it
                planes = self.weight_quantizer.bit_planes(weight)
        return int(planes.scales.numel())

    def stored_values(self) -> tuple[int, int]:
        """``(real, binary)``: the 32-bit and the binary values this layer stores, the
        accounting's rule (paper 4.6.1, :mod:`binarize_cli.analyze.profile`): ``M`` binary
        values per weight; the bias, the quantizers' parameters and the weight scales
        (:meth:`weight_scale_count`) real (a weight quantizer whose parameters are its scales,
        ``scale_parameters``, counted once). Memory = ``32 * real + binary`` bits. A channel
        gate's parameters are not included: the accounting gives the gate a row of its own."""
        quantizers: list[nn.Module] = [self.activation_quantizer]
        if not self.weight_quantizer.scale_parameters:  # else counted as the weight scales
            quantizers.append(self.weight_quantizer)
        quantizer_params = sum(p.numel() for q in quantizers for p in q.parameters())
        bias = self.bias.numel() if self.bias is not None else 0
        return bias + quantizer_params + self.weight_scale_count(), self.weight_bases * (
            self.weight.numel()
        )

    def gate_values(self) -> int:
        """The channel gate's parameters (32-bit values; 0 without a gate). ``report`` gives
        them a row of their own; the layer's whole memory is ``32 * (real + gate) + binary``
        bits with ``(real, binary) =`` :meth:`stored_values`."""
        return 0 if self.gate is None else sum(p.numel() for p in self.gate.parameters())

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, scheme={self.scheme_name}, "
            f"M={self.weight_bases}, N={self.activation_bases}"
        )


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-accumulates per sample of one call of a conv or linear module (the
    accounting's MACs, :mod:`binarize_cli.analyze.profile`); 0 for other modules."""
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        batch = out.shape[0] if out.dim() > len(module.kernel_size) + 1 else 1
        if module.transposed:
            per_in = module.out_channels // module.groups * kernel
            return inp.numel() // batch * per_in
        per_out = module.in_channels // module.groups * kernel
        return out.numel() // batch * per_out
    if isinstance(module, nn.Linear):
        batch = out.shape[0] if out.dim() > 1 else 1
        return out.numel() // batch * module.in_features
    return 0
