"""core.modes.evaluating: eval mode and no autograd inside, every module's mode restored after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from binarize_cli.core.modes import evaluating


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.Dropout(), nn.Flatten())
    )


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("training", [True, False])
def test_eval_and_no_grad_inside_and_mode_restored(training):
    model = _net().train(training)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with evaluating(model) as inside:
        assert inside is model
        assert not any(_modes(model).values())
        assert not torch.is_grad_enabled()
        out = model(x)
    assert not out.requires_grad
    assert torch.is_grad_enabled()
    assert set(_modes(model).values()) == {training}


def test_mixed_submodule_modes_come_back_exactly():
    model = _net().train()
    model[1].eval()  # a frozen batch norm inside a training model
    model[3][0].eval()  # a nested module in eval mode
    before = _modes(model)
    assert len(set(before.values())) == 2
    with evaluating(model):
        model(torch.randn(2, 3, 5, 5))
    assert _modes(model) == before


def test_mode_restored_and_hooks_removed_when_the_body_raises():
    model = _net().train()
    model[1].eval()
    before = _modes(model)
    seen: list[tuple[int, ...]] = []
    hook = model[0].register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    with pytest.raises(RuntimeError, match="boom"), evaluating(model, hooks=[hook]):
        model(torch.randn(1, 3, 5, 5))
        raise RuntimeError("boom")
    assert seen == [(1, 4, 3, 3)]
    assert _modes(model) == before
    assert torch.is_grad_enabled()
    model(torch.randn(1, 3, 5, 5))
    assert len(seen) == 1  # the hook is gone
    assert not model[0]._forward_hooks


def test_mode_changes_made_inside_are_undone():
    model = _net().eval()
    with evaluating(model):
        model[1].train()  # e.g. batch-norm re-estimation trains the norms under eval
        assert model[1].training and not model.training
    assert not any(_modes(model).values())


def test_train_override_of_the_root_is_called_on_exit():
    calls: list[bool] = []

    class Frozen(nn.Sequential):
        def train(self, mode: bool = True) -> Frozen:
            calls.append(mode)
            return super().train(mode)

    model = Frozen(nn.Linear(2, 2)).train()
    calls.clear()
    with evaluating(model):
        pass
    assert calls == [False, True]  # eval() on entry, train(True) on exit
    assert model.training and model[0].training
