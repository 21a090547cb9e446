"""analyze: what a conversion buys, as data (``binarize report``).

Owns the per-layer profile and the paper's accounting (:mod:`.profile`), the report data for
analytic, run and comparison reports and the paper's Table 7 (:mod:`.report`), and the figures
(:mod:`.plots`). Returns data; rendering to the terminal is :mod:`binarize_cli.render`'s job.

May import: :mod:`binarize_cli.core`, :mod:`binarize_cli.load`, :mod:`binarize_cli.quant`,
:mod:`binarize_cli.convert` (to rebuild a run's model).
"""
