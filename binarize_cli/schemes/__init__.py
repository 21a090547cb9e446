"""Binarization schemes. Importing this package registers every built-in scheme.

PA-Net (:mod:`.pa`, seed 002) and ABC-Net (:mod:`.abc`, seeds 000/001) are the multiple-binary
schemes; :mod:`.single` holds the single-binary and low-bit baselines (BNN, XNOR-Net/BWN,
Bi-Real, DoReFa) that make ``report --compare`` meaningful.
"""

from binarize_cli.schemes import abc, pa, single  # noqa: F401  (registration side effects)
from binarize_cli.schemes.base import (
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
