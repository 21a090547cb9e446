"""Rebuild a run: its directory's metadata plus the converted model with its weights.

A run directory (:mod:`binarize_cli.core.rundir`) stores the latent weights and the
``binarize.json`` that names the architecture, scheme, bases and layer policy; rebuilding the
model means loading the architecture (:mod:`binarize_cli.load`) and replaying the surgery
(:mod:`binarize_cli.convert.surgery`), which is why this lives in ``convert`` and not in
``core``. ``report``, ``export`` and ``verify`` all start from :func:`load_run`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from binarize_cli.convert.surgery import binarize_model
from binarize_cli.core.errors import RunDirError
from binarize_cli.core.metadata import RunMetadata
from binarize_cli.core.rundir import WEIGHTS_FILE, resolve_run
from binarize_cli.load.models import create_architecture


@dataclass
class Run:
    """A loaded run: its directory, its metadata and the rebuilt model (eval mode)."""

    path: Path
    meta: RunMetadata
    model: nn.Module


def build_model_from_meta(meta: RunMetadata) -> nn.Module:
    """Rebuild the converted architecture (random weights) described by a run's metadata: its
    surgery replayed, with each layer's own bases where the run records ``layer_bases``
    (older runs: the run-level M, N everywhere)."""
    loaded = create_architecture(meta.model, num_classes=meta.num_classes)
    result = binarize_model(
        loaded.model,
        meta.scheme,
        meta.M,
        meta.N,
        keep=tuple(meta.keep),
        first_conv=loaded.first_conv if meta.first_conv is None else meta.first_conv,
        classifier=loaded.classifier if meta.classifier is None else meta.classifier,
        options=dict(meta.scheme_options),
        layer_bases=meta.layer_bases,
    )
    return result.model


def load_run(path: str | Path | None) -> Run:
    """Load a run directory: metadata plus the converted model with its weights, in eval mode."""
    from safetensors.torch import load_file

    run_path = resolve_run(path)
    meta = RunMetadata.load(run_path)
    model = build_model_from_meta(meta)
    try:
        state = load_file(str(run_path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise RunDirError(
            f"{run_path / WEIGHTS_FILE} is corrupt ({exc}); rerun `binarize convert`"
        ) from None
    # safetensors keeps no module versions (``state_dict()._metadata``); modules that check
    # theirs on load (torchvision's MNASNet) get the rebuilt model's own.
    state = OrderedDict(state)
    state._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = ", ".join((list(missing) + list(unexpected))[:3])
        raise RunDirError(
            f"{run_path / WEIGHTS_FILE} does not match its binarize.json (first keys: {first})"
        )
    model.eval()
    return Run(path=run_path, meta=meta, model=model)
