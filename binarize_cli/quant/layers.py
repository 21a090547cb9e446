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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.quant.base import ActivationQuantizer, Scheme, WeightQuantizer


class BinarizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight and input pass through a scheme's quantizers.

    Keeps the latent real-valued ``weight`` (and ``bias``) as parameters; the quantizers own
    the scheme's trainable endpoints/levels. ``scheme_name``, ``weight_bases`` (M) and
    ``activation_bases`` (N) are recorded for reports and export.
    """

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
        """``W_hat``: the approximated weight (differentiable)."""
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.activation_quantizer(x)
        w_hat = self.quantized_weight()
        return F.conv2d(
            x_hat, w_hat, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, scheme={self.scheme_name}, "
            f"M={self.weight_bases}, N={self.activation_bases}"
        )
