"""Recipes: TOML files validated strictly; defaults < recipe < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from binarize_cli.core.errors import RecipeError
from binarize_cli.core.settings import load_recipe, merge_settings

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.toml"))


def test_paper_recipes_are_valid_and_cover_table_3_and_4():
    seen = set()
    for path in RECIPES:
        data = load_recipe(path)
        seen.add((data["model"], data["scheme"], data["M"], data["N"]))
    for net in ("resnet18", "resnet34", "resnet50"):
        for cfg in (
            ("abc", 5, 0),
            ("abc", 5, 5),
            ("pa", 4, 0),
            ("pa", 8, 0),
            ("pa", 4, 5),
            ("pa", 8, 7),
        ):
            assert (net, *cfg) in seen
    assert ("densenet121", "pa", 8, 6) in seen
    assert ("mobilenetv1_100", "pa", 8, 7) in seen


def test_flags_override_recipe_and_recipe_overrides_defaults(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('scheme = "abc"\nM = 5\nN = 5\nepochs = 3\n[scheme_options]\nlambda_a = 0.5\n')
    s = merge_settings(
        load_recipe(p), {"M": 3, "epochs": None, "scheme_options": {"lambda_w": 2.0}}
    )
    assert s.scheme == "abc" and s.M == 3 and s.N == 5 and s.epochs == 3
    assert s.scheme_options == {"lambda_a": 0.5, "lambda_w": 2.0}
    assert merge_settings(None, {}).batch_size == 64


def test_recipes_say_where_and_how_a_run_trains(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('device = "cuda:1"\nworkers = 4\namp = "bf16"\ncompile = true\n')
    s = merge_settings(load_recipe(p), {"workers": 2, "device": None})
    assert (s.device, s.workers, s.amp, s.compile) == ("cuda:1", 2, "bf16", True)
    d = merge_settings(None, {})
    assert (d.device, d.workers, d.amp, d.compile) == ("auto", 0, "off", False)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("emochs = 2\n", "unknown key"),
        ('M = "four"\n', "M must be int"),
        ("M = true\n", "M must be int"),
        ("distill = 1\n", "distill must be bool"),
        ("keep = [1]\n", "keep item"),
        ("[scheme_options]\nlambda_q = 1\n", "unknown scheme option"),
        ("M = \n", "not valid TOML"),
        ('[layers]\n"layer1" = "int8"\n', 'must be "fp" or \\[M, N\\]'),
        ('[layers]\n"layer1" = [4]\n', 'must be "fp" or \\[M, N\\]'),
        ('[layers]\n"layer1" = [4.0, 5]\n', 'must be "fp" or \\[M, N\\]'),
        ('policy = "greedy"\n', "policy must be one of uniform, auto"),
        ('budget_mbit = "40"\n', "budget_mbit must be int or float"),
        ("device = 0\n", "device must be str"),
        ('workers = "4"\n', "workers must be int"),
        ('compile = "yes"\n', "compile must be bool"),
    ],
)
def test_bad_recipes_are_rejected(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=needle):
        load_recipe(p)


def test_missing_recipe(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.toml")


def test_layers_table_keeps_its_order(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[layers]\n"layer4\\\\..*downsample" = "fp"\n"layer1\\\\." = [2, 3]\n')
    s = merge_settings(load_recipe(p), {})
    assert list(s.layers.items()) == [("layer4\\..*downsample", "fp"), ("layer1\\.", [2, 3])]
    assert s.policy == "uniform" and s.budget_mbit is None and s.budget_bops is None


def test_example_recipe_with_per_layer_choices_is_valid():
    data = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "resnet18-pa-layers.toml")
    assert data["layers"] and all(v == "fp" or len(v) == 2 for v in data["layers"].values())
