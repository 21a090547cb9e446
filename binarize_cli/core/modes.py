"""Train/eval mode handling shared by every stage that runs a model to look at it.

:func:`evaluating` is the one way the package runs a model "for a look" (an accuracy pass,
hooks that record shapes or activations, tracing for export): eval mode, no autograd, and
afterwards every module's own ``training`` flag exactly as it was (and the hooks it was given
removed), also when the body raises.

Imports torch, so :mod:`binarize_cli.core`'s ``__init__`` does not import this module (the
torch-free runtime imports ``core``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(model: nn.Module, hooks: Iterable[RemovableHandle] = ()) -> Iterator[nn.Module]:
    """Run the body with ``model`` in eval mode under :func:`torch.no_grad`; yields ``model``.

    On exit (normal or by an exception, which propagates) ``model.train(mode)`` is called with
    the root's previous mode (so a module that overrides ``train`` sees the same call as
    before), then every submodule's ``training`` flag is set back to its recorded value: a
    model whose submodules were in mixed modes (e.g. frozen batch norms in a training model)
    comes back exactly as it was. Changes the body makes to a module's mode are undone too.
    Works for wrappers such as DDP (their ``modules()`` include the wrapped model).

    ``hooks``: handles of hooks registered for this look (forward hooks that record shapes
    or activations); they are removed on exit as well.
    """
    saved = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        model.train(saved[0][1])
        for module, training in saved:
            module.training = training
        for handle in hooks:
            handle.remove()
