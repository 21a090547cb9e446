"""binarize_cli.analyze.plots: the figures exist, are PNGs, and show both distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer

from binarize_cli.analyze.plots import (
    AccuracyPoint,
    accuracy_memory,
    activation_histogram,
    save_figure,
    training_curve,
    weight_histogram,
    write_figures,
)
from binarize_cli.analyze.report import PlotData, layer_samples, plot_data, run_report
from binarize_cli.core.errors import BadInputError
from binarize_cli.quant import get_scheme

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bars(fig):
    (ax,) = fig.axes
    return ax, [c for c in ax.containers if isinstance(c, BarContainer)]


def test_weight_histogram_has_both_distributions_on_shared_bins(tmp_path):
    w = torch.randn(32, 16, 3, 3) * 0.05
    quantizer = get_scheme("pa").weight_quantizer(4)
    quantizer.calibrate(w)
    w_hat = quantizer(w).detach()
    fig = weight_histogram(w, w_hat, layer="layer2.0.conv1", scheme="pa", m=4)
    ax, bars = _bars(fig)
    assert len(bars) == 2
    labels = ax.get_legend_handles_labels()[1]
    assert labels[0].startswith("full precision W") and "W_hat" in labels[1] and "M=4" in labels[1]
    heights = [np.array([p.get_height() for p in b.patches]) for b in bars]
    assert heights[0].sum() == w.numel() and heights[1].sum() == w.numel()  # every value binned
    # the approximation is concentrated on few levels (M + 1 for PA), the original is spread
    assert (heights[1] > 0).sum() <= 5 < (heights[0] > 0).sum()
    assert [p.get_x() for p in bars[0].patches][:3] == pytest.approx(
        [p.get_x() for p in bars[1].patches][:3], abs=0.02
    )
    assert "layer2.0.conv1" in ax.get_title()
    path = save_figure(fig, tmp_path / "w.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["w.png"]  # no temporary files left


def test_activation_histogram_log_counts():
    a = torch.relu(torch.randn(4, 8, 10, 10))
    a_hat = torch.clamp(torch.round(a * 2) / 2, max=2.0)
    fig = activation_histogram(a, a_hat, layer="layer2.0.conv2", scheme="pa", n=5)
    ax, bars = _bars(fig)
    assert len(bars) == 2 and ax.get_yscale() == "log"
    label = ax.get_legend_handles_labels()[1][1]
    assert "A_hat" in label and "N=5" in label
    assert sum(p.get_height() for p in bars[1].patches) == a.numel()


def test_accuracy_memory_plots_runs_and_baselines():
    points = [
        AccuracyPoint("fp", 374e6, 90.0, full_precision=True),
        AccuracyPoint("pa M=4 N=5", 61.6e6, 86.0),
        AccuracyPoint("bireal", 33.6e6, 70.0),
    ]
    fig = accuracy_memory(points)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    offsets = [c.get_offsets() for c in ax.collections]
    assert [len(o) for o in offsets] == [2, 1]
    assert sorted(offsets[0][:, 0].tolist()) == pytest.approx([33.6, 61.6])
    assert len(ax.texts) == 3


def test_training_curve_draws_each_recorded_series_and_marks_the_kept_epoch(tmp_path):
    epochs = [
        {"loss": 0.9, "top1": 70.0, "select_top1": 75.0, "val_top1": 72.0},
        {"loss": 0.6, "top1": 80.0, "select_top1": 79.0, "val_top1": 78.0},
        {"loss": 0.5, "top1": 82.0, "select_top1": 77.0},  # no validation this epoch
    ]
    fig = training_curve(epochs, kept=2)
    loss_ax, acc_ax = fig.axes
    assert loss_ax.lines[0].get_ydata().tolist() == [0.9, 0.6, 0.5]
    labels = [line.get_label() for line in acc_ax.lines if line.get_label() != "kept"]
    assert labels == ["train (running)", "selection subset", "validation"]
    val = acc_ax.lines[2].get_ydata()
    assert val[:2].tolist() == [72.0, 78.0] and np.isnan(val[2])
    kept_lines = [line for ax in fig.axes for line in ax.lines if line.get_label() == "kept"]
    assert len(kept_lines) == 2 and all(line.get_xdata()[0] == 2 for line in kept_lines)
    # written by write_figures when the run fine-tuned
    data = PlotData(weights=None, activations=None, points=[], epochs=epochs, kept_epoch=2)
    (png,) = write_figures(data, tmp_path)
    assert png.name == "training_curve.png" and png.read_bytes().startswith(PNG_MAGIC)


def test_write_figures_for_a_run(tmp_path, make_run_dir):
    from binarize_cli.convert.rebuild import load_run

    run = load_run(make_run_dir(tmp_path / "run"))
    rep = run_report(run.path, errors=False)
    data = plot_data(run, [rep])
    assert data.weights is not None and data.activations is not None
    assert data.weights.layer != data.activations.layer
    assert data.activations.original.shape == data.activations.approx.shape
    files = write_figures(data, tmp_path / "figs")
    names = sorted(f.name for f in files)
    assert names[0] == "accuracy_memory.png"
    assert names[1].startswith("activations_") and names[2].startswith("weights_")
    for f in files:
        assert f.read_bytes().startswith(PNG_MAGIC) and f.stat().st_size > 5000
    assert [p.label for p in data.points][0].endswith("FP")


def test_layer_samples_rejects_a_kept_layer(tmp_path, make_run_dir):
    from binarize_cli.convert.rebuild import load_run

    run = load_run(make_run_dir(tmp_path / "run"))
    with pytest.raises(BadInputError):
        layer_samples(run.model, None, weight_layer="fc")
    w, a = layer_samples(run.model, None)
    assert w is not None and a is None  # no batch: no activation figure


def test_write_figures_refuses_a_file(tmp_path):
    target = tmp_path / "file.png"
    target.write_bytes(b"x")
    with pytest.raises(BadInputError):
        write_figures(PlotData(None, None, []), target)


@pytest.mark.parametrize(
    ("mask", "mode"), [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"]
)
def test_report_plot_files_get_the_umask_mode(tmp_path, make_run_dir, capsys, mask, mode):
    """`report --plot DIR` writes its figures with 0o666 minus the umask (not tempfile's 0600)."""
    import os
    import stat

    from binarize_cli.cli import main

    run = make_run_dir(tmp_path / "run")
    old = os.umask(mask)
    try:
        main(["report", str(run), "--plot", str(tmp_path / "figs")])
    finally:
        os.umask(old)
    capsys.readouterr()
    files = sorted((tmp_path / "figs").iterdir())
    assert len(files) == 3
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {mode}
