"""Load image classifiers from timm or torchvision: by name, from the hub, or from a checkpoint.

Model specs
-----------
``resnet18``, ``timm:resnet18``, ``timm:resnet18.a1_in1k`` (a timm name with an optional
pretrained tag), ``torchvision:resnet18``, ``torchvision:resnet50.IMAGENET1K_V2`` (a torchvision
classification model with an optional weights-enum name), or ``MODULE:CLASS`` (a user's own
``nn.Module`` class, see "User classes" below). A bare name is looked up in timm
first; a bare name timm does not know but torchvision does (``mobilenet_v2``) loads from
torchvision, and the canonical spec (``LoadedModel.spec``) records that. Unknown names raise
:class:`~binarize_cli.core.errors.UnknownModelError` listing close matches (difflib).

Canonical specs: ``timm:ARCH`` for random/checkpoint weights without an explicit tag,
``timm:ARCH.TAG`` when a tag was given or pretrained weights were loaded (the resolved default
tag); ``torchvision:ARCH`` or ``torchvision:ARCH.WEIGHTS`` likewise. Every canonical spec is
accepted back by :func:`load_model` and :func:`create_architecture`.

User classes
------------
``MODULE:CLASS`` (``mymodels:TinyNet``, ``pkg.nets:Net``; any prefix other than ``timm`` and
``torchvision``) imports ``MODULE`` with the current directory first on the import path, then
``PYTHONPATH`` and the installed packages, and instantiates ``CLASS()``
(:func:`import_model_class`). The number of classes: when the constructor has a
``num_classes`` parameter it is passed ``num_classes=`` whenever a count is asked for;
otherwise ``CLASS()`` is built as it is and, if its classifier (the last ``nn.Linear`` run)
has another width, that classifier is replaced (:func:`reset_classifier`). Preprocessing and
roles may be declared timm's way, a ``pretrained_cfg`` dict attribute with ``input_size``,
``mean``, ``std``, ``first_conv``, ``classifier``; without it the input is 3x224x224 with
ImageNet's mean/std and the roles come from the execution order. A user class has no hub
weights (``pretrained`` is refused); weights come from ``--checkpoint``. Rebuilding a run
(``report``/``export``/``verify``) imports the module again: run them where it can be
imported. Import failures, a missing class and an object that is not an ``nn.Module``
subclass raise :class:`~binarize_cli.core.errors.UnknownModelError` (exit 2).

Weights (``LoadedModel.weights``)
---------------------------------
* ``"random"``: the architecture's own initialisation (:func:`create_architecture`).
* ``"pretrained"``: the hub weights. The local caches are tried first (Hugging Face hub cache
  under ``$HF_HUB_CACHE`` / ``$HF_HOME/hub``, then torch hub's ``$TORCH_HOME/hub/checkpoints``);
  a cached file is loaded through timm's own pretrained path
  (``pretrained_cfg_overlay=dict(file=...)``), so timm's checkpoint filters and classifier
  adaptation apply. Without a cached file the hub host is probed with a short timeout
  (:data:`PROBE_TIMEOUT_S`); offline (or with ``HF_HUB_OFFLINE=1``) a one-line
  :class:`~binarize_cli.core.errors.CheckpointError` names the cache directories searched and
  says to pass ``--checkpoint`` instead of sitting through timm's ~45 s retry loop. Online,
  timm's hub download (or torchvision's weights URL) runs as usual. ``LoadedModel.source`` is
  the cached file the weights were read from (after a download, the file it left in the
  cache), so a run can record the file and its hash (:func:`file_sha256`).
* ``"checkpoint:<sha256[:12]>"``: a local file. ``.safetensors`` is read with safetensors;
  anything else with ``torch.load(weights_only=True)`` (never a full unpickle). Accepted
  layouts: a plain state dict, ``{"state_dict": ...}``, ``{"model": ...}``,
  ``{"model_state_dict": ...}``, ``{"state_dict_ema": ...}``; ``module.`` (DDP) and
  ``_orig_mod.`` (torch.compile) prefixes are stripped. A checkpoint wins over
  ``pretrained=True`` (nothing is downloaded); ``convert`` refuses the two together.

Input size
----------
:func:`check_input_size` refuses an input smaller than the model can take (``inception_v3``
below 75x75) in one line naming the smallest size and ``--input-size``, from a dry forward on
a meta-device copy (no memory, no FLOPs).

Classifier policy
-----------------
The number of classes of a checkpoint is read from its classifier weight; the architecture is
built with that many classes and loaded *strictly* (every key and shape must match; a mismatch
names the first offending keys). If ``num_classes`` differs, the classifier is then reset
(``LoadedModel.classifier_reset``): the rest of the checkpoint is kept. A checkpoint without
classifier keys at all (a headless backbone) loads with a freshly initialised classifier. For
pretrained weights timm drops a mismatched classifier itself; torchvision's last ``nn.Linear``
is replaced by a fresh one.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import inspect
import os
import pickle
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarize_cli.core.errors import BadInputError, CheckpointError, UnknownModelError
from binarize_cli.core.modes import evaluating

__all__ = [
    "PROBE_TIMEOUT_S",
    "LoadedModel",
    "check_input_size",
    "file_sha256",
    "ModelSpec",
    "class_source_digest",
    "create_architecture",
    "find_classifier",
    "find_first_conv",
    "import_model_class",
    "is_class_spec",
    "load_model",
    "load_state_dict_file",
    "parse_spec",
    "reset_classifier",
]

#: Seconds to wait for a hub host before declaring the machine offline.
PROBE_TIMEOUT_S = 3.0

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model_state_dict", "model")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ModelSpec:
    """A parsed model spec: which library, which architecture, which tag (or weights enum)."""

    family: str  # "timm" | "torchvision" | "python" (arch is then "MODULE:CLASS")
    arch: str
    tag: str | None = None

    def canonical(self, tag: str | None = None) -> str:
        if self.family == "python":
            return self.arch
        t = tag if tag is not None else self.tag
        return f"{self.family}:{self.arch}" + (f".{t}" if t else "")


@dataclass
class LoadedModel:
    """A model plus what the rest of the tool needs to know about it.

    ``first_conv``/``classifier`` are module names (``model.get_submodule(name)``) or ``None``;
    ``mean``/``std``/``input_size`` (C, H, W), ``crop_pct`` and ``interpolation`` are the
    weights' preprocessing (timm's ``pretrained_cfg``; torchvision's weights transforms).
    """

    model: nn.Module
    spec: str
    family: str
    arch: str
    weights: str
    num_classes: int
    first_conv: str | None
    classifier: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    tag: str | None = None
    #: True when the classifier holds fresh random weights (reset for another class count).
    classifier_reset: bool = False
    #: Where the weights came from: checkpoint path, cached hub file, or download URL/hub id.
    source: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- spec parsing


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), candidates, n=4, cutoff=0.6)
    return (
        f"; did you mean {', '.join(close)}?"
        if close
        else "; see timm.list_models() or torchvision.models.list_models()"
    )


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec (see the module docstring); raises UnknownModelError."""
    text = spec.strip()
    if not text:
        raise UnknownModelError("empty model name; pass e.g. resnet18 or torchvision:resnet18")
    prefix, sep, rest = text.partition(":")
    family: str | None = None
    if sep:
        if prefix not in ("timm", "torchvision") and is_class_spec(text):
            import_model_class(text)
            return ModelSpec("python", text)
        if prefix not in ("timm", "torchvision"):
            raise UnknownModelError(
                f"unknown model source {prefix!r} in {spec!r}; use timm:NAME or torchvision:NAME"
            )
        family, text = prefix, rest
    name, _, tag = text.partition(".")
    tag_or_none = tag or None
    if family in (None, "timm"):
        import timm

        if timm.is_model(name):
            return ModelSpec("timm", name, tag_or_none)
    if family in (None, "torchvision") and name in _torchvision_names():
        return ModelSpec("torchvision", name, tag_or_none)
    if family == "timm":
        candidates = _timm_names()
    elif family == "torchvision":
        candidates = _torchvision_names()
    else:
        candidates = _timm_names() + [f"torchvision:{n}" for n in _torchvision_names()]
    where = {"timm": "timm", "torchvision": "torchvision"}.get(family or "", "timm or torchvision")
    raise UnknownModelError(
        f"unknown model {name!r}: not a {where} model{_suggest(name, candidates)}"
    )


