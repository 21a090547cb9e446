"""load: where models and data come from (stage 1 of the flow).

Owns model specs (timm / torchvision names, local checkpoints, hub caches) in :mod:`.models`
and the data sets behind a registry in :mod:`.data` (digits, fashion-mnist, cifar10,
imagefolder, fake).

May import: :mod:`binarize_cli.core`, torch, torchvision, timm, scikit-learn.
"""
