"""An outside reader (reader.py, written from docs/format.md alone) against `binarize run`.

Only the documented command line is used, in a subprocess (`python -m binarize_cli ...`).
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import reader  # noqa: E402
from make_folder import make  # noqa: E402


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-m", "binarize_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert p.returncode == 0, (
        f"binarize {' '.join(map(str, args))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    return p.stdout


def convert_export_run(run_dir, model, data, *extra, baseline_epochs=1, input_size=16):
    cli(
        "convert",
        model,
        "--data",
        data,
        "--input-size",
        input_size,
        "--epochs",
        0,
        "--baseline-epochs",
        baseline_epochs,
        "--batch-size",
        64,
        "-o",
        run_dir,
        "--overwrite",
        *extra,
    )
    packed = run_dir / "model.packed.safetensors"
    cli("export", run_dir, "--target", "packed", "-o", packed)
    logits_file = run_dir / "logits.npy"
    res = json.loads(cli("run", packed, "--json", "--save-logits", logits_file))
    return packed, res, np.load(logits_file)


def check_close(mine, theirs, flipped=0.0):
    """float64 reader vs the float32 runtime: same top-1 image by image, logits within float32
    rounding except on at most a ``flipped`` fraction of the images (docs/format.md section 5,
    "Precision at thresholds": a float64 reader may put a value on the other side of a step)."""
    assert mine.shape == theirs.shape
    assert np.array_equal(mine.argmax(1), theirs.argmax(1))
    scale = np.abs(theirs).max()
    off = np.abs(mine - theirs).max(1) > 1e-4 * scale + 1e-6
    assert off.mean() <= flipped, (off.sum(), np.abs(mine - theirs).max())


def test_reader_imports_neither_torch_nor_binarize_cli():
    tree = ast.parse((HERE / "reader.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert not names & {"torch", "binarize_cli", "timm", "torchvision"}, names
    assert names <= {
        "__future__",
        "json",
        "math",
        "os",
        "struct",
        "sys",
        "numpy",
        "PIL",
        "sklearn",
        "safetensors",
    }


def test_digits_resnet(tmp_path):
    packed, res, saved = convert_export_run(tmp_path / "dig", "timm:test_resnet", "digits")
    m = reader.load(packed)
    assert m.preprocessing["resampler"] == "torch" and m.preprocessing["resize"] == [16, 16]
    assert res["preprocessing"] == m.preprocessing and res["recorded_preprocessing"] is True
    x, y = reader.digits_inputs(m.preprocessing)
    assert x.shape[1:] == tuple(m.input_size)
    logits, top = reader.predict(m, x)
    # docs/format.md does not say which digits form the validation split (nor their order):
    # match every saved row to the reader's row for one of the 1797 images.
    d = np.abs(saved[:, None, :].astype(np.float64) - logits[None]).max(-1)
    idx = d.argmin(1)
    assert len(set(idx.tolist())) == len(idx) == res["samples"]
    assert np.all(np.diff(idx) > 0)  # the split keeps the stored order
    check_close(logits[idx], saved)
    assert res["top1"] == pytest.approx(100.0 * np.mean(top[idx] == y[idx]))


def test_imagefolder_nonsquare(tmp_path):
    root = make(tmp_path / "folder")
    packed, res, saved = convert_export_run(
        tmp_path / "fold", "timm:test_resnet", f"imagefolder:{root}"
    )
    m = reader.load(packed)
    p = m.preprocessing
    assert p["resampler"] == "pil" and p["crop"] == [16, 16] and len(p["resize"]) == 1
    x, y, classes = reader.imagefolder_inputs(root, p)
    assert classes == p["classes"]
    logits, top = reader.predict(m, x)
    check_close(logits, saved)
    assert res["top1"] == pytest.approx(100.0 * np.mean(top == y))


def _digits_v2(tmp_path, model, want, input_size=16, flipped=0.0, scheme="pa"):
    packed, res, saved = convert_export_run(
        tmp_path / "v2",
        model,
        "digits",
        "--calib-batches",
        1,
        "--scheme",
        scheme,
        baseline_epochs=0,
        input_size=input_size,
    )
    m = reader.load(packed)
    assert m.version == 2
    ops = set(m.ops())
    assert want <= ops, (want, ops)
    x, y = reader.digits_inputs(m.preprocessing)
    logits, top = reader.predict(m, x)
    d = np.abs(saved[:, None, :].astype(np.float64) - logits[None]).max(-1)
    idx = d.argmin(1)
    assert len(set(idx.tolist())) == len(idx) == res["samples"]
    check_close(logits[idx], saved, flipped)
    assert res["top1"] == pytest.approx(100.0 * np.mean(top[idx] == y[idx]))


def test_version2_shape_ops_shufflenet(tmp_path):
    """torchvision ShuffleNetV2: chunk -> slice, channel shuffle -> reshape + transpose (version-2 ops)."""
    _digits_v2(tmp_path, "torchvision:shufflenet_v2_x0_5", {"slice", "reshape", "transpose", "cat"})


def test_hardswish_se_mobilenetv3(tmp_path):
    """timm MobileNetV3: hardswish, hardsigmoid gates, SE (mean keepdim, mul)."""
    _digits_v2(tmp_path, "timm:mobilenetv3_small_050", {"hardswish", "hardsigmoid", "mean", "mul"})


def test_same_padding_pad_tf_mobilenetv3(tmp_path):
    """timm tf_mobilenetv3 (Conv2dSame): the `pad` + `conv2d` rule of section 3, end to end."""
    _digits_v2(
        tmp_path, "timm:tf_mobilenetv3_small_075", {"pad", "conv2d"}, input_size=32, flipped=0.05
    )


def test_realtobin_gate_ops(tmp_path):
    """Real-to-Bin's channel gate (docs/format.md section 5): table ops after each bconv2d."""
    want = {"bconv2d", "mean", "linear", "relu", "sigmoid", "mul", "reshape"}
    _digits_v2(tmp_path, "timm:test_resnet", want, scheme="realtobin")


