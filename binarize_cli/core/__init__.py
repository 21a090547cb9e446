"""core: what every stage shares and nothing stage-specific.

Owns the error family (:mod:`.errors`), convert settings and recipes (:mod:`.settings`), the
run directory and atomic file writes (:mod:`.rundir`, :mod:`.files`), and the typed run
metadata (:mod:`.metadata`).

May import: the standard library, NumPy and safetensors. ``core.errors`` and ``core.files`` stay
torch-free because the torch-free :mod:`binarize_cli.runtime` imports them. Imports no other
``binarize_cli`` subpackage at module level.
"""
