"""runtime: run packed binarized models without torch (``binarize run``, ``binarize verify``).

Owns the packed format (:mod:`.format`), its op table (:mod:`.optable`), the step-function
record (:mod:`.staircase`), bit packing (:mod:`.bits`), the kernels (:mod:`.kernels`, the C
kernel ``_kernel.c`` built by :mod:`._build`), the float ops (:mod:`.ops`), binarized
convolutions (:mod:`.bitconv`) and the packed model (:mod:`.model`, :mod:`.evaluate`).
:func:`load_packed` reads a file written by ``binarize export --target packed``
(``docs/format.md``) and returns a :class:`PackedModel` that maps normalised images
``[B, C, H, W]`` to logits: binarized convolutions run as AND/XNOR + popcount over bit planes,
everything else in float. ``docs/runtime.md`` derives the bitwise algebra and the border
correction.

May import: NumPy, safetensors, the standard library, and of the package only
:mod:`binarize_cli.core.errors` and :mod:`binarize_cli.core.files`: never torch
(``tests/runtime/test_model.py`` imports and runs it with torch blocked).
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
