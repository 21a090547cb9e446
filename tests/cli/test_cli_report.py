"""`binarize report` through the CLI: analytic, run, --compare, --plot, --paper, errors."""

from __future__ import annotations

import json
from functools import partial

import pytest
from typer.testing import CliRunner

from binarize_cli.cli import app
from binarize_cli.convert.rebuild import load_run
from binarize_cli.core.errors import BadInputError, RunDirError

runner = CliRunner()
CONTRACT_KEYS = {
    "memory_bits",
    "fp_memory_bits",
    "memory_saving",
    "flops",
    "fp_flops",
    "speedup",
    "bops",
    "params",
    "layers",
}


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def _check_sums(d: dict) -> None:
    rows = d["layers"]
    assert d["memory_bits"] == sum(r["bits"] for r in rows)
    assert d["fp_memory_bits"] == sum(r["fp_bits"] for r in rows)
    assert d["flops"] == sum(r["flops"] for r in rows)
    assert d["fp_flops"] == sum(r["fp_flops"] for r in rows)
    assert d["bops"] == sum(r["bops"] for r in rows)
    assert d["params"] == {
        "real": sum(r["params_real"] for r in rows),
        "binary": sum(r["params_binary"] for r in rows),
    }


def test_analytic_json_pa_resnet18_224():
    d = _json(
        [
            "report",
            "resnet18",
            "--scheme",
            "pa",
            "-M",
            "4",
            "-N",
            "5",
            "--input-size",
            "224",
            "--json",
        ]
    )
    assert set(d) >= CONTRACT_KEYS and "accuracy" not in d
    assert (d["scheme"], d["M"], d["N"], d["input_size"]) == ("pa", 4, 5, [3, 224, 224])
    assert d["memory_bits"] == pytest.approx(61.6e6, rel=0.005)
    assert d["fp_memory_bits"] == pytest.approx(374.1e6, rel=0.005)
    assert d["fp_flops"] == pytest.approx(1.81e9, rel=0.005)
    assert d["memory_saving"] == pytest.approx(d["fp_memory_bits"] / d["memory_bits"])
    assert d["speedup"] == pytest.approx(d["fp_flops"] / d["flops"])
    _check_sums(d)
    conv = next(r for r in d["layers"] if r["name"] == "layer1.0.conv1")
    assert conv["binarized"] and conv["M"] == 4 and conv["N"] == 5
    assert conv["input_shape"] == [64, 56, 56] and conv["bops"] == 20 * conv["macs"]


def test_analytic_json_ttq_resnet18_224_counts_two_bits_and_two_scales():
    """TTQ: 2 bits per binarized weight plus W_p, W_n per layer (counted once); the same
    memory as PA with two planes and real activations, which stores the same per layer."""
    args = ["report", "resnet18", "-M", "2", "-N", "0", "--input-size", "224", "--json"]
    d = _json([*args, "--scheme", "ttq"])
    assert (d["scheme"], d["M"], d["N"]) == ("ttq", 2, 0)
    _check_sums(d)
    binarized = [r for r in d["layers"] if r["binarized"]]
    assert len(binarized) == 19  # 16 3x3 + 3 downsample convs: all but the stem are ternary
    for r in binarized:
        assert r["M"] == 2 and r["N"] == 0 and r["scales"] == 2 and r["bops"] == 0
        assert r["params_binary"] == 2 * r["fp_params"]  # 2 bits per weight (no conv bias)
        assert r["params_real"] == 2  # W_p, W_n (no bias, no activation parameters)
        assert r["bits"] == 2 * r["fp_params"] + 2 * 32
    # ResNet-18's 19 binarized convolutions (all but the stem) hold 11,157,504 weights
    assert d["params"]["binary"] == 2 * sum(r["fp_params"] for r in binarized) == 2 * 11_157_504
    pa = _json([*args, "--scheme", "pa"])
    assert d["memory_bits"] == pa["memory_bits"] and d["params"] == pa["params"]


