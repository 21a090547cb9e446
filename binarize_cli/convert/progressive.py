"""The progressive teacher-student schedule (Real-to-Bin, Martinez et al., ICLR 2020,
section 4.3; seed 004's slide "Progressive Teacher-Student"), for any scheme.

With the setting ``progressive`` the fine-tune runs three stages of ``epochs`` each, on the
binarized architecture (graph surgery already done, so a scheme's extra modules, such as
Real-to-Bin's gating branch, train from stage 1):

=====  ===================================  ======================================  =====================
stage  weights                              activations                             teacher
=====  ===================================  ======================================  =====================
1      real (weight quantizers bypassed)    real (activation quantizers bypassed)   the full-precision model
2      real                                 binary                                  the stage-1 student
3      binary                               binary                                  the stage-2 student
=====  ===================================  ======================================  =====================

A stage's teacher is a frozen copy of the student as the previous stage left it (its own
quantizer switches included). Without a teacher (``distill off``) the stages run without
one. Choices the paper leaves open, and ours:

* Each stage is a fine-tune of its own: a fresh Adam and a cosine schedule over the stage's
  ``epochs``, the same learning rate.
* Calibration runs once, as for every run, before stage 1, on the stage-3 (fully binary)
  model, so the recorded ``calibrated`` accuracy means what it means elsewhere; the
  quantizers' trainable parameters then keep training in the stages that use them.
* Only stage 3 is scored for the kept epoch (the best selection score among stage-3
  epochs); stages 1 and 2 end on their last epoch and their validation accuracy is recorded
  only. A stage-1 (real) or stage-2 model is never the result.
* Every epoch's record carries its ``stage`` (``binarize.json``'s ``finetune_epochs``,
  ``metrics.csv``); epochs are numbered across the stages (stage 3's first epoch is
  ``2 * epochs + 1`` for whole ``epochs``).
* No epoch checkpoints: a progressive run cannot ``--resume``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from binarize_cli.convert.finetune import FinetuneState, finetune
from binarize_cli.quant.layers import BinarizedConv2d

__all__ = ["STAGES", "Stage", "progressive_finetune", "quantizing", "set_quantizing"]


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule: which quantizers the student applies."""

    number: int
    weights: bool
    activations: bool

    def describe(self) -> str:
        kind = {False: "real", True: "binary"}
        return (
            f"progressive stage {self.number}/3: {kind[self.weights]} weights, "
            f"{kind[self.activations]} activations"
        )


STAGES = (Stage(1, False, False), Stage(2, False, True), Stage(3, True, True))


def set_quantizing(model: nn.Module, *, weights: bool, activations: bool) -> None:
    """Set every :class:`~binarize_cli.quant.layers.BinarizedConv2d`'s ``quantize_weights``
    and ``quantize_activations`` in ``model``."""
    for module in model.modules():
        if isinstance(module, BinarizedConv2d):
            module.quantize_weights = weights
            module.quantize_activations = activations


@contextlib.contextmanager
def quantizing(model: nn.Module, *, weights: bool, activations: bool) -> Iterator[nn.Module]:
    """:func:`set_quantizing` for the ``with`` block; each layer's own switches are restored
    on exit (also on an error)."""
    layers = [m for m in model.modules() if isinstance(m, BinarizedConv2d)]
    before = [(m.quantize_weights, m.quantize_activations) for m in layers]
    set_quantizing(model, weights=weights, activations=activations)
    try:
        yield model
    finally:
        for layer, (w, a) in zip(layers, before, strict=True):
            layer.quantize_weights, layer.quantize_activations = w, a


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def progressive_finetune(
    model: nn.Module,
    *,
    teacher: nn.Module | None,
    on_stage: Callable[[Stage], None] | None = None,
    on_epoch_start: Callable[[int, int, int], None] | None = None,
    select: Callable[[nn.Module], float] | None = None,
    **finetune_args: Any,
) -> FinetuneState:
    """Fine-tune ``model`` in place through :data:`STAGES` (module docstring), each stage a
    :func:`~binarize_cli.convert.finetune.finetune` with ``finetune_args`` (``epochs`` per
    stage; ``work_dir``, ``resume`` and ``resume_state`` are not accepted). ``select`` scores
    stage-3 epochs only. ``on_stage`` is told each stage as it starts; ``on_epoch_start`` gets
    epochs numbered across the stages.

    Returns one state over the three stages: ``epoch_stats`` rows carry ``stage``;
    ``kept_epoch`` counts across the stages and is always a stage-3 epoch (``None`` when no
    epoch ran). ``model`` ends with all its quantizers on.
    """
    for key in ("work_dir", "resume", "resume_state"):
        if key in finetune_args:
            raise ValueError(f"progressive fine-tuning takes no {key}")
    combined = FinetuneState()
    stage_teacher = teacher
    for stage in STAGES:
        if on_stage is not None:
            on_stage(stage)
        offset = combined.epochs_done

        def numbered(epoch: int, num_epochs: int, steps: int, offset: int = offset) -> None:
            if on_epoch_start is not None:
                on_epoch_start(offset + epoch, 3 * num_epochs, steps)

        set_quantizing(model, weights=stage.weights, activations=stage.activations)
        try:
            state = finetune(
                model,
                teacher=stage_teacher,
                on_epoch_start=numbered,
                select=select if stage.number == 3 else None,
                **finetune_args,
            )
        finally:
            set_quantizing(model, weights=True, activations=True)
        for row in state.epoch_stats:
            combined.epoch_stats.append({**row, "stage": stage.number})
        combined.epoch_seconds.extend(state.epoch_seconds)
        combined.warmup_s += state.warmup_s
        combined.warmup_steps += state.warmup_steps
        combined.epochs_done += state.epochs_done
        if stage.number == 3 and state.kept_epoch is not None:
            combined.kept_epoch = offset + state.kept_epoch
        if stage.number < 3 and teacher is not None:
            with quantizing(model, weights=stage.weights, activations=stage.activations):
                stage_teacher = _frozen_copy(model)
    return combined
