"""export: write a binarized model out for deployment and check the copies agree.

Owns the step-function search shared by the writers (:mod:`.steps`), the packed safetensors
writer (:mod:`.packed`), the ONNX exporter (:mod:`.onnx`), and ``binarize verify``'s three-way
agreement check (PyTorch float64 / bitwise runtime / ONNX Runtime, :mod:`.verify`).

May import: :mod:`binarize_cli.core`, :mod:`binarize_cli.load`, :mod:`binarize_cli.quant`,
:mod:`binarize_cli.convert`, and :mod:`binarize_cli.runtime` (its format, op table and bit
packing are the contract the writers follow).
"""
