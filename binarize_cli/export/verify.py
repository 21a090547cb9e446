"""``binarize verify``: the PyTorch model, the bitwise runtime and ONNX, side by side.

:func:`verify_model` exports the model to a packed file and to ONNX (in a temporary
directory), runs all three on the same ``samples`` validation images and returns a
:class:`VerifyResult`, whose ``to_dict()`` is ``verify --json``::

    {"samples": n,
     "top1_agreement":     {"runtime": %, "onnx": % or None},   # vs the reference, in percent
     "max_abs_logit_diff": {"runtime": x, "onnx": x or None},
     "logit_scale": max |PyTorch logit|,
     "max_rel_logit_diff": {"runtime": x / scale, "onnx": ...},
     "precision": {"reference": "float64 ...", "runtime": "float64", "onnx": "float32"},
     "float32": {"top1_agreement": %, "max_abs_logit_diff": x, "max_rel_logit_diff": x,
                 "flipped_activations": k, "pytorch_vs_float64": x,
                 "onnx_vs_pytorch": {"top1_agreement": %, "max_abs_logit_diff": x} or None},
     "backend": "c (avx512-vpopcntdq)" | "numpy", "notes": [...],
     "run": RUN_DIR}                                   # verify_run only

**Why the runtime is compared in float64.** Every binarized layer thresholds its input
(PA eq. 10/18, ABC's ``R + v_n >= 0.5``): a step function. Two correct float32
implementations (PyTorch's oneDNN convolutions and the runtime's BLAS/popcount path) round
differently, and an activation within ~1e-6 of a threshold can land on different sides,
moving that element by a whole level. That is a property of float32, not a bug, and on a
hundred images it happens a few times. ``verify`` therefore checks the *function*: it
evaluates, in float64, (a) PyTorch on exactly the parameters stored in the packed file
(``W_hat`` rebuilt from the stored planes and scales, batch norm as the stored folded
scale/shift, everything else the model's own weights), and (b) the runtime on the file,
and reports their agreement — any real disagreement (a wrong plane, a missing border
correction, a mis-serialised op) shows up as an O(1) difference, rounding as ~1e-12.
The float32 comparison (the model as trained vs the runtime in float32, what a deployment
sees) is reported too, under ``float32``, with the number of activation elements whose
bit planes differ and ``pytorch_vs_float64``: how far float32 PyTorch itself is from the
float64 evaluation (when that is as large as the runtime's float32 difference, the float32
difference is PyTorch's rounding, not the runtime's).

The reference for both engines is the float64 evaluation. ONNX (onnxruntime) computes in
float32 only, so its numbers include float32 rounding and any threshold flips it causes; its
comparison with the float32 PyTorch model is under ``float32.onnx_vs_pytorch``. If
:mod:`binarize_cli.export.onnx` cannot be imported or the export fails, the ``onnx`` entries
are ``None`` and ``notes`` says why (nothing is faked).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from binarize_cli.core.errors import BadInputError, BinarizeError
from binarize_cli.core.metadata import RunMetadata
from binarize_cli.quant.base import WeightQuantizer
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.runtime.bits import unpack_planes

DEFAULT_SAMPLES = 100

#: What each side of the comparison computes in (``VerifyResult.precision``).
PRECISION = {
    "reference": "float64 (PyTorch on the packed file's parameters)",
    "runtime": "float64",
    "onnx": "float32",
}


@dataclass
class ByEngine:
    """One measure for the bitwise runtime and for ONNX (``None``: ONNX not compared)."""

    runtime: float
    onnx: float | None


@dataclass
class Agreement:
    """Top-1 agreement (percent) and the largest absolute logit difference of two engines."""

    top1_agreement: float
    max_abs_logit_diff: float


@dataclass
class Float32Check:
    """The float32 comparison: the model as trained vs the float32 runtime (see the module
    docstring), threshold flips, PyTorch's own float32 drift, and ONNX vs float32 PyTorch."""

    top1_agreement: float
    max_abs_logit_diff: float
    max_rel_logit_diff: float
    flipped_activations: int
    pytorch_vs_float64: float
    onnx_vs_pytorch: Agreement | None


