"""core: what every stage shares and nothing stage-specific.

Owns the error family (:mod:`.errors`), convert settings and recipes (:mod:`.settings`), the
typed run metadata ``binarize.json`` (:mod:`.metadata`), the preprocessing record that turns a
stored image into the model's input (:mod:`.preprocess`), run directories (:mod:`.rundir`),
atomic file writes (:mod:`.files`), the package version (:mod:`.version`), the one way to
look at a model in eval mode under no_grad (:mod:`.modes`), and the C heap setting that CPU
training runs under (:mod:`.heap`: glibc keeps freed memory for the next step).

May import: nothing else of the package; the standard library, NumPy, safetensors, and torch
in :mod:`.rundir` and :mod:`.modes` only. ``errors`` and ``files`` stay torch-free because the
torch-free :mod:`binarize_cli.runtime` imports them, so this ``__init__`` imports nothing;
``preprocess``, ``metadata`` and ``heap`` are torch-free as well.
"""
