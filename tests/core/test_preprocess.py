"""The preprocessing record: JSON round trip, one-line validation, and its geometry rules
checked against torchvision's own Resize and CenterCrop on non-square images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from binarize_cli.core.errors import PreprocessingError
from binarize_cli.core.preprocess import MODEL_FIELDS, Preprocessing

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def folder_record(**over) -> Preprocessing:
    base = {
        "channels": 3,
        "pixel_scale": 255,
        **IMAGENET,
        "resize": (235,),
        "antialias": True,
        "round_resized": True,
        "resampler": "pil",
        "crop": (224, 224),
        "crop_pct": 0.95,
        "classes": ("ant", "bee"),
    }
    return Preprocessing(**{**base, **over})


def test_json_round_trip_keeps_every_field() -> None:
    rec = folder_record()
    d = rec.to_dict()
    assert list(d) == [
        "channels",
        "pixel_scale",
        "mean",
        "std",
        "grey",
        "resize",
        "interpolation",
        "antialias",
        "round_resized",
        "resampler",
        "crop",
        "crop_pct",
        "classes",
    ]
    assert d["resize"] == [235] and d["crop"] == [224, 224] and d["pixel_scale"] == 255.0
    again = Preprocessing.from_dict(json.loads(json.dumps(d)))
    assert again == rec and hash(again) == hash(rec)  # frozen: usable as a cache key
    with pytest.raises(AttributeError):
        rec.crop_pct = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"pixel_scale": 0}, "pixel_scale must be a positive number"),
        ({"mean": (0.5,)}, "mean must have 3 values"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be > 0"),
        ({"mean": ("a", 1, 2)}, "mean must be a list of numbers"),
        ({"interpolation": "lanczos"}, "interpolation must be one of bilinear, bicubic, nearest"),
        ({"resize": (0,)}, r"resize must be \[S\] or \[H, W\] \(positive integers\)"),
        ({"resize": (1, 2, 3)}, "resize must be"),
        ({"crop": (224,)}, r"crop must be \[H, W\] \(positive"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
        ({"pixel_scale": 16}, "resampler pil decodes 8-bit images"),
        ({"grey": "luma"}, "grey must be one of replicate"),
        ({"classes": "ab"}, "classes must be a list of strings"),
    ],
)
def test_validation_is_one_line(change, match) -> None:
    with pytest.raises(PreprocessingError, match=match) as info:
        folder_record(**change)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_from_dict_refuses_unknown_and_missing_keys() -> None:
    d = folder_record().to_dict()
    with pytest.raises(PreprocessingError, match="unknown keys: size"):
        Preprocessing.from_dict({**d, "size": 3})
    del d["pixel_scale"]
    with pytest.raises(PreprocessingError, match="lacks pixel_scale"):
        Preprocessing.from_dict(d)
    with pytest.raises(PreprocessingError, match="must be an object"):
        Preprocessing.from_dict([1, 2])
    torch_nearest = {"channels": 1, "pixel_scale": 1, "mean": [0], "std": [1]}
    with pytest.raises(PreprocessingError, match="antialias must be false with nearest"):
        Preprocessing.from_dict({**torch_nearest, "interpolation": "nearest", "antialias": True})


@pytest.mark.parametrize(("height", "width"), [(20, 30), (45, 31), (33, 33), (101, 7)])
def test_geometry_is_torchvisions(height: int, width: int) -> None:
    """``resized_size`` and ``crop_box`` give what torchvision's Resize(int) and CenterCrop do
    to a PIL image (the imagefolder transform), on non-square images."""
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    rec = folder_record(resize=(13,), crop=(11, 12))
    resized = transforms.Resize(13)(img)
    assert rec.resized_size(height, width) == (resized.height, resized.width)
    top, left, h, w = rec.crop_box(resized.height, resized.width)
    expected = np.asarray(transforms.CenterCrop((11, 12))(resized))
    assert np.array_equal(np.asarray(resized)[top : top + h, left : left + w], expected)
    assert rec.output_size(height, width) == (3, 11, 12)
    exact = folder_record(resize=(17, 9), crop=None)
    assert exact.resized_size(height, width) == (17, 9) and exact.crop_box(17, 9) == (0, 0, 17, 9)
    with pytest.raises(PreprocessingError, match="larger than the resized image"):
        folder_record(crop=(300, 300)).crop_box(235, 240)


def test_a_crop_that_does_not_fit_the_resize_is_refused() -> None:
    """docs/format.md section 8 step 3: the crop fits every resized image, else the record is
    refused when built (not padded as torchvision's CenterCrop would)."""
    with pytest.raises(PreprocessingError, match=r"crop 236x224 is larger .*shorter side 235"):
        folder_record(crop=(236, 224))
    with pytest.raises(PreprocessingError, match=r"crop 10x12 is larger .*size 17x11"):
        folder_record(resize=(17, 11), crop=(10, 12))
    with pytest.raises(PreprocessingError, match="crop needs a resize with resampler pil"):
        folder_record(resize=None)
    assert folder_record(crop=(235, 235)).crop_box(235, 300) == (0, 32, 235, 235)
    torch_rec = Preprocessing(channels=1, pixel_scale=1, mean=(0,), std=(1,), crop=(4, 4))
    with pytest.raises(PreprocessingError, match="larger than the resized image"):
        torch_rec.crop_box(3, 8)  # no resize: checked against the set's stored size


def test_model_side_and_description() -> None:
    digits = Preprocessing(
        channels=3, pixel_scale=16, mean=(0.3,) * 3, std=(0.3,) * 3, resize=(32, 32)
    )
    folder = folder_record()
    mixed = digits.with_model_side(folder)
    for name in MODEL_FIELDS:
        assert getattr(mixed, name) == getattr(folder, name), name
    # the data keeps how it is decoded, scaled and resampled
    assert (mixed.pixel_scale, mixed.resampler, mixed.antialias, mixed.classes) == (
        16,
        "torch",
        False,
        (),
    )
    assert folder.describe() == (
        "shorter side to 235 bilinear (pil, antialias), center crop 224x224 (crop_pct 0.95), "
        "pixels / 255, mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225]"
    )
    assert digits.describe().startswith("resize to 32x32 bilinear (torch), pixels / 16, mean [0.3")