@dataclass(kw_only=True)
class VerifyResult:
    """What ``binarize verify`` measured; :meth:`to_dict` is its ``--json`` output (fields in
    that order)."""

    samples: int
    top1_agreement: ByEngine
    max_abs_logit_diff: ByEngine
    logit_scale: float
    max_rel_logit_diff: ByEngine
    precision: dict[str, str] = field(default_factory=lambda: dict(PRECISION))
    float32: Float32Check
    backend: str
    notes: list[str]
    #: The run directory verified (:func:`verify_run`); ``None`` for :func:`verify_model`.
    run: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``verify --json`` mapping (``run`` only when set)."""
        d = asdict(self)
        if self.run is None:
            del d["run"]
        return d


class _FixedWeight(WeightQuantizer):
    """A weight "quantizer" that returns a stored ``W_hat`` (the replay's exported weight)."""

    def __init__(self, w_hat: torch.Tensor, m: int) -> None:
        super().__init__()
        self.num_bases = m
        self.register_buffer("w_hat", w_hat)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.w_hat.to(weight.dtype)


def _w_hat(planes: np.ndarray, scales: np.ndarray, domain: str) -> torch.Tensor:
    p = torch.from_numpy(planes.astype(np.float64))
    if domain == "plus_minus_one":
        p = 2 * p - 1
    s = torch.from_numpy(np.asarray(scales, dtype=np.float64))
    if s.dim() == 1:
        s = s.reshape(-1, *([1] * (p.dim() - 1)))
    else:  # [M, O]
        s = s.reshape(*s.shape, *([1] * (p.dim() - 2)))
    return (s * p).sum(dim=0)


def replay_model(
    model: nn.Module, tensors: Mapping[str, np.ndarray], graph: Mapping[str, Any]
) -> nn.Module:
    """A float64 copy of ``model`` that uses exactly the parameters of the packed file.

    Binarized convolutions get ``W_hat`` from the stored planes and scales; batch norms get
    the stored folded ``scale``/``shift`` (as ``weight``/``bias`` with zero mean, unit variance
    and ``eps = 0``, so PyTorch computes ``x * scale + shift``). Activation quantizers, full-
    precision layers and the network structure are the model's own.
    """
    rep = copy.deepcopy(model).eval()
    modules = dict(rep.named_modules())
    for node in graph["nodes"]:
        t = node.get("tensors", {})
        if node["op"] == "bconv2d":
            target = t["weight_planes"].rsplit(".weight_planes", 1)[0]
            layer = modules.get(target)
            if not isinstance(layer, BinarizedConv2d):
                raise BinarizeError(
                    f"packed layer {target} is not a binarized convolution of the model"
                )
            planes = unpack_planes(tensors[t["weight_planes"]], tuple(layer.weight.shape))
            w = _w_hat(planes, tensors[t["weight_scales"]], node["attrs"]["weight_domain"])
            layer.weight_quantizer = _FixedWeight(w, int(node["attrs"]["weight_bases"]))
        elif node["op"] == "batchnorm":
            target = t["scale"].rsplit(".scale", 1)[0]
            bn = modules.get(target)
            if not isinstance(bn, nn.BatchNorm2d):
                raise BinarizeError(f"packed batch norm {target} is not a batch norm of the model")
            with torch.no_grad():
                bn.running_mean.zero_()  # type: ignore[union-attr]
                bn.running_var.fill_(1.0)  # type: ignore[union-attr]
                bn.eps = 0.0
                if bn.weight is None or bn.bias is None:
                    bn.weight = nn.Parameter(torch.ones_like(bn.running_var))  # type: ignore[arg-type]
                    bn.bias = nn.Parameter(torch.zeros_like(bn.running_var))  # type: ignore[arg-type]
                bn.weight.copy_(torch.from_numpy(tensors[t["scale"]]))
                bn.bias.copy_(torch.from_numpy(tensors[t["shift"]]))
    return rep.double()


def _compare(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement in percent, max |logit difference|)."""
    agree = float((reference.argmax(axis=1) == other.argmax(axis=1)).mean() * 100.0)
    return agree, float(np.abs(reference.astype(np.float64) - other.astype(np.float64)).max())


def _flipped_activations(model: nn.Module, runtime: Any, images: np.ndarray) -> int:
    """Activation elements whose bit planes differ between float32 PyTorch and the runtime."""
    inputs: dict[str, np.ndarray] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, BinarizedConv2d) and mod.activation_bases > 0:
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda _m, a, n=name: inputs.__setitem__(n, a[0].detach().cpu().numpy())
                )
            )
    try:
        with torch.no_grad():
            model(torch.from_numpy(images))
    finally:
        for h in hooks:
            h.remove()
    values = dict(runtime.trace(images))
    values[runtime.graph["inputs"][0]] = images
    flips = 0
    for spec, node in zip(runtime.graph["nodes"], runtime.nodes, strict=True):
        if node.layer is None or node.layer.act is None:
            continue
        target = spec["tensors"]["weight_planes"].rsplit(".weight_planes", 1)[0]
        if target not in inputs:
            continue
        code = node.layer.act
        ours = code.planes(values[node.inputs[0]])
        theirs = code.planes(inputs[target])
        flips += int((ours != theirs).any(axis=0).sum())
    return flips


def _compare_onnx(
    model: nn.Module,
    meta: Mapping[str, Any],
    images: np.ndarray,
    torch64: np.ndarray,
    torch32: np.ndarray,
    tmp: Path,
    notes: list[str],
) -> tuple[float | None, float | None, Agreement | None]:
    """Export ``model`` to ONNX in ``tmp`` and compare ONNX Runtime's logits with PyTorch's
    float64 (agreement, max diff) and float32 (:class:`Agreement`). A failed export or run is
    a note and ``None`` values: reported, never faked."""
    try:
        from binarize_cli.export.onnx import export_onnx_model, onnx_logits
    except ImportError as exc:
        notes.append(f"onnx: not compared, the ONNX exporter is unavailable ({exc})")
        return None, None, None
    try:
        path = export_onnx_model(model, meta, tmp / "model.onnx")
        onnx_out = onnx_logits(path, images)
    except Exception as exc:  # noqa: BLE001 - reported, never faked: onnx stays None
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        notes.append(f"onnx: not compared, export or run failed ({type(exc).__name__}: {first})")
        return None, None, None
    agree, diff = _compare(torch64, onnx_out)
    a32, d32 = _compare(torch32, onnx_out)
    return agree, diff, Agreement(top1_agreement=a32, max_abs_logit_diff=d32)


def verify_model(
    model: nn.Module,
    meta: Mapping[str, Any],
    images: np.ndarray,
    *,
    workdir: str | Path | None = None,
    backend: str | None = None,
    onnx: bool = True,
) -> VerifyResult:
    """Compare PyTorch, the packed runtime and ONNX on ``images`` (normalised, ``[B, C, H, W]``)."""
    from binarize_cli.export.packed import export_packed_model
    from binarize_cli.runtime import load_packed, read_packed

    model = model.eval()
    images = np.ascontiguousarray(images, dtype=np.float32)
    n = int(images.shape[0])
    if n == 0:
        raise BadInputError("no images to verify on; pass --samples >= 1")
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        packed = export_packed_model(model, meta, Path(tmp) / "model.packed.safetensors")
        _, tensors = read_packed(packed)
        rt64 = load_packed(packed, backend=backend, precision="float64")
        rt32 = load_packed(packed, backend=backend, precision="float32")
        with torch.no_grad():
            torch32 = model(torch.from_numpy(images)).numpy()
            replay = replay_model(model, tensors, rt64.graph)
            torch64 = replay(torch.from_numpy(images.astype(np.float64))).numpy()
        out64 = rt64(images, batch_size=32)
        out32 = rt32(images, batch_size=32)
        scale = float(np.abs(torch32).max()) or 1.0
        agree64, diff64 = _compare(torch64, out64)
        agree32, diff32 = _compare(torch32, out32)
        flips = sum(_flipped_activations(model, rt32, images[i : i + 16]) for i in range(0, n, 16))
        _, torch_drift = _compare(torch64, torch32)
        onnx_agree, onnx_diff, onnx32 = (
            _compare_onnx(model, meta, images, torch64, torch32, Path(tmp), notes)
            if onnx
            else (None, None, None)
        )
        if not onnx:
            notes.append("onnx: not compared (disabled)")
    be = rt32.backend
    backend_name = be.name if be.name == "numpy" else f"{be.name} ({be.simd})"
    if getattr(be, "fallback_reason", None):
        notes.append(f"runtime: NumPy backend ({be.fallback_reason})")  # type: ignore[attr-defined]
    if flips:
        notes.append(
            f"float32: {flips} activation element(s) fall on different sides of a quantizer threshold "
            "in float32 PyTorch and the float32 runtime (rounding, not a bug)"
        )
    return VerifyResult(
        samples=n,
        top1_agreement=ByEngine(runtime=agree64, onnx=onnx_agree),
        max_abs_logit_diff=ByEngine(runtime=diff64, onnx=onnx_diff),
        logit_scale=scale,
        max_rel_logit_diff=ByEngine(
            runtime=diff64 / scale, onnx=None if onnx_diff is None else onnx_diff / scale
        ),
        float32=Float32Check(
            top1_agreement=agree32,
            max_abs_logit_diff=diff32,
            max_rel_logit_diff=diff32 / scale,
            flipped_activations=flips,
            pytorch_vs_float64=torch_drift,
            onnx_vs_pytorch=onnx32,
        ),
        backend=backend_name,
        notes=notes,
    )


def _images(meta: RunMetadata, data: str | None, samples: int) -> np.ndarray:
    from binarize_cli.load.data import load_data

    bundle = load_data(str(data or meta.data or "digits"), **meta.data_kwargs())
    count = min(samples, len(bundle.val))  # type: ignore[arg-type]
    if count == 0:
        raise BadInputError("the validation set is empty; nothing to verify on")
    return np.stack([np.asarray(bundle.val[i][0], dtype=np.float32) for i in range(count)])


def verify_run(
    run_dir: str | Path | None,
    *,
    data: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    backend: str | None = None,
    onnx: bool = True,
) -> VerifyResult:
    """``binarize verify [RUN_DIR] [--data SPEC] [--samples N]``: see :func:`verify_model`.

    The images are the first ``samples`` validation images of ``data`` (default: the run's
    data), made with the run's preprocessing record (``RunMetadata.data_kwargs``: for runs
    recorded before it, the run's input size and normalisation).
    """
    from binarize_cli.convert.rebuild import load_run

    if samples < 1:
        raise BadInputError(f"--samples must be >= 1 (got {samples})")
    run = load_run(run_dir)
    images = _images(run.meta, data, samples)
    result = verify_model(
        run.model, run.meta.to_dict(), images, workdir=None, backend=backend, onnx=onnx
    )
    result.run = str(run.path)
    return result
