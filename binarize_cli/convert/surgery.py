"""Graph surgery: replace a model's eligible ``nn.Conv2d`` layers by :class:`BinarizedConv2d`.

:func:`binarize_model` is the pass (``apply(model) -> result``, Brevitas's habit). It

1. resolves the scheme and validates (M, N) (:meth:`Scheme.check`);
2. traces the model with ``torch.fx`` (:func:`binarize_cli.convert.graph.try_trace`). Where it traces,
   downsample convolutions are found *structurally* (:func:`binarize_cli.convert.graph.shortcut_convs`:
   a convolution on the shortcut branch of a residual addition) and the graph gives the
   execution order. Where it does not (data-dependent control flow), downsample convolutions
   are found by name (a module path component containing ``downsample``, ``shortcut``,
   ``short_cut``, ``skip`` or ``proj``), the execution order comes from forward hooks, and a
   warning says so. ``SurgeryResult.traced`` records which path ran;
3. finds the first convolution and the classifier: the names given, else the model's
   ``pretrained_cfg`` (``first_conv`` / ``classifier``, timm), else the execution order (the
   first convolution run, the last weight layer run). A name can be a container: every weight
   layer under it counts. The first convolution therefore stays full precision even when the
   config does not name it;
4. classifies every module that owns a weight of rank >= 2 (:func:`classify_layer`), asks the
   :class:`~binarize_cli.convert.policy.LayerPolicy` (data: paper 4.3, 4.6.1, ``--keep``) whether to
   binarize it, and swaps each selected ``nn.Conv2d`` for ``BinarizedConv2d.from_conv`` (weight
   and bias copied, every reference to a shared module replaced);
5. returns what it did: one :class:`LayerDecision` per layer (``convert`` prints them as a
   table, :func:`decisions_table`) and warnings. Nothing is printed.

The swap is made *in place on the original module tree*, also when the model traces: the
graph is used for analysis only. The converted model keeps its class, its methods (timm's
``forward_features``, ``pretrained_cfg``) and its ``state_dict`` keys, so a run directory can
rebuild it from the architecture and the recorded policy (``rebuild.build_model_from_meta``)
and load its weights strictly. ``symbolic_trace`` of the result works with
:func:`binarize_cli.convert.graph.trace_model` (``BinarizedConv2d`` is a leaf).

What is never binarized, and always reported: layers that are not a plain ``nn.Conv2d``
(``nn.Conv1d``, ``nn.ConvTranspose2d``, an ``nn.Linear`` in the body, a custom module owning a
weight), convolutions with ``padding_mode != 'zeros'``, and ``nn.Conv2d`` subclasses whose
``forward`` differs from ``nn.Conv2d``'s (timm's ``Conv2dSame`` pads dynamically, ``StdConv2d``
standardises its weight): binarizing them would change what they compute, so they stay full
precision and a warning names them. Subclasses that only add state (same ``forward``) are
binarized. ``BinarizedConv2d`` layers already in the model are left as they are (``isinstance``
of ``nn.Conv2d`` is true for them: they are never re-binarized).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from binarize_cli.convert.graph import execution_order, graph_order, shortcut_convs, try_trace
from binarize_cli.convert.policy import LayerInfo, LayerPolicy
from binarize_cli.core.errors import BadInputError
from binarize_cli.quant.base import Scheme, get_scheme
from binarize_cli.quant.layers import BinarizedConv2d

#: Module-path components that mark a shortcut convolution when the model does not trace.
DOWNSAMPLE_NAME_PATTERN = re.compile(r"downsample|shortcut|short_cut|skip|proj")

#: Spatial size of the probe input used for the execution order of untraceable models.
PROBE_SIZE = 64


@dataclass(frozen=True)
class LayerDecision:
    """One row of ``convert``'s layer table: what surgery did with one layer and why."""

    name: str
    kind: str
    binarized: bool
    reason: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    op: str = "Conv2d"
    m: int | None = None
    n: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kernel_size"] = list(self.kernel_size)
        data["stride"] = list(self.stride)
        return data


