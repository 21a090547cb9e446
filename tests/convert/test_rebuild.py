"""Rebuilding a run directory's model (``load_run``)."""

from __future__ import annotations

from binarize_cli.convert.rebuild import load_run
from binarize_cli.quant.layers import BinarizedConv2d


def test_load_run_gives_modules_their_state_dict_versions(tmp_path, make_run_dir) -> None:
    """safetensors stores no module versions; torchvision's MNASNet refuses to load without
    its own (``version should be set to 1 or 2``)."""
    run = load_run(make_run_dir(tmp_path / "run", model="torchvision:mnasnet0_5"))
    assert run.meta.model == "torchvision:mnasnet0_5"
    assert any(isinstance(m, BinarizedConv2d) for m in run.model.modules())
