"""Torch-free runtime for packed binarized models (``binarize run``, ``binarize verify``).

Imports NumPy and safetensors only — never torch (``tests/runtime/test_model.py`` imports
it with torch blocked). :func:`load_packed` reads a file written by
``binarize export --target packed`` (``docs/format.md``) and returns a :class:`PackedModel`
that maps normalised images ``[B, C, H, W]`` to logits: binarized convolutions run as
AND/XNOR + popcount over bit planes (:mod:`.bitconv`, :mod:`.kernels`, the C kernel
``_kernel.c``), everything else in float (:mod:`.ops`). ``docs/runtime.md`` derives the
bitwise algebra and the border correction.
"""

from binarize_cli.runtime.bitconv import ActivationCode, BinaryConv2d
from binarize_cli.runtime.evaluate import Accuracy, evaluate_packed, topk_correct
from binarize_cli.runtime.format import FORMAT_NAME, FORMAT_VERSION
from binarize_cli.runtime.kernels import CBackend, NumpyBackend, get_backend
from binarize_cli.runtime.model import PackedModel, load_packed, read_packed

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Accuracy",
    "ActivationCode",
    "BinaryConv2d",
    "CBackend",
    "NumpyBackend",
    "PackedModel",
    "evaluate_packed",
    "get_backend",
    "load_packed",
    "read_packed",
    "topk_correct",
]
