"""The layer policy: which layers graph surgery binarizes, as data (paper 4.3 and 4.6.1).

The policy is a frozen, serialisable value, not code: recipes (TOML) and run directories store
it with :meth:`LayerPolicy.to_dict` and rebuild it with :meth:`LayerPolicy.from_dict`, and a
converted model is reproducible from it. *What* to replace lives here; *how* to replace it
(tracing, module swaps) lives in :mod:`binarize_cli.convert.surgery` (the split ``torch.ao``'s mappings
and passes make).

The default rules follow the PA-Net paper (seed 002):

* the first convolution and the final classifier stay full precision (section 4.3, as in
  every BNN since Courbariaux et al.: they hold few parameters and cost most accuracy);
* depthwise convolutions stay full precision, pointwise ones are binarized (section 4.3);
* the 1x1 downsample (shortcut) convolutions of residual networks are binarized by PA and kept
  real-valued by ABC-Net and Bi-Real (section 4.6.1, Table 7 accounting): the scheme's
  ``binarize_downsample`` decides;
* every other ``nn.Conv2d`` (kxk, grouped, pointwise) is binarized; its input activation
  passes through the scheme's activation approximation.

``--keep REGEX`` (and a recipe's ``keep`` list) adds exclusions: each pattern is matched with
:func:`re.search` against a layer's qualified module name (``layer4.1.conv2``). Three aliases
name layers by role instead of by name: ``first`` (the first convolution), ``last`` and
``classifier`` (the classifier); they matter when a recipe turns ``keep_first_conv`` or
``keep_classifier`` off and keeps the layer again with a pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from binarize_cli.core.errors import BadInputError, RecipeError

#: Layer kinds, as classified by :func:`binarize_cli.convert.surgery.classify_layer`.
#:
#: ``first_conv``  the first convolution executed on the image;
#: ``classifier``  the final classifier (``nn.Linear`` or a 1x1 ``nn.Conv2d``);
#: ``depthwise``   ``groups == in_channels > 1`` (depth multiplier allowed);
#: ``grouped``     ``1 < groups < in_channels``;
#: ``pointwise``   1x1, ``groups == 1``, not a shortcut;
#: ``downsample``  a convolution on the shortcut branch of a residual addition (1x1 in the
#:                 ResNet family);
#: ``conv``        any other kxk ``nn.Conv2d``;
#: ``linear``      an ``nn.Linear`` in the body (not the classifier);
#: ``other``       any other module that carries a weight matrix or kernel (``nn.Conv1d``,
#:                 ``nn.ConvTranspose2d``, ...): never binarized, always reported.
LAYER_KINDS: tuple[str, ...] = (
    "first_conv",
    "classifier",
    "depthwise",
    "grouped",
    "pointwise",
    "downsample",
    "conv",
    "linear",
    "other",
)

#: ``--keep`` aliases naming a layer by role: alias -> layer kind.
KEEP_ALIASES: dict[str, str] = {
    "first": "first_conv",
    "last": "classifier",
    "classifier": "classifier",
}


@dataclass(frozen=True)
class LayerInfo:
    """What the policy sees of one layer: its qualified name, kind and shape."""

    name: str
    kind: str
    op: str = "Conv2d"
    in_channels: int = 0
    out_channels: int = 0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    groups: int = 1


@dataclass(frozen=True)
class Decision:
    """The policy's verdict on one layer; ``reason`` is a short human string for the table."""

    binarize: bool
    reason: str


def _kernel_text(kernel_size: tuple[int, ...]) -> str:
    return "x".join(str(k) for k in kernel_size) if kernel_size else "1x1"


