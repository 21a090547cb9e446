"""Full-precision baseline: adapt when needed, cache (hit/miss/corrupt), determinism, accuracy."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from binarize_cli.convert import baseline as baseline_mod
from binarize_cli.convert.baseline import (
    DEFAULT_BASELINE_BATCH_SIZE,
    DEFAULT_BASELINE_EPOCHS,
    DEFAULT_BASELINE_LR,
    baseline_key,
    cache_root,
    ensure_baseline,
)
from binarize_cli.core.errors import TrainingDivergedError
from binarize_cli.load.data import load_data, make_loader
from binarize_cli.load.models import create_architecture, load_model

TINY = "test_resnet"  # timm's 0.37M-parameter test ResNet


@pytest.fixture(scope="module")
def fake8():
    return load_data("fake", input_size=8)


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BINARIZE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("BINARIZE_CACHE")
    assert cache_root() == Path("~/.cache/binarize").expanduser()


def test_second_call_is_a_cache_hit(fake8, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, batch_size=64, lr=1e-3)
    assert not first.cache_hit and first.trained and len(first.epoch_times) == 1
    assert first.cache_path is not None and first.cache_path.parent == cache_root() / "baselines"
    assert (first.cache_path / "model.safetensors").is_file()
    meta = json.loads((first.cache_path / "baseline.json").read_text())
    assert meta["key"] == first.key and meta["fields"]["model"] == "timm:test_resnet"
    assert not [p for p in first.cache_path.iterdir() if p.name.endswith(".tmp")]

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(baseline_mod, "train_one_epoch", no_training)
    second = ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, batch_size=64, lr=1e-3)
    assert second.cache_hit and second.key == first.key and second.cache_path == first.cache_path
    assert second.epoch_times == first.epoch_times and second.accuracy == first.accuracy
    assert _equal_states(second.model, first.model) and not second.model.training


def test_training_is_seeded_and_settings_change_the_key(fake8, tmp_path: Path) -> None:
    torch.manual_seed(111)  # the caller's RNG state must not matter...
    a = ensure_baseline(
        create_architecture(TINY, 10), fake8, epochs=1, lr=1e-3, cache_dir=tmp_path / "a"
    )
    torch.manual_seed(222)
    b = ensure_baseline(
        create_architecture(TINY, 10), fake8, epochs=1, lr=1e-3, cache_dir=tmp_path / "b"
    )
    assert not b.cache_hit and _equal_states(a.model, b.model)  # ...only `seed` does
    fresh = create_architecture(TINY, 10)
    state = torch.get_rng_state()
    c = ensure_baseline(fresh, fake8, epochs=1, lr=1e-3, seed=1, cache_dir=tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's RNG is left alone
    assert not c.cache_hit and c.key != a.key and not _equal_states(a.model, c.model)
    loaded = create_architecture(TINY, 10)
    keys = {
        baseline_key(loaded, fake8, train=True, epochs=e, batch_size=bs, lr=lr, seed=0)[0]
        for e, bs, lr in [(1, 64, 1e-3), (2, 64, 1e-3), (1, 32, 1e-3), (1, 64, 2e-3)]
    }
    assert len(keys) == 4
    # settings that are not used (no training) do not split the cache
    k1 = baseline_key(loaded, fake8, train=False, epochs=1, batch_size=64, lr=1e-3, seed=0)[0]
    k2 = baseline_key(loaded, fake8, train=False, epochs=9, batch_size=8, lr=5.0, seed=3)[0]
    assert k1 == k2


def test_trained_classes_adapt_and_matching_checkpoint_is_not_retrained(
    fake8, tmp_path: Path
) -> None:
    # a 1000-class model on 10-class data: the classifier is reset and trained
    adapted = ensure_baseline(create_architecture(TINY), fake8, epochs=1, cache_dir=tmp_path)
    assert (
        adapted.trained and adapted.model.get_submodule("fc").out_features == 10 and adapted.notes
    )
    # a checkpoint that already fits the data: evaluated only, epochs ignored, accuracy cached
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in adapted.model.state_dict().items()},
        str(tmp_path / "mine.safetensors"),
    )
    lm = load_model(TINY, checkpoint=tmp_path / "mine.safetensors")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ev = ensure_baseline(lm, fake8, epochs=50, cache_dir=tmp_path)
    assert not ev.trained and ev.epoch_times == [] and not ev.cache_hit
    assert ev.accuracy.top1 == pytest.approx(adapted.accuracy.top1)
    assert all(torch.equal(before[k], v) for k, v in ev.model.state_dict().items())
    assert not (ev.cache_path / "model.safetensors").exists()
    again = ensure_baseline(
        load_model(TINY, checkpoint=tmp_path / "mine.safetensors"),
        fake8,
        epochs=3,
        cache_dir=tmp_path,
    )
    assert again.cache_hit and again.accuracy == ev.accuracy


def test_corrupt_cache_entry_is_rebuilt(fake8, tmp_path: Path) -> None:
    first = ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, cache_dir=tmp_path)
    (first.cache_path / "model.safetensors").write_bytes(b"garbage")
    second = ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, cache_dir=tmp_path)
    assert not second.cache_hit and any("unreadable" in n for n in second.notes)
    assert _equal_states(first.model, second.model)
    (first.cache_path / "baseline.json").write_text("{not json")
    third = ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, cache_dir=tmp_path)
    assert not third.cache_hit
    fourth = ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, cache_dir=tmp_path)
    assert fourth.cache_hit


def test_progress_bar_only_when_asked(
    fake8, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    ensure_baseline(
        create_architecture(TINY, 10), fake8, epochs=2, progress=console, cache_dir=tmp_path
    )
    text = out.getvalue()
    assert "baseline test_resnet epoch 2/2" in text and "img/s" in text
    ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, cache_dir=tmp_path / "quiet")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_unwritable_cache_still_returns_the_baseline(fake8, tmp_path: Path, top1_recount) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, cache_dir=blocker)
    assert res.cache_path is None and any("could not write" in n for n in res.notes)
    # the accuracy is the returned model's, over the whole validation set
    loader = make_loader(fake8.val, batch_size=128, shuffle=False, seed=0)
    correct, total = top1_recount(res.model, loader)
    assert res.accuracy.samples == total == len(fake8.val)
    assert res.accuracy.top1 == pytest.approx(100 * correct / total, abs=1e-9)


def test_bad_arguments(fake8) -> None:
    with pytest.raises(ValueError):
        ensure_baseline(create_architecture(TINY, 10), fake8, epochs=-1)
    with pytest.raises(ValueError):
        ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, batch_size=0)


@pytest.mark.slow
def test_digits_resnet18_baseline_reaches_95_percent_and_is_cached(tmp_path: Path) -> None:
    """The documented default: timm resnet18 from scratch on 32x32 digits, >= 95 % top-1."""
    data = load_data("digits")

    def baseline():
        return ensure_baseline(
            create_architecture("resnet18", data.num_classes),
            data,
            epochs=DEFAULT_BASELINE_EPOCHS,
            batch_size=DEFAULT_BASELINE_BATCH_SIZE,
            lr=DEFAULT_BASELINE_LR,
            cache_dir=tmp_path,
        )

    first = baseline()
    assert (
        first.trained and not first.cache_hit and len(first.epoch_times) == DEFAULT_BASELINE_EPOCHS
    )
    assert first.accuracy.top1 >= 95.0 and first.accuracy.samples == 360
    start = time.monotonic()
    second = baseline()
    assert second.cache_hit and second.accuracy == first.accuracy
    assert time.monotonic() - start < max(first.epoch_times)  # no training
    assert os.path.isfile(second.cache_path / "model.safetensors")


def test_divergence_names_the_baseline_flag_and_caches_nothing(fake8, tmp_path: Path) -> None:
    with pytest.raises(TrainingDivergedError) as info:
        ensure_baseline(
            create_architecture(TINY, 10), fake8, epochs=1, lr=1e30, cache_dir=tmp_path / "c"
        )
    message = str(info.value)
    assert message.startswith("full-precision baseline diverged: loss is")
    assert "--baseline-lr" in message and "lower --lr" not in message
    cached = list((tmp_path / "c").rglob("*.safetensors")) if (tmp_path / "c").exists() else []
    assert cached == []


def test_the_key_hashes_the_whole_preprocessing_record(fake8) -> None:
    # the same data spec, size, mean and std read with another resampling or crop is other
    # data: a baseline trained and scored on one must not be reused for the other
    from dataclasses import replace

    loaded = create_architecture(TINY, 10)
    args = {"epochs": 1, "batch_size": 64, "lr": 1e-3, "seed": 0}
    base = fake8.preprocessing
    variants = [
        replace(base, interpolation="bicubic"),
        replace(base, antialias=not base.antialias),
        replace(base, pixel_scale=base.pixel_scale / 2),
    ]
    keys = {baseline_key(loaded, fake8, train=False, **args)[0]}
    for record in variants:
        assert record != base
        keys.add(baseline_key(loaded, replace(fake8, preprocessing=record), train=False, **args)[0])
    assert len(keys) == 1 + len(variants)
    fields = baseline_key(loaded, fake8, train=False, **args)[1]
    assert fields["preprocessing"] == base.to_dict()


def test_how_a_baseline_trains_splits_the_key_only_where_the_weights_differ(fake8) -> None:
    from binarize_cli.convert.training import Execution

    loaded = create_architecture(TINY, 10)

    def key(run: Execution | None, train: bool = True) -> str:
        args = {"epochs": 1, "batch_size": 64, "lr": 1e-3, "seed": 0}
        return baseline_key(loaded, fake8, train=train, execution=run, **args)[0]

    cpu = key(None)
    # loader workers and the CPU's index change no weight: the CPU keys of older runs stay
    assert key(Execution("cpu")) == key(Execution("cpu:0", workers=2)) == cpu
    # the device type, mixed precision and compilation each train other weights
    others = [Execution("cuda:0"), Execution("cpu", amp="bf16"), Execution("cpu", compile=True)]
    assert len({cpu, *(key(run) for run in others)}) == 4
    assert key(Execution("cuda:0")) == key(Execution("cuda:1"))
    # a baseline that does not train is the same whatever would have trained it
    assert key(Execution("cuda:0", amp="bf16"), train=False) == key(None, train=False)
    fields = baseline_key(loaded, fake8, train=True, epochs=1, batch_size=64, lr=1e-3, seed=0)[1]
    assert not {"device", "amp", "compile"} & set(fields)


def test_the_baseline_trains_and_evaluates_where_execution_says(fake8, monkeypatch) -> None:
    from binarize_cli.convert import training
    from binarize_cli.convert.training import Execution

    seen: set[str] = set()
    real = training._to

    def spy(batch, device):
        seen.add(str(device))
        return real(batch, device)

    monkeypatch.setattr(training, "_to", spy)
    # A device string no default would produce. Plain float32: bf16 autocast on a CPU can
    # leave this tiny model's weights NaN on 8x8 images (docs/devices.md), which is not what
    # this test is about (tests/convert/test_device.py covers bf16 epochs).
    run = Execution("cpu:0")
    base = ensure_baseline(create_architecture(TINY, 10), fake8, epochs=1, execution=run)
    assert seen == {"cpu:0"} and base.trained
    assert all(p.dtype == torch.float32 for p in base.model.parameters())


def test_non_finite_weights_with_a_finite_loss_stop_the_baseline(fake8, tmp_path, monkeypatch):
    """A step can leave a weight NaN while its loss was finite (seen with bf16 autocast on a
    CPU): the baseline is checked after each epoch, and --amp is named as a way out."""
    from binarize_cli.convert.training import EpochStats, Execution

    def poisoned(model, *args, **kwargs):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return EpochStats(loss=1.0, top1=0.0, images_per_s=1.0, seconds=0.1, steps=1)

    monkeypatch.setattr(baseline_mod, "train_one_epoch", poisoned)
    with pytest.raises(TrainingDivergedError) as info:
        ensure_baseline(
            create_architecture(TINY, 10),
            fake8,
            epochs=1,
            cache_dir=tmp_path,
            execution=Execution(amp="bf16"),
        )
    message = str(info.value)
    assert message.startswith("full-precision baseline diverged: ")
    assert "non-finite" in message and "without --amp" in message
    assert not list(tmp_path.rglob("*.safetensors"))