def test_validation_refuses(tmp_path):
    """Header checks of sections 2-3: a bad format, version, bit order or op is refused."""
    packed = tmp_path / "t.safetensors"
    from safetensors.numpy import save_file

    graph = {
        "inputs": ["input"],
        "outputs": ["fc"],
        "nodes": [
            {
                "name": "f",
                "op": "flatten",
                "inputs": ["input"],
                "attrs": {"start_dim": 1, "end_dim": -1},
                "tensors": {},
            },
            {
                "name": "fc",
                "op": "linear",
                "inputs": ["f"],
                "attrs": {},
                "tensors": {"weight": "w"},
            },
        ],
    }
    meta = {
        "format": "binarize-packed",
        "format_version": "1",
        "bit_order": "lsb-first",
        "producer": "t",
        "scheme": "pa",
        "M": "2",
        "N": "2",
        "source_model": "t",
        "num_classes": "2",
        "input_size": "[1, 2, 2]",
        "mean": "null",
        "std": "null",
        "data": "digits",
        "graph": json.dumps(graph),
    }
    w = np.arange(8, dtype=np.float32).reshape(2, 4)
    save_file({"w": w}, str(packed), metadata=meta)
    out = reader.load(packed)(np.ones((3, 1, 2, 2)))
    assert np.allclose(out, np.ones((3, 4)) @ w.T)
    for key, bad in (("format", "other"), ("format_version", "3"), ("bit_order", "msb-first")):
        save_file({"w": w}, str(packed), metadata=dict(meta, **{key: bad}))
        with pytest.raises(reader.FormatError):
            reader.load(packed)
    g2 = json.loads(meta["graph"])
    g2["nodes"][0] = {
        "name": "f",
        "op": "reshape",
        "inputs": ["input"],
        "attrs": {"shape": [4]},
        "tensors": {},
    }
    save_file(
        {"w": w}, str(packed), metadata=dict(meta, graph=json.dumps(g2))
    )  # version-2 op in a version-1 file
    with pytest.raises(reader.FormatError):
        reader.load(packed)
    save_file({"w": w}, str(packed), metadata=dict(meta, graph=json.dumps(g2), format_version="2"))
    assert reader.load(packed)(np.ones((1, 1, 2, 2))).shape == (1, 2)
