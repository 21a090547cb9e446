"""Datasets behind ``--data SPEC`` and deterministic loaders.

Specs
-----
Each name is registered with :func:`register_data` (``DATA_LOADERS``: name -> loader taking a
:class:`DataRequest`); :data:`DATA_SPECS` lists them as errors show them.

``digits`` (default)
    scikit-learn's bundled 1797 handwritten 8x8 digits (values 0..16), scaled to [0, 1],
    upsampled bilinearly to the input size (default 32x32), replicated to 3 channels. Fixed
    stratified 80/20 train/val split (1437/360, ``random_state=0``), independent of ``--seed``
    so accuracies compare across seeds. Held in memory.
``fashion-mnist[:PATH]``
    Zalando's Fashion-MNIST (60k train / 10k test, 28x28 grayscale), read from the four IDX
    files (``train-images-idx3-ubyte[.gz]`` ...) with gzip + numpy. Searched in PATH (only
    there, when given), then ``$BINARIZE_DATA`` (and its ``fashion-mnist/`` subfolder), then
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``); each also in
    torchvision's ``FashionMNIST/raw`` layout. If none has it and the mirror is reachable,
    torchvision downloads it into ``$BINARIZE_DATA/fashion-mnist`` (default
    ``~/.cache/binarize/data/fashion-mnist``, searched last on later runs).
    Resized to the input size (default 32x32), 3 channels. Held in memory as uint8.
``cifar10:PATH``
    The CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``) in PATH or
    ``PATH/cifar-10-batches-py``; read with a restricted unpickler that only admits numpy
    arrays (the batches are pickles; nothing else is executed).
``imagefolder:PATH``
    ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (ImageNet's layout), through
    torchvision's ``ImageFolder`` with the shorter side resized to ``size / crop_pct`` and a center crop (no
    random augmentation: loaders stay deterministic under ``--seed``). Val classes must be a
    subset of train classes and use train's class indices.
``fake``
    10 classes, 256 train / 128 val images of 3x32x32: a fixed random pattern per class plus
    noise, generated from a fixed seed. Learnable, for smoke tests.

Normalisation and size
----------------------
Grayscale sets (digits, fashion-mnist) are standardised with their own training-set mean and
std (replicated over channels) and default to 32x32. RGB sets (cifar10, imagefolder) use the
model's normalisation (``mean``/``std``, from its ``pretrained_cfg``) and the model's input size
(``model_input_size``), falling back to the set's own statistics and native size; ``fake``
defaults to 32x32 and the model's normalisation. ``input_size`` (``--input-size``) overrides the
size for every set. Items are ``(float tensor [C, H, W], int label)``. Small images that the
model's input size enlarges a lot (32x32 CIFAR or ImageFolder images at 224x224) train slowly:
:func:`upscale_hint` words the hint ``convert`` prints (the rule is in its docstring).

The preprocessing record
------------------------
Each loader first builds its :class:`~binarize_cli.core.preprocess.Preprocessing` (pixel
scale, resize, interpolation, crop, mean/std, classes) from the values above, then makes its
items from that record and nothing else: in-memory sets through :class:`TensorImageDataset`
(small sets resized once up front with the same :func:`resize_stored`), imagefolder through
a torchvision transform built from it. The record is ``DataBundle.preprocessing``; ``convert``
stores it in ``binarize.json`` and the exports. ``load_data(spec, preprocessing=record)``
makes a set's items with a recorded record's model side (what ``run`` and ``verify`` do).

Errors: an unknown spec, a missing/empty path or a wrong layout raise
:class:`~binarize_cli.core.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from binarize_cli.core.errors import DataError
from binarize_cli.core.preprocess import Preprocessing

__all__ = [
    "DATA_LOADERS",
    "DATA_SPECS",
    "DEFAULT_FASHION_MNIST_DIR",
    "DataBundle",
    "DataRequest",
    "describe",
    "resize_stored",
    "TensorImageDataset",
    "load_data",
    "make_loader",
    "parse_input_size",
    "read_idx",
    "register_data",
    "upscale_hint",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_GRAY_DEFAULT_SIZE = 32
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_FASHION_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
_FASHION_MIRROR_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class DataBundle:
    """A dataset pair plus the preprocessing the rest of the tool records.

    ``spec`` is canonical (``digits``, ``fashion-mnist``, ``fashion-mnist:/abs/dir``,
    ``cifar10:/abs/dir``, ``imagefolder:/abs/dir``, ``fake``); ``source`` is where the files
    were found. ``preprocessing`` is the record the items are made with (the loader builds its
    transform from it; ``mean``, ``std``, ``channels`` and ``classes`` read it). ``input_size``
    is (C, H, W) of the items; ``native_size`` is (H, W) of the stored images before resizing
    (imagefolder: the first training image's), or None when the set has no native size
    (``fake`` is generated at the input size).
    """

    spec: str
    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    input_size: tuple[int, int, int]
    preprocessing: Preprocessing
    source: str | None = None
    native_size: tuple[int, int] | None = None

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    @property
    def channels(self) -> int:
        return self.preprocessing.channels

    @property
    def classes(self) -> list[str]:
        return list(self.preprocessing.classes)


def resize_stored(x: torch.Tensor, prep: Preprocessing, size: tuple[int, int]) -> torch.Tensor:
    """Step 2 of :mod:`binarize_cli.core.preprocess` with the torch resampler: float32 stored
    values ``[N, C, H, W]`` resized to ``size`` (``prep.interpolation``, ``align_corners=False``,
    ``prep.antialias``), rounded half to even and clamped to 0..255 when
    ``prep.round_resized``; unchanged when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if prep.interpolation == "nearest":
        y = F.interpolate(x, size=size, mode="nearest")
    else:
        y = F.interpolate(
            x, size=size, mode=prep.interpolation, align_corners=False, antialias=prep.antialias
        )
    return y.round_().clamp_(0, 255) if prep.round_resized else y


class TensorImageDataset(Dataset):
    """Images held in memory as stored values ``[N, C0, H0, W0]`` (uint8 or float), labels
    ``[N]``; an item is its image through ``preprocessing`` (torch resampler): resized
    (:func:`resize_stored`), center cropped, divided by ``pixel_scale``, a single channel
    replicated to ``channels``, normalised. Images stored at the resized size are not resized
    again (the loaders resize small sets once, up front, with the same function).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, preprocessing: Preprocessing
    ) -> None:
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images [N,C,H,W] and labels [N] expected, got {tuple(images.shape)}, {tuple(labels.shape)}"
            )
        if preprocessing.resampler != "torch":
            raise ValueError("TensorImageDataset resizes with torch; the record asks for PIL")
        if images.shape[1] not in (1, preprocessing.channels):
            raise DataError(
                f"the images have {images.shape[1]} channels but the preprocessing makes "
                f"{preprocessing.channels}-channel inputs"
            )
        self.images = images
        self.labels = labels.long()
        self.preprocessing = preprocessing
        self.resized = preprocessing.resized_size(*images.shape[-2:])
        self.box = preprocessing.crop_box(*self.resized)
        self._mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(preprocessing.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        p = self.preprocessing
        x = resize_stored(self.images[index : index + 1].float(), p, self.resized)[0]
        top, left, h, w = self.box
        x = x[:, top : top + h, left : left + w] / p.pixel_scale
        if x.shape[0] != p.channels:
            x = x.expand(p.channels, -1, -1)
        return (x - self._mean) / self._std, int(self.labels[index])


# --------------------------------------------------------------------------- helpers


def parse_input_size(
    value: int | Sequence[int] | None, channels: int
) -> tuple[int, int, int] | None:
    """``224`` -> (C, 224, 224); ``(H, W)`` -> (C, H, W); ``(C, H, W)`` as given. None stays None."""
    if value is None:
        return None
    if isinstance(value, int):
        dims: tuple[int, ...] = (channels, value, value)
    else:
        vals = tuple(int(v) for v in value)
        if len(vals) == 2:
            dims = (channels, *vals)
        elif len(vals) == 3:
            dims = vals
        else:
            raise DataError(f"input size must be N, (H, W) or (C, H, W); got {value!r}")
    if min(dims) < 1 or dims[0] not in (1, 3):
        raise DataError(f"input size must have 1 or 3 channels and positive sides; got {dims}")
    return dims  # type: ignore[return-value]


def _resize_u8(images: np.ndarray, prep: Preprocessing, chunk: int = 8192) -> torch.Tensor:
    """Uint8 [N, C, H, W] through step 2 (:func:`resize_stored`; ``prep`` rounds) in chunks,
    kept as uint8: the whole set resized once instead of per item."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    size = prep.resized_size(*t.shape[-2:])
    if tuple(t.shape[-2:]) == size:
        return t.clone()
    out = torch.empty((t.shape[0], t.shape[1], *size), dtype=torch.uint8)
    for i in range(0, t.shape[0], chunk):
        out[i : i + chunk] = resize_stored(t[i : i + chunk].float(), prep, size).to(torch.uint8)
    return out


def _gray_stats(images: torch.Tensor, pixel_scale: float) -> tuple[float, float]:
    x = images.float() / pixel_scale
    return float(x.mean()), float(x.std())


def _grey_record(
    req: DataRequest, *, pixel_scale: float, classes: Sequence[str], round_resized: bool = False
) -> Preprocessing:
    """A grey set's record at ``--input-size`` (default 3x32x32), with unit statistics until
    :func:`_own_grey_stats` measures the set's own on its resized training images."""
    c, h, w = parse_input_size(req.input_size, 3) or (3, _GRAY_DEFAULT_SIZE, _GRAY_DEFAULT_SIZE)
    own = Preprocessing(
        channels=c,
        pixel_scale=pixel_scale,
        mean=(0.0,) * c,
        std=(1.0,) * c,
        resize=(h, w),
        round_resized=round_resized,
        classes=tuple(classes),
    )
    return req.adopt(own)


def _rgb_record(
    req: DataRequest,
    default_mean: Sequence[float],
    default_std: Sequence[float],
    *,
    classes: Sequence[str] = (),
    **fields: Any,
) -> Preprocessing:
    """An 8-bit RGB set's record: ``--mean``/``--std`` (the model's) or the set's defaults,
    resized values rounded to 8 bits, then ``fields`` (resize, crop, resampler, ...)."""
    m, s = _pick_norm(req.mean, req.std, default_mean, default_std, 3)
    own = Preprocessing(
        channels=3,
        pixel_scale=255.0,
        mean=m,
        std=s,
        round_resized=True,
        classes=tuple(classes),
        **fields,
    )
    return req.adopt(own)


def _own_grey_stats(req: DataRequest, prep: Preprocessing, train: torch.Tensor) -> Preprocessing:
    """``prep`` with the set's own mean and std (replicated over the channels), measured on
    the resized training images; a recorded record (``req.preprocessing``) keeps its own."""
    if req.preprocessing is not None:
        return prep
    mu, sd = _gray_stats(train, prep.pixel_scale)
    return replace(prep, mean=(mu,) * prep.channels, std=(sd,) * prep.channels)


def _pick_norm(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    default_mean: Sequence[float],
    default_std: Sequence[float],
    channels: int,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    m = tuple(float(v) for v in (mean if mean is not None else default_mean))
    s = tuple(float(v) for v in (std if std is not None else default_std))
    if len(m) == 1:
        m = m * channels
    if len(s) == 1:
        s = s * channels
    if len(m) != channels or len(s) != channels or min(s) <= 0:
        raise DataError(f"mean/std must have {channels} entries with std > 0; got {m}, {s}")
    return m, s


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DataRequest:
    """What :func:`load_data` hands a registered loader: the spec's ``PATH`` part (``""``
    when absent) and the size/normalisation hints (see :func:`load_data`'s arguments).

    ``input_size`` is as given (parse it with :func:`parse_input_size`); ``model_input_size``
    is already a tuple of ints.
    """

    path: str
    input_size: int | Sequence[int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    model_input_size: tuple[int, ...] | None = None
    crop_pct: float = 0.875
    preprocessing: Preprocessing | None = None

    def adopt(self, own: Preprocessing) -> Preprocessing:
        """The set's ``own`` record, with the model's side of :attr:`preprocessing` when one
        was given (:meth:`~binarize_cli.core.preprocess.Preprocessing.with_model_side`)."""
        return own if self.preprocessing is None else own.with_model_side(self.preprocessing)

    def rgb_size(self, default: tuple[int, int, int]) -> tuple[int, ...]:
        """``--input-size``, else the model's (3, H, W), else ``default``."""
        mis = self.model_input_size
        return parse_input_size(self.input_size, 3) or (mis and (3, *mis[-2:])) or default


DataLoaderFn = Callable[[DataRequest], DataBundle]

#: ``--data`` name (and aliases) -> loader, filled by :func:`register_data`.
DATA_LOADERS: dict[str, DataLoaderFn] = {}
#: The registered specs as errors and docs list them (``"cifar10:PATH"``), in order.
DATA_SPECS: tuple[str, ...] = ()


def register_data(usage: str, *aliases: str) -> Callable[[DataLoaderFn], DataLoaderFn]:
    """Register a loader under the name that starts ``usage`` (``"cifar10:PATH"`` ->
    ``cifar10``) and under ``aliases``; ``usage`` is how errors and docs list the spec."""
    name = usage.split("[")[0].split(":")[0]

    def register(loader: DataLoaderFn) -> DataLoaderFn:
        global DATA_SPECS
        for key in (name, *aliases):
            DATA_LOADERS[key] = loader
        DATA_SPECS = (*DATA_SPECS, usage)
        return loader

    return register


def _tensor_bundle(
    spec: str,
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    prep: Preprocessing,
    *,
    source: str,
    native_size: tuple[int, int] | None = None,
) -> DataBundle:
    """Two in-memory ``(images, labels)`` splits of stored values as a bundle of
    :class:`TensorImageDataset` made with ``prep``."""
    train_set = TensorImageDataset(*train, prep)
    return DataBundle(
        spec=spec,
        name=name,
        train=train_set,
        val=TensorImageDataset(*val, prep),
        num_classes=len(prep.classes),
        input_size=prep.output_size(*train[0].shape[-2:]),
        preprocessing=prep,
        source=source,
        native_size=native_size,
    )


def _required_dir(req: DataRequest, name: str, what: str) -> Path:
    """The spec's PATH, an existing directory (``what`` says what it holds)."""
    parse_input_size(req.input_size, 3)  # a bad --input-size is reported before the path
    if not req.path:
        raise DataError(f"{name} needs a path: --data {name}:DIR ({what})")
    d = Path(req.path).expanduser()
    if not d.is_dir():
        raise DataError(f"{name}: {d} does not exist or is not a directory")
    return d


def _no_path(req: DataRequest, name: str, why: str = "") -> None:
    if req.path:
        raise DataError(f"{name} takes no path{why}; use --data {name}")


# --------------------------------------------------------------------------- digits


@register_data("digits")
def _load_digits(req: DataRequest) -> DataBundle:
    _no_path(req, "digits", " (it ships with scikit-learn)")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32).reshape(-1, 1, 8, 8)  # values 0..16
    y = np.asarray(digits.target, dtype=np.int64)
    idx_train, idx_val = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=y, random_state=0, shuffle=True
    )
    prep = _grey_record(req, pixel_scale=16.0, classes=[str(i) for i in range(10)])
    images = torch.from_numpy(x)
    images = resize_stored(images, prep, prep.resized_size(8, 8))  # once, for the whole set
    labels = torch.from_numpy(y)
    tr = torch.from_numpy(np.sort(idx_train))
    va = torch.from_numpy(np.sort(idx_val))
    prep = _own_grey_stats(req, prep, images[tr])
    return _tensor_bundle(
        "digits",
        "digits",
        (images[tr].contiguous(), labels[tr]),
        (images[va].contiguous(), labels[va]),
        prep,
        source="sklearn.datasets.load_digits",
        native_size=(8, 8),
    )


# --------------------------------------------------------------------------- fashion-mnist


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, magic ``0 0 dtype ndim``.

    Only unsigned-byte data (dtype code 0x08, what MNIST-style sets use) is accepted.
    """
    p = Path(path)
    try:
        raw = bytearray(gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {p}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{p} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{p}: IDX data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - header != count:
        raise DataError(
            f"{p}: IDX payload has {len(raw) - header} bytes, header says {count} (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def _fashion_dirs(directory: Path) -> list[Path]:
    return [directory, directory / "FashionMNIST" / "raw", directory / "fashion-mnist"]


def _find_fashion(directory: Path) -> dict[str, Path] | None:
    for d in _fashion_dirs(directory):
        found = {k: _idx_file(d, stem) for k, stem in _FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _data_home() -> Path:
    env = os.environ.get("BINARIZE_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("BINARIZE_CACHE")
    base = Path(cache).expanduser() if cache else Path("~/.cache/binarize").expanduser()
    return base / "data"


def _download_fashion(root: Path) -> dict[str, Path] | None:
    """Download with torchvision when the mirror is reachable; None when offline."""
    from binarize_cli.load.models import _reachable

    # torchvision's mirror (FashionMNIST.mirrors); probed before importing torchvision at all
    if not _reachable(_FASHION_MIRROR_HOST, 80):
        return None
    import torchvision

    try:
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:
        raise DataError(f"downloading Fashion-MNIST into {root} failed: {exc}") from exc
    return _find_fashion(root)


def _fashion_files(path: str | None) -> tuple[dict[str, Path], str]:
    """The four IDX files and the canonical spec: in ``path`` only when given, else in the
    default places (then downloaded when the mirror is reachable)."""
    if path:
        d = Path(path).expanduser()
        if not d.exists():
            raise DataError(f"fashion-mnist: {d} does not exist")
        if not d.is_dir():
            raise DataError(f"fashion-mnist: {d} is not a directory")
        found = _find_fashion(d)
        if found is None:
            raise DataError(
                f"fashion-mnist: {d} has no train-images-idx3-ubyte.gz/train-labels-idx1-ubyte.gz/"
                "t10k-images-idx3-ubyte.gz/t10k-labels-idx1-ubyte.gz"
            )
        return found, f"fashion-mnist:{d.resolve()}"
    candidates = []
    if os.environ.get("BINARIZE_DATA"):
        candidates.append(Path(os.environ["BINARIZE_DATA"]).expanduser())
    candidates.append(DEFAULT_FASHION_MNIST_DIR)
    candidates.append(_data_home() / "fashion-mnist")  # where an earlier download went
    files = None
    for c in candidates:
        if c.is_dir():
            files = _find_fashion(c)
            if files:
                break
    if files is None:
        files = _download_fashion(_data_home() / "fashion-mnist")
    if files is None:
        where = ", ".join(str(c) for c in candidates)
        raise DataError(
            f"fashion-mnist not found (looked in {where}) and the download mirror is unreachable; "
            "run `apt-get install dataset-fashion-mnist` or pass --data fashion-mnist:DIR"
        )
    return files, "fashion-mnist"


def _check_fashion_arrays(arrays: dict[str, np.ndarray]) -> None:
    for split in ("train", "val"):
        imgs, labs = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if imgs.ndim != 3 or labs.ndim != 1 or imgs.shape[0] != labs.shape[0]:
            raise DataError(
                f"fashion-mnist: {split} images {imgs.shape} and labels {labs.shape} do not match"
            )
        if imgs.shape[0] == 0:
            raise DataError(f"fashion-mnist: the {split} split is empty")
        if labs.max(initial=0) > 9:
            raise DataError(f"fashion-mnist: {split} labels outside 0..9")


@register_data("fashion-mnist[:PATH]", "fashion_mnist", "fashionmnist")
def _load_fashion(req: DataRequest) -> DataBundle:
    parse_input_size(req.input_size, 3)  # a bad --input-size fails before any file is read
    files, spec = _fashion_files(req.path or None)
    arrays = {k: read_idx(p) for k, p in files.items()}
    _check_fashion_arrays(arrays)
    prep = _grey_record(req, pixel_scale=255.0, classes=_FASHION_CLASSES, round_resized=True)
    tr_images = _resize_u8(arrays["train_images"][:, None], prep)  # once, kept as uint8
    va_images = _resize_u8(arrays["val_images"][:, None], prep)
    prep = _own_grey_stats(req, prep, tr_images)
    return _tensor_bundle(
        spec,
        "fashion-mnist",
        (tr_images, torch.from_numpy(arrays["train_labels"].astype(np.int64))),
        (va_images, torch.from_numpy(arrays["val_labels"].astype(np.int64))),
        prep,
        source=str(files["train_images"].parent),
        native_size=(28, 28),
    )


# --------------------------------------------------------------------------- cifar10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what numpy arrays need; CIFAR batches are pickled dicts of arrays/lists."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise DataError(f"cifar10: cannot read {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"cifar10: {path} is not a CIFAR batch")
    data = obj.get("data", obj.get(b"data"))
    labels = obj.get("labels", obj.get(b"labels"))
    if data is None or labels is None:
        raise DataError(f"cifar10: {path} lacks 'data' or 'labels'")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"cifar10: {path} has data {data.shape} / labels {labels.shape}, expected [N, 3072] / [N]"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_classes(base: Path) -> list[str]:
    """The label names from ``batches.meta`` when it is readable, else ``0``..``9``."""
    meta = base / "batches.meta"
    if meta.is_file():
        try:
            with meta.open("rb") as f:
                names = _NumpyOnlyUnpickler(f, encoding="latin1").load().get("label_names")
            if isinstance(names, list) and len(names) == 10:
                return [str(n) for n in names]
        except Exception:
            pass
    return [str(i) for i in range(10)]


@register_data("cifar10:PATH")
def _load_cifar10(req: DataRequest) -> DataBundle:
    d = _required_dir(req, "cifar10", "the folder holding cifar-10-batches-py")
    base = d / "cifar-10-batches-py" if (d / "cifar-10-batches-py").is_dir() else d
    train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
    test_file = base / "test_batch"
    missing = [p.name for p in [*train_files, test_file] if not p.is_file()]
    if missing:
        raise DataError(
            f"cifar10: {base} lacks {', '.join(missing)}; expected the python version (cifar-10-python.tar.gz) unpacked"
        )
    parts = [_read_cifar_batch(p) for p in train_files]
    tr_x = np.concatenate([p[0] for p in parts])
    tr_y = np.concatenate([p[1] for p in parts])
    va_x, va_y = _read_cifar_batch(test_file)
    if tr_y.size and (tr_y.min() < 0 or tr_y.max() > 9 or va_y.min() < 0 or va_y.max() > 9):
        raise DataError("cifar10: labels outside 0..9")
    size = req.rgb_size((3, 32, 32))
    if size[0] != 3:
        raise DataError(f"cifar10 is RGB; input size needs 3 channels, got {size}")
    prep = _rgb_record(
        req, _CIFAR_MEAN, _CIFAR_STD, resize=(size[1], size[2]), classes=_cifar_classes(base)
    )
    return _tensor_bundle(
        f"cifar10:{d.resolve()}",
        "cifar10",
        (torch.from_numpy(tr_x), torch.from_numpy(tr_y)),
        (torch.from_numpy(va_x), torch.from_numpy(va_y)),
        prep,  # resized per item: a 224x224 CIFAR would not fit in memory
        source=str(base),
        native_size=(32, 32),
    )


# --------------------------------------------------------------------------- imagefolder


def _use_train_classes(train: Any, val: Any) -> None:
    """Give ``val`` (an ImageFolder) ``train``'s class indices; val classes must be a subset."""
    extra = sorted(set(val.classes) - set(train.classes))
    if extra:
        raise DataError(f"imagefolder: val/ has classes not in train/: {', '.join(extra[:5])}")
    remap = {val.class_to_idx[c]: train.class_to_idx[c] for c in val.classes}
    val.samples = [(p, remap[t]) for p, t in val.samples]
    val.imgs = val.samples
    val.targets = [t for _, t in val.samples]
    val.classes = list(train.classes)
    val.class_to_idx = dict(train.class_to_idx)


def _first_image_size(samples: list[tuple[str, int]]) -> tuple[int, int] | None:
    """(H, W) of the first image of an ImageFolder (its header only), or None if unreadable."""
    from PIL import Image

    if not samples:
        return None
    try:
        with Image.open(samples[0][0]) as img:
            width, height = img.size
    except OSError:
        return None
    return int(height), int(width)


@register_data("imagefolder:PATH")
def _load_imagefolder(req: DataRequest) -> DataBundle:
    from torchvision import datasets

    d = _required_dir(req, "imagefolder", "with train/ and val/ class folders")
    for split in ("train", "val"):
        if not (d / split).is_dir():
            raise DataError(
                f"imagefolder: {d} has no {split}/ folder; expected {d}/train/<class>/* and {d}/val/<class>/*"
            )
    size = req.rgb_size((3, 224, 224))
    if size[0] != 3:
        raise DataError(f"imagefolder images are RGB; input size needs 3 channels, got {size}")
    h, w = size[1], size[2]
    crop_pct = req.crop_pct
    if not 0 < crop_pct <= 1:
        raise DataError(f"crop_pct must be in (0, 1]; got {crop_pct}")
    # timm/torchvision evaluation: shorter side to size / crop_pct (aspect kept), center crop
    prep = _rgb_record(
        req,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        resize=(int(h / crop_pct),) if h == w else (int(h / crop_pct), int(w / crop_pct)),
        antialias=True,
        resampler="pil",
        crop=(h, w),
        crop_pct=crop_pct,
    )
    if prep.channels != 3:
        raise DataError("imagefolder images are RGB; the preprocessing asks for 1 channel")
    tf = _pil_transform(prep)
    try:
        train = datasets.ImageFolder(str(d / "train"), transform=tf)
        val = datasets.ImageFolder(str(d / "val"), transform=tf)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder: {' '.join(str(exc).split())}") from exc
    _use_train_classes(train, val)
    prep = replace(prep, classes=tuple(train.classes))
    native = _first_image_size(train.samples)
    return DataBundle(
        spec=f"imagefolder:{d.resolve()}",
        name="imagefolder",
        train=train,
        val=val,
        num_classes=len(train.classes),
        input_size=prep.output_size(*(native or prep.crop or (h, w))),
        preprocessing=prep,
        source=str(d),
        native_size=native,
    )


def _pil_transform(prep: Preprocessing) -> Any:
    """The torchvision transform of a ``pil`` record (steps 2-6 on a decoded RGB image):
    ``Resize`` (an int: shorter side; a pair: exact) with PIL's filter, ``CenterCrop``,
    ``ToTensor`` (divides by 255) and ``Normalize``."""
    from torchvision import transforms

    steps: list[Any] = []
    if prep.resize is not None:
        size = prep.resize[0] if len(prep.resize) == 1 else tuple(prep.resize)
        mode = transforms.InterpolationMode(prep.interpolation)
        steps.append(transforms.Resize(size, interpolation=mode, antialias=True))
    if prep.crop is not None:
        steps.append(transforms.CenterCrop(tuple(prep.crop)))
    steps += [transforms.ToTensor(), transforms.Normalize(prep.mean, prep.std)]
    return transforms.Compose(steps)


# --------------------------------------------------------------------------- fake

_FAKE_CLASSES, _FAKE_TRAIN, _FAKE_VAL = 10, 256, 128


@register_data("fake")
def _load_fake(req: DataRequest) -> DataBundle:
    _no_path(req, "fake")
    c, h, w = parse_input_size(req.input_size, 3) or (3, 32, 32)
    m, s = _pick_norm(req.mean, req.std, (0.5,) * c, (0.25,) * c, c)
    classes = tuple(f"class{i}" for i in range(_FAKE_CLASSES))
    prep = req.adopt(
        Preprocessing(channels=c, pixel_scale=1.0, mean=m, std=s, resize=(h, w), classes=classes)
    )
    # generated at the size the record's crop (else resize) asks for: no native size to keep
    c, (h, w) = prep.channels, prep.crop or prep.resized_size(h, w)
    g = torch.Generator().manual_seed(20240601)
    patterns = torch.rand((_FAKE_CLASSES, c, 8, 8), generator=g)
    patterns = F.interpolate(patterns, size=(h, w), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % _FAKE_CLASSES
        labels = labels[torch.randperm(n, generator=g)]
        noise = 0.25 * torch.randn((n, c, h, w), generator=g)
        return (patterns[labels] + noise).clamp_(0, 1), labels

    train = make(_FAKE_TRAIN)
    val = make(_FAKE_VAL)
    return _tensor_bundle("fake", "fake", train, val, prep, source="synthetic")


# --------------------------------------------------------------------------- entry points


def load_data(
    spec: str = "digits",
    *,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_input_size: Sequence[int] | None = None,
    crop_pct: float = 0.875,
    preprocessing: Preprocessing | None = None,
) -> DataBundle:
    """Load a data spec ``NAME[:PATH]`` through its registered loader (see the module
    docstring). The splits are fixed on purpose (no seed: accuracies compare across seeds).

    Args:
        input_size: explicit size (``--input-size``): N, (H, W) or (C, H, W); every set.
        mean, std: the model's normalisation, used by RGB sets (cifar10, imagefolder, fake);
            grayscale sets standardise with their own training statistics.
        model_input_size: the model's (C, H, W); the default size of cifar10/imagefolder.
        crop_pct: the model's center-crop fraction (imagefolder).
        preprocessing: a recorded :class:`~binarize_cli.core.preprocess.Preprocessing` (a
            run's or an export's): its model side (channels, resize, interpolation, crop,
            mean, std) replaces the size and normalisation the other arguments would give,
            so the items are made exactly as they were for the run; the set keeps its own
            decoding, pixel scale, resampler and classes.
    """
    text = (spec or "digits").strip()
    name, _, path = text.partition(":")
    mis = tuple(int(v) for v in model_input_size) if model_input_size is not None else None
    loader = DATA_LOADERS.get(name.lower())
    if loader is None:
        raise DataError(f"unknown data spec {spec!r}; use one of: {', '.join(DATA_SPECS)}")
    return loader(DataRequest(path, input_size, mean, std, mis, crop_pct, preprocessing))


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a loader worker from torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    distributed: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (and the epoch, via the sampler).

    Shuffling draws from a ``torch.Generator`` seeded with ``seed``; iterating the loader
    again continues that generator (a new, still deterministic, order per epoch). With
    ``distributed=True`` a ``DistributedSampler(shuffle, seed, drop_last)`` shards the data
    over ranks; call ``loader.sampler.set_epoch(epoch)`` each epoch
    (:func:`binarize_cli.convert.training.train_one_epoch` does it when given ``epoch``).
    ``num_replicas``/``rank`` default to the initialised process group's. With
    ``num_workers > 0`` the workers persist across passes over the loader (an evaluation
    loader read every epoch starts them once).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1 (got {batch_size})")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("the dataset is empty")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "drop_last": drop_last,
        "num_workers": num_workers,
        "generator": generator,
        "pin_memory": pin_memory,
        "worker_init_fn": _seed_worker if num_workers > 0 else None,
        "persistent_workers": num_workers > 0,
    }
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=int(seed),
            drop_last=drop_last,
        )
        return DataLoader(dataset, sampler=sampler, **kwargs)
    return DataLoader(dataset, shuffle=shuffle, **kwargs)


