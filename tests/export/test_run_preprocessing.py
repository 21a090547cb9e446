"""`binarize run FILE` scores what `convert` reported: the packed file carries the run's data
and preprocessing, `run` rebuilds the very images `convert` evaluated, and its top-1 equals
``binarize.json``'s binarized top-1 to the image (issue 14).

Two real runs, each converted once per module on tiny settings (timm's ``test_resnet``,
random weights, one baseline epoch, ``--epochs 0``):

* an ImageFolder of non-square images at input size 32. ``test_resnet``'s ``pretrained_cfg``
  has ``crop_pct`` 0.95 (not the 0.875 default), so ``convert`` resizes the shorter side to
  ``int(32 / 0.95) = 33`` and center crops 32; before the record, ``run`` used 0.875 (36);
* digits at 16x16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from binarize_cli.cli import main
from binarize_cli.load.data import load_data

MODEL = "timm:test_resnet"
COLOURS = [(200, 40, 40), (40, 180, 60), (50, 60, 210)]
SHAPES = [(36, 52), (48, 30), (40, 40), (30, 45)]


def write_colour_folder(root: Path, train: int = 8, val: int = 6) -> None:
    """Three classes, each a coloured band at a class-specific height on grey noise; image
    sizes cycle through non-square shapes (and one square)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for k, colour in enumerate(COLOURS):
            d = root / split / f"c{k}"
            d.mkdir(parents=True)
            for i in range(n):
                h, w = SHAPES[(i + k) % len(SHAPES)]
                img = rng.normal(110, 40, (h, w, 3))
                top = (k + 1) * h // 5
                img[top : top + h // 5] = np.array(colour) + rng.normal(0, 20, (h // 5, w, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")


def convert_and_export(root: Path, data: str, extra: list[str]) -> dict:
    """Convert (recording the images of its final evaluation) and export the packed file."""
    from binarize_cli.convert import training

    seen: list[torch.Tensor] = []
    original = training.evaluate

    def spy(model, loader, **kwargs):
        batches = list(loader)
        seen.append(torch.cat([x for x, _ in batches]))
        return original(model, batches, **kwargs)

    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "evaluate", spy)
        main(
            [
                "convert",
                MODEL,
                "--no-pretrained",
                "--data",
                data,
                *extra,
                "--baseline-epochs",
                "1",
                "--epochs",
                "0",
                "--calib-batches",
                "1",
                "-o",
                str(run_dir),
            ]
        )
    packed = root / "model.packed.safetensors"
    main(["export", str(run_dir), "--target", "packed", "-o", str(packed)])
    meta = json.loads((run_dir / "binarize.json").read_text())
    return {"run": run_dir, "packed": packed, "meta": meta, "images": seen[-1].numpy()}


def run_json(capsys, monkeypatch, *args: str) -> tuple[dict, np.ndarray]:
    """``binarize run ... --json`` and the images it handed the runtime, in order."""
    import binarize_cli.runtime as runtime

    handed: list[np.ndarray] = []
    original = runtime.evaluate_packed

    def spy(model, batches, **kwargs):
        def recorded():
            for x, y in batches:
                handed.append(x)
                yield x, y

        return original(model, recorded(), **kwargs)

    capsys.readouterr()
    monkeypatch.setattr(runtime, "evaluate_packed", spy)
    main(["run", *args, "--json"])
    out = json.loads(capsys.readouterr().out)
    return out, np.concatenate(handed)


