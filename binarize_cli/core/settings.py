"""Convert settings and declarative recipes (TOML).

Precedence, lowest first: built-in defaults < the scheme's defaults (M, N) < a recipe file
(``--recipe FILE``) < flags given on the command line. A recipe is a flat TOML table of
the keys of :class:`ConvertSettings` (``model`` optional) plus an optional
``[scheme_options]`` table (``lambda_w``, ``lambda_a``, ``lambda_delta``,
``weight_endpoints``, ``signed_activations``, ``weight_clip_std``, ``ttq_threshold``) and an optional ``[layers]`` table that pins
per-layer choices by regex (``re.search`` on layer names, first matching regex wins, in the
file's order): ``"fp"`` keeps a layer full precision, ``[M, N]`` gives it its own bases::

    [layers]
    "layer4\\..*downsample" = "fp"
    "layer1\\." = [2, 3]

``distill`` is :data:`DISTILL_MODES` (``true``/``false`` are read as ``"logits"``/``"off"``);
``attention_weight`` weighs the attention-matching loss of ``distill = "attention"``;
``progressive`` runs the fine-tune as the three-stage teacher-student schedule
(:mod:`binarize_cli.convert.progressive`). ``policy`` (``"uniform"`` or ``"auto"``), ``budget_mbit`` and ``budget_bops`` choose the
per-layer bases of the other layers (docs/sensitivity.md); ``calibration`` (``"tensor"`` or
``"output"``) is the calibration rule (:mod:`binarize_cli.convert.calibrate`). ``device`` (``"auto"``, ``"cpu"``,
``"cuda"``, ``"cuda:N"``), ``workers``, ``amp`` (:data:`AMP_MODES`) and ``compile`` say where
and how the run trains (docs/devices.md). Unknown keys and wrong types are errors, never
ignored.

Example (``recipes/pa-resnet18-m4n5.toml``)::

    model = "resnet18"
    scheme = "pa"
    M = 4
    N = 5
    epochs = 2
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from binarize_cli.core.errors import RecipeError

SCHEME_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "lambda_w": (int, float),
    "lambda_a": (int, float),
    "lambda_delta": (int, float),
    "signed_activations": (bool,),
    "weight_endpoints": (list,),
    "weight_clip_std": (int, float),
    "ttq_threshold": (int, float),
}


@dataclass
class ConvertSettings:
    """Everything `binarize convert` needs; the effective values are saved in the run."""

    model: str | None = None
    scheme: str = "pa"
    M: int | None = None
    N: int | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    data: str = "digits"
    input_size: int | None = None
    epochs: float = 2.0
    baseline_epochs: int = 4
    batch_size: int = 64
    lr: float = 5e-4
    baseline_lr: float = 2e-3
    weight_decay: float = 0.0
    calib_batches: int = 8
    seed: int = 0
    baseline_seed: int | None = None
    keep: list[str] = field(default_factory=list)
    distill: str = "logits"
    distill_weight: float = 0.5
    temperature: float = 1.0
    attention_weight: float = 1.0
    progressive: bool = False
    scheme_options: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    policy: str = "uniform"
    budget_mbit: float | None = None
    budget_bops: float | None = None
    sensitivity: bool = False
    calibration: str = "tensor"
    device: str = "auto"
    workers: int = 0
    amp: str = "off"
    compile: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "scheme": (str,),
    "M": (int,),
    "N": (int,),
    "checkpoint": (str,),
    "pretrained": (bool,),
    "data": (str,),
    "input_size": (int,),
    "epochs": (int, float),
    "baseline_epochs": (int,),
    "batch_size": (int,),
    "lr": (int, float),
    "baseline_lr": (int, float),
    "weight_decay": (int, float),
    "calib_batches": (int,),
    "seed": (int,),
    "baseline_seed": (int,),
    "keep": (list,),
    "distill": (bool, str),
    "distill_weight": (int, float),
    "temperature": (int, float),
    "attention_weight": (int, float),
    "progressive": (bool,),
    "scheme_options": (dict,),
    "layers": (dict,),
    "policy": (str,),
    "budget_mbit": (int, float),
    "budget_bops": (int, float),
    "sensitivity": (bool,),
    "calibration": (str,),
    "device": (str,),
    "workers": (int,),
    "amp": (str,),
    "compile": (bool,),
}

#: The ``--policy`` choices: one (M, N) for every layer, or per-layer bases chosen from the
#: measured sensitivity within a budget.
POLICIES = ("uniform", "auto")
#: The ``--amp`` choices: float32 training, or convolutions in bfloat16 / float16.
AMP_MODES = ("off", "bf16", "fp16")

#: The ``--distill`` modes: logit distillation from the full-precision model, that plus the
#: attention-matching loss at the end of each block (Real-to-Bin), or none.
DISTILL_MODES = ("logits", "attention", "off")

#: The ``--calibration`` rules: each activation quantizer fitted to its own input (tensor), or
#: that fit refined to minimise each layer's output error (output; docs/sensitivity.md).
CALIBRATION_RULES = ("tensor", "output")


def _check_type(where: str, key: str, value: Any, types: tuple[type, ...]) -> None:
    # bool is an int subclass: reject True for an int field and 1 for a bool field.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        expected = " or ".join(t.__name__ for t in types)
        raise RecipeError(
            f"{where}: {key} must be {expected}, got {type(value).__name__} {value!r}"
        )


def validate_recipe(data: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """Check a recipe mapping: known keys, right types. Returns it unchanged."""
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        known = ", ".join(sorted(_FIELD_TYPES))
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {known}")
    for key, value in data.items():
        _check_type(where, key, value, _FIELD_TYPES[key])
    for item in data.get("keep", []):
        _check_type(where, "keep item", item, (str,))
    options = data.get("scheme_options", {})
    unknown_opts = sorted(set(options) - set(SCHEME_OPTION_TYPES))
    if unknown_opts:
        raise RecipeError(
            f"{where}: unknown scheme option(s) {', '.join(unknown_opts)}; "
            f"known: {', '.join(sorted(SCHEME_OPTION_TYPES))}"
        )
    for key, value in options.items():
        _check_type(where, f"scheme_options.{key}", value, SCHEME_OPTION_TYPES[key])
    for pattern, value in data.get("layers", {}).items():
        pair = isinstance(value, list) and len(value) == 2
        if not (value == "fp" or (pair and all(type(v) is int for v in value))):
            raise RecipeError(
                f'{where}: layers.{pattern!r} must be "fp" or [M, N] (two integers), got {value!r}'
            )
    distill = data.get("distill", "logits")
    if isinstance(distill, str) and distill not in DISTILL_MODES:
        raise RecipeError(
            f"{where}: distill must be one of {', '.join(DISTILL_MODES)} (or true/false), "
            f"got {distill!r}"
        )
    if data.get("policy", "uniform") not in POLICIES:
        raise RecipeError(f"{where}: policy must be one of {', '.join(POLICIES)}")
    if data.get("calibration", "tensor") not in CALIBRATION_RULES:
        raise RecipeError(f"{where}: calibration must be one of {', '.join(CALIBRATION_RULES)}")
    for item in options.get("weight_endpoints", []):
        _check_type(where, "weight_endpoints item", item, (int, float))
    return data


def distill_mode(value: bool | str) -> str:
    """A ``distill`` value as one of :data:`DISTILL_MODES`: ``True`` (the key's former
    boolean form) is ``"logits"``, ``False`` is ``"off"``, a string is itself."""
    if isinstance(value, bool):
        return "logits" if value else "off"
    return value


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and validate a TOML recipe file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {p} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {p} is not valid TOML: {exc}") from None
    return validate_recipe(data, where=f"recipe {p}")


def merge_settings(recipe: dict[str, Any] | None, overrides: dict[str, Any]) -> ConvertSettings:
    """Defaults < recipe < overrides (only keys whose value is not None are overrides)."""
    settings = ConvertSettings()
    layers = [recipe or {}, {k: v for k, v in overrides.items() if v is not None}]
    for layer in layers:
        validate_recipe(dict(layer), where="settings")
        for key, value in layer.items():
            if key in ("scheme_options", "layers"):
                setattr(settings, key, {**getattr(settings, key), **value})
            elif key == "distill":
                settings.distill = distill_mode(value)
            else:
                setattr(settings, key, value)
    return settings