@dataclass
class SurgeryResult:
    """What :func:`binarize_model` changed.

    Attributes:
        model: the converted model (the same object as the input, modified in place, unless
            the input itself was a bare ``nn.Conv2d``).
        decisions: one row per weight layer, in module registration order.
        warnings: one-line messages: layers that could not be handled, the tracing fallback,
            ``--keep`` patterns that matched nothing.
        traced: whether ``torch.fx`` traced the model (structural downsample detection).
        trace_error: why tracing failed, when it did.
        policy: the policy applied (``--keep`` merged in); store ``policy.to_dict()``.
        first_conv, classifier: the module names identified in those roles.
        layer_bases: the per-layer table: every layer the policy binarizes, by name, with
            its ``[M, N]``, or ``None`` where a per-layer choice keeps it full precision
            (``binarize.json``'s ``layer_bases``; :func:`binarize_model` rebuilds from it).
    """

    model: nn.Module
    decisions: list[LayerDecision]
    warnings: list[str]
    traced: bool
    trace_error: str | None = None
    policy: LayerPolicy = field(default_factory=LayerPolicy)
    first_conv: tuple[str, ...] = ()
    classifier: tuple[str, ...] = ()
    layer_bases: dict[str, list[int] | None] = field(default_factory=dict)

    @property
    def binarized(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.binarized]

    @property
    def kept(self) -> list[LayerDecision]:
        return [d for d in self.decisions if not d.binarized]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{kind: {"binarized": a, "kept": b}}`` over the decisions."""
        out: dict[str, dict[str, int]] = {}
        for d in self.decisions:
            row = out.setdefault(d.kind, {"binarized": 0, "kept": 0})
            row["binarized" if d.binarized else "kept"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for run records and ``--json`` output)."""
        return {
            "traced": self.traced,
            "trace_error": self.trace_error,
            "policy": self.policy.to_dict(),
            "first_conv": list(self.first_conv),
            "classifier": list(self.classifier),
            "layers": [d.to_dict() for d in self.decisions],
            "layer_bases": {k: None if v is None else list(v) for k, v in self.layer_bases.items()},
            "warnings": list(self.warnings),
        }


def _own_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def _as_tuple(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, tuple | list):
        return tuple(int(v) for v in value)
    return ()


def _unsupported_conv_reason(module: nn.Conv2d) -> str | None:
    """Why an ``nn.Conv2d`` (subclass) cannot be swapped, or ``None`` if it can."""
    cls = type(module)
    if cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward:
        return f"{cls.__name__} overrides nn.Conv2d.forward (e.g. dynamic 'same' padding or weight standardisation)"
    if module.padding_mode != "zeros":
        return (
            f"padding_mode={module.padding_mode!r} (only zero padding is exact for binary planes)"
        )
    return None


def classify_layer(
    name: str,
    module: nn.Module,
    *,
    first_conv: set[str] | frozenset[str] = frozenset(),
    classifier: set[str] | frozenset[str] = frozenset(),
    downsample: set[str] | frozenset[str] = frozenset(),
) -> str:
    """The layer kind (:data:`binarize_cli.convert.policy.LAYER_KINDS`) of one weight layer.

    Roles first (``first_conv``, ``classifier``), then by type and shape: depthwise
    (``groups == in_channels > 1``), downsample (in ``downsample``), grouped, pointwise (1x1),
    conv (kxk); ``nn.Linear`` is ``linear``, anything else ``other``.
    """
    if name in first_conv:
        return "first_conv"
    if name in classifier:
        return "classifier"
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        if name in downsample:
            return "downsample"
        if module.groups > 1:
            return "grouped"
        if tuple(module.kernel_size) == (1, 1):
            return "pointwise"
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return "other"


def _layer_info(name: str, kind: str, module: nn.Module) -> LayerInfo:
    if isinstance(module, nn.Linear):
        return LayerInfo(name, kind, type(module).__name__, module.in_features, module.out_features)
    return LayerInfo(
        name=name,
        kind=kind,
        op=type(module).__name__,
        in_channels=int(getattr(module, "in_channels", 0) or 0),
        out_channels=int(getattr(module, "out_channels", 0) or 0),
        kernel_size=_as_tuple(getattr(module, "kernel_size", ())),
        stride=_as_tuple(getattr(module, "stride", ())),
        groups=int(getattr(module, "groups", 1) or 1),
    )


