"""Data specs (digits, fashion-mnist IDX, cifar10 batches, imagefolder, fake), errors, loaders."""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from binarize_cli.core.errors import DataError
from binarize_cli.core.preprocess import Preprocessing
from binarize_cli.load.data import (
    DATA_LOADERS,
    DATA_SPECS,
    DEFAULT_FASHION_MNIST_DIR,
    DataRequest,
    TensorImageDataset,
    load_data,
    make_loader,
    parse_input_size,
    read_idx,
    resize_stored,
    upscale_hint,
)

#: One channel, values as stored: the items are the stored images themselves.
PLAIN1 = Preprocessing(channels=1, pixel_scale=1.0, mean=(0.0,), std=(1.0,))

# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_digits_split_shapes_and_normalisation(digits) -> None:
    assert digits.spec == "digits" and digits.num_classes == 10 and digits.channels == 3
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    assert digits.input_size == (3, 32, 32)
    x, y = digits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grayscale replicated
    train = torch.stack([digits.train[i][0] for i in range(len(digits.train))])
    assert float(train.mean()) == pytest.approx(0.0, abs=1e-4)  # own training statistics
    assert float(train.std()) == pytest.approx(1.0, abs=1e-3)
    # stratified: every class has 35..37 of the 360 validation images
    counts = torch.bincount(digits.val.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37


def test_digits_split_is_fixed(digits) -> None:
    torch.manual_seed(123)
    again = load_data("digits")  # the split does not depend on any seed
    assert torch.equal(again.val.labels, digits.val.labels)
    assert torch.equal(again.val.images, digits.val.images)
    assert digits.train.images.shape[0] + digits.val.images.shape[0] == 1797


def test_digits_upsampling_is_bilinear_from_8x8() -> None:
    from sklearn.datasets import load_digits

    small = load_data("digits", input_size=8)
    raw = torch.from_numpy(load_digits().data.reshape(-1, 8, 8).astype(np.float32))
    # at 8x8 the stored images are the raw 0..16 ones, exactly (a permutation of them); the
    # items divide them by the record's pixel scale
    assert small.preprocessing.pixel_scale == 16
    stored = small.train.images[:, 0]
    hits = (stored[:20, None] == raw[None]).flatten(2).all(-1).any(-1)
    assert bool(hits.all())
    big = load_data("digits", input_size=(1, 16, 24))
    x, _ = big.val[3]
    assert x.shape == (1, 16, 24) and big.channels == 1 and big.input_size == (1, 16, 24)


def test_parse_input_size() -> None:
    assert parse_input_size(None, 3) is None
    assert parse_input_size(64, 3) == (3, 64, 64)
    assert parse_input_size((40, 48), 3) == (3, 40, 48)
    assert parse_input_size((1, 40, 48), 3) == (1, 40, 48)
    for bad in [(2, 8, 8), (0,), (3, 0, 4)]:
        with pytest.raises(DataError):
            parse_input_size(bad, 3)


# --------------------------------------------------------------------------- fashion-mnist


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_fashion(
    directory: Path, n_train: int = 20, n_val: int = 10, gz: bool = True
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_val) % 10)[::-1].astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def test_read_idx_roundtrip_and_errors(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "trunc").write_bytes(_idx_bytes(arr)[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\x00" * 4)
    with pytest.raises(DataError, match="unsigned byte"):
        read_idx(tmp_path / "float")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_from_an_explicit_path(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path / "fm")
    bundle = load_data(f"fashion-mnist:{tmp_path / 'fm'}")
    assert bundle.spec == f"fashion-mnist:{(tmp_path / 'fm').resolve()}"
    assert (len(bundle.train), len(bundle.val)) == (20, 10) and bundle.num_classes == 10
    assert bundle.input_size == (3, 32, 32) and bundle.classes[9] == "ankle boot"
    x, y = bundle.val[0]
    assert x.shape == (3, 32, 32) and y == int(arrays["t10k-labels-idx1-ubyte"][0])
    # at the native 28x28 the stored pixels are the file's, exactly
    native = load_data(f"fashion-mnist:{tmp_path / 'fm'}", input_size=28)
    assert torch.equal(
        native.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"])
    )
    x, _ = native.train[1]
    expect = (arrays["train-images-idx3-ubyte"][1] / 255.0 - native.mean[0]) / native.std[0]
    assert torch.allclose(x[0], torch.from_numpy(expect).float(), atol=1e-5)


def test_fashion_mnist_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # $BINARIZE_DATA, in torchvision's FashionMNIST/raw layout, uncompressed files
    _write_fashion(tmp_path / "home" / "FashionMNIST" / "raw", n_train=30, gz=False)
    monkeypatch.setenv("BINARIZE_DATA", str(tmp_path / "home"))
    bundle = load_data("fashion-mnist")
    assert bundle.spec == "fashion-mnist" and len(bundle.train) == 30
    assert bundle.source == str(tmp_path / "home" / "FashionMNIST" / "raw")


def test_fashion_mnist_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"fashion-mnist:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_data(f"fashion-mnist:{tmp_path / 'empty'}")
    _write_fashion(tmp_path / "mixed")
    (tmp_path / "mixed" / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    )
    with pytest.raises(DataError, match="do not match"):
        load_data(f"fashion-mnist:{tmp_path / 'mixed'}")
    # nothing anywhere and offline: a clear error, fast
    from binarize_cli.load import data as data_mod
    from binarize_cli.load import models

    monkeypatch.setenv("BINARIZE_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(data_mod, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setattr(models, "_reachable", lambda *a, **k: False)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_data("fashion-mnist")


@pytest.mark.slow
def test_real_fashion_mnist_from_the_debian_package() -> None:
    """Needs `apt-get install dataset-fashion-mnist` (the .ci script installs it)."""
    assert (DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(), (
        "install the Debian package dataset-fashion-mnist"
    )
    bundle = load_data(f"fashion-mnist:{DEFAULT_FASHION_MNIST_DIR}")
    assert (len(bundle.train), len(bundle.val)) == (60000, 10000)
    assert torch.equal(torch.bincount(bundle.val.labels), torch.full((10,), 1000))
    assert 0.25 < bundle.mean[0] < 0.32 and 0.3 < bundle.std[0] < 0.4


# --------------------------------------------------------------------------- cifar10


def _write_cifar(base: Path, n: int = 6) -> None:
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in (np.arange(n) + i) % 10],
        }
        with (base / name).open("wb") as f:
            pickle.dump(batch, f)
    with (base / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_batches(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    bundle = load_data(
        f"cifar10:{tmp_path / 'cifar'}", mean=mean, std=std, model_input_size=(3, 48, 48)
    )
    assert (len(bundle.train), len(bundle.val)) == (30, 6) and bundle.num_classes == 10
    assert bundle.input_size == (3, 48, 48) and bundle.mean == mean and bundle.std == std
    x, y = bundle.train[7]
    assert x.shape == (3, 48, 48) and y == 2  # row 1 of data_batch_2, whose labels start at 1
    # --input-size wins over the model's; native size keeps the pixels exactly
    native = load_data(
        f"cifar10:{tmp_path / 'cifar' / 'cifar-10-batches-py'}", input_size=32, mean=mean, std=std
    )
    x, _ = native.val[0]
    raw = native.val.images[0].float() / 255
    assert torch.allclose(
        x, (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1), atol=1e-5
    )


def test_cifar10_refuses_foreign_pickles(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(
        pickle.dumps({b"data": Path("/etc/passwd"), b"labels": []})
    )
    with pytest.raises(DataError, match="not allowed"):
        load_data(f"cifar10:{tmp_path / 'c'}")


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a path"):
        load_data("cifar10")
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"cifar10:{tmp_path / 'none'}")
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch"):
        load_data(f"cifar10:{tmp_path / 'c'}")


# --------------------------------------------------------------------------- imagefolder


def _write_images(root: Path, layout: dict[str, dict[str, int]]) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, classes in layout.items():
        for cls, count in classes.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )


def test_imagefolder(tmp_path: Path) -> None:
    _write_images(tmp_path / "ds", {"train": {"ant": 2, "bee": 3, "cat": 1}, "val": {"bee": 2}})
    bundle = load_data(
        f"imagefolder:{tmp_path / 'ds'}", model_input_size=(3, 24, 24), crop_pct=0.75
    )
    assert bundle.num_classes == 3 and bundle.classes == ["ant", "bee", "cat"]
    assert (len(bundle.train), len(bundle.val)) == (6, 2) and bundle.input_size == (3, 24, 24)
    x, y = bundle.val[0]
    assert x.shape == (3, 24, 24) and y == 1  # val has only "bee": train's index, not 0
    assert bundle.mean == pytest.approx((0.485, 0.456, 0.406))


def test_small_images_upscaled_to_the_model_size_get_a_hint(tmp_path: Path) -> None:
    """20x30 ImageFolder images or 32x32 CIFAR fed to a 224 model: a hint naming --input-size."""
    _write_images(tmp_path / "ds", {"train": {"ant": 1, "bee": 1}, "val": {"bee": 1}})
    spec = f"imagefolder:{tmp_path / 'ds'}"
    model = (3, 224, 224)
    bundle = load_data(spec, model_input_size=model)
    assert bundle.native_size == (20, 30)
    assert upscale_hint(bundle, model, explicit_size=False) == (
        "the images are 20x30 but the model's input size is 224x224: every image is upscaled "
        "7x, which is slow; pass --input-size 30 to train at their own size"
    )
    # --input-size given (even the model's own size), or less than 4x larger: no hint
    assert upscale_hint(bundle, model, explicit_size=True) is None
    near = load_data(spec, model_input_size=(3, 96, 96))
    assert upscale_hint(near, (3, 96, 96), explicit_size=False) is None
    _write_cifar(tmp_path / "cifar")
    cifar = load_data(f"cifar10:{tmp_path / 'cifar'}", model_input_size=model)
    assert cifar.native_size == (32, 32)
    assert "pass --input-size 32" in str(upscale_hint(cifar, model, explicit_size=False))
    # digits and fake keep their own 32x32 default whatever the model's size: no hint
    for other in ("digits", "fake"):
        small = load_data(other, model_input_size=model)
        assert upscale_hint(small, model, explicit_size=False) is None, other


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a path"):
        load_data("imagefolder:")
    _write_images(tmp_path / "a", {"train": {"x": 1}})
    with pytest.raises(DataError, match="no val/ folder"):
        load_data(f"imagefolder:{tmp_path / 'a'}")
    (tmp_path / "b" / "train" / "x").mkdir(parents=True)
    (tmp_path / "b" / "val" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="imagefolder"):
        load_data(f"imagefolder:{tmp_path / 'b'}")
    _write_images(tmp_path / "c", {"train": {"x": 1}, "val": {"x": 1, "y": 1}})
    with pytest.raises(DataError, match="not in train/: y"):
        load_data(f"imagefolder:{tmp_path / 'c'}")


# --------------------------------------------------------------------------- fake, specs


def test_fake_is_deterministic_and_learnable_shape() -> None:
    a = load_data("fake")
    torch.manual_seed(9)
    b = load_data("fake")  # its own fixed generator, not the global one
    assert (len(a.train), len(a.val), a.num_classes) == (256, 128, 10)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert torch.bincount(a.train.labels).tolist() == [26] * 6 + [25] * 4
    small = load_data("fake", input_size=16, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    assert small.train[0][0].shape == (3, 16, 16) and small.mean == (0.1, 0.2, 0.3)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("mnist", "unknown data spec 'mnist'; use one of: digits"),
        ("digits:/tmp", "digits takes no path"),
        ("fake:/x", "fake takes no path"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_data(spec)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- loaders


def _order(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_make_loader_is_deterministic_under_seed() -> None:
    ds = TensorImageDataset(torch.zeros(50, 1, 2, 2), torch.arange(50), PLAIN1)
    first = _order(make_loader(ds, batch_size=8, shuffle=True, seed=3))
    assert first == _order(make_loader(ds, batch_size=8, shuffle=True, seed=3))
    assert first != _order(make_loader(ds, batch_size=8, shuffle=True, seed=4))
    assert sorted(first) == list(range(50))
    loader = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    epoch1, epoch2 = _order(loader), _order(loader)
    assert epoch1 == first and epoch2 != epoch1  # a new but reproducible order per pass
    assert _order(make_loader(ds, batch_size=8, shuffle=False, seed=3)) == list(range(50))
    assert len(make_loader(ds, batch_size=8, shuffle=True, seed=0, drop_last=True)) == 6
    with_workers = make_loader(ds, batch_size=8, shuffle=True, seed=3, num_workers=1)
    assert _order(with_workers) == first


def test_make_loader_distributed_shards() -> None:
    ds = TensorImageDataset(torch.zeros(10, 1, 1, 1), torch.arange(10), PLAIN1)
    seen = []
    for rank in range(2):
        loader = make_loader(
            ds, batch_size=3, shuffle=True, seed=5, distributed=True, num_replicas=2, rank=rank
        )
        seen.append(_order(loader))
        assert (
            _order(
                make_loader(
                    ds,
                    batch_size=3,
                    shuffle=True,
                    seed=5,
                    distributed=True,
                    num_replicas=2,
                    rank=rank,
                )
            )
            == seen[-1]
        )
        loader.sampler.set_epoch(1)
        assert sorted(_order(loader)) != _order(loader) or _order(loader) != seen[-1]
    assert sorted(seen[0] + seen[1]) == list(range(10)) and not set(seen[0]) & set(seen[1])


def test_make_loader_rejects_empty_and_bad_batch() -> None:
    empty = TensorImageDataset(torch.zeros(0, 1, 2, 2), torch.zeros(0), PLAIN1)
    with pytest.raises(DataError, match="empty"):
        make_loader(empty, batch_size=4, shuffle=False, seed=0)
    ds = TensorImageDataset(torch.zeros(3, 1, 2, 2), torch.zeros(3), PLAIN1)
    with pytest.raises(DataError, match="batch size"):
        make_loader(ds, batch_size=0, shuffle=False, seed=0)


def test_specs_are_a_registry(monkeypatch) -> None:
    import binarize_cli.load.data as data_mod

    assert DATA_SPECS == (
        "digits",
        "fashion-mnist[:PATH]",
        "cifar10:PATH",
        "imagefolder:PATH",
        "fake",
    )
    assert DATA_LOADERS["fashion_mnist"] is DATA_LOADERS["fashion-mnist"]
    monkeypatch.setattr(data_mod, "DATA_SPECS", data_mod.DATA_SPECS)
    monkeypatch.setattr(data_mod, "DATA_LOADERS", dict(data_mod.DATA_LOADERS))
    seen: list[DataRequest] = []

    @data_mod.register_data("mine:PATH", "my")
    def _mine(req: DataRequest):
        seen.append(req)
        return load_data("fake", input_size=req.input_size)

    bundle = load_data("My:/x", input_size=16, crop_pct=0.5)
    assert (seen[0].path, seen[0].input_size, seen[0].crop_pct) == ("/x", 16, 0.5)
    assert bundle.input_size == (3, 16, 16)
    with pytest.raises(DataError, match=r"use one of: digits, .*, fake, mine:PATH$"):
        load_data("other")


# --------------------------------------------------------------------------- the preprocessing record


def by_the_record(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """A reader's own implementation of docs/format.md's "Preprocessing" steps 2-6 for a
    stored array ``[C0, H0, W0]`` (the torch resampler): only the resize is torch's."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32))[None]
    h0, w0 = x.shape[-2:]
    if prep.resize is None:
        h, w = h0, w0
    elif len(prep.resize) == 2:
        h, w = prep.resize
    else:  # the shorter side to S, the longer to int(S * long / short)
        s = prep.resize[0]
        h, w = (int(s * h0 / w0), s) if w0 <= h0 else (s, int(s * w0 / h0))
    if (h, w) != (h0, w0):
        x = F.interpolate(x, size=(h, w), mode=prep.interpolation, align_corners=False)
        if prep.round_resized:
            x = x.round().clamp(0, 255)
    y = x[0].numpy()
    if prep.crop is not None:
        top, left = int(round((h - prep.crop[0]) / 2)), int(round((w - prep.crop[1]) / 2))
        y = y[:, top : top + prep.crop[0], left : left + prep.crop[1]]
    y = y / np.float32(prep.pixel_scale)
    y = np.repeat(y, prep.channels, axis=0) if y.shape[0] == 1 else y
    mean = np.asarray(prep.mean, np.float32)[:, None, None]
    std = np.asarray(prep.std, np.float32)[:, None, None]
    return (y - mean) / std


def _digits_val_raw() -> np.ndarray:
    """The validation images of ``digits`` as stored by scikit-learn (0..16), in set order."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, idx_val = train_test_split(
        np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0
    )
    return d.data.reshape(-1, 1, 8, 8)[np.sort(idx_val)]


def _items(dataset, count: int) -> np.ndarray:
    return np.stack([dataset[i][0].numpy() for i in range(count)])


def test_tensor_sets_make_their_items_by_their_record(tmp_path: Path) -> None:
    """digits, fashion-mnist, cifar10 and fake: each item is exactly what the documented
    steps make of the stored image with the set's record, resized or not."""
    digits = load_data("digits", input_size=(3, 20, 28))
    rec = digits.preprocessing
    assert (rec.pixel_scale, rec.resize, rec.round_resized, rec.resampler) == (
        16.0,
        (20, 28),
        False,
        "torch",
    )
    assert rec.classes == tuple(str(i) for i in range(10)) and rec.mean == digits.mean
    expected = np.stack([by_the_record(img, rec) for img in _digits_val_raw()[:8]])
    assert np.array_equal(_items(digits.val, 8), expected)

    arrays = _write_fashion(tmp_path / "fm")
    fashion = load_data(f"fashion-mnist:{tmp_path / 'fm'}")
    rec = fashion.preprocessing
    assert (rec.pixel_scale, rec.resize, rec.round_resized) == (255.0, (32, 32), True)
    raw = arrays["t10k-images-idx3-ubyte"][:, None]
    expected = np.stack([by_the_record(img, rec) for img in raw[:6]])
    assert np.array_equal(_items(fashion.val, 6), expected)

    _write_cifar(tmp_path / "cifar")
    cifar = load_data(f"cifar10:{tmp_path / 'cifar'}", model_input_size=(3, 40, 48))
    rec = cifar.preprocessing
    assert (rec.resize, rec.round_resized, len(rec.classes)) == ((40, 48), True, 10)
    expected = np.stack([by_the_record(img, rec) for img in cifar.val.images[:6].numpy()])
    assert np.array_equal(_items(cifar.val, 6), expected)
    assert cifar.input_size == (3, 40, 48)

    fake = load_data("fake", input_size=16)
    rec = fake.preprocessing
    assert (rec.pixel_scale, rec.resize, fake.input_size) == (1.0, (16, 16), (3, 16, 16))
    expected = np.stack([by_the_record(img, rec) for img in fake.val.images[:6].numpy()])
    assert np.array_equal(_items(fake.val, 6), expected)


def _write_shapes(root: Path) -> list[Path]:
    """Non-square RGB and greyscale images in an ImageFolder layout; the val files in order."""
    from PIL import Image

    rng = np.random.default_rng(5)
    shapes = [(20, 30), (37, 23), (26, 26)]
    for split in ("train", "val"):
        for k, cls in enumerate(("ant", "bee")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i, (h, w) in enumerate(shapes):
                rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(rgb[..., 0]) if (i + k) % 3 == 2 else Image.fromarray(rgb)
                img.save(d / f"{i}.png")
    return sorted((root / "val").glob("*/*.png"))


def test_imagefolder_items_are_pil_by_the_record(tmp_path: Path) -> None:
    """imagefolder: PIL decodes (greyscale replicated by ``convert("RGB")``), resizes the shorter
    side to ``int(size / crop_pct)`` with its bilinear filter and center crops; then / 255 and
    the normalisation: the record says each of these, and the items follow it exactly."""
    from PIL import Image

    files = _write_shapes(tmp_path / "ds")
    bundle = load_data(
        f"imagefolder:{tmp_path / 'ds'}", model_input_size=(3, 24, 24), crop_pct=0.95
    )
    rec = bundle.preprocessing
    assert rec.resize == (int(24 / 0.95),) and rec.crop == (24, 24) and rec.crop_pct == 0.95
    assert (rec.resampler, rec.antialias, rec.round_resized, rec.pixel_scale) == (
        "pil",
        True,
        True,
        255.0,
    )
    assert rec.classes == ("ant", "bee") and bundle.input_size == (3, 24, 24)
    for i, path in enumerate(files):
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        s = rec.resize[0]
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # PIL takes (W, H)
        resized = np.asarray(rgb.resize(size, Image.BILINEAR)).transpose(2, 0, 1)
        top = int(round((resized.shape[1] - 24) / 2))
        left = int(round((resized.shape[2] - 24) / 2))
        crop = resized[:, top : top + 24, left : left + 24].astype(np.float32) / np.float32(255)
        mean = np.asarray(rec.mean, np.float32)[:, None, None]
        std = np.asarray(rec.std, np.float32)[:, None, None]
        assert np.array_equal(bundle.val[i][0].numpy(), (crop - mean) / std), path


def test_a_recorded_preprocessing_is_applied_to_any_set(tmp_path: Path) -> None:
    """``load_data(spec, preprocessing=record)``: the record's model side (size, crop,
    interpolation, mean, std) on the set's own decoding and scale, whatever the other
    arguments say."""
    _write_shapes(tmp_path / "ds")
    folder = load_data(
        f"imagefolder:{tmp_path / 'ds'}", model_input_size=(3, 24, 24), crop_pct=0.95
    ).preprocessing
    digits = load_data("digits", preprocessing=folder, input_size=64, mean=(0.1,) * 3)
    rec = digits.preprocessing
    assert (rec.resize, rec.crop, rec.mean) == (folder.resize, folder.crop, folder.mean)
    assert (rec.pixel_scale, rec.resampler, rec.classes) == (
        16.0,
        "torch",
        digits.preprocessing.classes,
    )
    assert digits.input_size == (3, 24, 24) and digits.val[0][0].shape == (3, 24, 24)
    expected = np.stack([by_the_record(img, rec) for img in _digits_val_raw()[:5]])
    assert np.allclose(_items(digits.val, 5), expected, atol=1e-5)
    # the set's own record applied to itself gives the very same items
    again = load_data("digits", preprocessing=load_data("digits").preprocessing)
    assert torch.equal(again.val[7][0], load_data("digits").val[7][0])
    # a 1-channel record on RGB data is refused in one line
    grey = Preprocessing(channels=1, pixel_scale=1.0, mean=(0.5,), std=(0.25,))
    with pytest.raises(DataError, match="imagefolder images are RGB"):
        load_data(f"imagefolder:{tmp_path / 'ds'}", preprocessing=grey)
    _write_cifar(tmp_path / "cifar")
    with pytest.raises(DataError, match="3 channels but the preprocessing makes 1-channel"):
        load_data(f"cifar10:{tmp_path / 'cifar'}", preprocessing=grey)


def test_resize_stored_follows_the_filter_and_rounding() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4) * 17  # 0..255
    near = Preprocessing(
        channels=1, pixel_scale=255.0, mean=(0.0,), std=(1.0,), interpolation="nearest"
    )
    assert torch.equal(resize_stored(x, near, (8, 8)), F.interpolate(x, (8, 8), mode="nearest"))
    assert resize_stored(x, near, (4, 4)) is x  # already that size: untouched
    rounded = replace(near, interpolation="bilinear", round_resized=True)
    y = resize_stored(x, rounded, (6, 6))
    raw = F.interpolate(x, (6, 6), mode="bilinear", align_corners=False)
    assert torch.equal(y, raw.round().clamp(0, 255)) and not torch.equal(y, raw)
    cubic = replace(near, interpolation="bicubic", antialias=True)
    expected = F.interpolate(x, (2, 3), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(resize_stored(x, cubic, (2, 3)), expected)