# --------------------------------------------------------------------------- user classes

_CLASS_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_class_spec(spec: str) -> bool:
    """Whether ``spec`` has the ``MODULE:CLASS`` form (dotted identifiers; not timm/torchvision)."""
    text = spec.strip()
    return bool(_CLASS_SPEC.fullmatch(text)) and text.split(":")[0] not in ("timm", "torchvision")


def _class_spec_hint(spec: str) -> str:
    return (
        f"{spec!r} is read as MODULE:CLASS, imported from the current directory or PYTHONPATH "
        "(hub models are timm:NAME or torchvision:NAME)"
    )


def import_model_class(spec: str) -> type[nn.Module]:
    """Import ``MODULE`` of a ``MODULE:CLASS`` spec (the current directory first on the path)
    and return its ``nn.Module`` subclass ``CLASS``; one-line UnknownModelError otherwise."""
    module_name, _, attr = spec.strip().partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UnknownModelError(
            f"cannot import module {module_name!r} ({exc}); {_class_spec_hint(spec)}"
        ) from None
    except Exception as exc:  # the user's module raised while being imported
        raise UnknownModelError(
            f"importing module {module_name!r} failed ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UnknownModelError(
                f"module {module_name!r} ({getattr(module, '__file__', None) or 'no file'}) has "
                f"no class {attr!r}; check the CLASS part of {spec!r}"
            )
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise UnknownModelError(
            f"{spec} is not an nn.Module subclass (got {type(obj).__name__}); name the model's class"
        )
    return obj


