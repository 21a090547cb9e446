"""Attention matching between a student and its teacher at the end of each block
(Real-to-Bin, Martinez et al., ICLR 2020, section 4.2; ``convert --distill attention``).

The loss (seed 004's slide "Loss Term")::

    L_att = sum_j || Q_s^j / ||Q_s^j||_2  -  Q_T^j / ||Q_T^j||_2 ||_p,   Q^j = sum_i |A_i^j|^2

``A^j`` is the output of block ``j`` (a ``(B, C, H, W)`` tensor), ``Q^j`` its spatial
attention map: the sum over the ``C`` channels of the squared activations, per sample,
flattened over the ``H x W`` positions. Each map is divided by its own L2 norm, so the loss
compares where a block's energy is, not how much of it there is (a binary block's outputs
have another scale than the real one's). Choices the lecture leaves open, and ours:

* ``p = 2`` (the paper follows Zagoruyko & Komodakis' attention transfer, which uses the
  L2 distance); the norm itself, not its square, as the slide writes it.
* Per sample, then the mean over the batch; summed (not averaged) over the blocks ``j``.
* The teacher's maps carry no gradient (the teacher is frozen).
* The weight of ``L_att`` in the training loss is the setting ``attention_weight``
  (:mod:`binarize_cli.convert.training` adds ``attention_weight * L_att`` to the logit
  distillation's loss). Its default, 1.0, is explained in docs/schemes-abc-baselines.md.

Where the maps are taken (:func:`block_ends`), found by module name so that the teacher and
the student (graph surgery keeps every name) are matched name by name:

1. Blocks: every module held by an ``nn.Sequential`` or ``nn.ModuleList`` that is not itself
   such a container nor a convolution, and has a convolution inside it; the outermost ones
   only. This is each residual block of a timm or torchvision ResNet (``layer1.0``, ...),
   each inverted-residual (or depthwise-separable) block of a MobileNetV2 or EfficientNet
   (``blocks.1.0``, ``features.3``, ...), each dense layer of a DenseNet.
2. Fallback for plain stacks without blocks (VGG's ``features``): the module registered just
   before each max/average pooling layer that follows a convolution in the same parent, i.e.
   each stage's output.
3. Fallback when neither finds anything (a small user network): every convolution's output.

The maps are captured with forward hooks (:class:`AttentionMatch`), on the models
themselves: nothing is copied, and the hooks are removed when the match's ``with`` ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.core.errors import BadInputError

__all__ = [
    "ATTENTION_P",
    "AttentionMatch",
    "AttentionSpec",
    "attention_loss",
    "attention_map",
    "block_ends",
]

#: The norm of the difference of the normalised maps (``p`` in ``|| . ||_p``).
ATTENTION_P = 2

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _blocks(model: nn.Module) -> list[str]:
    """Rule 1: the outermost non-container modules with a convolution inside, held by a
    Sequential or ModuleList."""
    found: list[str] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, _CONTAINERS):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, (*_CONTAINERS, nn.Conv2d)) or not _has_conv(child):
                continue
            found.append(_join(parent_name, child_name))
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]


def _stage_ends(model: nn.Module) -> list[str]:
    """Rule 2: the module just before each pooling layer that follows a convolution."""
    found: list[str] = []
    for parent_name, parent in model.named_modules():
        previous: str | None = None
        conv_since_pool = False
        for child_name, child in parent.named_children():
            if isinstance(child, _POOLS):
                if conv_since_pool and previous is not None:
                    found.append(_join(parent_name, previous))
                conv_since_pool = False
            elif _has_conv(child):
                conv_since_pool = True
            previous = child_name
    return found


def block_ends(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs the attention loss compares, in module order (see
    the module docstring for the three rules). Raises BadInputError when the model has no
    convolution at all."""
    for rule in (_blocks, _stage_ends):
        names = rule(model)
        if names:
            return names
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise BadInputError(
            "attention distillation needs a convolutional model; this one has no Conv2d"
        )
    return convs


