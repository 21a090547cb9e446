"""The progressive teacher-student schedule: the quantizer switches, the three stages and
their teachers, stage-3-only epoch keeping, a progressive attention-distilled convert run,
the shipped Real-to-Bin recipe and the ``--distill`` option."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from binarize_cli.convert import progressive
from binarize_cli.convert.pipeline import run_convert, validate_settings
from binarize_cli.convert.progressive import progressive_finetune, quantizing, set_quantizing
from binarize_cli.core.errors import BadInputError, RecipeError
from binarize_cli.core.settings import load_recipe, merge_settings
from binarize_cli.quant import get_scheme
from binarize_cli.quant.base import available_schemes
from binarize_cli.quant.layers import BinarizedConv2d

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "resnet18-realtobin-progressive.toml"


def _flags(model: torch.nn.Module) -> set[tuple[bool, bool]]:
    return {
        (m.quantize_weights, m.quantize_activations)
        for m in model.modules()
        if isinstance(m, BinarizedConv2d)
    }


def test_quantizer_switches_bypass_each_quantizer_and_are_restored() -> None:
    torch.manual_seed(0)
    layer = BinarizedConv2d.from_conv(torch.nn.Conv2d(3, 4, 3, padding=1), get_scheme("xnor"), 1, 1)
    x = torch.randn(2, 3, 5, 5)
    w, a, b = layer.weight, layer.activation_quantizer(x), layer.bias
    binary = layer(x)
    assert torch.allclose(binary, F.conv2d(a, layer.quantized_weight(), b, padding=1))
    with quantizing(layer, weights=False, activations=False):
        assert torch.allclose(layer(x), F.conv2d(x, w, b, padding=1))
    with quantizing(layer, weights=False, activations=True):
        assert torch.allclose(layer(x), F.conv2d(a, w, b, padding=1))
    assert (layer.quantize_weights, layer.quantize_activations) == (True, True)
    assert torch.equal(layer(x), binary)
    set_quantizing(layer, weights=True, activations=False)
    assert torch.allclose(layer(x), F.conv2d(x, layer.quantized_weight(), b, padding=1))
    with pytest.raises(RuntimeError), quantizing(layer, weights=False, activations=False):
        raise RuntimeError  # restored on an error too
    assert (layer.quantize_weights, layer.quantize_activations) == (True, False)


def test_three_stages_their_teachers_and_stage_3_epoch_keeping(binarized_model, monkeypatch):
    torch.manual_seed(0)
    student = binarized_model("slim_resnet18", "xnor", 1, 1, images=None)
    fp = copy.deepcopy(student)  # stands in for the full-precision model
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    seen: list[dict[str, Any]] = []
    real_finetune = progressive.finetune

    def recording(model: torch.nn.Module, *, teacher: Any, **kwargs: Any) -> Any:
        seen.append(
            {
                "student": _flags(model),
                "teacher": teacher,
                "teacher_flags": _flags(teacher),
                "frozen": not any(p.requires_grad for p in teacher.parameters()),
                "select": kwargs["select"] is not None,
            }
        )
        return real_finetune(model, teacher=teacher, **kwargs)

    monkeypatch.setattr(progressive, "finetune", recording)
    scores = iter([50.0, 40.0])  # stage 3's first epoch scores best

    def select(model: torch.nn.Module) -> float:
        assert _flags(model) == {(True, True)}  # only stage 3 is ever scored
        return next(scores)

    stages: list[int] = []
    epochs: list[tuple[int, int]] = []
    state = progressive_finetune(
        student,
        teacher=fp,
        make_train_loader=lambda _epoch: batches,
        epochs=2,
        lr=1e-3,
        select=select,
        on_stage=lambda stage: stages.append(stage.number),
        on_epoch_start=lambda epoch, total, _steps: epochs.append((epoch, total)),
        validate=lambda _m: {"val_top1": 1.0, "val_top5": 2.0},
    )
    assert stages == [1, 2, 3]
    assert epochs == [(i, 6) for i in range(6)]
    assert [s["student"] for s in seen] == [{(False, False)}, {(False, True)}, {(True, True)}]
    assert seen[0]["teacher"] is fp
    # each later stage is taught by a frozen copy of the previous stage's student
    assert seen[1]["teacher_flags"] == {(False, False)} and seen[1]["frozen"]
    assert seen[2]["teacher_flags"] == {(False, True)} and seen[2]["frozen"]
    assert [s["select"] for s in seen] == [False, False, True]
    assert [row["stage"] for row in state.epoch_stats] == [1, 1, 2, 2, 3, 3]
    assert "select_top1" not in state.epoch_stats[0] and state.epoch_stats[0]["val_top1"] == 1.0
    assert state.epochs_done == 6 and len(state.epoch_seconds) == 6
    assert state.kept_epoch == 5  # stage 3's first epoch, counted across the stages
    assert _flags(student) == {(True, True)}
    with pytest.raises(ValueError, match="work_dir"):
        progressive_finetune(student, teacher=fp, work_dir=Path("."), epochs=1)


def test_progressive_attention_convert_records_stages_and_keeps_stage_3(tmp_path, capsys, run_cli):
    recipe = tmp_path / "r.toml"
    recipe.write_text('scheme = "xnor"\nprogressive = true\nattention_weight = 2.0\n')
    run = tmp_path / "run"
    args = ["convert", "timm:test_resnet", "--no-pretrained", "--data", "digits"]
    args += ["--recipe", str(recipe), "--distill", "ATTENTION", "--input-size", "16"]
    args += ["--batch-size", "128", "--baseline-epochs", "1", "--epochs", "0.2"]
    args += ["--calib-batches", "1", "-o", str(run)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    meta = json.loads((run / "binarize.json").read_text())
    recipe_saved = meta["recipe"]
    assert recipe_saved["distill"] == "attention" and recipe_saved["progressive"] is True
    assert recipe_saved["attention_weight"] == 2.0
    assert [row["stage"] for row in meta["finetune_epochs"]] == [1, 2, 3]
    assert meta["finetune_kept_epoch"] == 3
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["epoch"], r["stage"], r["kept"]) for r in rows] == [
        ("1", "1", "0"),
        ("2", "2", "0"),
        ("3", "3", "1"),
    ]
    assert rows[2]["select_top1"] and not rows[0]["select_top1"]
    # the saved model is the binary one: its recorded accuracy is stage 3's validation top-1
    assert float(rows[2]["val_top1"]) == pytest.approx(
        meta["accuracy"]["binarized"]["top1"], abs=1e-3
    )
    settings = merge_settings(None, {**recipe_saved, "progressive": True})
    with pytest.raises(BadInputError, match="cannot resume"):
        run_convert(settings, out_dir=tmp_path / "again", resume=True)


def test_distill_option_and_recipe_values(monkeypatch, capsys, run_cli):
    from binarize_cli.convert import pipeline

    got: list[str] = []

    def stop(settings: Any, **_kwargs: Any) -> None:
        got.append(settings.distill)
        raise BadInputError("stop")

    monkeypatch.setattr(pipeline, "run_convert", stop)
    for flags, expect in (
        ([], "logits"),
        (["--distill", "attention"], "attention"),
        (["--distill", "Off"], "off"),
        (["--no-distill"], "off"),
        (["--no-distill", "--distill", "off"], "off"),
    ):
        code, _, err = run_cli(["convert", "resnet18", *flags], capsys)
        assert code == 2 and err.strip() == "binarize: error: stop", err
        assert got[-1] == expect, flags
    # recipes keep the former boolean form
    assert merge_settings({"distill": True}, {}).distill == "logits"
    assert merge_settings({"distill": False}, {}).distill == "off"
    assert merge_settings({"distill": False}, {"distill": "attention"}).distill == "attention"
    with pytest.raises(RecipeError, match="distill must be one of logits, attention, off"):
        merge_settings({"distill": "soft"}, {})


def test_the_shipped_real_to_bin_recipe() -> None:
    data = load_recipe(RECIPE)
    assert data["scheme"] == "realtobin" and data["model"] == "resnet18"
    assert data["distill"] == "attention" and data["progressive"] is True
    settings = merge_settings(data, {})
    assert settings.attention_weight == 1.0 and settings.epochs == 1
    if "realtobin" in available_schemes():
        scheme, m, n = validate_settings(settings)
        assert (scheme.name, m, n) == ("realtobin", 1, 1)
    else:  # the scheme lands on another branch: the recipe is refused only for its scheme
        with pytest.raises(BadInputError, match="realtobin"):
            validate_settings(settings)
        validate_settings(merge_settings(data, {"scheme": "xnor"}))