def class_source_digest(spec: str) -> str:
    """SHA-256 of the source file defining a ``MODULE:CLASS`` spec's class ("" if none), so
    caches keyed on the spec notice an edited class."""
    cls = import_model_class(spec)
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:
        source = None
    return file_sha256(Path(source)) if source and Path(source).is_file() else ""


def _build_python(ms: ModelSpec, num_classes: int | None) -> nn.Module:
    """``CLASS()`` or ``CLASS(num_classes=...)`` with a classifier of ``num_classes`` outputs
    (see "User classes" in the module doc)."""
    cls = import_model_class(ms.arch)
    try:
        takes = "num_classes" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes = False
    try:
        model = cls(num_classes=num_classes) if takes and num_classes is not None else cls()
    except Exception as exc:
        what = "num_classes=" if takes and num_classes is not None else "no"
        raise BadInputError(
            f"{ms.arch}() with {what} arguments failed ({type(exc).__name__}: {_first_line(exc)}); "
            "the class must build without other arguments"
        ) from None
    if num_classes is not None and not takes:
        loaded = _describe(model, ms, weights="random", canonical_tag=None)
        if loaded.num_classes != num_classes:
            reset_classifier(loaded, num_classes)
    return model


# --------------------------------------------------------------------------- module finding


def _execution_order(model: nn.Module, example: torch.Tensor) -> list[str] | None:
    """Names of the Conv2d/Linear modules in the order ``model(example)`` calls them, or None."""
    order: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            handles.append(mod.register_forward_hook(lambda m, i, o, n=name: order.append(n)))
    try:
        with evaluating(model, hooks=handles):
            model(example)
    except Exception:
        return None
    return order


