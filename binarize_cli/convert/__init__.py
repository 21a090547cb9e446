"""convert: turn a loaded full-precision model into a calibrated, fine-tuned binarized one.

Owns the stages of ``binarize convert`` after loading: the graph view of a model
(:mod:`.graph`), which layers to replace (:mod:`.policy`), the module swap (:mod:`.surgery`),
the full-precision baseline (:mod:`.baseline`), calibration (:mod:`.calibrate`), per-layer
sensitivity and the budgeted choice of per-layer bases (:mod:`.sensitivity`,
:mod:`.allocate`), the training
loop (:mod:`.training`, :mod:`.finetune`, :mod:`.distributed`), and the stage functions that
chain them into a run directory (:mod:`.pipeline`), and the rebuilding of a saved run's model
(:mod:`.rebuild`, where ``report``, ``export`` and ``verify`` start).

May import: :mod:`binarize_cli.core`, :mod:`binarize_cli.load`, :mod:`binarize_cli.quant`.
"""