@dataclass(frozen=True)
class LayerPolicy:
    """Which layers to binarize (data, serialisable; see the module docstring for the rules).

    Attributes:
        keep_first_conv: keep the first convolution full precision (paper 4.3).
        keep_classifier: keep the final classifier full precision (paper 4.3).
        keep_depthwise: keep depthwise convolutions full precision (paper 4.3).
        binarize_downsample: binarize shortcut (downsample) convolutions; from the scheme
            (:attr:`binarize_cli.quant.base.Scheme.binarize_downsample`, paper 4.6.1).
        keep_patterns: regexes (``re.search`` on the qualified module name) or the aliases
            ``first``, ``last``, ``classifier``; a match keeps the layer full precision.
        scheme: the scheme's name, only for the reason strings ("kept for abc").

    Raises:
        BadInputError: a pattern that is not a valid regular expression.
    """

    keep_first_conv: bool = True
    keep_classifier: bool = True
    keep_depthwise: bool = True
    binarize_downsample: bool = True
    keep_patterns: tuple[str, ...] = ()
    scheme: str = ""
    _compiled: tuple[re.Pattern[str] | None, ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        patterns = tuple(self.keep_patterns)
        for p in patterns:
            if not isinstance(p, str):
                raise BadInputError(f"--keep expects regular expressions, got {p!r}")
        object.__setattr__(self, "keep_patterns", patterns)
        object.__setattr__(self, "_compiled", tuple(_compile(p) for p in patterns))

    @classmethod
    def for_scheme(cls, scheme: Any, keep: tuple[str, ...] | list[str] = ()) -> LayerPolicy:
        """The paper's default policy for ``scheme`` (a :class:`Scheme` or anything with
        ``name`` and ``binarize_downsample``) plus ``--keep`` patterns."""
        return cls(
            binarize_downsample=bool(scheme.binarize_downsample),
            keep_patterns=tuple(keep),
            scheme=str(scheme.name),
        )

    def with_keep(self, keep: tuple[str, ...] | list[str]) -> LayerPolicy:
        """A copy with more ``--keep`` patterns appended (duplicates dropped)."""
        extra = tuple(p for p in keep if p not in self.keep_patterns)
        if not extra:
            return self
        return LayerPolicy(
            keep_first_conv=self.keep_first_conv,
            keep_classifier=self.keep_classifier,
            keep_depthwise=self.keep_depthwise,
            binarize_downsample=self.binarize_downsample,
            keep_patterns=self.keep_patterns + extra,
            scheme=self.scheme,
        )

    def matching_pattern(self, info: LayerInfo) -> str | None:
        """The first ``--keep`` pattern (or alias) that selects this layer, if any."""
        for pattern, compiled in zip(self.keep_patterns, self._compiled, strict=True):
            if compiled is None:
                if KEEP_ALIASES[pattern] == info.kind:
                    return pattern
            elif compiled.search(info.name):
                return pattern
        return None

    def decide(self, info: LayerInfo) -> Decision:
        """Binarize or keep one layer, with the reason shown in ``convert``'s table.

        Order: ``--keep`` patterns, then the role rules (first convolution, classifier), then
        the structural rules (depthwise, downsample); everything else is binarized.
        Whether the layer *can* be binarized (only ``nn.Conv2d`` can) is surgery's business.
        """
        pattern = self.matching_pattern(info)
        if pattern is not None:
            return Decision(False, f"matched --keep {pattern!r}")
        if info.kind == "first_conv" and self.keep_first_conv:
            return Decision(False, "first convolution")
        if info.kind == "classifier" and self.keep_classifier:
            return Decision(False, "classifier")
        if info.kind == "depthwise" and self.keep_depthwise:
            return Decision(False, "depthwise (kept FP, paper 4.3)")
        if info.kind == "downsample" and not self.binarize_downsample:
            who = f" for {self.scheme}" if self.scheme else ""
            kernel = _kernel_text(info.kernel_size)
            return Decision(False, f"{kernel} downsample kept{who} (paper 4.6.1)")
        return Decision(True, "binarized")

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-friendly mapping; :meth:`from_dict` inverts it."""
        return {
            "keep_first_conv": self.keep_first_conv,
            "keep_classifier": self.keep_classifier,
            "keep_depthwise": self.keep_depthwise,
            "binarize_downsample": self.binarize_downsample,
            "keep": list(self.keep_patterns),
            "scheme": self.scheme,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "layer policy") -> LayerPolicy:
        """Rebuild from :meth:`to_dict`'s mapping; unknown keys or wrong types are a
        :class:`RecipeError` (missing keys take the defaults)."""
        if not isinstance(data, dict):
            raise RecipeError(f"{where} must be a table/mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - _POLICY_KEYS)
        if unknown:
            raise RecipeError(
                f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(_POLICY_KEYS))}"
            )
        kwargs: dict[str, Any] = {}
        for key in ("keep_first_conv", "keep_classifier", "keep_depthwise", "binarize_downsample"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise RecipeError(f"{where}: {key} must be true or false, got {data[key]!r}")
                kwargs[key] = data[key]
        if "scheme" in data:
            if not isinstance(data["scheme"], str):
                raise RecipeError(f"{where}: scheme must be a string, got {data['scheme']!r}")
            kwargs["scheme"] = data["scheme"]
        keep = data.get("keep", [])
        if not isinstance(keep, list | tuple) or not all(isinstance(k, str) for k in keep):
            raise RecipeError(f"{where}: keep must be a list of strings, got {keep!r}")
        kwargs["keep_patterns"] = tuple(keep)
        return cls(**kwargs)


_POLICY_KEYS = {
    "keep_first_conv",
    "keep_classifier",
    "keep_depthwise",
    "binarize_downsample",
    "keep",
    "scheme",
}


def _compile(pattern: str) -> re.Pattern[str] | None:
    """Compile one ``--keep`` pattern; ``None`` for a role alias."""
    if pattern in KEEP_ALIASES:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BadInputError(
            f"--keep {pattern!r} is not a valid regular expression ({exc}); "
            "escape special characters, e.g. 'layer4\\.0'"
        ) from None