def _meta_order(
    ms: ModelSpec, num_classes: int | None, input_size: tuple[int, int, int]
) -> list[str] | None:
    """Execution order from a copy of the architecture built on the meta device (no memory, no FLOPs)."""
    try:
        with torch.device("meta"):
            meta = _build_random(ms, num_classes)
    except Exception:
        return None
    return _execution_order(meta, torch.empty((1, *input_size), device="meta"))


def _pick(
    model: nn.Module, order: list[str] | None, kind: type[nn.Module], last: bool
) -> str | None:
    modules = dict(model.named_modules())
    names = order if order else [n for n, _ in model.named_modules()]
    names = list(reversed(names)) if last else names
    for n in names:
        if isinstance(modules.get(n), kind):
            return n
    return None


def find_first_conv(model: nn.Module, example: torch.Tensor | None = None) -> str | None:
    """Name of the first ``nn.Conv2d`` in execution order of ``model(example)``.

    Without an example (or if the forward fails), registration order is used.
    """
    order = _execution_order(model, example) if example is not None else None
    return _pick(model, order, nn.Conv2d, last=False)


def find_classifier(model: nn.Module, example: torch.Tensor | None = None) -> str | None:
    """Name of the last ``nn.Linear`` in execution order of ``model(example)`` (see find_first_conv)."""
    order = _execution_order(model, example) if example is not None else None
    return _pick(model, order, nn.Linear, last=True)


def _existing(model: nn.Module, names: Any) -> str | None:
    if isinstance(names, list | tuple):
        names = names[0] if names else None
    if not names:
        return None
    try:
        model.get_submodule(names)
    except AttributeError:
        return None
    return str(names)


# --------------------------------------------------------------------------- construction


def _timm_create(ms: ModelSpec, *, num_classes: int | None, **kwargs: Any) -> nn.Module:
    import timm

    name = ms.arch + (f".{ms.tag}" if ms.tag else "")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, **extra, **kwargs)
    except RuntimeError as exc:
        if "Invalid pretrained tag" in str(exc):
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{ms.arch}.*") if "." in t]
            hint = f"; known tags: {', '.join(tags[:8])}" if tags else ""
            raise UnknownModelError(
                f"timm model {ms.arch!r} has no pretrained tag {ms.tag!r}{hint}"
            ) from exc
        raise


def _tv_weights(ms: ModelSpec, required: bool) -> Any:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(ms.arch)
    except (ValueError, KeyError):
        enum = None
    if ms.tag:
        if enum is None or ms.tag not in enum.__members__:
            known = ", ".join(enum.__members__) if enum is not None else "none"
            raise UnknownModelError(
                f"torchvision model {ms.arch!r} has no weights {ms.tag!r}; known: {known}"
            )
        return enum[ms.tag]
    if enum is None:
        if required:
            raise CheckpointError(
                f"torchvision has no pretrained weights for {ms.arch!r}; pass --checkpoint PATH or --no-pretrained"
            )
        return None
    return enum.DEFAULT


def _tv_preprocessing(
    ms: ModelSpec,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, int, int], float, str]:
    weights = _tv_weights(ms, required=False)
    if weights is None:
        return _IMAGENET_MEAN, _IMAGENET_STD, (3, 224, 224), 0.875, "bilinear"
    t = weights.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0]) if getattr(t, "resize_size", None) else crop
    interp = getattr(t.interpolation, "value", "bilinear")
    return tuple(t.mean), tuple(t.std), (3, crop, crop), crop / resize, str(interp)


