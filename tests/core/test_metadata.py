"""binarize.json as a typed record: byte-identical round trip, old files, malformed files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from binarize_cli.core.errors import BadInputError, RunDirError, RunMetadataError
from binarize_cli.core.metadata import (
    META_FILE,
    REQUIRED_KEYS,
    SCHEMA_VERSION,
    RunMetadata,
    StageAccuracy,
)


def convert_record() -> dict[str, Any]:
    """A record shaped exactly as `convert` writes it (keys and order of pipeline.run_convert)."""
    return {
        "format": "binarize-run",
        "format_version": 1,
        "model": "timm:resnet18",
        "weights": None,
        "scheme": "pa",
        "M": 4,
        "N": 5,
        "data": "digits",
        "recipe": {"model": "resnet18", "scheme": "pa", "M": 4, "N": 5, "epochs": 1.0},
        "accuracy": {
            "fp": {"top1": 97.5, "top5": 100.0},
            "calibrated": {"top1": 60.25, "top5": 91.0},
            "binarized": {"top1": 93.0, "top5": 99.75},
        },
        "timings": {
            "baseline_epoch_s": [12.5, 11.0],
            "baseline_cached": False,
            "finetune_epoch_s": [30.125],
            "calibrate_s": 0.75,
            "finetune_step_s": 0.5,
            "fp_step_s": 0.25,
        },
        "finetune_epochs": [
            {"loss": 0.5, "top1": 88.0, "images_per_s": 410.0, "seconds": 30.125, "steps": 45}
        ],
        "finetune_kept_epoch": 1,
        "num_classes": 10,
        "keep": ["layer4.*"],
        "scheme_options": {"weight_endpoints": [-1.0, -0.5, 0.5, 1.0]},
        "first_conv": ["conv1"],
        "classifier": ["fc"],
        "policy": {"keep_first_conv": True, "keep": ["layer4.*"], "scheme": "pa"},
        "input_size": [3, 32, 32],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "world_size": 1,
        "created": "2026-11-30T04:00:00+00:00",
        "binarize_version": "0.1.0",
        "weights_file": "/ckpt/resnet18.safetensors",
        "weights_sha256": "ab" * 32,
        "notes": ["the classifier is reset"],
        "layer_bases": {"layer1.0.conv1": [2, 3], "layer4.0.downsample": None},
        "allocation": {"policy": "auto", "budget_mbit": 40.0, "memory_bits": 39000000},
    }


def _write(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).write_text(text)
    return path


def test_round_trip_keeps_every_byte(tmp_path) -> None:
    record = convert_record()
    expected = (json.dumps(record, indent=2, sort_keys=False) + "\n").encode()
    meta = RunMetadata.from_dict(record)
    assert list(meta.to_dict()) == list(record)
    assert meta.to_dict() == record
    written = meta.save(tmp_path)
    assert written == tmp_path / META_FILE
    assert written.read_bytes() == expected
    loaded = RunMetadata.load(tmp_path)
    assert loaded == meta
    assert RunMetadata.load(written) == meta  # the file path works as well as the directory
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == expected


def test_the_device_is_kept_where_convert_records_it(tmp_path) -> None:
    """``device`` (written after ``world_size`` by runs that know it) round-trips byte for
    byte; a record without it stays without it; a non-string is refused."""
    items = list(convert_record().items())
    at = [k for k, _ in items].index("world_size") + 1
    record = dict([*items[:at], ("device", "cuda:0"), *items[at:]])
    meta = RunMetadata.from_dict(record)
    assert meta.device == "cuda:0" and list(meta.to_dict()) == list(record)
    meta.save(tmp_path)
    assert (tmp_path / META_FILE).read_bytes() == (json.dumps(record, indent=2) + "\n").encode()
    assert "device" not in RunMetadata.from_dict(convert_record()).to_dict()
    with pytest.raises(RunMetadataError, match="device"):
        RunMetadata.from_dict({**record, "device": 0})


def test_typed_access() -> None:
    meta = RunMetadata.from_dict(convert_record())
    assert (meta.model, meta.scheme, meta.M, meta.N) == ("timm:resnet18", "pa", 4, 5)
    assert meta.accuracy.binarized == StageAccuracy(top1=93.0, top5=99.75)
    assert meta.accuracy.stage("fp") is meta.accuracy.fp
    with pytest.raises(KeyError):
        meta.accuracy.stage("final")
    assert meta.timings.finetune_epoch_s == [30.125] and meta.timings.calibrate_s == 0.75
    assert meta.timings.step_ratio == 2.0 and meta.finetune_kept_epoch == 1
    assert meta.data_kwargs() == {
        "input_size": (3, 32, 32),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }


def test_an_old_file_without_the_schema_keys_still_loads(tmp_path) -> None:
    # What the first releases wrote before ``format``/``format_version`` and the optional keys.
    old = {k: convert_record()[k] for k in REQUIRED_KEYS}
    old["accuracy"] = {"fp": {"top1": 90, "top5": 99}}  # integers, and stages not measured
    old["timings"] = {}
    meta = RunMetadata.load(_write(tmp_path, json.dumps(old)))
    assert meta.format_version == SCHEMA_VERSION == 1 and meta.format == "binarize-run"
    assert meta.accuracy.fp is not None and meta.accuracy.fp.top1 == 90
    assert meta.accuracy.calibrated is None and meta.accuracy.binarized is None
    assert meta.timings.finetune_epoch_s == [] and meta.timings.calibrate_s is None
    assert meta.keep == [] and meta.input_size is None and meta.first_conv is None
    assert meta.data_kwargs() == {}
    assert meta.world_size == 1
    assert meta.weights_file is None and meta.weights_sha256 is None and meta.notes == []
    assert meta.timings.step_ratio is None and meta.finetune_kept_epoch is None
    assert meta.layer_bases is None and meta.allocation is None  # rebuilt with M, N everywhere


def test_another_schema_version_is_refused(tmp_path) -> None:
    record = {**convert_record(), "format_version": SCHEMA_VERSION + 1}
    with pytest.raises(
        RunMetadataError, match="run format version 2; this binarize reads version 1"
    ):
        RunMetadata.load(_write(tmp_path, json.dumps(record)))


def _one_line_bad_input(exc: pytest.ExceptionInfo[RunMetadataError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert isinstance(exc.value, RunDirError) and isinstance(exc.value, BadInputError)
    assert exc.value.exit_code == 2
    return message


@pytest.mark.parametrize("text", ["{not json", "", "\udcff"])
def test_not_json(tmp_path, text) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / META_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(RunMetadataError) as exc:
        RunMetadata.load(run)
    message = _one_line_bad_input(exc)
    assert str(run / META_FILE) in message and "not JSON" in message


def test_not_an_object(tmp_path) -> None:
    with pytest.raises(RunMetadataError) as exc:
        RunMetadata.load(_write(tmp_path, "[1, 2]"))
    assert "is not a binarize run record" in _one_line_bad_input(exc)


@pytest.mark.parametrize("key", ["model", "M", "accuracy", "timings", "num_classes"])
def test_missing_key(tmp_path, key) -> None:
    record = convert_record()
    del record[key]
    with pytest.raises(RunMetadataError) as exc:
        RunMetadata.load(_write(tmp_path, json.dumps(record)))
    message = _one_line_bad_input(exc)
    assert f"lacks keys {key};" in message and str(tmp_path / META_FILE) in message


def test_missing_nested_key(tmp_path) -> None:
    record = convert_record()
    del record["accuracy"]["calibrated"]["top5"]
    with pytest.raises(RunMetadataError) as exc:
        RunMetadata.load(_write(tmp_path, json.dumps(record)))
    assert "lacks key accuracy.calibrated.top5" in _one_line_bad_input(exc)


def _set(record: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    target = record
    for p in parents:
        target = target[p]
    target[last] = value


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("M", "4", "M must be an integer, not a string"),
        ("N", True, "N must be an integer, not true/false"),
        ("model", None, "model must be a string, not null"),
        ("keep", "layer4", "keep must be a list of strings, not a string"),
        ("input_size", [3, "32", 32], "input_size must be [C, H, W] or null, not a list"),
        ("recipe", [], "recipe must be an object or null, not a list"),
        ("accuracy", [], "accuracy must be an object, not a list"),
        ("accuracy.fp", 97.5, "accuracy.fp must be an object, not a number"),
        ("accuracy.binarized.top1", "93%", "accuracy.binarized.top1 must be a number"),
        ("timings", None, "timings must be an object, not null"),
        ("notes", "reset", "notes must be a list of strings, not a string"),
        ("weights_sha256", 12, "weights_sha256 must be a string or null, not a number"),
        ("layer_bases", {"conv": [4]}, "layer_bases must be an object of [M, N] or null per layer"),
        ("layer_bases", [[4, 5]], "layer_bases must be an object of [M, N] or null per layer"),
        ("timings.finetune_epoch_s", 30.0, "timings.finetune_epoch_s must be a list of numbers"),
        (
            "timings.calibrate_s",
            "fast",
            "timings.calibrate_s must be a number or null, not a string",
        ),
    ],
)
def test_wrong_type(tmp_path, key, value, expected) -> None:
    record = convert_record()
    _set(record, key, value)
    with pytest.raises(RunMetadataError) as exc:
        RunMetadata.load(_write(tmp_path, json.dumps(record)))
    message = _one_line_bad_input(exc)
    assert expected in message and str(tmp_path / META_FILE) in message


def test_a_malformed_run_is_one_line_and_exit_2_on_the_cli(tmp_path, capsys) -> None:
    from binarize_cli.cli import main

    run = tmp_path / "run"
    record = convert_record()
    record["N"] = "five"
    _write(run, json.dumps(record))
    (run / "model.safetensors").write_bytes(b"")  # never read: the metadata fails first
    with pytest.raises(SystemExit) as exc:
        main(["report", str(run), "--json"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "N must be an integer, not a string" in err


def with_preprocessing(record: dict[str, Any], prep: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``preprocessing`` where convert writes it (after ``std``)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        out[key] = value
        if key == "std":
            out["preprocessing"] = prep
    return out


DIGITS_PREP = {
    "channels": 3,
    "pixel_scale": 16.0,
    "mean": [0.3, 0.3, 0.3],
    "std": [0.32, 0.32, 0.32],
    "grey": "replicate",
    "resize": [32, 32],
    "interpolation": "bilinear",
    "antialias": False,
    "round_resized": False,
    "resampler": "torch",
    "crop": None,
    "crop_pct": None,
    "classes": [str(i) for i in range(10)],
}


def test_preprocessing_is_optional_and_round_trips(tmp_path) -> None:
    from binarize_cli.core.preprocess import Preprocessing

    old = convert_record()  # written before the record existed: no key, and none added
    new = with_preprocessing(old, DIGITS_PREP)
    for name, record in (("old", old), ("new", new)):
        expected = (json.dumps(record, indent=2) + "\n").encode()
        meta = RunMetadata.from_dict(record)
        assert meta.save(tmp_path / f"{name}.json").read_bytes() == expected, name
        assert RunMetadata.load(tmp_path / f"{name}.json").to_dict() == record, name
    assert "preprocessing" not in RunMetadata.from_dict(old).to_dict()
    assert RunMetadata.from_dict(old).preprocessing_record() is None
    meta = RunMetadata.from_dict(new)
    record = meta.preprocessing_record()
    assert record == Preprocessing.from_dict(DIGITS_PREP)
    # what verify and report load their images with: the record, not size and mean alone
    assert meta.data_kwargs() == {"preprocessing": record}


def test_bad_preprocessing_is_a_one_line_metadata_error(tmp_path) -> None:
    bad = with_preprocessing(convert_record(), {**DIGITS_PREP, "crop_pct": 2})
    run = _write(tmp_path / "run", json.dumps(bad))
    with pytest.raises(RunMetadataError, match="preprocessing.crop_pct must be in") as info:
        RunMetadata.load(run)
    assert "\n" not in str(info.value) and str(run / META_FILE) in str(info.value)
    wrong_type = with_preprocessing(convert_record(), [1, 2])  # type: ignore[arg-type]
    with pytest.raises(RunMetadataError, match="preprocessing must be an object or null"):
        RunMetadata.from_dict(wrong_type)
