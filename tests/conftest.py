"""Shared test setup: deterministic seeds, few threads (CI has 2 cores), isolated cache, and the
builders several test files need (each a session fixture that returns a plain function):

* ``calibrate_activations`` / ``binarized_model``: a small binarized model with calibrated
  activation quantizers, as the export, ONNX, runtime and verify tests build it;
* ``run_meta`` / ``make_run_dir``: ``binarize.json`` records and whole run directories;
* ``top1_recount``: correct predictions counted over a loader, independently of the
  library's evaluation loops;
* ``numeric_grad`` / ``away_from`` / ``check_ramp_gradients``: finite-difference references
  for the quantizers' backward passes;
* ``binarize_process``: ``python -m binarize_cli ...`` in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    cache = tmp_path_factory.mktemp("binarize-cache")
    monkeypatch.setenv("BINARIZE_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


# --------------------------------------------------------------------------- binarized models

#: What happens to the batch-norm layers around calibration: ``keep`` leaves them as built,
#: ``perturb`` draws running mean ~ N(0, 0.1) and variance ~ U(0.5, 2) first (so the folded
#: scales of an export are not all 1), ``reestimate`` recomputes the running statistics on the
#: calibration images afterwards (as ``binarize convert`` does).
BatchNormMode = Literal["keep", "perturb", "reestimate"]


@torch.no_grad()
def _calibrate_activations(
    model: nn.Module, x: torch.Tensor, *, bn: BatchNormMode = "keep"
) -> nn.Module:
    """Fit every activation quantizer (N > 0) on the inputs its layer sees for ``x`` in eval
    mode (one forward pass, all of them), handling batch norm as ``bn`` says; returns ``model``
    in eval mode."""
    from binarize_cli.quant.layers import BinarizedConv2d

    if bn == "perturb":
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    model.eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BinarizedConv2d)}
    samples: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_pre_hook(
            lambda _m, a, k=name: samples.__setitem__(k, a[0].detach().flatten())
        )
        for name, mod in layers.items()
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    for name, mod in layers.items():
        if mod.activation_bases:
            mod.activation_quantizer.calibrate(samples[name])
    if bn == "reestimate":
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None  # cumulative average: exactly the statistics of x
                mod.train()
        model(x)
        model.eval()
    return model


@pytest.fixture(scope="session")
def calibrate_activations() -> Callable[..., nn.Module]:
    """``calibrate_activations(model, x, *, bn="keep")``: see :func:`_calibrate_activations`."""
    return _calibrate_activations


def _slim_resnet18(num_classes: int = 10) -> nn.Module:
    """timm's ResNet-18 structure at 1/4 width (fast tests)."""
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [2, 2, 2, 2], channels=(16, 32, 64, 128), num_classes=num_classes)


def _binarized_model(
    arch: str | Callable[[], nn.Module],
    scheme: Any,
    m: int,
    n: int,
    *,
    seed: int | None = 0,
    images: int | torch.Tensor | None = 8,
    size: tuple[int, int] = (32, 32),
    bn: BatchNormMode = "perturb",
    surgery: Callable[[nn.Module, Any, int, int], Any] | None = None,
    num_classes: int = 10,
) -> nn.Module:
    """A model with random weights, binarized, calibrated; returned in eval mode.

    ``seed``: ``torch.manual_seed(seed)`` first (``None``: the RNG as it is). ``arch``:
    ``"slim_resnet18"``, a timm name, or a builder. ``surgery(model, scheme, m, n)`` replaces
    the convolutions (default ``binarize_model``, told that a ResNet's stem is ``conv1`` and
    its head ``fc``). ``images``: the calibration batch, how many ``N(0, 1)`` images of
    ``size`` to draw (after surgery), or ``None`` for no calibration. ``bn``: see
    :data:`BatchNormMode`.
    """
    import timm

    from binarize_cli.convert.surgery import binarize_model

    if seed is not None:
        torch.manual_seed(seed)
    names: dict[str, Any] = {}
    if callable(arch):
        model = arch()
    elif arch == "slim_resnet18":
        model = _slim_resnet18(num_classes)
        names = {"first_conv": "conv1", "classifier": "fc"}
    else:
        model = timm.create_model(arch, num_classes=num_classes)
        names = {"first_conv": "conv1", "classifier": "fc"} if "resnet" in arch else {}
    if surgery is None:
        binarize_model(model, scheme, m, n, **names)
    else:
        surgery(model, scheme, m, n)
    if images is None:
        return model.eval()
    x = torch.randn(images, 3, *size) if isinstance(images, int) else images
    return _calibrate_activations(model, x, bn=bn)