def _describe(
    model: nn.Module,
    ms: ModelSpec,
    *,
    weights: str,
    canonical_tag: str | None,
    classifier_reset: bool = False,
    source: str | None = None,
) -> LoadedModel:
    """Fill a LoadedModel from a built model."""
    if ms.family in ("timm", "python"):
        cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        input_size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
        mean = tuple(float(v) for v in cfg.get("mean", _IMAGENET_MEAN))
        std = tuple(float(v) for v in cfg.get("std", _IMAGENET_STD))
        crop_pct = float(cfg.get("crop_pct", 0.875) or 0.875)
        interp = str(cfg.get("interpolation", "bilinear") or "bilinear")
        first_conv = _existing(model, cfg.get("first_conv"))
        classifier = _existing(model, cfg.get("classifier"))
        if first_conv is None or classifier is None:
            width = getattr(model, "num_classes", None) if ms.family == "timm" else None
            order = _meta_order(ms, width, input_size)  # type: ignore[arg-type]
            first_conv = first_conv or _pick(model, order, nn.Conv2d, last=False)
            classifier = classifier or _pick(model, order, nn.Linear, last=True)
        counted = _classes_of(model, classifier) if ms.family == "python" else 0
        num_classes = int(
            counted or getattr(model, "num_classes", 0) or _classes_of(model, classifier)
        )
    else:
        mean, std, input_size, crop_pct, interp = _tv_preprocessing(ms)
        order = _meta_order(ms, None, input_size)
        first_conv = _pick(model, order, nn.Conv2d, last=False)
        classifier = _pick(model, order, nn.Linear, last=True)
        num_classes = _classes_of(model, classifier) or int(getattr(model, "num_classes", 0) or 0)
    return LoadedModel(
        model=model,
        spec=ms.canonical(canonical_tag),
        family=ms.family,
        arch=ms.arch,
        weights=weights,
        num_classes=num_classes,
        first_conv=first_conv,
        classifier=classifier,
        mean=mean,
        std=std,
        input_size=input_size,  # type: ignore[arg-type]
        crop_pct=crop_pct,
        interpolation=interp,
        tag=canonical_tag,
        classifier_reset=classifier_reset,
        source=source,
    )


def _classes_of(model: nn.Module, classifier: str | None) -> int:
    if classifier is None:
        return 0
    mod = model.get_submodule(classifier)
    return int(getattr(mod, "out_features", 0) or getattr(mod, "out_channels", 0) or 0)


def _build_random(ms: ModelSpec, num_classes: int | None) -> nn.Module:
    if ms.family == "python":
        return _build_python(ms, num_classes)
    if ms.family == "timm":
        return _timm_create(ms, num_classes=num_classes, pretrained=False)
    import torchvision

    _tv_weights(ms, required=False)  # validates an explicit weights tag
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if ms.arch in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return torchvision.models.get_model(ms.arch, **kwargs)


def create_architecture(spec: str, num_classes: int | None = None) -> LoadedModel:
    """The architecture with random weights (never touches the network)."""
    ms = parse_spec(spec)
    model = _build_random(ms, num_classes)
    return _describe(model, ms, weights="random", canonical_tag=ms.tag)


def reset_classifier(loaded: LoadedModel, num_classes: int) -> LoadedModel:
    """Replace the classifier by a freshly initialised one with ``num_classes`` outputs, in place.

    timm: ``model.reset_classifier(num_classes)``; torchvision: the last ``nn.Linear`` is
    replaced by ``nn.Linear(in_features, num_classes)`` (same bias setting).
    """
    if num_classes < 1:
        raise BadInputError(f"num_classes must be >= 1 (got {num_classes})")
    model = loaded.model
    if loaded.family == "timm" and hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    else:
        if loaded.classifier is None:
            raise BadInputError(
                f"cannot find a Linear classifier in {loaded.spec} to resize to {num_classes} classes"
            )
        old = model.get_submodule(loaded.classifier)
        if not isinstance(old, nn.Linear):
            raise BadInputError(
                f"{loaded.spec}: classifier {loaded.classifier!r} is not an nn.Linear"
            )
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        model.set_submodule(loaded.classifier, new)
    loaded.num_classes = num_classes
    loaded.classifier_reset = True
    return loaded


# --------------------------------------------------------------------------- checkpoints


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line.split(". ")[0][:200]  # torch appends paragraphs of advice to its first sentence


