"""The layer policy: decisions per kind, precedence, --keep patterns and aliases, serialisation."""

from __future__ import annotations

import json

import pytest

from binarize_cli.convert.policy import LAYER_KINDS, LayerInfo, LayerPolicy
from binarize_cli.core.errors import BadInputError, RecipeError


def info(name: str, kind: str, kernel: tuple[int, ...] = (3, 3)) -> LayerInfo:
    return LayerInfo(name=name, kind=kind, in_channels=8, out_channels=8, kernel_size=kernel)


class _FakeScheme:
    def __init__(self, name: str, binarize_downsample: bool) -> None:
        self.name = name
        self.binarize_downsample = binarize_downsample


@pytest.mark.parametrize(
    ("kind", "binarize", "reason"),
    [
        ("first_conv", False, "first convolution"),
        ("classifier", False, "classifier"),
        ("depthwise", False, "depthwise (kept FP, paper 4.3)"),
        ("grouped", True, "binarized"),
        ("pointwise", True, "binarized"),
        ("conv", True, "binarized"),
        ("linear", True, "binarized"),
    ],
)
def test_default_decisions_follow_paper_4_3(kind: str, binarize: bool, reason: str) -> None:
    decision = LayerPolicy().decide(info("layer1.0.conv1", kind))
    assert decision.binarize is binarize
    assert decision.reason == reason


def test_downsample_follows_the_scheme_paper_4_6_1() -> None:
    ds = info("layer2.0.downsample.0", "downsample", kernel=(1, 1))
    pa = LayerPolicy.for_scheme(_FakeScheme("pa", True))
    abc = LayerPolicy.for_scheme(_FakeScheme("abc", False))
    assert pa.decide(ds).binarize is True
    verdict = abc.decide(ds)
    assert verdict.binarize is False
    assert verdict.reason == "1x1 downsample kept for abc (paper 4.6.1)"
    assert abc.scheme == "abc" and abc.binarize_downsample is False


def test_keep_pattern_uses_re_search_on_the_qualified_name() -> None:
    policy = LayerPolicy(keep_patterns=("layer4", r"^layer1\.0\.conv2$"))
    assert policy.decide(info("layer4.1.conv2", "conv")).reason == "matched --keep 'layer4'"
    assert policy.decide(info("layer1.0.conv2", "conv")).binarize is False
    # re.search, not fullmatch; and the anchored pattern does not leak to siblings
    assert policy.decide(info("layer1.0.conv1", "conv")).binarize is True
    assert policy.decide(info("xlayer4y", "conv")).binarize is False


def test_keep_patterns_win_over_role_rules() -> None:
    policy = LayerPolicy(keep_patterns=("conv1",))
    # the first convolution is kept either way, but the reason names the pattern first
    assert policy.decide(info("conv1", "first_conv")).reason == "matched --keep 'conv1'"


@pytest.mark.parametrize(
    ("alias", "kind"),
    [("first", "first_conv"), ("last", "classifier"), ("classifier", "classifier")],
)
def test_aliases_select_by_role_not_by_name(alias: str, kind: str) -> None:
    policy = LayerPolicy(keep_first_conv=False, keep_classifier=False, keep_patterns=(alias,))
    assert policy.decide(info("whatever.name", kind)).binarize is False
    assert policy.decide(info("whatever.name", kind)).reason == f"matched --keep {alias!r}"
    # an alias is not a regex: a layer *named* "first"/"last" of another kind is unaffected
    assert policy.decide(info(alias, "conv")).binarize is True


def test_role_rules_can_be_turned_off() -> None:
    policy = LayerPolicy(keep_first_conv=False, keep_classifier=False, keep_depthwise=False)
    for kind in ("first_conv", "classifier", "depthwise"):
        assert policy.decide(info("x", kind)).binarize is True


@pytest.mark.parametrize("pattern", ["layer[", "(unclosed", "*conv"])
def test_invalid_regex_is_a_one_line_bad_input_error(pattern: str) -> None:
    with pytest.raises(BadInputError) as err:
        LayerPolicy(keep_patterns=(pattern,))
    assert pattern in str(err.value)
    assert "\n" not in str(err.value)


def test_with_keep_appends_and_deduplicates() -> None:
    base = LayerPolicy(keep_patterns=("a",), binarize_downsample=False, scheme="abc")
    merged = base.with_keep(("a", "b"))
    assert merged.keep_patterns == ("a", "b")
    assert merged.binarize_downsample is False and merged.scheme == "abc"
    assert base.with_keep(()) is base
    with pytest.raises(BadInputError):
        base.with_keep(("[",))


def test_round_trip_through_json() -> None:
    policy = LayerPolicy(
        keep_first_conv=False,
        keep_classifier=True,
        keep_depthwise=False,
        binarize_downsample=False,
        keep_patterns=("layer4", "first"),
        scheme="abc",
    )
    data = json.loads(json.dumps(policy.to_dict()))
    assert data["keep"] == ["layer4", "first"]
    again = LayerPolicy.from_dict(data)
    assert again == policy
    assert again.decide(info("layer4.0.conv1", "conv")).binarize is False


def test_from_dict_defaults_and_errors() -> None:
    assert LayerPolicy.from_dict({}) == LayerPolicy()
    with pytest.raises(RecipeError, match="unknown key"):
        LayerPolicy.from_dict({"keep_first": True})
    with pytest.raises(RecipeError, match="keep_depthwise"):
        LayerPolicy.from_dict({"keep_depthwise": "yes"})
    with pytest.raises(RecipeError, match="keep must be a list"):
        LayerPolicy.from_dict({"keep": "layer4"})
    with pytest.raises(RecipeError):
        LayerPolicy.from_dict(["keep"])  # type: ignore[arg-type]
    with pytest.raises(BadInputError):
        LayerPolicy.from_dict({"keep": ["layer4["]})


def test_kinds_are_documented() -> None:
    assert {
        "first_conv",
        "classifier",
        "depthwise",
        "grouped",
        "pointwise",
        "downsample",
        "conv",
        "linear",
    } <= set(LAYER_KINDS)