def cli_error(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return int(info.value.code), capsys.readouterr().err


def rewrite_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    """A copy of a packed file with metadata keys changed (None: removed), as older
    exports (no ``preprocessing``) or a moved data set would leave it."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(src), "np") as f:
        metadata = dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(load_file(str(src)), str(dst), metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("folder")
    write_colour_folder(root / "ds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BINARIZE_CACHE", str(root / "cache"))
        made = convert_and_export(
            root, f"imagefolder:{root / 'ds'}", ["--input-size", "32", "--batch-size", "16"]
        )
    return {**made, "root": root}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("digits")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BINARIZE_CACHE", str(root / "cache"))
        made = convert_and_export(root, "digits", ["--input-size", "16", "--batch-size", "128"])
    return {**made, "root": root}


def test_imagefolder_run_scores_what_convert_reported(capsys, monkeypatch, folder_run) -> None:
    meta = folder_run["meta"]
    record = meta["preprocessing"]
    assert record["crop_pct"] == 0.95 and record["resize"] == [33] and record["crop"] == [32, 32]
    assert record["resampler"] == "pil" and record["classes"] == ["c0", "c1", "c2"]
    out, images = run_json(capsys, monkeypatch, str(folder_run["packed"]))
    assert out["data"] == meta["data"] and out["data_from"] == "file"
    assert out["preprocessing"] == record and out["recorded_preprocessing"] is True
    assert out["notes"] == [] and out["samples"] == 18
    # the very images convert evaluated, and the same top-1 to the image
    assert images.dtype == np.float32 and np.array_equal(images, folder_run["images"])
    assert out["top1"] == pytest.approx(meta["accuracy"]["binarized"]["top1"], abs=1e-9)
    # the old rule (crop_pct 0.875: shorter side 36) makes other images: the test can tell
    old = load_data(meta["data"], input_size=32, mean=meta["mean"], std=meta["std"])
    assert not np.allclose(np.stack([old.val[i][0].numpy() for i in range(18)]), images)


def test_run_prints_the_data_and_preprocessing_it_used(capsys, folder_run) -> None:
    capsys.readouterr()
    main(["run", str(folder_run["packed"])])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (
        f"data {folder_run['meta']['data']} (recorded in the file): shorter side to 33 bilinear "
        "(pil, antialias), center crop 32x32 (crop_pct 0.95), pixels / 255, "
        "mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5]"
    )
    assert "top-1" in lines[1] and len(lines) == 2


def test_run_with_data_applies_the_files_preprocessing(capsys, monkeypatch, folder_run) -> None:
    moved = folder_run["root"] / "elsewhere"
    if not moved.exists():
        shutil.copytree(folder_run["root"] / "ds", moved)
    out, images = run_json(
        capsys, monkeypatch, str(folder_run["packed"]), "--data", f"imagefolder:{moved}"
    )
    assert out["data"] == f"imagefolder:{moved.resolve()}" and out["data_from"] == "--data"
    assert out["preprocessing"] == folder_run["meta"]["preprocessing"]
    assert np.array_equal(images, folder_run["images"])
    assert out["top1"] == pytest.approx(folder_run["meta"]["accuracy"]["binarized"]["top1"])


def test_recorded_data_that_is_gone_names_data_option(capsys, folder_run, tmp_path) -> None:
    gone = rewrite_metadata(
        folder_run["packed"], tmp_path / "gone.safetensors", data=f"imagefolder:{tmp_path / 'x'}"
    )
    code, err = cli_error(capsys, "run", str(gone))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no longer exists" in err and "--data imagefolder:PATH" in err


def test_file_without_a_record_runs_as_before_with_a_note(
    capsys, monkeypatch, folder_run, tmp_path
) -> None:
    old = rewrite_metadata(folder_run["packed"], tmp_path / "v1.safetensors", preprocessing=None)
    out, _ = run_json(capsys, monkeypatch, str(old))
    assert out["recorded_preprocessing"] is False and out["data_from"] == "file"
    assert out["preprocessing"]["crop_pct"] == 0.875  # today's default, which the note names
    assert len(out["notes"]) == 1 and "records no preprocessing" in out["notes"][0]
    capsys.readouterr()
    main(["run", str(old), "--samples", "3"])
    captured = capsys.readouterr()
    assert captured.err.startswith("note: ") and "re-export" in captured.err


def test_digits_run_scores_what_convert_reported_and_saves_logits(
    capsys, monkeypatch, digits_run, tmp_path
) -> None:
    meta = digits_run["meta"]
    assert meta["preprocessing"]["pixel_scale"] == 16.0
    assert meta["preprocessing"]["resize"] == [16, 16]
    logits_file = tmp_path / "logits.npy"
    logits_file.write_bytes(b"an older file: replaced, as export -o replaces")
    out, images = run_json(
        capsys, monkeypatch, str(digits_run["packed"]), "--save-logits", str(logits_file)
    )
    assert out["data"] == "digits" and out["data_from"] == "file" and out["samples"] == 360
    assert np.array_equal(images, digits_run["images"])
    assert out["top1"] == pytest.approx(meta["accuracy"]["binarized"]["top1"], abs=1e-9)
    assert out["logits_file"] == str(logits_file)
    logits = np.load(logits_file)
    assert logits.dtype == np.float32 and logits.shape == (360, 10)
    labels = load_data("digits").val.labels.numpy()
    assert 100 * float((logits.argmax(1) == labels).mean()) == pytest.approx(out["top1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.npy"]  # no staging left


def test_save_logits_location_is_checked_before_running(capsys, digits_run, tmp_path) -> None:
    code, err = cli_error(
        capsys, "run", str(digits_run["packed"]), "--save-logits", str(tmp_path / "no" / "l.npy")
    )
    assert code == 2 and "--save-logits" in err and "does not exist" in err


def test_verify_images_follow_the_record(folder_run) -> None:
    """``binarize verify`` compares the engines on the images the run was evaluated on."""
    from binarize_cli.core.metadata import RunMetadata
    from binarize_cli.export.verify import _images

    meta = RunMetadata.load(folder_run["run"])
    assert np.array_equal(_images(meta, None, 5), folder_run["images"][:5])


def test_onnx_metadata_carries_data_and_preprocessing(folder_run) -> None:
    from binarize_cli.export.onnx import _metadata

    meta = folder_run["meta"]
    props = _metadata(meta, float_weights=False)
    assert json.loads(props["binarize.preprocessing"]) == meta["preprocessing"]
    assert props["binarize.data"] == meta["data"]
    older = {k: v for k, v in meta.items() if k != "preprocessing"}
    assert "binarize.preprocessing" not in _metadata({**older, "data": ""}, float_weights=True)
    assert "binarize.data" not in _metadata({**older, "data": ""}, float_weights=True)