def test_analytic_tables(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    result = runner.invoke(
        app, ["report", "timm:test_resnet", "--scheme", "bireal", "--input-size", "64"]
    )
    assert result.exit_code == 0, result.output
    for text in ("Layers", "Totals", "memory (Mbit)", "FLOPs", "downsample", "first convolution"):
        assert text in result.stdout, text
    assert "Accuracy" not in result.stdout


def test_run_json_has_accuracy_and_errors(tmp_path, make_run_dir):
    run_dir = make_run_dir(tmp_path / "run")
    d = _json(["report", str(run_dir), "--json"])
    assert CONTRACT_KEYS | {"accuracy"} <= set(d)
    assert d["accuracy"]["binarized"] == {"top1": 85.0, "top5": 97.0}
    assert d["mode"] == "run" and d["run_dir"] == str(run_dir)
    _check_sums(d)
    # weight errors: ||W - W_hat|| / ||W|| of the run's own layers, recomputed here
    modules = dict(load_run(run_dir).model.named_modules())
    binarized = [r for r in d["layers"] if r["binarized"]]
    assert binarized
    for r in binarized:
        conv = modules[r["name"]]
        w = conv.weight.detach()
        expected = float((w - conv.quantized_weight().detach()).norm() / w.norm())
        assert r["weight_error"] == pytest.approx(expected, rel=1e-6), r["name"]
        assert 0.0 < r["activation_error"] < 1.5, r["name"]


def test_default_run_is_the_most_recent(tmp_path, make_run_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run_dir(tmp_path / "runs" / "only", scheme="pa", m=4, n=0)
    d = _json(["report", "--json", "--input-size", "32"])
    assert (d["scheme"], d["M"], d["N"]) == ("pa", 4, 0)
    assert d["bops"] == 0


def test_run_tables_and_plot(tmp_path, make_run_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    run_dir = make_run_dir(tmp_path / "run")
    figs = tmp_path / "figs"
    result = runner.invoke(app, ["report", str(run_dir), "--plot", str(figs)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (
        "Accuracy" in result.stdout and "fine-tuned" in result.stdout and "W err" in result.stdout
    )
    pngs = sorted(p.name for p in figs.iterdir())
    assert len(pngs) == 3 and all(p.endswith(".png") for p in pngs)


def test_compare_json_and_table(tmp_path, make_run_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    a = make_run_dir(tmp_path / "a", top1=85.0)
    b = make_run_dir(tmp_path / "b", scheme="bireal", m=1, n=1, top1=70.0)
    d = _json(["report", str(a), "--compare", str(b), "--json"])
    rows = d["runs"]
    assert [r["label"] for r in rows] == ["full precision", "a", "b"]
    assert [r["scheme"] for r in rows] == [None, "pa", "bireal"]
    assert rows[2]["gap_top1"] == pytest.approx(20.0)
    assert rows[0]["memory_bits"] > max(rows[1]["memory_bits"], rows[2]["memory_bits"])
    result = runner.invoke(app, ["report", "--compare", str(a), "--compare", str(b)])
    assert result.exit_code == 0, result.output
    assert "Runs compared" in result.stdout and "bireal" in result.stdout


def test_paper_json(monkeypatch):
    import binarize_cli.analyze.report as lib

    monkeypatch.setattr(lib, "paper_comparison", partial(lib.paper_comparison, ("resnet18",)))
    d = _json(["report", "--paper", "--json", "--input-size", "32"])  # memory: size-independent
    rows = {r["label"]: r for r in d["paper"]}
    assert rows["PA ResNet18"]["paper_memory_bits"] == 61.6e6
    assert abs(rows["PA ResNet18"]["memory_diff"]) < 0.005
    assert rows["ABC ResNet18"]["note"]


def test_bad_combinations_are_bad_input(tmp_path, make_run_dir):
    run_dir = make_run_dir(tmp_path / "run")
    result = runner.invoke(app, ["report", str(run_dir), "-M", "4"])
    assert isinstance(result.exception, BadInputError)
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert isinstance(result.exception, RunDirError)
    result = runner.invoke(app, ["report", "resnet18", "--plot", str(tmp_path / "figs")])
    assert isinstance(result.exception, BadInputError)
    assert not (tmp_path / "figs").exists()


def test_error_is_one_line_exit_2(tmp_path, binarize_process):
    proc = binarize_process(
        "report",
        "resnet18",
        "--plot",
        str(tmp_path / "f"),
        cwd=tmp_path,
        env={"BINARIZE_DEBUG": "0"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("binarize: error: --plot")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- width and gap


@pytest.fixture(scope="module")
def wide_and_narrow(tmp_path_factory, make_run_dir):
    """One run's report at 80 columns, at 200 columns, and as JSON."""
    run_dir = make_run_dir(tmp_path_factory.mktemp("width") / "run")
    out = {}
    for columns in (80, 200):
        result = runner.invoke(app, ["report", str(run_dir)], env={"COLUMNS": str(columns)})
        assert result.exit_code == 0, (result.output, result.exception)
        out[columns] = result.stdout
    out["json"] = _json(["report", str(run_dir), "--json"])
    return out


def _layer_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("layer "))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("total"))
    return [line for line in lines[start:end] if line.strip()]


def test_report_at_80_columns_cuts_no_cell(wide_and_narrow):
    text, d = wide_and_narrow[80], wide_and_narrow["json"]
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = {line.split()[0]: line.split() for line in _layer_lines(text)[1:]}
    for layer in d["layers"]:
        if layer["binarized"] or layer["macs"]:
            cells = rows[layer["name"]]  # every compute layer's row, its name whole
            if layer["weight_error"] is not None:
                assert f"{layer['weight_error']:.3f}" in cells
            o = layer["output_shape"]
            assert any(c.endswith("x".join(map(str, o[1:]))) for c in cells) or len(o) < 2
    flat = " ".join(text.split())
    assert "not shown at this width: FLOPs, MACs, kind, why" in flat and "see --json" in flat


def test_report_on_a_wide_terminal_shows_every_column(wide_and_narrow):
    header = _layer_lines(wide_and_narrow[200])[0].split()
    for column in ("kind", "why", "params", "Mbit", "MACs", "BOPs", "FLOPs", "W", "A"):
        assert column in header
    assert "not shown at this width" not in wide_and_narrow[200]
    assert "…" not in wide_and_narrow[200]


def test_report_gap_is_fp_minus_model(wide_and_narrow):
    """fp 90/99, calibrated 40/70, fine-tuned 85/97 (conftest): gaps 50/29 and 5/2, positive."""
    text = wide_and_narrow[200]
    fine_tuned = next(line for line in text.splitlines() if "fine-tuned" in line)
    assert [c.strip() for c in fine_tuned.split("│")][1:6] == [
        "fine-tuned",
        "85.00",
        "97.00",
        "5.00",
        "2.00",
    ]
    assert "-5.00" not in text
    assert "gap = full-precision accuracy - this model's accuracy" in " ".join(text.split())


def test_paper_and_compare_tables_fit_80_columns(tmp_path, make_run_dir, monkeypatch):
    import binarize_cli.analyze.report as lib

    monkeypatch.setattr(lib, "paper_comparison", partial(lib.paper_comparison, ("resnet18",)))
    a = make_run_dir(tmp_path / "a", top1=85.0)
    b = make_run_dir(tmp_path / "b", scheme="bireal", m=1, n=1, top1=70.0)
    for args, whole in (
        (["report", "--paper", "--input-size", "32"], ("PA ResNet18", "61.6")),
        (["report", str(a), "--compare", str(b)], ("full precision", "20.00", "bireal")),
    ):
        narrow = runner.invoke(app, args, env={"COLUMNS": "80"})
        wide = runner.invoke(app, args, env={"COLUMNS": "250"})
        assert narrow.exit_code == 0 and wide.exit_code == 0, (narrow.output, wide.output)
        for text, width in ((narrow.stdout, 80), (wide.stdout, 250)):
            assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
            assert all(cell in text for cell in whole)
        assert "not shown at this width" in " ".join(narrow.stdout.split())
        assert "not shown at this width" not in wide.stdout
    # --paper's notes move below the table at 80 columns, whole
    narrow = runner.invoke(app, ["report", "--paper", "--input-size", "32"], env={"COLUMNS": "80"})
    rows = lib.paper_comparison(input_size=32)
    for r in rows:
        if r.note and len(f"{r.label}: {r.note}") <= 80:
            assert f"{r.label}: {r.note}" in narrow.stdout


def test_report_of_a_run_without_fine_tuning_has_no_fine_tuned_row(tmp_path, make_run_dir):
    """A run converted with --epochs 0 keeps `accuracy.binarized` (the calibrated model's) in
    binarize.json and --json, but its accuracy table shows no fine-tuned row."""
    run = make_run_dir(tmp_path / "run", recipe={"epochs": 0})
    text = runner.invoke(app, ["report", str(run)], env={"COLUMNS": "200"}).output
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert any("calibrated" in line for line in rows)
    assert not any("fine-tuned" in line for line in rows), text
    assert _json(["report", str(run), "--json"])["accuracy"]["binarized"]["top1"] == 85.0
    tuned = make_run_dir(tmp_path / "tuned", recipe={"epochs": 0.5})
    text = runner.invoke(app, ["report", str(tuned)], env={"COLUMNS": "200"}).output
    assert any("fine-tuned" in line for line in text.splitlines() if line.startswith("│"))