def _cfg_names(model: nn.Module, key: str) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    value = cfg.get(key) if isinstance(cfg, dict) else None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _expand(names: Sequence[str], weight_layers: dict[str, nn.Module]) -> list[str]:
    """The weight layers named by ``names`` (each layer itself or every layer under it), in
    module registration order."""
    prefixes = [p for p in names if p]
    return [
        name
        for name in weight_layers
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    ]


def _probe_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels = int(first.in_channels) if first is not None else 3
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    return torch.randn(1, channels, PROBE_SIZE, PROBE_SIZE, device=device, dtype=dtype)


def _order_of_weight_layers(
    model: nn.Module,
    weight_layers: dict[str, nn.Module],
    graph_names: list[str] | None,
    example_input: torch.Tensor | None,
    warnings: list[str],
) -> list[str]:
    """Weight layers in execution order (graph order, forward hooks, or registration order)."""
    if graph_names is not None:
        order: list[str] = []
        for called in graph_names:
            # A leaf call may be a container timm keeps opaque (VGG's ConvMlp): expand it.
            order.extend(n for n in _expand([called], weight_layers) if n not in order)
        if order:
            return order
    try:
        probe = example_input if example_input is not None else _probe_input(model)
        ran = execution_order(model, probe)
        order = [n for n in ran if n in weight_layers]
        if order:
            return order
    except Exception as exc:
        warnings.append(
            f"could not run the model on a probe input ({type(exc).__name__}) to find its first "
            "convolution and classifier; assuming module registration order (pass example_input)"
        )
    return list(weight_layers)


def _resolve_role(
    role: str,
    given: str | Sequence[str] | None,
    model: nn.Module,
    weight_layers: dict[str, nn.Module],
    order: list[str],
    warnings: list[str],
) -> set[str]:
    """Names for ``role`` (``first_conv`` / ``classifier``): given, config, execution order."""
    if isinstance(given, str):
        given = (given,)
    for source, names in (
        ("given", tuple(given or ())),
        ("pretrained_cfg", _cfg_names(model, role)),
    ):
        if not names:
            continue
        found = _expand(names, weight_layers)
        if found:
            return set(found)
        existing = dict(model.named_modules())
        if source == "pretrained_cfg" and all(n in existing for n in names):
            # e.g. num_classes=0: the classifier is an nn.Identity, so there is none to keep
            return set()
        warnings.append(
            f"{role} {', '.join(repr(n) for n in names)} ({source}) names no weight layer of the "
            "model; using the execution order instead"
        )
    if role == "first_conv":
        first = next(
            (n for n in order if isinstance(weight_layers[n], nn.modules.conv._ConvNd)), None
        )
        return {first} if first is not None else set()
    last = next(
        (n for n in reversed(order) if isinstance(weight_layers[n], nn.Linear | nn.Conv2d)), None
    )
    return {last} if last is not None else set()


def _downsample_by_name(weight_layers: dict[str, nn.Module]) -> set[str]:
    return {
        name
        for name, module in weight_layers.items()
        if isinstance(module, nn.Conv2d)
        and any(DOWNSAMPLE_NAME_PATTERN.search(part) for part in name.split("."))
    }


def _replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Point every reference to a replaced module at its replacement (shared modules too)."""
    if id(model) in replacements:
        return replacements[id(model)]
    edits: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in replacements:
                edits.append((parent, child_name, replacements[id(child)]))
    for parent, child_name, new in edits:
        setattr(parent, child_name, new)
    return model


def _resolve_scheme(scheme: str | Scheme) -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    if not isinstance(scheme, str):
        raise BadInputError(f"scheme must be a scheme name or Scheme, got {type(scheme).__name__}")
    return get_scheme(scheme)


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module owning a weight of rank >= 2, except the internals of binarized layers."""
    weight_layers: dict[str, nn.Module] = {}
    inside_binarized: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_binarized):
            continue
        if isinstance(module, BinarizedConv2d):
            inside_binarized.append(name)
            weight_layers[name] = module
        elif _own_weight(module):
            weight_layers[name] = module
    return weight_layers


@dataclass
class _Structure:
    """What the graph says: traced or not, downsample convs, execution order, the roles."""

    traced: bool
    trace_error: str | None
    downsample: set[str]
    first: set[str]
    last: set[str]


