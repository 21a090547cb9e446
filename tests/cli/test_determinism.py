"""Determinism: the same command with the same ``--seed`` on CPU gives a bit-identical
``model.safetensors``.

Fast tests pin the pieces: seeded loaders, seeded calibration sampling, fine-tuning from the
same start, and a weights file free of timestamps. The slow test runs ``binarize convert``
twice in fresh processes with separate baseline caches (so the baseline is trained twice,
too) and compares bytes, and checks that another seed gives other bytes (the comparison can
fail).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import TensorDataset

from binarize_cli.convert.finetune import finetune
from binarize_cli.core.metadata import META_FILE, RunMetadata
from binarize_cli.core.rundir import WEIGHTS_FILE, write_run
from binarize_cli.load.data import make_loader


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(
        torch.randn(20, 3, 6, 6, generator=g), torch.randint(0, 4, (20,), generator=g)
    )


def test_loaders_depend_only_on_the_seed():
    def order(seed: int) -> list[int]:
        loader = make_loader(_dataset(), batch_size=5, shuffle=True, seed=seed)
        return [int(y) for _x, ys in loader for y in ys]

    torch.manual_seed(1)
    first = order(3)
    torch.manual_seed(999)  # the global RNG must not matter
    assert order(3) == first
    assert order(4) != first


def test_calibration_sampling_is_seeded():
    from binarize_cli.convert.calibrate import collect_input_samples

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    batches = [
        torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]

    def sample(seed: int) -> torch.Tensor:
        return collect_input_samples(model, ["2"], batches, samples_per_layer=50, seed=seed)["2"]

    torch.manual_seed(5)
    a = sample(0)
    torch.manual_seed(6)
    assert torch.equal(a, sample(0))
    assert not torch.equal(a, sample(1))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4)
    )


def _finetuned() -> dict[str, torch.Tensor]:
    model = _tiny()
    finetune(
        model,
        make_train_loader=lambda epoch: make_loader(
            _dataset(), batch_size=5, shuffle=True, seed=11 + epoch, drop_last=True
        ),
        epochs=2,
        lr=1e-2,
    )
    return model.state_dict()


def test_same_training_gives_the_same_weights_file(tmp_path, run_meta):
    a = write_run(tmp_path / "a", _finetuned(), RunMetadata.from_dict(run_meta(num_classes=4)))
    time.sleep(1.1)  # a timestamp in the weights file would now differ
    b = write_run(
        tmp_path / "b",
        _finetuned(),
        RunMetadata.from_dict({**run_meta(num_classes=4), "created": "later"}),
    )
    assert (a / WEIGHTS_FILE).read_bytes() == (b / WEIGHTS_FILE).read_bytes()
    assert (a / META_FILE).read_bytes() != (b / META_FILE).read_bytes()
    with safe_open(str(a / WEIGHTS_FILE), framework="pt") as fh:
        assert fh.metadata() == {"format": "binarize-run"}


# --------------------------------------------------------------------------- the real CLI


def _convert(binarize_process, cwd: Path, cache: Path, out: str, seed: int) -> Path:
    args = [
        "convert",
        "test_resnet",
        "--data",
        "fake",
        "--epochs",
        "1",
        "--baseline-epochs",
        "1",
        "--batch-size",
        "32",
        "--calib-batches",
        "1",
        "--seed",
        str(seed),
        "-o",
        out,
    ]
    env = {"BINARIZE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = binarize_process(*args, cwd=cwd, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / out / WEIGHTS_FILE


@pytest.mark.slow
def test_same_seed_same_bytes_across_processes(tmp_path, binarize_process):
    first = _convert(binarize_process, tmp_path, tmp_path / "cache1", "run1", seed=3)
    second = _convert(binarize_process, tmp_path, tmp_path / "cache2", "run2", seed=3)
    assert first.read_bytes() == second.read_bytes()
    meta1 = json.loads((first.parent / META_FILE).read_text())
    meta2 = json.loads((second.parent / META_FILE).read_text())
    assert meta1["accuracy"] == meta2["accuracy"]
    other = _convert(binarize_process, tmp_path, tmp_path / "cache1", "run3", seed=4)
    assert other.read_bytes() != first.read_bytes()