def attention_map(activation: torch.Tensor) -> torch.Tensor:
    """``Q / ||Q||_2`` per sample: ``Q = sum_i |A_i|^2`` over the channels (dim 1), flattened
    over the remaining dims; ``(B, H*W)``. Half-precision inputs are summed in float32."""
    if activation.dim() < 2:
        raise ValueError(f"an attention map needs a (B, C, ...) tensor, got {activation.dim()}-D")
    if activation.dtype in (torch.float16, torch.bfloat16):
        activation = activation.float()
    q = activation.pow(2).sum(dim=1).flatten(1)
    return F.normalize(q, p=2.0, dim=1)


def attention_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], p: int = ATTENTION_P
) -> torch.Tensor:
    """``sum_j mean_batch || map(A_s^j) - map(A_T^j) ||_p`` (:func:`attention_map`); the
    teacher's activations are detached. Raises ValueError when the lists' lengths or a
    pair's map sizes differ."""
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"need as many student as teacher maps (got {len(student)}, {len(teacher)})"
        )
    total: torch.Tensor | None = None
    for j, (a_s, a_t) in enumerate(zip(student, teacher, strict=True)):
        q_s, q_t = attention_map(a_s), attention_map(a_t.detach())
        if q_s.shape != q_t.shape:
            raise ValueError(
                f"block {j}: student map {tuple(q_s.shape)} and teacher map {tuple(q_t.shape)} differ"
            )
        term = torch.linalg.vector_norm(q_s - q_t.to(q_s.dtype), ord=p, dim=1).mean()
        total = term if total is None else total + term
    assert total is not None
    return total


@dataclass(frozen=True)
class AttentionSpec:
    """What ``--distill attention`` adds to the loss: ``weight * L_att`` over ``blocks``
    (module names, :func:`block_ends`), with the norm ``p``."""

    blocks: tuple[str, ...]
    weight: float
    p: int = ATTENTION_P

    def bind(self, student: nn.Module, teacher: nn.Module) -> AttentionMatch:
        """An :class:`AttentionMatch` of ``student`` and ``teacher`` (enter it to hook them)."""
        return AttentionMatch(student, teacher, self)


class AttentionMatch:
    """Forward hooks that keep the last output of each block of a student and of its teacher;
    :meth:`loss` turns them into ``weight * L_att``. Use as a context manager: the hooks are
    registered on entry and removed on exit. Raises BadInputError on entry when a block name
    is missing from either model."""

    def __init__(self, student: nn.Module, teacher: nn.Module, spec: AttentionSpec) -> None:
        self.spec = spec
        self._models = {"student": student, "teacher": teacher}
        self._outputs: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionMatch:
        for role, model in self._models.items():
            modules = dict(model.named_modules())
            for name in self.spec.blocks:
                if name not in modules:
                    self._remove()
                    raise BadInputError(
                        f"attention distillation: the {role} has no module named {name!r} "
                        "(the teacher and the student must share module names)"
                    )
                self._handles.append(modules[name].register_forward_hook(self._keeper(role, name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for outputs in self._outputs.values():
            outputs.clear()

    def _keeper(self, role: str, name: str) -> Any:
        outputs = self._outputs[role]

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise BadInputError(
                    f"attention distillation: block {name!r} returns {type(output).__name__}, "
                    "not a tensor"
                )
            outputs[name] = output

        return hook

    def loss(self) -> torch.Tensor:
        """``weight * L_att`` over the outputs of the last student and teacher forward passes
        (both must have run since the last call); the kept outputs are released."""
        student, teacher = self._outputs["student"], self._outputs["teacher"]
        missing = [n for n in self.spec.blocks if n not in student or n not in teacher]
        if missing:
            raise RuntimeError(f"no forward output recorded for block(s) {', '.join(missing)}")
        value = attention_loss(
            [student[n] for n in self.spec.blocks],
            [teacher[n] for n in self.spec.blocks],
            self.spec.p,
        )
        student.clear()
        teacher.clear()
        return self.spec.weight * value