def _structure(
    model: nn.Module,
    weight_layers: dict[str, nn.Module],
    first_conv: str | Sequence[str] | None,
    classifier: str | Sequence[str] | None,
    example_input: torch.Tensor | None,
    warnings: list[str],
) -> _Structure:
    """Downsample convolutions (torch.fx, else by name) and the first-conv/classifier roles."""
    gm, trace_error = try_trace(model)
    if gm is not None:
        downsample = shortcut_convs(gm)
        graph_names: list[str] | None = graph_order(gm)
    else:
        downsample = _downsample_by_name(weight_layers)
        graph_names = None
        warnings.append(
            f"model does not trace with torch.fx ({trace_error}); downsample convolutions were "
            "found by name ('downsample', 'shortcut', 'skip', 'proj'): check the table"
        )
    order = _order_of_weight_layers(model, weight_layers, graph_names, example_input, warnings)
    first = _resolve_role("first_conv", first_conv, model, weight_layers, order, warnings)
    last = _resolve_role("classifier", classifier, model, weight_layers, order, warnings) - first
    return _Structure(gm is not None, trace_error, downsample, first, last)


def _decision_row(
    info: LayerInfo, binarized: bool, reason: str, bases: tuple[int, int] | None = None
) -> LayerDecision:
    return LayerDecision(
        name=info.name or "(root)",
        kind=info.kind,
        binarized=binarized,
        reason=reason,
        in_channels=info.in_channels,
        out_channels=info.out_channels,
        kernel_size=info.kernel_size,
        stride=info.stride,
        groups=info.groups,
        op=info.op,
        m=None if bases is None else bases[0],
        n=None if bases is None else bases[1],
    )


@dataclass
class _Swaps:
    """The replacements one :func:`binarize_model` call collects, and what it could not do."""

    scheme: Scheme
    options: dict[str, Any] | None
    warnings: list[str]
    replacements: dict[int, nn.Module] = field(default_factory=dict)
    unsupported: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def requested(self, m: int, n: int) -> tuple[str, int, int]:
        """What a layer binarized by this call at (m, n) records (to spot earlier, different
        surgery)."""
        return (
            self.scheme.name,
            int(self.scheme.weight_quantizer(m, self.options).num_bases),
            int(self.scheme.activation_quantizer(n, self.options).num_bases),
        )

    def apply(
        self,
        name: str,
        module: nn.Module,
        binarize: bool,
        reason: str,
        bases: tuple[int, int],
    ) -> tuple[bool, str]:
        """``(binarized, reason)`` for one weight layer binarized at ``bases`` = (M, N);
        queues its replacement if any."""
        if isinstance(module, BinarizedConv2d):
            requested = self.requested(*bases)
            reason = f"already binarized ({module.scheme_name} M={module.weight_bases} N={module.activation_bases})"
            if (module.scheme_name, module.weight_bases, module.activation_bases) != requested:
                self.warnings.append(
                    f"{name!r} was already binarized with {module.scheme_name} "
                    f"M={module.weight_bases} N={module.activation_bases}; left as it is"
                )
            return True, reason
        if not binarize:
            return False, reason
        why = (
            _unsupported_conv_reason(module)
            if isinstance(module, nn.Conv2d)
            else f"{type(module).__name__} (only nn.Conv2d is binarized)"
        )
        if why is not None:
            self.unsupported.setdefault((type(module).__name__, why), []).append(name or "(root)")
            return False, f"unsupported: {why}"
        if id(module) not in self.replacements:
            self.replacements[id(module)] = BinarizedConv2d.from_conv(
                module,  # type: ignore[arg-type]
                self.scheme,
                bases[0],
                bases[1],
                self.options,
            )
        return True, reason


#: A per-layer choice: ``(M, N)``, or ``None`` to keep the layer full precision.
LayerChoice = tuple[int, int] | None


def layer_choice(value: Any, where: str) -> LayerChoice:
    """A per-layer choice from its written forms: ``None`` or ``"fp"`` (full precision), or
    ``[M, N]`` / ``(M, N)`` (two integers); anything else is a one-line BadInputError naming
    ``where``."""
    if value is None or (isinstance(value, str) and value.lower() == "fp"):
        return None
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise BadInputError(f'{where} must be "fp" or [M, N] (two integers), got {value!r}')


