"""Calibration: initialise every binarized layer from data before any training.

Two steps, both without gradient:

1. **Activation endpoints and levels.** For every :class:`~binarize_cli.quant.layers.BinarizedConv2d`,
   the real input activations are sampled from the *full-precision* model at the same module
   name (its inputs are what the quantizer has to approximate) and handed to the layer's
   ``activation_quantizer.calibrate(samples)`` (PA: piece-wise least squares of ``v`` and
   ``beta``; ABC: shifts from quantiles, then least-squares ``beta``). Weight endpoints need
   no data (PA: ``mean(W) + c_k std(W)``); they were fixed when the layer was built.
2. **Batch-norm re-estimation.** Binarizing the convolutions shifts the statistics of what
   follows them; the running mean/variance of every batch-norm layer is re-estimated on the
   calibration batches with the binarized model (cumulative average, affine parameters
   untouched).

This replaces the random initialisation of ``beta``/``v`` that sank both seed
re-implementations of ABC-Net.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from binarize_cli.core.modes import evaluating
from binarize_cli.quant.layers import BinarizedConv2d

#: Samples kept per layer for activation calibration (uniformly drawn from each batch).
DEFAULT_SAMPLES_PER_LAYER = 200_000


@dataclass
class CalibrationStats:
    """What calibration did: layers calibrated, batches used, seconds taken."""

    layers: int
    batches: int
    seconds: float


def _binarized_layers(model: nn.Module) -> dict[str, BinarizedConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BinarizedConv2d)}


@torch.no_grad()
def collect_input_samples(
    model: nn.Module,
    layer_names: Iterable[str],
    batches: Iterable[torch.Tensor],
    *,
    samples_per_layer: int = DEFAULT_SAMPLES_PER_LAYER,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``batches`` and keep a uniform sample of each named layer's input.

    Returns a 1-D float tensor per layer name. Each batch contributes the same share of
    samples, so the result is an (approximately) uniform sample over all batches.
    """
    names = list(layer_names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"layers not found in the reference model: {missing[:3]}")
    batch_list = list(batches)
    per_batch = max(1, samples_per_layer // max(1, len(batch_list)))
    generator = torch.Generator().manual_seed(seed)
    collected: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook_for(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            flat = inputs[0].detach().reshape(-1).float().cpu()
            if flat.numel() > per_batch:
                idx = torch.randint(flat.numel(), (per_batch,), generator=generator)
                flat = flat[idx]
            collected[name].append(flat)

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    with evaluating(model, hooks=handles):
        device = next(model.parameters()).device
        for batch in batch_list:
            model(batch.to(device))
    return {n: torch.cat(v) if v else torch.empty(0) for n, v in collected.items()}


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute running mean/var of every batch-norm layer on ``batches``; returns the count."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    with evaluating(model):  # restores every module's mode, the norms' included
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration batches
            m.train()
        try:
            device = next(model.parameters()).device
            for batch in batches:
                model(batch.to(device))
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
    return len(norms)


def calibrate_model(
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    samples_per_layer: int = DEFAULT_SAMPLES_PER_LAYER,
    seed: int = 0,
    reestimate_bn: bool = True,
    refinements: int = 1,
) -> CalibrationStats:
    """Calibrate the binarized ``model`` against its full-precision ``reference``.

    ``reference`` must have the same module names as ``model`` (it is the model before
    surgery). ``batches`` are input tensors (no labels).

    Round 0 fits every activation quantizer on the reference model's inputs, then
    re-estimates batch norm. Binarizing upstream layers changes the scale of what reaches a
    layer (the re-estimated batch norms renormalise the *outputs* of binarized convs, not the
    inputs the next quantizer sees through residual sums), so each of the ``refinements``
    further rounds refits the quantizers on the binarized model's own inputs and re-estimates
    batch norm again.
    """
    start = time.perf_counter()
    batch_list = list(batches)
    layers = _binarized_layers(model)
    to_calibrate = {n: m for n, m in layers.items() if m.activation_bases > 0}
    for layer in layers.values():
        layer.weight_quantizer.calibrate(layer.weight.detach())
    for round_index in range(1 + max(0, refinements)):
        source = reference if round_index == 0 else model
        samples = collect_input_samples(
            source, to_calibrate, batch_list, samples_per_layer=samples_per_layer, seed=seed
        )
        for name, layer in to_calibrate.items():
            layer.activation_quantizer.calibrate(samples[name])
        if reestimate_bn:
            reestimate_batchnorm(model, batch_list)
        if not to_calibrate:
            break
    return CalibrationStats(
        layers=len(layers), batches=len(batch_list), seconds=time.perf_counter() - start
    )
