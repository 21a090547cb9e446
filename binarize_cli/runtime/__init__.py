"""Torch-free runtime for packed binarized models (``binarize run``, ``binarize verify``).

Imports NumPy and safetensors only — never torch (``tests/runtime/test_model.py`` imports
it with torch blocked). :func:`load_packed` reads a file written by
``binarize export --target packed`` (``docs/format.md``) and returns a :class:`PackedModel`
that maps normalised images ``[B, C, H, W]`` to logits: binarized convolutions run as
AND/XNOR + popcount over bit planes (:mod:`.bitconv`, :mod:`.kernels`, the C kernel
``_kernel.c``), everything else in float (:mod:`.ops`). ``docs/runtime.md`` derives the
bitwise algebra and the border correction.

The contracts with the writers live here, torch-free: the op table (:mod:`.optable`), the
bit order and packing (:mod:`.bits`), the activation step function (:mod:`.staircase`) and
the format's header checks (:mod:`.format`).

May import: NumPy, safetensors, :mod:`binarize_cli.core.errors` — nothing else of the package.
"""

from binarize_cli.runtime.bitconv import BinaryConv2d
from binarize_cli.runtime.evaluate import Accuracy, evaluate_packed, topk_correct
from binarize_cli.runtime.format import FORMAT_NAME, FORMAT_VERSION
from binarize_cli.runtime.kernels import CBackend, NumpyBackend, get_backend
from binarize_cli.runtime.model import PackedModel, load_packed, read_packed
from binarize_cli.runtime.staircase import Staircase

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Accuracy",
    "BinaryConv2d",
    "CBackend",
    "NumpyBackend",
    "PackedModel",
    "Staircase",
    "evaluate_packed",
    "get_backend",
    "load_packed",
    "read_packed",
    "topk_correct",
]
