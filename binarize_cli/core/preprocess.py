"""The preprocessing record: what turns a stored image into the model's input tensor.

:class:`Preprocessing` is defined here once and travels everywhere the input must be
reproduced: every data set of :mod:`binarize_cli.load.data` builds its transform from one
(and hands it out as ``DataBundle.preprocessing``), ``binarize.json`` records it under
``preprocessing``, the packed file and the ONNX file carry it as JSON metadata, and
``binarize run`` / ``binarize verify`` rebuild their images from it. ``docs/format.md``
("Preprocessing") is the specification a third-party reader follows; the steps, in order:

1. **decode** the stored image to its pixel values ``[C0, H0, W0]`` (``resampler`` ``pil``:
   ``PIL.Image.open(f).convert("RGB")``, 8-bit; ``torch``: the set's stored array);
2. **resize** the stored values (not yet scaled) to :meth:`Preprocessing.resized_size`:
   ``resize`` ``[S]`` puts the shorter side to ``S`` and the longer to
   ``int(S * long / short)``; ``[H, W]`` is exact; ``None`` keeps the size. ``resampler``
   ``pil`` resizes with ``PIL.Image.resize`` and the ``interpolation`` filter (PIL antialiases
   when shrinking: ``antialias`` is true), ``torch`` with
   ``torch.nn.functional.interpolate(mode=interpolation, align_corners=False,
   antialias=antialias)`` on float32 values, skipped when the size already matches;
   ``round_resized`` rounds the result half to even and clamps it to 0..255 (8-bit images;
   PIL's output is 8-bit by construction);
3. **center crop** to ``crop`` ``[H, W]`` when given: top ``int(round((h - H) / 2))``, left
   ``int(round((w - W) / 2))`` (Python's ``round``: half to even);
4. **scale**: divide by ``pixel_scale`` (255 for 8-bit images, 16 for the digits set, 1 for
   sets stored as floats in [0, 1]) in float32;
5. **channels**: a 1-channel image becomes ``channels`` channels by replicating it
   (``grey`` is ``replicate``);
6. **normalise**: ``(x - mean[c]) / std[c]`` per channel, in float32.

``crop_pct`` is the fraction the crop keeps (the timm/torchvision evaluation rule
``resize = int(crop / crop_pct)``): recorded for the reader, already applied in ``resize``.
``classes`` are the class names by index where the data has them.

The record splits in two: the *model's* side (:data:`MODEL_FIELDS`: channels, resize,
interpolation, crop, crop_pct, mean, std), which another data set adopts when ``run``
evaluates a file on it (:meth:`Preprocessing.with_model_side`), and the *data's* side (how
its files are decoded and scaled, its resampler and class names).

Torch-free (the packed file's readers use it without torch); validation errors are one-line
:class:`~binarize_cli.core.errors.PreprocessingError` (exit 2) naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from binarize_cli.core.errors import PreprocessingError

#: Interpolation filters a record may name.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: Which library resizes: PIL on the decoded 8-bit image, or torch on the stored array.
RESAMPLERS = ("pil", "torch")
#: How a 1-channel image becomes a 3-channel input.
GREY_MODES = ("replicate",)
#: The fields the model fixes (adopted by another data set evaluated with the record).
MODEL_FIELDS = ("channels", "resize", "interpolation", "crop", "crop_pct", "mean", "std")


def _ints(value: Any, name: str, lengths: tuple[int, ...]) -> tuple[int, ...]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) in lengths
    if ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return tuple(int(v) for v in value)
    shape = " or ".join({1: "[S]", 2: "[H, W]"}[n] for n in lengths)
    raise PreprocessingError(
        f"preprocessing.{name} must be {shape} (positive integers), got {value!r}"
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _floats(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, Sequence) and not isinstance(value, str) and all(map(_is_number, value)):
        return tuple(float(v) for v in value)
    raise PreprocessingError(f"preprocessing.{name} must be a list of numbers, got {value!r}")


@dataclass(frozen=True)
class Preprocessing:
    """How a stored image becomes the model's input (the steps in the module docstring).

    ``channels`` (1 or 3), ``pixel_scale`` (> 0), ``mean``/``std`` (one value per channel,
    std > 0) are required; ``resize`` is ``(S,)`` (shorter side), ``(H, W)`` (exact) or None;
    ``crop`` is ``(H, W)`` or None. Construction validates every field (one-line
    :class:`PreprocessingError`).
    """

    channels: int
    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    grey: str = "replicate"
    resize: tuple[int, ...] | None = None
    interpolation: str = "bilinear"
    antialias: bool = False
    round_resized: bool = False
    resampler: str = "torch"
    crop: tuple[int, ...] | None = None
    crop_pct: float | None = None
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise PreprocessingError(
                f"preprocessing.channels must be 1 or 3, got {self.channels!r}"
            )
        scale = self.pixel_scale
        if not _is_number(scale) or not scale > 0:
            raise PreprocessingError(
                f"preprocessing.pixel_scale must be a positive number, got {scale!r}"
            )
        set_(self, "pixel_scale", float(scale))
        for name in ("mean", "std"):
            values = _floats(getattr(self, name), name)
            if len(values) != self.channels:
                raise PreprocessingError(
                    f"preprocessing.{name} must have {self.channels} values (one per channel), "
                    f"got {len(values)}"
                )
            set_(self, name, values)
        if min(self.std) <= 0:
            raise PreprocessingError(f"preprocessing.std must be > 0, got {list(self.std)}")
        for name, allowed in (
            ("grey", GREY_MODES),
            ("interpolation", INTERPOLATIONS),
            ("resampler", RESAMPLERS),
        ):
            if getattr(self, name) not in allowed:
                raise PreprocessingError(
                    f"preprocessing.{name} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        for name in ("antialias", "round_resized"):
            if not isinstance(getattr(self, name), bool):
                raise PreprocessingError(f"preprocessing.{name} must be true or false")
        pil = (self.pixel_scale, self.antialias, self.round_resized) == (255.0, True, True)
        if self.resampler == "pil" and not pil:
            raise PreprocessingError(
                "preprocessing with resampler pil decodes 8-bit images: pixel_scale must be 255, "
                "antialias and round_resized true"
            )
        if self.resampler == "torch" and self.interpolation == "nearest" and self.antialias:
            raise PreprocessingError(
                "preprocessing.antialias must be false with nearest (torch cannot antialias it)"
            )
        if self.resize is not None:
            set_(self, "resize", _ints(self.resize, "resize", (1, 2)))
        if self.crop is not None:
            set_(self, "crop", _ints(self.crop, "crop", (2,)))
        self._check_crop_fits()
        pct = self.crop_pct
        if pct is not None and (not _is_number(pct) or not 0 < pct <= 1):
            raise PreprocessingError(f"preprocessing.crop_pct must be in (0, 1], got {pct!r}")
        if pct is not None:
            set_(self, "crop_pct", float(pct))
        if isinstance(self.classes, str) or not all(isinstance(c, str) for c in self.classes):
            raise PreprocessingError("preprocessing.classes must be a list of strings")
        set_(self, "classes", tuple(self.classes))

    def _check_crop_fits(self) -> None:
        """A crop must fit inside every resized image (torchvision would pad, an accident):
        within ``[S]`` (the shorter side) or ``[H, W]``; with no resize the torch sets check
        their one stored size (:meth:`crop_box`), and a ``pil`` record needs a resize."""
        if self.crop is None:
            return
        if self.resize is None:
            if self.resampler == "pil":
                raise PreprocessingError(
                    "preprocessing.crop needs a resize with resampler pil "
                    "(the crop must fit every image)"
                )
            return
        limit = self.resize * 2 if len(self.resize) == 1 else self.resize
        if self.crop[0] > limit[0] or self.crop[1] > limit[1]:
            side = "shorter side" if len(self.resize) == 1 else "size"
            raise PreprocessingError(
                f"preprocessing.crop {self.crop[0]}x{self.crop[1]} is larger than the resized "
                f"image ({side} {'x'.join(map(str, self.resize))})"
            )

    # -- geometry ------------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after step 2 for a stored image of ``height`` x ``width``."""
        if self.resize is None:
            return height, width
        if len(self.resize) == 2:
            return self.resize[0], self.resize[1]
        side = self.resize[0]
        if width <= height:
            return int(side * height / width), side
        return side, int(side * width / height)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, H, W)`` of step 3 in a resized image of ``height`` x ``width`` (the
        whole image when there is no crop); a crop larger than the image is an error."""
        if self.crop is None:
            return 0, 0, height, width
        ch, cw = self.crop
        if ch > height or cw > width:
            raise PreprocessingError(
                f"preprocessing.crop {ch}x{cw} is larger than the resized image {height}x{width}"
            )
        return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), ch, cw

    def output_size(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H, W) of the model input made from a stored ``height`` x ``width`` image."""
        _, _, h, w = self.crop_box(*self.resized_size(height, width))
        return self.channels, h, w

    # -- combination and text ------------------------------------------------------------
    def with_model_side(self, other: Preprocessing) -> Preprocessing:
        """This data's record with the model's side (:data:`MODEL_FIELDS`) taken from
        ``other``: how ``run --data SPEC`` applies a file's record to other data."""
        return replace(self, **{name: getattr(other, name) for name in MODEL_FIELDS})

    def describe(self) -> str:
        """One line: resize, crop, interpolation, scale, mean/std (``run`` prints it)."""
        if self.resize is None:
            steps = ["no resize"]
        else:
            what = (
                f"shorter side to {self.resize[0]}"
                if len(self.resize) == 1
                else f"resize to {self.resize[0]}x{self.resize[1]}"
            )
            extra = ", antialias" if self.antialias else ""
            steps = [f"{what} {self.interpolation} ({self.resampler}{extra})"]
        if self.crop is not None:
            pct = f" (crop_pct {self.crop_pct:g})" if self.crop_pct is not None else ""
            steps.append(f"center crop {self.crop[0]}x{self.crop[1]}{pct}")
        steps.append(f"pixels / {self.pixel_scale:g}")
        mean = "[" + ", ".join(f"{v:.4g}" for v in self.mean) + "]"
        std = "[" + ", ".join(f"{v:.4g}" for v in self.std) + "]"
        return ", ".join([*steps, f"mean {mean} std {std}"])

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (field order; tuples as lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Preprocessing:
        """The record from its JSON form; an unknown or missing key, or a bad value, is a
        one-line :class:`PreprocessingError`."""
        if not isinstance(data, Mapping):
            raise PreprocessingError("preprocessing must be an object")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise PreprocessingError(f"preprocessing has unknown keys: {', '.join(unknown)}")
        missing = [n for n in ("channels", "pixel_scale", "mean", "std") if n not in data]
        if missing:
            raise PreprocessingError(f"preprocessing lacks {', '.join(missing)}")
        return cls(**dict(data))


__all__ = [
    "GREY_MODES",
    "INTERPOLATIONS",
    "MODEL_FIELDS",
    "RESAMPLERS",
    "Preprocessing",
]
