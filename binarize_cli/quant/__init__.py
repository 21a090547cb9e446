"""quant: the binarization schemes and the binarized layer (the math of the papers).

Owns the scheme contract and registry (:mod:`.base`), PA-Net (:mod:`.pa`, seed 002), ABC-Net
(:mod:`.abc`, seeds 000/001), the single-binary and low-bit baselines (BNN, XNOR-Net/BWN,
Bi-Real, DoReFa; :mod:`.single`) that make ``report --compare`` meaningful, Trained Ternary
Quantization (:mod:`.ttq`, seed 004), Real-to-Bin's gated sign convolution
(:mod:`.realtobin`, seed 004), the
``BinarizedConv2d`` module that applies a scheme's quantizers (:mod:`.layers`), and the
compiled one-loop kernels that PA and ABC train through on the CPU (:mod:`.fused`). Importing
this package registers every built-in scheme.

May import: :mod:`binarize_cli.core` and torch; nothing of the flow's later stages.
"""

from binarize_cli.quant import abc, pa, realtobin, single, ttq  # noqa: F401  (registration side effects)
from binarize_cli.quant.base import (
    ActivationQuantizer,
    BitPlanes,
    Domain,
    FullPrecisionActivation,
    Scheme,
    WeightQuantizer,
    available_schemes,
    get_scheme,
    register_scheme,
)

__all__ = [
    "ActivationQuantizer",
    "BitPlanes",
    "Domain",
    "FullPrecisionActivation",
    "Scheme",
    "WeightQuantizer",
    "available_schemes",
    "get_scheme",
    "register_scheme",
]
