"""binarize_cli.analyze.report: the paper's check points (224x224), Table 7 rows, run reports with
approximation errors, comparison across runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from binarize_cli.analyze.profile import profile_model
from binarize_cli.analyze.report import (
    PAPER_NOTES,
    activation_errors,
    analytic_report,
    build_binarized,
    compare_reports,
    compare_runs,
    normalize_input_size,
    paper_comparison,
    report_for_run,
    run_report,
    weight_errors,
)
from binarize_cli.core.errors import BadInputError
from binarize_cli.quant import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d

DOCS = Path(__file__).resolve().parents[2] / "docs" / "accounting.md"
SMALL_MODEL = "timm:test_resnet"


def _assert_totals_are_row_sums(d: dict[str, Any]) -> None:
    rows = d["layers"]
    for key in ("memory_bits", "fp_memory_bits", "flops", "fp_flops", "bops"):
        row_key = {"memory_bits": "bits", "fp_memory_bits": "fp_bits"}.get(key, key)
        assert d[key] == sum(r[row_key] for r in rows), key
    assert d["params"]["real"] == sum(r["params_real"] for r in rows)
    assert d["params"]["binary"] == sum(r["params_binary"] for r in rows)
    assert d["memory_bits"] == 32 * d["params"]["real"] + d["params"]["binary"]


# --------------------------------------------------------------------------------------
# Analytic mode: the brief's check points


def test_pa_resnet18_224_is_61_6_mbit_and_full_precision_is_374_1_and_1_81e9():
    rep = analytic_report("resnet18", "pa", 4, 5, input_size=224)
    p = rep.profile
    assert p.input_size == (3, 224, 224) and (p.scheme, p.m, p.n) == ("pa", 4, 5)
    assert p.memory_bits == pytest.approx(61.6e6, rel=0.005)
    assert p.fp_memory_bits == pytest.approx(374.1e6, rel=0.005)
    assert p.fp_flops == pytest.approx(1.81e9, rel=0.005)
    # PA binarizes every conv but the first, downsample included (paper 4.6.1): 16 + 3
    binarized = p.binarized_layers
    assert len(binarized) == 19
    assert sum(r.kind == "downsample" for r in binarized) == 3
    kept = {r.name: r.reason for r in p.layers if r.macs and not r.binarized}
    assert set(kept) == {"conv1", "fc"}
    assert "first" in kept["conv1"] and "classifier" in kept["fc"]
    d = rep.to_dict()
    _assert_totals_are_row_sums(d)
    assert "accuracy" not in d


@pytest.fixture(scope="module")
def architectures() -> dict[str, Any]:
    """ImageNet ResNets with random weights, built once per module (deep-copied per scheme)."""
    return {}


@pytest.mark.parametrize(
    ("arch", "scheme", "m", "n", "paper_mbit"),
    [
        ("resnet50", "pa", 4, 5, 161.3),
        ("resnet18", "bireal", 1, 1, 33.6),
        ("resnet34", "bireal", 1, 1, 43.7),
        ("resnet50", "bireal", 1, 1, 176.8),
    ],
)
def test_table7_memory_check_points(architectures, arch, scheme, m, n, paper_mbit):
    from binarize_cli.load.models import create_architecture

    if arch not in architectures:
        architectures[arch] = create_architecture(arch, num_classes=1000)
    built = build_binarized(arch, scheme, m, n, fp_model=architectures[arch])
    # memory does not depend on the input size: profile small to keep the test quick
    prof = profile_model(built.model, (3, 64, 64), decisions=built.decisions)
    assert prof.memory_bits == pytest.approx(paper_mbit * 1e6, rel=0.005)
    downsample = [r for r in prof.layers if r.kind == "downsample"]
    assert downsample and all(r.binarized == (scheme == "pa") for r in downsample)


def test_memory_is_independent_of_input_size_and_flops_scale_with_pixels():
    built = build_binarized(SMALL_MODEL, "pa", 4, 5, num_classes=10)
    a = profile_model(built.model, (3, 32, 32))
    b = profile_model(built.model, (3, 64, 64))
    assert a.memory_bits == b.memory_bits
    assert b.fp_flops == pytest.approx(4 * a.fp_flops, rel=0.02)


def test_analytic_defaults_and_bad_scheme():
    rep = analytic_report(SMALL_MODEL, "pa", input_size=32, num_classes=10)
    assert (rep.profile.m, rep.profile.n) == (
        get_scheme("pa").default_m,
        get_scheme("pa").default_n,
    )
    from binarize_cli.core.errors import SchemeError

    with pytest.raises(SchemeError):
        analytic_report(SMALL_MODEL, "nope", input_size=32)
    with pytest.raises(SchemeError):
        analytic_report(SMALL_MODEL, "pa", 3, 5, input_size=32)  # PA needs an even M


@pytest.mark.parametrize(
    ("value", "expected"),
    [(224, (3, 224, 224)), ([32, 40], (3, 32, 40)), ((1, 28, 28), (1, 28, 28))],
)
def test_normalize_input_size(value, expected):
    assert normalize_input_size(value) == expected


@pytest.mark.parametrize("value", [0, -3, [1, 2, 3, 4], "224", True])
def test_normalize_input_size_rejects(value):
    with pytest.raises(BadInputError):
        normalize_input_size(value)


# --------------------------------------------------------------------------------------
# --paper


def test_paper_comparison_resnet18_rows_and_documented_differences():
    rows = paper_comparison(("resnet18",), input_size=224)
    by_label = {r.label: r for r in rows}
    assert list(by_label) == ["Bi-Real ResNet18", "ABC ResNet18", "PA ResNet18", "ResNet18"]
    assert by_label["PA ResNet18"].paper_memory_bits == 61.6e6  # the published value
    assert by_label["PA ResNet18"].paper_flops == 6.74e8
    for label in ("Bi-Real ResNet18", "PA ResNet18", "ResNet18"):
        assert abs(by_label[label].memory_diff) <= 0.005, label
    assert by_label["ResNet18"].flops == 1_814_073_344
    # the rule, exactly: 118,525,952 real MACs + 20/64 x 1,695,547,392 binarized MACs
    assert by_label["PA ResNet18"].flops == 118_525_952 + 20 * 1_695_547_392 / 64
    assert by_label["PA ResNet18"].speedup == pytest.approx(
        1_814_073_344 / by_label["PA ResNet18"].flops
    )
    # every row that differs by more than 0.5% carries a note pointing into the docs
    docs = DOCS.read_text()
    for r in rows:
        if abs(r.memory_diff) > 0.005 or abs(r.flops_diff) > 0.005:
            assert r.note, r.label
        for ref in re.findall(r"\[([\d., ]+)\]", r.note):
            for section in re.findall(r"\d\.\d", ref):
                assert f"### {section} " in docs, (r.label, section)


def test_every_paper_note_points_at_a_docs_section():
    docs = DOCS.read_text()
    for note in PAPER_NOTES.values():
        sections = re.findall(r"\[([\d., ]+)\]", note)
        assert sections, note
        for section in re.findall(r"\d\.\d", sections[0]):
            assert f"### {section} " in docs, note


# --------------------------------------------------------------------------------------
# Run mode


def test_run_report_accuracy_and_approximation_errors(tmp_path, make_run_dir):
    run_dir = make_run_dir(tmp_path / "run-pa")
    rep = run_report(run_dir)
    assert rep.mode == "run" and rep.run_dir == run_dir
    assert rep.accuracy == {
        "fp": {"top1": 90.0, "top5": 99.0},
        "calibrated": {"top1": 40.0, "top5": 70.0},
        "binarized": {"top1": 85.0, "top5": 97.0},
    }
    assert rep.warnings == []
    binarized = rep.profile.binarized_layers
    assert binarized
    for r in binarized:
        assert r.weight_error is not None and 0.0 < r.weight_error < 1.0, r.name
        assert r.activation_error is not None and 0.0 < r.activation_error < 1.5, r.name
    for r in rep.profile.layers:
        if not r.binarized:
            assert r.weight_error is None and r.activation_error is None
    assert rep.profile.input_size == (3, 32, 32)
    d = rep.to_dict()
    _assert_totals_are_row_sums(d)
    assert d["accuracy"]["binarized"]["top1"] == 85.0
    # kind and reason come from surgery's decisions, rebuilt from the run's metadata
    assert any(r.kind == "downsample" for r in binarized)


def test_run_report_without_loadable_data_skips_activation_errors(tmp_path, make_run_dir):
    run_dir = make_run_dir(tmp_path / "run", data="cifar10:" + str(tmp_path / "missing"))
    rep = run_report(run_dir, input_size=48)
    assert rep.profile.input_size == (3, 48, 48)
    assert any("activation errors skipped" in w for w in rep.warnings)
    assert all(r.activation_error is None for r in rep.profile.layers)
    assert all(r.weight_error is not None for r in rep.profile.binarized_layers)


def test_weight_and_activation_errors_are_the_relative_frobenius_norms():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = BinarizedConv2d.from_conv(conv, get_scheme("pa"), 4, 0)
    model = nn.Sequential(layer)
    w = layer.weight.detach()
    expected = float((w - layer.quantized_weight().detach()).norm() / w.norm())
    assert weight_errors(model) == {"0": pytest.approx(expected)}
    assert activation_errors(model, torch.randn(2, 3, 6, 6)) == {"0": None}  # N = 0

    layer = BinarizedConv2d.from_conv(conv, get_scheme("pa"), 4, 3)
    x = torch.randn(2, 3, 6, 6).abs()
    errs = activation_errors(nn.Sequential(layer), x)
    a_hat = layer.activation_quantizer(x).detach()
    assert errs["0"] == pytest.approx(float((x - a_hat).norm() / x.norm()))


# --------------------------------------------------------------------------------------
# --compare


def test_compare_runs_rows_and_gaps(tmp_path, make_run_dir):
    a = make_run_dir(tmp_path / "a", scheme="pa", m=2, n=2, top1=85.0, top5=97.0)
    b = make_run_dir(tmp_path / "b", scheme="pa", m=4, n=0, top1=88.5, top5=98.0)
    rows = compare_runs([a, b])
    assert [r.label for r in rows] == ["full precision", "a", "b"]
    fp, ra, rb = rows
    assert fp.scheme is None and fp.top1 == 90.0 and fp.memory_saving == 1.0
    assert (ra.scheme, ra.m, ra.n) == ("pa", 2, 2) and (rb.m, rb.n) == (4, 0)
    assert ra.gap_top1 == pytest.approx(5.0) and ra.gap_top5 == pytest.approx(2.0)
    assert rb.gap_top1 == pytest.approx(1.5)
    assert fp.memory_bits > rb.memory_bits > ra.memory_bits  # M=4 stores more than M=2
    assert rb.flops == fp.flops  # N = 0: no bitwise operations
    assert ra.flops < fp.flops
    assert ra.to_dict()["M"] == 2


def test_compare_needs_runs():
    with pytest.raises(BadInputError):
        compare_runs([])


def test_compare_reports_without_fp_accuracy(tmp_path, make_run_dir):
    from binarize_cli.convert.rebuild import load_run

    run = load_run(make_run_dir(tmp_path / "x"))
    run.meta.accuracy.fp = None
    rows = compare_reports([report_for_run(run, errors=False)])
    assert len(rows) == 1 and rows[0].gap_top1 is None
