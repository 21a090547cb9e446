"""Attention matching (Real-to-Bin): the loss by hand and by finite differences, block
discovery on timm / torchvision / user networks, the hooks, and the training step's loss."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from binarize_cli.convert.attention import (
    AttentionSpec,
    attention_loss,
    attention_map,
    block_ends,
)
from binarize_cli.convert.training import distillation_loss, train_one_epoch
from binarize_cli.core.errors import BadInputError


def test_attention_loss_on_a_hand_computed_example() -> None:
    # one sample, 2 channels, 1 x 2 positions
    student = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # Q_s = (2, 4)
    teacher = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]]])  # Q_T = (9, 0)
    q_s = torch.tensor([2.0, 4.0]) / math.sqrt(20.0)
    assert torch.allclose(attention_map(student)[0], q_s)
    assert torch.allclose(attention_map(teacher)[0], torch.tensor([1.0, 0.0]))
    expect = math.sqrt((2 / math.sqrt(20) - 1) ** 2 + (4 / math.sqrt(20)) ** 2)
    assert float(attention_loss([student], [teacher])) == pytest.approx(expect, rel=1e-6)
    # p = 1: the sum of the absolute differences
    expect_l1 = abs(2 / math.sqrt(20) - 1) + 4 / math.sqrt(20)
    assert float(attention_loss([student], [teacher], p=1)) == pytest.approx(expect_l1, rel=1e-6)
    # summed over blocks, averaged over the batch; scale-free; zero against itself
    two = torch.cat([student, teacher])
    pair = attention_loss([two, student], [torch.cat([teacher, teacher]), teacher])
    assert float(pair) == pytest.approx(expect / 2 + expect, rel=1e-6)
    assert float(attention_loss([5 * student], [teacher])) == pytest.approx(expect, rel=1e-6)
    assert float(attention_loss([student], [student])) == pytest.approx(0.0, abs=1e-7)


def test_attention_loss_rejects_unmatched_maps() -> None:
    with pytest.raises(ValueError, match="as many"):
        attention_loss([torch.ones(1, 2, 2, 2)], [])
    with pytest.raises(ValueError, match="differ"):
        attention_loss([torch.ones(1, 2, 2, 2)], [torch.ones(1, 2, 4, 4)])


def test_attention_loss_gradient_matches_finite_differences(numeric_grad) -> None:
    torch.manual_seed(0)
    student = [torch.randn(2, 3, 3, 3, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(2, 5, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3).double()]
    for x in student:
        x.requires_grad_(True)
    attention_loss(student, teacher).backward()
    for j, x in enumerate(student):

        def loss_of(v: torch.Tensor, j: int = j) -> torch.Tensor:
            parts = [v if i == j else s.detach() for i, s in enumerate(student)]
            return attention_loss(parts, teacher)

        expect = numeric_grad(loss_of, x.detach().clone())
        assert torch.allclose(x.grad, expect, atol=1e-7), j
    # the teacher side carries no gradient
    t = teacher[0].clone().requires_grad_(True)
    attention_loss([student[0]], [t]).backward()
    assert t.grad is None
    # identical maps: a finite (zero) gradient, not NaN
    same = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    attention_loss([same], [same.detach().clone()]).backward()
    assert torch.isfinite(same.grad).all()


def test_block_ends_of_timm_resnet18() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    assert block_ends(model) == [f"layer{i}.{b}" for i in range(1, 5) for b in (0, 1)]


def test_block_ends_of_timm_mobilenetv2() -> None:
    model = timm.create_model("mobilenetv2_100", pretrained=False)
    ends = block_ends(model)
    assert ends[0] == "blocks.0.0" and ends[-1] == "blocks.6.0" and len(ends) == 17
    modules = dict(model.named_modules())
    assert {type(modules[n]).__name__ for n in ends} == {
        "DepthwiseSeparableConv",
        "InvertedResidual",
    }


def test_block_ends_of_torchvision_vgg11_fall_back_to_stage_ends() -> None:
    model = torchvision.models.vgg11()
    ends = block_ends(model)
    features = model.features
    # the module before each of the five max-pools: each conv stage's (ReLU) output
    assert ends == ["features.1", "features.4", "features.9", "features.14", "features.19"]
    for name in ends:
        index = int(name.split(".")[1])
        assert isinstance(features[index], nn.ReLU)
        assert isinstance(features[index + 1], nn.MaxPool2d)


class _UserNet(nn.Module):
    """A user network without containers or pooling modules."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.body(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_block_ends_of_a_user_module_and_of_a_model_without_convolutions() -> None:
    assert block_ends(_UserNet()) == ["stem", "body"]

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList([_UserNet(), nn.Sequential(nn.Conv2d(3, 3, 1))])

    # a ModuleList's composite child is a block; a Sequential inside it is not
    assert block_ends(Blocks()) == ["stages.0"]
    with pytest.raises(BadInputError, match="no Conv2d"):
        block_ends(nn.Sequential(nn.Linear(2, 2)))


def test_match_hooks_both_models_and_removes_its_hooks() -> None:
    torch.manual_seed(0)
    teacher, student = _UserNet(), _UserNet()
    spec = AttentionSpec(("stem", "body"), weight=0.5)
    x = torch.randn(2, 3, 4, 4)
    with spec.bind(student, teacher) as match:
        student(x)
        teacher(x)
        value = match.loss()
        with pytest.raises(RuntimeError, match="no forward output"):
            match.loss()  # the outputs were released
    # each hook sees its module's own output (the stem's before the functional ReLU)
    with torch.no_grad():
        a_s = [student.stem(x), student.body(F.relu(student.stem(x)))]
        a_t = [teacher.stem(x), teacher.body(F.relu(teacher.stem(x)))]
    assert float(value.detach()) == pytest.approx(0.5 * float(attention_loss(a_s, a_t)), rel=1e-6)
    assert not student.stem._forward_hooks and not teacher.body._forward_hooks
    missing = AttentionSpec(("stem", "nope"), 1.0).bind(student, teacher)
    with pytest.raises(BadInputError, match="no module named 'nope'"):
        missing.__enter__()
    assert not student.stem._forward_hooks


def test_train_one_epoch_adds_the_weighted_attention_loss() -> None:
    torch.manual_seed(0)
    teacher, student = _UserNet().eval(), _UserNet()
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    w, beta = 0.5, 2.0
    with torch.no_grad():
        s_logits, t_logits = student(x), teacher(x)
        a_s = [student.stem(x), student.body(F.relu(student.stem(x)))]
        a_t = [teacher.stem(x), teacher.body(F.relu(teacher.stem(x)))]
    expect = (
        (1 - w) * F.cross_entropy(s_logits, y)
        + w * distillation_loss(s_logits, t_logits, 1.0)
        + beta * attention_loss(a_s, a_t)
    )
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    spec = AttentionSpec(("stem", "body"), weight=beta)
    with spec.bind(student, teacher) as match:
        stats = train_one_epoch(
            student, [(x, y)], optimizer, teacher=teacher, distill_weight=w, attention=match
        )
    assert stats.loss == pytest.approx(float(expect), rel=1e-5)
    # distill_weight 0: the teacher still runs for the attention term
    with spec.bind(student, teacher) as match:
        stats = train_one_epoch(
            student, [(x, y)], optimizer, teacher=teacher, distill_weight=0.0, attention=match
        )
    with torch.no_grad():
        plain = F.cross_entropy(student(x), y) + beta * attention_loss(a_s, a_t)
    assert stats.loss == pytest.approx(float(plain), rel=1e-5)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_one_epoch(student, [(x, y)], optimizer, attention=match)