def _read_checkpoint_object(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {path}: not a valid .safetensors file ({_first_line(exc)}); is it truncated or corrupt?"
            ) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m or "Unsupported global" in text or "Unsupported class" in text:
            what = f" ({m.group(1)})" if m else ""
            raise CheckpointError(
                f"refused to unpickle {path}: it holds Python objects{what} that torch.load(weights_only=True) does not allow; "
                "save model.state_dict() instead (torch.save or safetensors)"
            ) from exc
        detail = re.search(r"Unsupported operand[^\n]*", text)
        raise CheckpointError(
            f"cannot read {path}: corrupt or not a PyTorch checkpoint"
            + (f" ({detail.group(0).strip()})" if detail else "")
            + "; pass a .safetensors or torch.save(model.state_dict()) file"
        ) from exc
    except Exception as exc:  # the unpickler fails in many ways on arbitrary bytes
        raise CheckpointError(
            f"cannot read {path}: truncated or not a PyTorch checkpoint ({_first_line(exc)}); "
            "copy it again or re-save it with torch.save(model.state_dict(), PATH)"
        ) from exc


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path} holds no state dict (got {type(obj).__name__}); save model.state_dict()"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path} is not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        k = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if k.startswith(prefix):
                    k = k[len(prefix) :]
                    changed = True
        out[k] = value
    return out


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``torch.load(weights_only=True)`` (see module doc)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file")
    return _unwrap_state_dict(_read_checkpoint_object(p), p)