def _checked_table(
    layer_bases: Mapping[str, Any], scheme: Scheme, weight_layers: dict[str, nn.Module]
) -> dict[str, LayerChoice]:
    """``layer_bases`` with every choice parsed and validated by the scheme; a name that is
    no weight layer of the model is a BadInputError."""
    table: dict[str, LayerChoice] = {}
    for name, value in layer_bases.items():
        if name not in weight_layers:
            shown = ", ".join(list(weight_layers)[:4])
            raise BadInputError(
                f"per-layer bases name {name!r}, which is no weight layer of the model "
                f"(its layers: {shown}, ...)"
            )
        choice = layer_choice(value, f"the bases of layer {name!r}")
        if choice is not None:
            scheme.check(*choice)
        table[name] = choice
    return table


def compiled_rules(
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any], scheme: Scheme
) -> list[tuple[str, re.Pattern[str], LayerChoice]]:
    """``(pattern, regex, choice)`` per rule, in order; bad regexes and choices are one-line
    BadInputErrors."""
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out: list[tuple[str, re.Pattern[str], LayerChoice]] = []
    for pattern, value in items:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise BadInputError(
                f"[layers] {pattern!r} is not a valid regular expression ({exc})"
            ) from None
        choice = layer_choice(value, f"[layers] {pattern!r}")
        if choice is not None:
            scheme.check(*choice)
        out.append((pattern, compiled, choice))
    return out


