"""Per-layer bases end to end: a run whose layers have their own M and N (and one kept full
precision) rebuilds from its ``binarize.json``, exports packed and ONNX, verifies at 100%
top-1 agreement, and ``report --json`` counts each layer's own bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from binarize_cli.cli import main
from binarize_cli.convert.rebuild import load_run
from binarize_cli.core.metadata import RunMetadata
from binarize_cli.export.verify import verify_model
from binarize_cli.load.data import load_data
from binarize_cli.quant.layers import BinarizedConv2d

#: resnet10t's layers: layer1 at M=2 N=3, layer2's 3x3 convolutions at M=6 N=7, layer3's
#: downsample kept full precision, the rest at the run-level (4, 5).
RULES = {
    "layer1\\.": [2, 3],
    "layer2\\.0\\.conv": [6, 7],
    "layer3\\.0\\.downsample": "fp",
}
EXPECTED = {
    "layer1.0.conv1": (2, 3),
    "layer1.0.conv2": (2, 3),
    "layer2.0.conv1": (6, 7),
    "layer2.0.conv2": (6, 7),
    "layer2.0.downsample.1": (4, 5),
    "layer3.0.conv1": (4, 5),
    "layer4.0.conv2": (4, 5),
}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, make_run_dir) -> Path:
    bundle = load_data("digits")
    return make_run_dir(
        tmp_path_factory.mktemp("runs") / "mixed",
        model="timm:resnet10t",
        scheme="pa",
        m=4,
        n=5,
        calibrate_on=torch.stack([bundle.train[i][0] for i in range(32)]),
        bn="reestimate",
        layer_rules=RULES,
        num_classes=bundle.num_classes,
        input_size=list(bundle.input_size),
        mean=list(bundle.mean),
        std=list(bundle.std),
    )


def test_the_run_records_and_rebuilds_each_layers_bases(mixed_run) -> None:
    meta = RunMetadata.load(mixed_run)
    assert meta.layer_bases is not None
    assert meta.layer_bases["layer3.0.downsample.1"] is None
    for name, bases in EXPECTED.items():
        assert tuple(meta.layer_bases[name]) == bases
    modules = dict(load_run(mixed_run).model.named_modules())
    for name, (m, n) in EXPECTED.items():
        layer = modules[name]
        assert isinstance(layer, BinarizedConv2d)
        assert (layer.weight_bases, layer.activation_bases) == (m, n)
    assert not isinstance(modules["layer3.0.downsample.1"], BinarizedConv2d)


def test_mixed_bases_export_packed_and_onnx_agree_100(mixed_run, tmp_path) -> None:
    run = load_run(mixed_run)
    bundle = load_data("digits", **run.meta.data_kwargs())
    images = torch.stack([bundle.val[i][0] for i in range(24)]).numpy()
    result = verify_model(run.model, run.meta.to_dict(), images, workdir=tmp_path)
    assert result.top1_agreement.runtime == 100.0
    assert result.max_rel_logit_diff.runtime < 1e-6
    assert result.top1_agreement.onnx == 100.0, result.notes


def test_report_counts_each_layers_own_bases(mixed_run, capsys) -> None:
    main(["report", str(mixed_run), "--json"])
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["layers"]}
    for name, (m, n) in EXPECTED.items():
        assert (rows[name]["M"], rows[name]["N"], rows[name]["precision"]) == (m, n, "binary")
        assert rows[name]["bops"] == m * n * rows[name]["macs"]
    fp_row = rows["layer3.0.downsample.1"]
    assert (fp_row["M"], fp_row["N"], fp_row["precision"]) == (None, None, "fp")
    # Memory recounted from the model: 32 bits per real parameter, M bits per binarized
    # weight and M 32-bit scales per binarized layer (PA's layer-wise alpha).
    model = load_run(mixed_run).model
    binarized = [m for m in model.modules() if isinstance(m, BinarizedConv2d)]
    weights = {id(m.weight) for m in binarized}
    real = sum(p.numel() for p in model.parameters() if id(p) not in weights)
    bits = 32 * real + sum(m.weight_bases * (m.weight.numel() + 32) for m in binarized)
    assert out["memory_bits"] == bits
    assert out["bops"] == sum(r["bops"] for r in rows.values()) > 0


def test_packed_file_stores_each_layers_bases(mixed_run, tmp_path) -> None:
    from binarize_cli.runtime import load_packed

    target = tmp_path / "mixed.safetensors"
    main(["export", str(mixed_run), "--target", "packed", "-o", str(target)])
    nodes = load_packed(target).graph["nodes"]
    bases = {
        n["name"]: (n["attrs"]["weight_bases"], n["attrs"]["activation_bases"])
        for n in nodes
        if n["op"] == "bconv2d"
    }
    # node names are the module names with "_" for "."
    assert {name: bases.get(name.replace(".", "_")) for name in EXPECTED} == EXPECTED, bases
    assert "layer3_0_downsample_1" not in bases