#: :func:`upscale_hint`'s rule: images whose native side is at most this many pixels ...
SMALL_IMAGE_SIDE = 64
#: ... and that the model's input size enlarges at least this many times get a hint.
UPSCALE_FACTOR = 4


def upscale_hint(
    bundle: DataBundle, model_input_size: Sequence[int], *, explicit_size: bool
) -> str | None:
    """A one-line hint when small images are upscaled to a much larger model input size.

    The rule: no ``--input-size`` was given (``explicit_size`` False), the items have the
    model's input size (so that size came from the model, not from the set's own default),
    the native side is at most :data:`SMALL_IMAGE_SIDE` and the item side is at least
    :data:`UPSCALE_FACTOR` times it (32x32 CIFAR or ImageFolder images fed to a 224x224
    model). Otherwise None.
    """
    native = bundle.native_size
    size = tuple(bundle.input_size[-2:])
    if explicit_size or native is None or size != tuple(model_input_size[-2:]):
        return None
    if max(native) > SMALL_IMAGE_SIDE or min(size) < UPSCALE_FACTOR * max(native):
        return None
    return (
        f"the images are {native[0]}x{native[1]} but the model's input size is "
        f"{size[0]}x{size[1]}: every image is upscaled {min(size) // max(native)}x, which is slow; "
        f"pass --input-size {max(native)} to train at their own size"
    )


def describe(bundle: DataBundle) -> str:
    """One line about a bundle, for logs: name, sizes, classes, input size."""
    return (
        f"{bundle.spec}: {len(bundle.train)} train / {len(bundle.val)} val, "  # type: ignore[arg-type]
        f"{bundle.num_classes} classes, input {bundle.input_size[0]}x{bundle.input_size[1]}x{bundle.input_size[2]}"
    )
