"""Training/evaluation loops: exact top-k, eval-mode handling, distillation, divergence, DDP."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binarize_cli.convert.training import (
    Accuracy,
    distillation_loss,
    evaluate,
    time_training_steps,
    topk_correct,
    train_one_epoch,
)
from binarize_cli.core.errors import TrainingDivergedError
from binarize_cli.core.preprocess import Preprocessing
from binarize_cli.load.data import TensorImageDataset, load_data, make_loader

#: One channel, values as stored: the items are the stored images themselves.
PLAIN1 = Preprocessing(channels=1, pixel_scale=1.0, mean=(0.0,), std=(1.0,))


class Fixed(nn.Module):
    """Returns the logits stored for each input index (x[:, 0, 0, 0] holds the index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()] * self.scale


def _index_set(labels: list[int]) -> TensorImageDataset:
    n = len(labels)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return TensorImageDataset(images, torch.tensor(labels), PLAIN1)


def _small_net(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, classes),
    )


class _Recording:
    """A loader that keeps the labels of the batches it hands out, in order."""

    def __init__(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.loader = loader
        self.labels: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            self.labels.append(y)
            yield x, y


def test_topk_correct_exact() -> None:
    logits = torch.tensor(
        [
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # ranking 6,5,4,3,2,1,0
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # ranking 0,1,2,3,4,5,6
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        ]
    )
    target = torch.tensor([6, 4, 6])  # top-1 hit; top-5 hit (rank 5); rank 7: neither
    assert topk_correct(logits, target) == [1, 2]
    assert topk_correct(logits, target, ks=(1, 3, 7)) == [1, 1, 3]
    # fewer than five classes: top-5 means top-C
    assert topk_correct(logits[:, :3], torch.tensor([0, 2, 2]), ks=(1, 5)) == [0, 3]


def test_evaluate_exact_and_restores_mode() -> None:
    # 6 samples, 3 classes: predictions 0,1,2,0,1,2; labels make 4 of 6 top-1 correct
    table = torch.eye(3)[[0, 1, 2, 0, 1, 2]] * 5
    model = Fixed(table)
    model.train()
    loader = make_loader(_index_set([0, 1, 2, 1, 1, 0]), batch_size=4, shuffle=False, seed=0)
    acc = evaluate(model, loader)
    assert acc == Accuracy(top1=pytest.approx(100 * 4 / 6), top5=100.0, samples=6)
    assert acc.to_dict() == {"top1": pytest.approx(66.6666667), "top5": 100.0}
    assert model.training
    first = evaluate(model, loader, max_batches=1)
    assert first.samples == 4 and first.top1 == pytest.approx(75.0)
    empty = evaluate(model, [], max_batches=0)
    assert empty == Accuracy(0.0, 0.0, 0)


def test_train_one_epoch_learns_and_reports() -> None:
    torch.manual_seed(0)
    data = load_data("fake", input_size=16)
    model = _small_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = make_loader(data.train, batch_size=32, shuffle=True, seed=0, drop_last=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * len(loader))
    calls: list[tuple] = []
    before = evaluate(model, make_loader(data.val, batch_size=64, shuffle=False, seed=0))
    predictions: list[torch.Tensor] = []  # of the current epoch's training batches
    hook = model.register_forward_hook(
        lambda _m, _x, out: predictions.append(out.detach().argmax(dim=1))
    )
    for epoch in range(3):
        predictions.clear()
        recorded = _Recording(loader)
        stats = train_one_epoch(
            model, recorded, opt, scheduler=sched, epoch=epoch, on_step=lambda *a: calls.append(a)
        )
    hook.remove()
    after = evaluate(model, make_loader(data.val, batch_size=64, shuffle=False, seed=0))
    assert (
        stats.steps == 8 and stats.samples == 256 and stats.seconds > 0 and stats.images_per_s > 0
    )
    assert sched.last_epoch == 24  # stepped once per batch
    assert [c[0] for c in calls[:8]] == list(range(1, 9)) and all(c[1] == 8 for c in calls)
    # top1: the last epoch's running accuracy, i.e. of each batch's predictions as trained
    correct = sum(int((p == y).sum()) for p, y in zip(predictions, recorded.labels, strict=True))
    assert stats.top1 == pytest.approx(100 * correct / 256) and calls[-1][3] == stats.top1
    assert stats.top1 > 5 * 100 / 10  # far above chance (10 classes) on its own training data
    assert math.isfinite(stats.loss)
    assert after.top1 > before.top1 + 30  # the fake set is learnable


def test_training_is_deterministic_under_seed() -> None:
    data = load_data("fake", input_size=8)

    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model = _small_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train_one_epoch(model, make_loader(data.train, batch_size=16, shuffle=True, seed=7), opt)
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 3.0
    p_t = F.softmax(t / T, -1)
    expect = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert float(distillation_loss(s, t, T)) == pytest.approx(float(expect), rel=1e-5)
    assert float(distillation_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_train_one_epoch_distillation_weight() -> None:
    torch.manual_seed(0)
    data = load_data("fake", input_size=8)
    student, teacher = _small_net(), _small_net()
    loader = make_loader(data.train, batch_size=256, shuffle=False, seed=0)
    x, y = next(iter(loader))
    teacher.eval()
    with torch.no_grad():
        t_logits = teacher(x)
        probe = copy.deepcopy(student).train()
        s_logits = probe(x)
    w, T = 0.7, 2.0
    expect = (1 - w) * F.cross_entropy(s_logits, y) + w * distillation_loss(s_logits, t_logits, T)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the loss is of the initial weights
    stats = train_one_epoch(student, loader, opt, teacher=teacher, distill_weight=w, temperature=T)
    assert stats.loss == pytest.approx(float(expect), rel=1e-5)
    with pytest.raises(ValueError):
        train_one_epoch(student, loader, opt, teacher=teacher, distill_weight=1.5)


def test_non_finite_loss_raises_before_the_step() -> None:
    model = _small_net()
    ds = TensorImageDataset(
        torch.full((4, 3, 4, 4), float("nan")),
        torch.zeros(4),
        Preprocessing(channels=3, pixel_scale=1.0, mean=(0.0,) * 3, std=(1.0,) * 3),
    )
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingDivergedError, match="epoch 2, step 1"):
        train_one_epoch(model, make_loader(ds, batch_size=2, shuffle=False, seed=0), opt, epoch=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k)


def test_ddp_wrapped_model(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        data = load_data("fake", input_size=8)
        model = _small_net()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        loader = make_loader(data.train, batch_size=32, shuffle=True, seed=0, distributed=True)
        stats = train_one_epoch(ddp, loader, opt, epoch=0)
        assert stats.samples == 256
        val = make_loader(data.val, batch_size=64, shuffle=False, seed=0, distributed=True)
        reduced = evaluate(ddp, val, distributed=True)
        plain = evaluate(model, make_loader(data.val, batch_size=64, shuffle=False, seed=0))
        assert reduced.samples == 128 and reduced.top1 == pytest.approx(plain.top1)
    finally:
        dist.destroy_process_group()


def test_time_training_steps_leaves_the_model_and_the_rng_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 3))  # dropout draws RNG
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 2, 2, generator=g), torch.randint(0, 3, (4,), generator=g))] * 6
    rng = torch.get_rng_state()
    seconds = time_training_steps(model, batches, lr=0.1, warmup=2)
    assert seconds is not None and seconds > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # nothing left to time after the warm-up
    assert time_training_steps(model, batches[:2], lr=0.1, warmup=2) is None
    assert time_training_steps(model, batches[:1], lr=0.1, warmup=0) is not None