@pytest.fixture(scope="session")
def binarized_model() -> Callable[..., nn.Module]:
    """``binarized_model(arch, scheme, m, n, **options)``: see :func:`_binarized_model`."""
    return _binarized_model


# --------------------------------------------------------------------------- run directories


def _run_meta(
    scheme: str = "pa", m: int = 2, n: int = 2, *, model: str = "timm:test_resnet", **extra: Any
) -> dict[str, Any]:
    """A ``binarize.json`` record: the contract keys (no accuracy or timings measured), what a
    run needs to be rebuilt (10 classes, 3x32x32 inputs), then ``extra`` on top."""
    return {
        "model": model,
        "scheme": scheme,
        "M": m,
        "N": n,
        "data": "fake",
        "recipe": {},
        "accuracy": {},
        "timings": {},
        "num_classes": 10,
        "keep": [],
        "scheme_options": {},
        "input_size": [3, 32, 32],
        **extra,
    }


@pytest.fixture(scope="session")
def run_meta() -> Callable[..., dict[str, Any]]:
    """``run_meta(scheme="pa", m=2, n=2, *, model="timm:test_resnet", **extra)``."""
    return _run_meta


def _accuracy_record(
    top1: float, top5: float, fp: tuple[float, float], calibrated: tuple[float, float]
) -> dict[str, dict[str, float]]:
    stages = {"fp": fp, "calibrated": calibrated, "binarized": (top1, top5)}
    return {stage: {"top1": t1, "top5": t5} for stage, (t1, t5) in stages.items()}


