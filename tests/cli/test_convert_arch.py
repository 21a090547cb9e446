"""`binarize convert --arch MODULE:CLASS --checkpoint FILE`: a user's own model class through
the command line, and the run it writes reloaded by `export` and `verify`."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            y = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(x + self.bn2(self.conv2(y)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


    def not_a_class():
        return None
    """
)
MODULE = "arch_cli_tinynet"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding the module and a checkpoint of its class (10 classes)."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BINARIZE_DEBUG", raising=False)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    namespace: dict = {}
    exec(compile(SOURCE, "tinynet", "exec"), namespace)
    torch.manual_seed(0)
    torch.save(namespace["TinyNet"]().state_dict(), tmp_path / "tiny.pt")
    yield tmp_path
    sys.modules.pop(MODULE, None)


def test_convert_export_verify_a_user_class(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    run_cli: Callable[..., tuple[int, str, str]],
) -> None:
    spec = f"{MODULE}:TinyNet"
    fast = ["--data", "fake", "--epochs", "0.25", "--batch-size", "32", "--calib-batches", "2"]
    code, out, err = run_cli(
        ["convert", "--arch", spec, "--checkpoint", "tiny.pt", *fast, "-o", "run"], capsys
    )
    assert code == 0, err
    meta = json.loads((workdir / "run" / "binarize.json").read_text())
    assert meta["model"] == spec and meta["weights"].startswith("checkpoint:")
    assert meta["input_size"] == [3, 32, 32] and meta["num_classes"] == 10
    assert "conv1" in out and "fine-tuned" in out

    # `export` and `verify` rebuild the class from binarize.json, importing it again.
    sys.modules.pop(MODULE, None)
    code, _, err = run_cli(["export", "run", "--target", "packed"], capsys)
    assert code == 0, err
    assert (workdir / "run" / "model.packed.safetensors").is_file()
    code, out, err = run_cli(["verify", "run", "--samples", "16", "--no-onnx", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["top1_agreement"]["runtime"] == 100.0


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--arch", "no_such_user_module:Net"], "cannot import module 'no_such_user_module'"),
        (["--arch", f"{MODULE}:Missing"], "has no class 'Missing'"),
        (["--arch", f"{MODULE}:not_a_class"], "not an nn.Module subclass"),
        (["--arch", "resnet18"], "--arch takes MODULE:CLASS"),
        (["resnet18", "--arch", f"{MODULE}:TinyNet"], "not both"),
    ],
)
def test_bad_arch_is_one_line_exit_2(
    args: list[str],
    expect: str,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    run_cli: Callable[..., tuple[int, str, str]],
) -> None:
    before = sorted(p.name for p in workdir.iterdir())
    code, _, err = run_cli(["convert", *args, "--checkpoint", "tiny.pt", "--data", "fake"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binarize: error:") and expect in lines[0]
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written
