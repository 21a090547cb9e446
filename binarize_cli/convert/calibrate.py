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

Two rules (``--calibration``, :data:`~binarize_cli.core.settings.CALIBRATION_RULES`):

* ``tensor`` (the default): the two steps above; each activation quantizer minimises the
  error of its own input, ``||A - A_hat||^2``.
* ``output``: the tensor rule, then a layer-wise **output reconstruction** (AdaRound /
  BRECQ style, docs/sensitivity.md "Output-aware calibration"). Layer by layer, in the order
  the forward pass reaches them, on the first :data:`OUTPUT_IMAGES` calibration images:
  ``x`` is the layer's input in the binarized model as calibrated so far (the layers before
  it already reconstructed, the batch norms re-estimated after each), and the layer's
  trainable activation parameters (PA and ABC: ``v`` and ``beta``) take
  :data:`OUTPUT_STEPS` Adam steps (learning rate :data:`OUTPUT_LR` times the RMS of ``x``)
  on minibatches of :data:`OUTPUT_BATCH` images minimising the layer's relative output
  error (:func:`output_error`) between ``conv(x, W)`` and ``conv(A_hat(x), W_hat)``, with
  the scheme's own surrogate gradients; when the output feeds a batch norm, the error is
  that of what the norm passes on after re-estimation (channels standardised, weighted by
  the norm's squared gains). ``W_hat`` is fixed: the weight levels are recomputed from
  ``W`` and the weight endpoints carry no gradient. The error on all the images is checked
  every :data:`OUTPUT_CHECK_EVERY` steps and the best parameters seen (the tensor rule's
  included) are kept, so the rule never raises a layer's output error on these images. A
  final batch-norm re-estimation on every calibration batch follows. Deterministic for a
  seed (seeded minibatch order; CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.core.errors import BadInputError
from binarize_cli.core.modes import evaluating
from binarize_cli.core.settings import CALIBRATION_RULES
from binarize_cli.quant.layers import BinarizedConv2d

#: Samples kept per layer for activation calibration (uniformly drawn from each batch).
DEFAULT_SAMPLES_PER_LAYER = 200_000
#: The output rule: calibration images reconstructed on (the first ones), Adam steps per
#: layer, images per step, the learning rate in units of the layer input's RMS, and how
#: often the error on all the images is checked (the best parameters seen are kept).
OUTPUT_IMAGES = 256
OUTPUT_STEPS = 100
OUTPUT_BATCH = 32
OUTPUT_LR = 0.01
OUTPUT_CHECK_EVERY = 25


@dataclass
class CalibrationStats:
    """What calibration did: the rule (``tensor`` or ``output``), layers calibrated, batches
    used, seconds taken; for the output rule also the layers reconstructed and their summed
    relative output error before (the tensor rule's) and after, on the images used."""

    layers: int
    batches: int
    seconds: float
    rule: str = "tensor"
    reconstructed: int = 0
    output_error_before: float | None = None
    output_error_after: float | None = None


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
    rule: str = "tensor",
    steps: int = OUTPUT_STEPS,
) -> CalibrationStats:
    """Calibrate the binarized ``model`` against its full-precision ``reference``.

    ``reference`` must have the same module names as ``model`` (it is the model before
    surgery). ``batches`` are input tensors (no labels). ``rule`` is ``"tensor"`` or
    ``"output"`` (module doc; ``steps``: the output rule's Adam steps per layer); another
    value is a :class:`~binarize_cli.core.errors.BadInputError`.

    Round 0 fits every activation quantizer on the reference model's inputs, then
    re-estimates batch norm. Binarizing upstream layers changes the scale of what reaches a
    layer (the re-estimated batch norms renormalise the *outputs* of binarized convs, not the
    inputs the next quantizer sees through residual sums), so each of the ``refinements``
    further rounds refits the quantizers on the binarized model's own inputs and re-estimates
    batch norm again.
    """
    if rule not in CALIBRATION_RULES:
        raise BadInputError(
            f"unknown calibration rule {rule!r}; use one of: {', '.join(CALIBRATION_RULES)}"
        )
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
    stats = CalibrationStats(layers=len(layers), batches=len(batch_list), seconds=0.0, rule=rule)
    if rule == "output":
        images = _first_images(batch_list, OUTPUT_IMAGES)
        errors = reconstruct_outputs(
            model, images, steps=steps, seed=seed, reestimate_bn=reestimate_bn
        )
        if reestimate_bn:
            reestimate_batchnorm(model, batch_list)
        stats.reconstructed = len(errors)
        stats.output_error_before = sum(before for before, _ in errors.values())
        stats.output_error_after = sum(after for _, after in errors.values())
    stats.seconds = time.perf_counter() - start
    return stats


# --------------------------------------------------------------------------- output rule


class _Reached(Exception):
    """Raised by a pre-hook to stop a forward pass once the hooked layer has its input."""


def _first_images(batches: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The first ``count`` images of ``batches``, in batches of at most :data:`OUTPUT_BATCH`."""
    kept: list[torch.Tensor] = []
    total = 0
    for batch in batches:
        if total >= count:
            break
        part = batch[: count - total]
        kept.append(part)
        total += part.shape[0]
    if not kept:
        return []
    return list(torch.cat(kept).split(OUTPUT_BATCH))


def _returning(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: value


@contextlib.contextmanager
def _fixed_weights(model: nn.Module) -> Iterator[None]:
    """Within the body every binarized layer's ``quantized_weight()`` returns ``W_hat``
    computed once on entry (calibration never changes ``W``; recomputing the weight levels
    on every forward is most of a calibration pass's time)."""
    layers = list(_binarized_layers(model).values())
    try:
        for layer in layers:
            with torch.no_grad():
                w_hat = layer.quantized_weight().detach()
            layer.quantized_weight = _returning(w_hat)  # type: ignore[method-assign]
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("quantized_weight", None)


@torch.no_grad()
def trace_layers(model: nn.Module, batch: torch.Tensor) -> tuple[list[str], dict[str, nn.Module]]:
    """One forward pass on ``batch``: the binarized layers' names in the order it calls them,
    and, for each layer whose output goes straight into a batch norm, that norm (by the
    layer's name)."""
    order: list[str] = []
    norms: dict[str, nn.Module] = {}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (layer, output), kept alive

    def layer_hook(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if name not in order:
                order.append(name)
                outputs[id(output)] = (name, output)

        return hook

    def norm_hook(norm: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        found = outputs.get(id(inputs[0]))
        if found is not None and found[1] is inputs[0]:
            norms.setdefault(found[0], norm)

    handles = [m.register_forward_hook(layer_hook(n)) for n, m in _binarized_layers(model).items()]
    handles += [
        m.register_forward_pre_hook(norm_hook)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with evaluating(model, hooks=handles):
        model(batch.to(next(model.parameters()).device))
    return order, norms


@torch.no_grad()
def layer_inputs(model: nn.Module, name: str, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The input of layer ``name`` (its first call) on each of ``batches``, in eval mode; each
    pass stops at the layer."""
    module = dict(model.named_modules())[name]
    inputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].detach())
        raise _Reached

    handle = module.register_forward_pre_hook(hook)
    with evaluating(model, hooks=[handle]):
        device = next(model.parameters()).device
        for batch in batches:
            try:
                model(batch.to(device))
            except _Reached:
                continue
    return inputs


def _reference_output(layer: BinarizedConv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x, W)``: the layer's full-precision output (no bias: it cancels in the error)."""
    return F.conv2d(
        x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups
    )


def _binarized_output(layer: BinarizedConv2d, x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """``conv(A_hat(x), W_hat)`` with the activation quantizer's surrogate gradients."""
    x_hat = layer.activation_quantizer(x)
    return F.conv2d(x_hat, w_hat, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _error_terms(
    y: torch.Tensor, y_hat: torch.Tensor, norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator of :func:`output_error` on one set of outputs."""
    if norm is None:
        return (y - y_hat).pow(2).sum(), y.pow(2).sum()
    dims = [0, *range(2, y.dim())]
    eps = float(getattr(norm, "eps", 1e-5))

    def standardised(t: torch.Tensor) -> torch.Tensor:
        mean = t.mean(dim=dims, keepdim=True)
        var = t.var(dim=dims, keepdim=True, unbiased=False)
        return (t - mean) / torch.sqrt(var + eps)

    weight = getattr(norm, "weight", None)
    gains = torch.ones(y.shape[1], dtype=y.dtype, device=y.device)
    if weight is not None:
        gains = weight.detach().to(y.dtype).abs()
    shape = [1, -1, *([1] * (y.dim() - 2))]
    g2 = gains.pow(2).reshape(shape)
    s = standardised(y)
    return (g2 * (s - standardised(y_hat)).pow(2)).sum(), (g2 * s.pow(2)).sum()


@torch.no_grad()
def output_error(
    layer: BinarizedConv2d, inputs: list[torch.Tensor], norm: nn.Module | None = None
) -> float:
    """The layer's relative output error on ``inputs`` (its input batches, taken together),
    ``y = conv(x, W)`` and ``y_hat = conv(A_hat(x), W_hat)``:

    * ``norm`` None: ``||y - y_hat||^2 / ||y||^2``;
    * ``norm`` the batch norm the layer's output feeds: the error of what that norm passes
      on when its statistics are re-estimated, as calibration does: each channel of ``y`` and
      of ``y_hat`` standardised by its own mean and variance (over images and positions, the
      norm's ``eps``), the channels weighted by the norm's squared gains ``gamma_c^2``::

          sum_c gamma_c^2 ||s(y)_c - s(y_hat)_c||^2 / sum_c gamma_c^2 ||s(y)_c||^2

      (a per-channel offset or scale of ``y_hat`` costs nothing: re-estimation removes it).

    0 when the denominator is 0."""
    w_hat = layer.quantized_weight().detach()
    y = torch.cat([_reference_output(layer, x) for x in inputs]).double()
    y_hat = torch.cat([_binarized_output(layer, x, w_hat) for x in inputs]).double()
    num, den = _error_terms(y, y_hat, norm)
    return float(num / den) if float(den) > 0 else 0.0


def layer_output_errors(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Every binarized layer's :func:`output_error` (with the norm its output feeds, if any)
    on its input in ``model`` itself (the layers before it binarized), by name, in forward
    order."""
    batch_list = list(batches)
    layers = _binarized_layers(model)
    order, norms = trace_layers(model, batch_list[0])
    with _fixed_weights(model):
        return {
            name: output_error(layers[name], layer_inputs(model, name, batch_list), norms.get(name))
            for name in order
        }


def _reconstruct_layer(
    layer: BinarizedConv2d,
    inputs: list[torch.Tensor],
    norm: nn.Module | None,
    steps: int,
    seed: int,
) -> tuple[float, float]:
    """Adam on the layer's activation parameters (module doc); keeps the best parameters
    seen. Returns the output error before and after."""
    quantizer = layer.activation_quantizer
    params = [p for p in quantizer.parameters() if p.requires_grad]
    best = output_error(layer, inputs, norm)
    before = best
    if best == 0.0 or steps <= 0:
        return before, best
    saved = {k: v.detach().clone() for k, v in quantizer.state_dict().items()}
    with torch.no_grad():
        w_hat = layer.quantized_weight().detach()
        targets = [_reference_output(layer, x) for x in inputs]
        squares = sum(float(x.double().pow(2).sum()) for x in inputs)
        scale = math.sqrt(squares / max(1, sum(x.numel() for x in inputs)))
    optimizer = torch.optim.Adam(params, lr=OUTPUT_LR * scale)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randint(len(inputs), (steps,), generator=generator).tolist()
    for step, index in enumerate(order, start=1):
        optimizer.zero_grad(set_to_none=True)
        num, den = _error_terms(
            targets[index], _binarized_output(layer, inputs[index], w_hat), norm
        )
        (num / den.clamp_min(torch.finfo(den.dtype).tiny)).backward()
        optimizer.step()
        if step % OUTPUT_CHECK_EVERY == 0 or step == steps:
            error = output_error(layer, inputs, norm)
            if error < best:
                best = error
                saved = {k: v.detach().clone() for k, v in quantizer.state_dict().items()}
    quantizer.load_state_dict(saved)
    return before, best


def reconstruct_outputs(
    model: nn.Module,
    batches: list[torch.Tensor],
    *,
    steps: int = OUTPUT_STEPS,
    seed: int = 0,
    reestimate_bn: bool = True,
) -> dict[str, tuple[float, float]]:
    """The output rule's reconstruction (module doc) on ``batches`` (input tensors), layer
    by layer in forward order; the batch norms are re-estimated on ``batches`` after each
    layer when ``reestimate_bn``. A layer whose activation quantizer has no trainable
    parameters (real activations, parameter-free single-binary schemes) is skipped.
    Returns ``{name: (output error before, after)}`` (:func:`output_error`) for the layers
    reconstructed."""
    if not batches:
        return {}
    layers = _binarized_layers(model)
    order, norms = trace_layers(model, batches[0])
    results: dict[str, tuple[float, float]] = {}
    with _fixed_weights(model):
        for index, name in enumerate(order):
            layer = layers[name]
            if layer.activation_bases == 0 or not any(
                p.requires_grad for p in layer.activation_quantizer.parameters()
            ):
                continue
            inputs = layer_inputs(model, name, batches)
            with torch.enable_grad():
                results[name] = _reconstruct_layer(
                    layer, inputs, norms.get(name), steps, seed + index
                )
            if reestimate_bn:
                reestimate_batchnorm(model, batches)
    return results