def binarize_model(
    model: nn.Module,
    scheme: str | Scheme,
    m: int,
    n: int,
    *,
    keep: Sequence[str] = (),
    first_conv: str | Sequence[str] | None = None,
    classifier: str | Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    policy: LayerPolicy | None = None,
    example_input: torch.Tensor | None = None,
    layer_bases: Mapping[str, Any] | None = None,
    layer_rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = (),
) -> SurgeryResult:
    """Replace the model's eligible ``nn.Conv2d`` layers by ``BinarizedConv2d`` in place.

    Args:
        model: a timm / torchvision (or any) image model; modified in place.
        scheme: a registered scheme name (``"pa"``, ``"abc"``, ...) or a :class:`Scheme`.
        m, n: weight and activation bases (``-M``, ``-N``), validated by the scheme: the
            bases of every binarized layer the per-layer choices below do not name.
        keep: ``--keep`` regexes (``re.search`` on qualified names; ``first``/``last`` aliases),
            added to the policy's own patterns.
        first_conv, classifier: module names in those roles (``LoadedModel.first_conv`` /
            ``.classifier``); default: the model's ``pretrained_cfg``, else execution order.
        options: scheme options passed to the quantizer factories.
        policy: the layer policy; default :meth:`LayerPolicy.for_scheme` (paper 4.3, 4.6.1).
        example_input: probe input for the forward-hook execution order of models that do not
            trace (default: ``[1, C, 64, 64]`` noise).
        layer_bases: per-layer choices by exact layer name: ``(M, N)`` (validated by the
            scheme), or ``None`` / ``"fp"`` to keep that layer full precision
            (``binarize.json``'s ``layer_bases``, the allocation's result). Only layers the
            policy binarizes may get bases; ``None`` for a layer the policy keeps is allowed.
        layer_rules: a recipe's ``[layers]`` table: ``(regex, choice)`` pairs (or a mapping,
            in its order), ``re.search`` on the names of the layers the policy binarizes; the
            first matching regex wins, and ``layer_bases`` wins over every rule. A regex that
            matches no layer the policy binarizes is an error.

    Returns:
        :class:`SurgeryResult` with one decision per weight layer, the per-layer table and
        the warnings.

    Raises:
        SchemeError: unknown scheme or invalid (M, N), per layer too.
        BadInputError: an invalid ``--keep`` regex or ``[layers]`` rule, a per-layer choice
            naming no weight layer or giving bases to a layer the policy keeps.
    """
    scheme_obj = _resolve_scheme(scheme)
    scheme_obj.check(m, n)
    active = (policy or LayerPolicy.for_scheme(scheme_obj)).with_keep(tuple(keep))
    warnings: list[str] = []
    weight_layers = _weight_layers(model)
    table = _checked_table(layer_bases or {}, scheme_obj, weight_layers)
    rules = compiled_rules(layer_rules, scheme_obj)
    graph = _structure(model, weight_layers, first_conv, classifier, example_input, warnings)
    swaps = _Swaps(scheme_obj, options, warnings)
    decisions: list[LayerDecision] = []
    recorded: dict[str, list[int] | None] = {}
    matched_patterns: set[str] = set()
    matched_rules: set[str] = set()
    for name, module in weight_layers.items():
        kind = classify_layer(
            name, module, first_conv=graph.first, classifier=graph.last, downsample=graph.downsample
        )
        info = _layer_info(name, kind, module)
        pattern = active.matching_pattern(info)
        if pattern is not None:
            matched_patterns.add(pattern)
        decision = active.decide(info)
        binarize, reason, bases = decision.binarize, decision.reason, (m, n)
        choice: LayerChoice = bases
        source = ""
        hits = [r for r in rules if r[1].search(name)] if decision.binarize else []
        matched_rules.update(r[0] for r in hits)
        if name in table:
            choice = table[name]
            if not decision.binarize and choice is not None:
                raise BadInputError(
                    f"per-layer bases for {name!r}, which the policy keeps full precision "
                    f"({decision.reason}); drop it from the per-layer table"
                )
            source = "the per-layer table"
        elif hits:
            choice, source = hits[0][2], f"[layers] {hits[0][0]!r}"
        if decision.binarize and choice is None:
            binarize, reason = False, f"full precision by {source}"
        elif choice is not None:
            bases = choice
        binarized, reason = swaps.apply(name, module, binarize, reason, bases)
        if isinstance(module, BinarizedConv2d):
            bases = (module.weight_bases, module.activation_bases)
        if binarized:
            recorded[name] = list(bases)
        elif decision.binarize and choice is None:
            recorded[name] = None
        decisions.append(_decision_row(info, binarized, reason, bases if binarized else None))

    unmatched = [r[0] for r in rules if r[0] not in matched_rules]
    if unmatched:
        raise BadInputError(
            f"[layers] {unmatched[0]!r} matches no layer the policy binarizes; fix the pattern "
            "(a regular expression searched in each layer name)"
        )
    for (op, why), names in swaps.unsupported.items():
        warnings.append(
            f"{len(names)} {op} layer(s) kept full precision, cannot binarize: {why}: {', '.join(names)}"
        )
    warnings.extend(
        f"--keep {p!r} matched no layer" for p in active.keep_patterns if p not in matched_patterns
    )
    converted = _replace_modules(model, swaps.replacements)
    return SurgeryResult(
        model=converted,
        decisions=decisions,
        warnings=warnings,
        traced=graph.traced,
        trace_error=graph.trace_error,
        policy=active,
        first_conv=tuple(sorted(graph.first)),
        classifier=tuple(sorted(graph.last)),
        layer_bases=recorded,
    )


def decisions_table(result: SurgeryResult, title: str | None = None) -> Any:
    """A ``rich.table.Table`` of the decisions, for ``convert`` to print.

    One row per weight layer (name, kind, op, channels, kernel/stride, groups, binarized,
    reason) and a caption with the totals.
    """
    from rich.table import Table

    n_bin = len(result.binarized)
    caption = f"{n_bin} of {len(result.decisions)} weight layers binarized"
    if not result.traced:
        caption += " (torch.fx tracing failed: downsample found by name)"
    table = Table(title=title, caption=caption)
    for column in (
        "layer",
        "kind",
        "op",
        "in->out",
        "kernel/stride",
        "groups",
        "binarized",
        "reason",
    ):
        table.add_column(column, no_wrap=column in ("layer", "kind"))
    for d in result.decisions:
        kernel = "x".join(map(str, d.kernel_size)) if d.kernel_size else "-"
        stride = "x".join(map(str, d.stride)) if d.stride else "-"
        table.add_row(
            d.name,
            d.kind,
            d.op,
            f"{d.in_channels}->{d.out_channels}",
            f"{kernel}/{stride}",
            str(d.groups),
            "yes" if d.binarized else "no",
            d.reason,
        )
    return table
