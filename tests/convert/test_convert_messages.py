"""What `convert` says while it runs, and records: notes, provenance, counts, the table."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch

from binarize_cli.cli import main
from binarize_cli.convert.pipeline import validate_settings
from binarize_cli.core.errors import BadInputError
from binarize_cli.core.settings import merge_settings


def test_pretrained_with_checkpoint_is_refused_before_loading(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"never read")
    settings = merge_settings(
        None, {"model": "timm:test_resnet", "pretrained": True, "checkpoint": str(ckpt)}
    )
    with pytest.raises(BadInputError, match="--pretrained and --checkpoint both name"):
        validate_settings(settings)


def test_checkpoint_of_1000_classes_on_10_class_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 1000-class checkpoint on fake data with --epochs 0: the classifier reset is said and
    recorded, the weights file and its sha256 are recorded, the calibration count is the one
    used, and the accuracy table has no fine-tuned row."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "imagenet_head.pt"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), ckpt)
    run = tmp_path / "run"
    args = ["convert", "timm:test_resnet", "--checkpoint", str(ckpt), "--data", "fake"]
    args += ["--epochs", "0", "--baseline-epochs", "1", "--batch-size", "128"]
    args += ["--calib-batches", "8", "-o", str(run)]
    main(args)  # returns normally: `main` exits only on errors
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1, err
    assert "1000-class classifier" in notes[0] and "10 classes" in notes[0]
    # fake has 256 training images: 2 batches of 128, not the 8 asked for
    assert "calibrating on 2 batches (the training split has only 2 of the 8" in err
    assert "calibrating on 8" not in err
    assert "calibrated (no training)" in out and "fine-tuned" not in out
    meta = json.loads((run / "binarize.json").read_text())
    # the note said, then the warnings said (one baseline epoch on fake data is near chance;
    # rich may wrap a long warning, so its first printed line is a prefix of the record)
    said = [line.split("warning: ", 1)[1] for line in err.splitlines() if "warning:" in line]
    assert meta["notes"][0] == notes[0].split("note: ", 1)[1]
    assert len(meta["notes"]) == 1 + len(said)
    for recorded, printed in zip(meta["notes"][1:], said, strict=True):
        assert recorded.startswith(printed.strip()), (recorded, printed)
    assert meta["weights_file"] == str(ckpt.resolve())
    assert meta["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["weights"] == f"checkpoint:{meta['weights_sha256'][:12]}"
    # `binarized` is kept, equal to the calibrated model's accuracy (no fine-tuning ran)
    assert meta["accuracy"]["binarized"] == meta["accuracy"]["calibrated"]