def _make_run_dir(
    path: Path,
    *,
    model: str = "timm:test_resnet",
    scheme: Any = "pa",
    m: int = 2,
    n: int = 2,
    top1: float = 85.0,
    top5: float = 97.0,
    fp: tuple[float, float] = (90.0, 99.0),
    calibrated: tuple[float, float] = (40.0, 70.0),
    calibrate_on: torch.Tensor | None = None,
    bn: BatchNormMode = "keep",
    layer_rules: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """A run directory the way ``convert`` writes one, without training: the registry
    ``model`` built with random weights (seed 0), binarized (``scheme``: a name or a
    ``Scheme``), its activation quantizers calibrated on ``calibrate_on`` when given (batch
    norm: ``bn``), saved with ``write_run``. The accuracies and timings are made up
    (``top1``/``top5`` are the binarized model's); ``layer_rules`` (a recipe's ``[layers]``)
    gives layers their own bases, recorded as ``layer_bases``; ``extra`` adds or overrides
    metadata keys."""
    from binarize_cli.convert.surgery import binarize_model
    from binarize_cli.core.metadata import RunMetadata
    from binarize_cli.core.rundir import write_run
    from binarize_cli.load.models import create_architecture

    torch.manual_seed(0)
    loaded = create_architecture(model, num_classes=int(extra.get("num_classes", 10)))
    names = {"first_conv": loaded.first_conv, "classifier": loaded.classifier}
    surgeries: list[Any] = []
    built = _binarized_model(
        lambda: loaded.model,
        scheme,
        m,
        n,
        seed=None,
        images=calibrate_on,
        bn=bn,
        surgery=lambda mod, s, m_, n_: surgeries.append(
            binarize_model(mod, s, m_, n_, layer_rules=layer_rules or {}, **names)
        ),
    )
    fields = {
        "data": "digits",
        "accuracy": _accuracy_record(top1, top5, fp, calibrated),
        "timings": {"baseline_epoch_s": [], "finetune_epoch_s": [1.0], "calibrate_s": 0.5},
        **names,
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "layer_bases": surgeries[0].layer_bases,
        **extra,
    }
    name = scheme if isinstance(scheme, str) else scheme.name
    meta = _run_meta(name, m, n, model=loaded.spec, **fields)
    return write_run(path, built.state_dict(), RunMetadata.from_dict(meta))


@pytest.fixture(scope="session")
def make_run_dir() -> Callable[..., Path]:
    """``make_run_dir(path, *, model, scheme, m, n, top1, top5, ..., calibrate_on, **extra)``."""
    return _make_run_dir


# --------------------------------------------------------------------------- accuracy


@torch.no_grad()
def _top1_recount(
    model: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    limit: int | None = None,
) -> tuple[int, int]:
    """``(correct, total)``: how many of the images in ``batches`` (the first ``limit`` of
    them, all by default) ``model`` puts in their labelled class, by argmax of its logits.
    A torch module is put in eval mode first."""
    if isinstance(model, nn.Module):
        model.eval()
    correct = total = 0
    for x, y in batches:
        if limit is not None:
            x, y = x[: limit - total], y[: limit - total]
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += int(y.shape[0])
        if limit is not None and total >= limit:
            break
    return correct, total


@pytest.fixture(scope="session")
def top1_recount() -> Callable[..., tuple[int, int]]:
    """``top1_recount(model, batches, limit=None) -> (correct, total)``."""
    return _top1_recount


# --------------------------------------------------------------------------- finite differences


def _numeric_grad(
    fn: Callable[[torch.Tensor], Any], x: torch.Tensor, h: float = 1e-6
) -> torch.Tensor:
    """Central finite differences of the scalar ``fn(x)``, element by element (``x`` is
    modified in place and restored; use double precision)."""
    grad = torch.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        old = float(flat[i])
        with torch.no_grad():  # values only: a finite difference needs no graph
            flat[i] = old + h
            up = float(fn(x))
            flat[i] = old - h
            down = float(fn(x))
            flat[i] = old
        grad.reshape(-1)[i] = (up - down) / (2 * h)
    return grad


@pytest.fixture(scope="session")
def numeric_grad() -> Callable[..., torch.Tensor]:
    """``numeric_grad(fn, x, h=1e-6)``: see :func:`_numeric_grad`."""
    return _numeric_grad


def _away_from(values: torch.Tensor, kinks: Sequence[float], margin: float = 1e-3) -> torch.Tensor:
    """``values`` with every element within ``margin`` of a kink moved up by ``3 * margin``
    (kink by kink), where finite differences of a piecewise-linear surrogate are undefined."""
    out = values.clone()
    for k in kinks:
        out = torch.where((out - k).abs() < margin, out + 3 * margin, out)
    return out


@pytest.fixture(scope="session")
def away_from() -> Callable[..., torch.Tensor]:
    """``away_from(values, kinks, margin=1e-3)``: see :func:`_away_from`."""
    return _away_from


def _check_ramp_gradients(
    quantizer: nn.Module,
    x: torch.Tensor,
    ramp: Callable[[torch.Tensor, list[float]], torch.Tensor],
    v: list[float],
    h: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of ``quantizer`` (an activation quantizer with endpoints ``quantizer.v``)
    at ``x`` under a random upstream gradient ``g`` equals central finite differences of the
    surrogate ``ramp(x, v)``: in ``x`` (``dA_hat/dA``, nonzero somewhere) and in each ``v_i``
    (``dC/dv_i``), with ``ramp`` keeping its segments fixed while ``v_i`` moves. Returns
    ``(x, g)`` (``x`` detached) for further checks of the same backward pass."""
    x = x.detach().requires_grad_()
    g = torch.randn(x.shape, dtype=x.dtype)
    (quantizer(x) * g).sum().backward()
    xd = x.detach()
    fd_x = g * (ramp(xd + h, v) - ramp(xd - h, v)) / (2 * h)
    assert torch.allclose(x.grad, fd_x, rtol=1e-6, atol=1e-8)
    assert float(x.grad.abs().sum()) > 0
    fd_v = []
    for i in range(len(v)):
        vp, vm = list(v), list(v)
        vp[i] += h
        vm[i] -= h
        fd_v.append(float((g * ramp(xd, vp)).sum() - (g * ramp(xd, vm)).sum()) / (2 * h))
    assert quantizer.v.grad.tolist() == pytest.approx(fd_v, rel=1e-6, abs=1e-8)
    return xd, g


@pytest.fixture(scope="session")
def check_ramp_gradients() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``check_ramp_gradients(quantizer, x, ramp, v, h=1e-6)``: see :func:`_check_ramp_gradients`."""
    return _check_ramp_gradients


# --------------------------------------------------------------------------- fresh processes


def _binarize_process(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``python -m binarize_cli ARGS`` in a fresh process (this environment plus ``env``),
    output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "binarize_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def binarize_process() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``binarize_process(*args, cwd=None, env=None, timeout=300)``."""
    return _binarize_process


# --------------------------------------------------------------------------- the CLI in process


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``binarize ARGS`` in this process: ``(exit code, stdout, stderr)``."""
    from binarize_cli.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., tuple[int, str, str]]:
    return _run_cli