def _list_keys(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _check_fit(
    model: nn.Module, sd: dict[str, torch.Tensor], spec: str, path: Path, allow_missing: set[str]
) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in allow_missing]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing {_list_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected {_list_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {_list_keys(shapes)}")
    raise CheckpointError(
        f"checkpoint {path} does not fit {spec}: {'; '.join(parts)}; is it a checkpoint of another architecture?"
    )


def _load_from_checkpoint(
    ms: ModelSpec, path_like: str | os.PathLike[str], num_classes: int | None
) -> LoadedModel:
    path = Path(path_like).expanduser()
    sd = load_state_dict_file(path)
    with torch.device("meta"):  # names and shapes only: no memory, no init cost
        probe = _describe(_build_random(ms, None), ms, weights="random", canonical_tag=ms.tag)
    cls_keys: set[str] = set()
    ckpt_classes: int | None = None
    if probe.classifier is not None:
        cls_keys = {k for k in probe.model.state_dict() if k.startswith(probe.classifier + ".")}
        w = sd.get(probe.classifier + ".weight")
        if w is not None and w.ndim >= 1:
            ckpt_classes = int(w.shape[0])
    headless = bool(cls_keys) and not any(k in sd for k in cls_keys)
    build_classes = ckpt_classes if ckpt_classes is not None else (num_classes or probe.num_classes)
    model = _build_random(ms, build_classes)
    _check_fit(model, sd, ms.canonical(), path, cls_keys if headless else set())
    model.load_state_dict(sd, strict=not headless)
    loaded = _describe(
        model,
        ms,
        weights=f"checkpoint:{file_sha256(path)[:12]}",
        canonical_tag=ms.tag,
        classifier_reset=headless,
        source=str(path),
    )
    if headless:
        loaded.notes.append(
            f"{path} has no classifier weights; the classifier is freshly initialised"
        )
    if num_classes is not None and num_classes != loaded.num_classes:
        reset_classifier(loaded, num_classes)
    return loaded


# --------------------------------------------------------------------------- pretrained


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a timm dependency
        return Path("~/.cache/huggingface/hub").expanduser()


def _hf_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _safe_alternatives(filename: str) -> list[str]:
    if filename == "pytorch_model.bin":
        return ["model.safetensors"]
    if filename.endswith("_pytorch_model.bin"):
        return [filename[: -len("_pytorch_model.bin")] + "_model.safetensors"]
    return []


def _cached_hf_file(hub_id: str, filename: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    repo, _, revision = hub_id.partition("@")
    base = filename or "pytorch_model.bin"
    for name in [*_safe_alternatives(base), base]:
        try:
            found = try_to_load_from_cache(
                repo, name, cache_dir=str(hf_cache_dir()), revision=revision or None
            )
        except Exception:
            found = None
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def _cached_url_file(url: str) -> Path | None:
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        return None
    path = _torch_hub_checkpoints() / name
    return path if path.is_file() else None


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to ``host:port`` be opened within ``timeout`` seconds?

    Runs in a daemon thread so that a hanging DNS lookup cannot outlast the timeout.
    Honours ``HTTPS_PROXY``/``https_proxy`` by probing the proxy instead.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            host, port = parsed.hostname, parsed.port or 80
    result = [False]

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0]


def _torch_hub_checkpoints() -> Path:
    """torch hub's download directory (``$TORCH_HOME/hub/checkpoints``), read at call time."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline_error(what: str, host: str, searched: list[Path]) -> CheckpointError:
    reason = (
        "HF_HUB_OFFLINE is set"
        if _hf_offline_env() and "huggingface" in host
        else f"{host} is unreachable (offline?)"
    )
    where = ", ".join(str(d) for d in searched)
    return CheckpointError(
        f"no pretrained weights for {what} in the local caches (searched {where}) and {reason}; "
        "pass --checkpoint PATH (a .safetensors or .pth state dict) or --no-pretrained"
    )


def _load_timm_pretrained(ms: ModelSpec, num_classes: int | None) -> LoadedModel:
    from timm.models import get_pretrained_cfg

    try:
        pcfg = get_pretrained_cfg(ms.arch + (f".{ms.tag}" if ms.tag else ""))
    except RuntimeError:
        # a bad tag: let _timm_create turn it into an UnknownModelError listing the known tags
        _timm_create(ms, num_classes=None, pretrained=False)
        raise
    cfg = pcfg.to_dict() if pcfg is not None else {}
    tag = cfg.get("tag") or ms.tag
    what = ms.canonical(tag)
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not hub_id and not url and not cfg.get("file"):
        raise CheckpointError(
            f"timm has no pretrained weights for {what}; pass --checkpoint PATH or --no-pretrained"
        )

    def find_cached() -> Path | None:
        return (_cached_hf_file(hub_id, cfg.get("hf_hub_filename")) if hub_id else None) or (
            _cached_url_file(url) if url else None
        )

    cached = find_cached()
    searched = [hf_cache_dir()] if hub_id else []
    searched += [_torch_hub_checkpoints()] if url else []
    tagged = ModelSpec("timm", ms.arch, tag)
    try:
        if cached is not None:
            model = _timm_create(
                tagged,
                num_classes=num_classes,
                pretrained=True,
                pretrained_cfg_overlay={"file": str(cached)},
            )
            source = str(cached)
        else:
            if hub_id:
                from huggingface_hub import constants

                host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
                online = not _hf_offline_env() and _reachable(host)
            else:
                host = urllib.parse.urlparse(url).hostname or "github.com"
                online = _reachable(host)
            if not online:
                raise _offline_error(what, host, searched)
            model = _timm_create(tagged, num_classes=num_classes, pretrained=True)
            downloaded = find_cached()  # the download landed in one of the caches
            source = str(downloaded) if downloaded else (f"hf-hub:{hub_id}" if hub_id else url)
    except (CheckpointError, UnknownModelError):
        raise
    except Exception as exc:
        raise CheckpointError(
            f"loading pretrained weights for {what} failed ({_first_line(exc)}); pass --checkpoint PATH or --no-pretrained"
        ) from exc
    reset = num_classes is not None and num_classes != int(cfg.get("num_classes", 0) or 0)
    return _describe(
        model,
        tagged,
        weights="pretrained",
        canonical_tag=tag,
        classifier_reset=reset,
        source=source,
    )


def _load_tv_pretrained(ms: ModelSpec, num_classes: int | None) -> LoadedModel:
    import torchvision

    weights = _tv_weights(ms, required=True)
    tagged = ModelSpec("torchvision", ms.arch, weights.name)
    what = tagged.canonical()
    cached = _cached_url_file(weights.url)
    host = urllib.parse.urlparse(weights.url).hostname or "download.pytorch.org"
    if cached is None and not _reachable(host):
        raise _offline_error(what, host, [_torch_hub_checkpoints()])
    try:
        model = torchvision.models.get_model(ms.arch, weights=weights)
    except Exception as exc:
        raise CheckpointError(
            f"loading pretrained weights for {what} failed ({_first_line(exc)}); pass --checkpoint PATH or --no-pretrained"
        ) from exc
    loaded = _describe(
        model,
        tagged,
        weights="pretrained",
        canonical_tag=weights.name,
        source=str(cached or _cached_url_file(weights.url) or weights.url),
    )
    if num_classes is not None and num_classes != loaded.num_classes:
        reset_classifier(loaded, num_classes)
    return loaded


# --------------------------------------------------------------------------- input size


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _runs_at(model: nn.Module, size: tuple[int, int, int]) -> bool:
    """Does ``model`` (on the meta device) accept a ``[1, *size]`` input?"""
    try:
        with evaluating(model):
            model(torch.empty((1, *size), device="meta"))
    except Exception:  # a kernel larger than its input, a size assertion (fixed-size models)
        return False
    return True


def check_input_size(
    model: nn.Module,
    input_size: tuple[int, int, int],
    *,
    name: str,
    default_size: tuple[int, int, int] | None = None,
) -> None:
    """Raise a one-line :class:`BadInputError` if ``model`` cannot run at ``input_size``
    (C, H, W) because the input is too small (a kernel larger than a feature map, as
    ``inception_v3`` at 32x32), naming the smallest square side that runs and ``--input-size``.

    A dry forward of one zero image on a meta-device copy (no memory, no FLOPs). When it fails
    but the model runs at ``default_size`` (the weights' own size), the smallest side is found
    by bisection between the two; when it fails there too the problem is not the size and
    nothing is raised here (the real forward reports it).
    """
    try:
        meta = _meta_copy(model)
    except Exception:  # a module that cannot be deep-copied: the real forward will tell
        return
    if _runs_at(meta, input_size):
        return
    c, h, w = input_size
    high = max(default_size[1:]) if default_size is not None else 0
    if high <= max(h, w) or not _runs_at(meta, (c, high, high)):
        return
    low = max(h, w)  # fails at low, runs at high
    while high - low > 1:
        mid = (low + high) // 2
        if _runs_at(meta, (c, mid, mid)):
            high = mid
        else:
            low = mid
    raise BadInputError(
        f"{name} needs inputs of at least {high}x{high}, got {h}x{w}; "
        f"pass --input-size {high} or larger"
    )


# --------------------------------------------------------------------------- entry point


def load_model(
    spec: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Load a model by spec; weights from ``checkpoint``, the hub (``pretrained``) or random.

    ``num_classes`` different from the weights' resets the classifier (see the module doc).
    Raises UnknownModelError (bad name) or CheckpointError (missing/corrupt/unsafe/mismatched
    checkpoint; pretrained weights unavailable offline), each with a one-line message.
    """
    if num_classes is not None and num_classes < 1:
        raise BadInputError(f"num_classes must be >= 1 (got {num_classes})")
    ms = parse_spec(spec)
    if checkpoint is not None:
        return _load_from_checkpoint(ms, checkpoint, num_classes)
    if pretrained and ms.family == "python":
        raise CheckpointError(
            f"{ms.arch} is a user class without hub weights; pass --checkpoint FILE or --no-pretrained"
        )
    if pretrained:
        if ms.family == "timm":
            return _load_timm_pretrained(ms, num_classes)
        return _load_tv_pretrained(ms, num_classes)
    return create_architecture(spec, num_classes)
