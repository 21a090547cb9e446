"""ONNX export: packed bit-planes unpacked in-graph, exact activation steps, onnxruntime agreement.

The built-in schemes are used when they are registered; small stand-in schemes defined here
(PA-like piece indicators with ``>=``, ABC-like shifted signs in {-1,+1}, an XNOR-like sign
with ``>`` ties and per-channel weight scales, and a data-dependent quantizer that is not a
step function) keep the exporter tested on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from binarize_cli.core.errors import BadInputError, SchemeError
from binarize_cli.export.onnx import (
    INPUT_NAME,
    ONNX_FORMAT,
    OUTPUT_NAME,
    ExportConv,
    activation_staircase,
    build_export_model,
    check_staircase,
    export_onnx,
    export_onnx_model,
    onnx_logits,
    onnx_session,
)
from binarize_cli.quant.base import (
    ActivationQuantizer,
    BitPlanes,
    Domain,
    Scheme,
    WeightQuantizer,
    get_scheme,
)
from binarize_cli.quant.layers import BinarizedConv2d
from binarize_cli.runtime.bits import packed_length
from binarize_cli.runtime.staircase import Staircase

# --------------------------------------------------------------------------------------------
# Stand-in schemes
# --------------------------------------------------------------------------------------------


class PieceWeights(WeightQuantizer):
    """PA-like (eq. 6-7, 15-16): M endpoints mean + c std, piece means, zero middle piece."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.num_bases = m
        half = np.linspace(0.25, 1.5, m // 2)
        self.register_buffer(
            "c", torch.tensor(np.concatenate([-half[::-1], half]), dtype=torch.float32)
        )

    def bit_planes(self, weight: torch.Tensor) -> BitPlanes:
        u = weight.mean() + self.c * weight.std()
        piece = (weight.unsqueeze(-1) >= u).sum(-1)  # 0..M
        m = self.num_bases
        plane_pieces = [p for p in range(m + 1) if p != m // 2]
        planes = torch.stack([piece == p for p in plane_pieces])
        counts = planes.flatten(1).sum(1)
        sums = (planes * weight).flatten(1).sum(1)
        scales = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
        return BitPlanes(planes, scales, Domain.ZERO_ONE)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.bit_planes(weight).reconstruct()


class PieceActivations(ActivationQuantizer):
    """PA-like (eq. 10, 17-18): 0 below v_1, beta_i on [v_i, v_{i+1}), beta_N from v_N."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.num_bases = n
        self.v = nn.Parameter(torch.linspace(0.2, 1.5, n))
        self.beta = nn.Parameter(torch.linspace(0.5, 2.0, n))

    def bit_planes(self, x: torch.Tensor) -> BitPlanes:
        ge = [x >= v for v in self.v]
        planes = [ge[i] & ~ge[i + 1] for i in range(self.num_bases - 1)] + [ge[-1]]
        return BitPlanes(torch.stack(planes), self.beta.detach(), Domain.ZERO_ONE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bit_planes(x).reconstruct()

    @torch.no_grad()
    def calibrate(self, samples: torch.Tensor) -> None:
        pos = samples[samples > 0]
        qs = torch.linspace(0.2, 0.95, self.num_bases + 1)
        edges = torch.quantile(pos[:100_000], qs)
        self.v.copy_(edges[:-1])
        self.beta.copy_((edges[:-1] + edges[1:]) / 2)


class ShiftedSignWeights(WeightQuantizer):
    """ABC-like (eq. 1): B_m = sign(W - mean + u_m std), alpha by least squares, {-1,+1}."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.num_bases = m
        self.u = [0.0] if m == 1 else [-1 + k * 2 / (m - 1) for k in range(m)]

    def bit_planes(self, weight: torch.Tensor) -> BitPlanes:
        w = weight
        planes = torch.stack([w - w.mean() + u * w.std() >= 0 for u in self.u])
        b = (2.0 * planes.float() - 1.0).reshape(self.num_bases, -1).T
        alpha = torch.linalg.lstsq(b, w.reshape(-1, 1)).solution.reshape(-1)
        return BitPlanes(planes, alpha, Domain.PLUS_MINUS_ONE)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.bit_planes(weight).reconstruct()


class ShiftedSignActivations(ActivationQuantizer):
    """ABC-like (eq. 2): A_n = 2 * 1[clip(x + v_n, 0, 1) >= 0.5] - 1, R = sum beta_n A_n."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.num_bases = n
        self.v = nn.Parameter(torch.linspace(0.4, -0.6, n))
        self.beta = nn.Parameter(torch.full((n,), 0.4))

    def bit_planes(self, x: torch.Tensor) -> BitPlanes:
        planes = torch.stack([torch.clamp(x + v, 0, 1) >= 0.5 for v in self.v])
        return BitPlanes(planes, self.beta.detach(), Domain.PLUS_MINUS_ONE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bit_planes(x).reconstruct()


class ChannelSignWeights(WeightQuantizer):
    """XNOR-like: sign(W) with mean |W| per output channel (scales [1, C_out])."""

    num_bases = 1

    def bit_planes(self, weight: torch.Tensor) -> BitPlanes:
        scales = weight.abs().mean(dim=(1, 2, 3)).unsqueeze(0)
        return BitPlanes((weight >= 0).unsqueeze(0), scales, Domain.PLUS_MINUS_ONE)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.bit_planes(weight).reconstruct()


class StrictSignActivations(ActivationQuantizer):
    """sign with the tie at 0 going to -1 (``x > 0``), unlike the ``>=`` stand-ins."""

    num_bases = 1

    def bit_planes(self, x: torch.Tensor) -> BitPlanes:
        return BitPlanes((x > 0).unsqueeze(0), torch.ones(1), Domain.PLUS_MINUS_ONE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, 1.0, -1.0)


class ChannelScaledSign(ActivationQuantizer):
    """Not a step function: sign(x) times mean |x| over channels (XNOR-Net's K), per pixel."""

    num_bases = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, 1.0, -1.0) * x.abs().mean(dim=1, keepdim=True)


def _scheme(name: str, wq, aq, domain: Domain) -> Scheme:
    return Scheme(
        name=name,
        description=f"test stand-in {name}",
        make_weight_quantizer=lambda m, o: wq(m),
        make_activation_quantizer=lambda n, o: aq(n),
        default_m=2,
        default_n=2,
        binarize_downsample=True,
        weight_domain=domain,
        activation_domain=domain,
    )


STANDINS = {
    "pa-like": _scheme("pa-like", PieceWeights, PieceActivations, Domain.ZERO_ONE),
    "abc-like": _scheme(
        "abc-like", ShiftedSignWeights, ShiftedSignActivations, Domain.PLUS_MINUS_ONE
    ),
    "xnor-like": _scheme(
        "xnor-like",
        lambda m: ChannelSignWeights(),
        lambda n: StrictSignActivations(),
        Domain.PLUS_MINUS_ONE,
    ),
    "traced": _scheme("traced", PieceWeights, lambda n: ChannelScaledSign(), Domain.ZERO_ONE),
}


def _scheme_or_skip(name: str) -> Scheme:
    if name in STANDINS:
        return STANDINS[name]
    try:
        scheme = get_scheme(name)
        # A registered scheme must build quantizers; placeholders are skipped.
        scheme.weight_quantizer(scheme.default_m)
    except (SchemeError, NotImplementedError, TypeError) as exc:  # scheme not landed yet
        pytest.skip(f"scheme {name!r} not available: {exc}")
    return scheme


# --------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Odd channel counts and shapes: a stem, a strided block with a 1x1 shortcut, a dilated
    conv with bias, a grouped conv, a depthwise + pointwise pair, a classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 9, 3, padding=1, bias=False), nn.BatchNorm2d(9), nn.ReLU()
        )
        self.conv_a = nn.Conv2d(9, 13, 3, stride=2, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(13)
        self.conv_b = nn.Conv2d(13, 12, 3, padding=2, dilation=2, bias=True)
        self.bn_b = nn.BatchNorm2d(12)
        self.shortcut = nn.Sequential(nn.Conv2d(9, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.grouped = nn.Conv2d(12, 15, 3, padding=1, groups=3, bias=False)
        self.bn_g = nn.BatchNorm2d(15)
        self.depthwise = nn.Conv2d(15, 15, 3, padding=1, groups=15, bias=False)
        self.pointwise = nn.Conv2d(15, 7, 1, bias=False)
        self.bn_p = nn.BatchNorm2d(7)
        self.head = nn.Linear(7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn_a(self.conv_a(x)))
        y = torch.relu(self.bn_b(self.conv_b(y)) + self.shortcut(x))
        y = torch.relu(self.bn_g(self.grouped(y)))
        y = torch.relu(self.bn_p(self.pointwise(torch.relu(self.depthwise(y)))))
        return self.head(y.mean(dim=(2, 3)))


def _binarize(model: nn.Module, scheme: Scheme, m: int, n: int) -> nn.Module:
    """Replace every conv except the first and depthwise ones (surgery's policy, by hand)."""
    convs = [(name, c) for name, c in model.named_modules() if type(c) is nn.Conv2d]
    for i, (name, conv) in enumerate(convs):
        if i == 0 or (conv.groups > 1 and conv.groups == conv.in_channels):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, BinarizedConv2d.from_conv(conv, scheme, m, n))
    return model


@pytest.fixture(scope="session")
def make_model(binarized_model):
    """``make_model(arch, scheme, m, n, size=(32, 32))``: ``TinyNet`` (arch ``"tiny"``) or a
    timm model, binarized by :func:`_binarize`, activation quantizers calibrated on 8 random
    images, then batch-norm statistics re-estimated on them (as `binarize convert` does), so
    no activation sits on a threshold by construction."""

    def make(arch: str, scheme: Scheme, m: int, n: int, size: tuple[int, int] = (32, 32)):
        builder = TinyNet if arch == "tiny" else arch
        return binarized_model(builder, scheme, m, n, size=size, bn="reestimate", surgery=_binarize)

    return make


TINY_SIZE = (17, 19)
TINY_META = {
    "model": "tiny",
    "scheme": "pa",
    "M": 2,
    "N": 2,
    "num_classes": 10,
    "input_size": [3, *TINY_SIZE],
}
META = {
    "model": "timm:resnet18",
    "scheme": "pa",
    "M": 4,
    "N": 3,
    "num_classes": 10,
    "input_size": [3, 32, 32],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
}


def _assert_agrees(torch_logits: np.ndarray, onnx_out: np.ndarray) -> None:
    scale = float(np.abs(torch_logits).max())
    assert onnx_out.shape == torch_logits.shape
    assert float(np.abs(onnx_out - torch_logits).max()) <= 1e-4 * scale
    assert np.array_equal(onnx_out.argmax(1), torch_logits.argmax(1))


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


@pytest.fixture(scope="module")
def pa_resnet(tmp_path_factory: pytest.TempPathFactory, make_model) -> tuple[nn.Module, Path]:
    model = make_model("resnet18", STANDINS["pa-like"], 4, 3)
    path = tmp_path_factory.mktemp("onnx") / "pa.onnx"
    export_onnx_model(model, META, path)
    return model, path


# --------------------------------------------------------------------------------------------
# Activation step functions
# --------------------------------------------------------------------------------------------


def test_staircase_reads_pa_endpoints_exactly() -> None:
    q = PieceActivations(4)
    with torch.no_grad():
        q.v.copy_(torch.tensor([0.1, 0.3, 0.7, 1.9]))
        q.beta.copy_(torch.tensor([0.2, 0.5, 1.1, 2.5]))
    stair = activation_staircase(q)
    assert np.array_equal(stair.thresholds, q.v.detach().numpy())  # x >= v: t = v
    assert np.array_equal(stair.levels, np.array([0.0, 0.2, 0.5, 1.1, 2.5], np.float32))
    assert check_staircase(q, stair)


def test_staircase_strict_tie_moves_threshold_one_ulp() -> None:
    stair = activation_staircase(StrictSignActivations())
    tiny = np.nextafter(np.float32(0), np.float32(1))
    assert stair.thresholds.tolist() == [tiny]  # x > 0 <=> x >= smallest positive float
    assert stair(np.array([0.0, -0.0, tiny], np.float32)).tolist() == [-1.0, -1.0, 1.0]


def test_staircase_merges_equal_levels_and_abc_sums() -> None:
    q = ShiftedSignActivations(3)
    with torch.no_grad():
        q.beta.copy_(torch.tensor([0.3, 0.0, 0.7]))  # beta_2 = 0: its threshold changes nothing
    stair = activation_staircase(q)
    assert stair.thresholds.size == 2
    x = torch.linspace(-3, 3, 10_001)
    expected = q(x.reshape(1, 1, 1, -1)).reshape(-1).detach().numpy()
    assert np.array_equal(stair(x.numpy()), expected)


def test_staircase_rejects_a_non_step_function() -> None:
    class Ramp(ActivationQuantizer):
        num_bases = 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(0, 1)

    with pytest.raises(ValueError, match="step function"):
        activation_staircase(Ramp(), max_pieces=64)
    bad = Staircase(np.array([0.5], np.float32), np.array([0.0, 1.0], np.float32))
    assert not check_staircase(Ramp(), bad)


# --------------------------------------------------------------------------------------------
# The exported model
# --------------------------------------------------------------------------------------------


def test_onnx_is_valid_standard_and_dynamic(pa_resnet: tuple[nn.Module, Path]) -> None:
    _, path = pa_resnet
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert set(opsets) <= {"", "ai.onnx"} and opsets.get("", 0) >= 17
    assert {"BitShift", "BitwiseAnd", "Cast", "GreaterOrEqual", "Where", "Conv"} <= _op_types(model)
    (inp,) = model.graph.input
    assert inp.name == INPUT_NAME and model.graph.output[0].name == OUTPUT_NAME
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["binarize.format"] == ONNX_FORMAT and props["binarize.weights"] == "packed"
    assert json.loads(props["binarize.input_size"]) == [3, 32, 32] and props["binarize.M"] == "4"


def test_onnxruntime_matches_torch_pa_any_batch(pa_resnet: tuple[nn.Module, Path]) -> None:
    model, path = pa_resnet
    session = onnx_session(path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        _assert_agrees(expected, onnx_logits(path, x.numpy(), batch_size=7, session=session))


def test_packed_weights_are_stored_as_bits(
    pa_resnet: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    model, path = pa_resnet
    onnx_model = onnx.load(str(path))
    inits = {i.name: i for i in onnx_model.graph.initializer}
    binarized = {n: m for n, m in model.named_modules() if isinstance(m, BinarizedConv2d)}
    float_bytes = 0
    packed_bytes = 0
    for name, conv in binarized.items():
        assert f"{name}.w_hat" not in inits and f"{name}.weight" not in inits
        packed = inits[f"{name}.w_packed"]
        assert packed.data_type == onnx.TensorProto.UINT8
        n = conv.weight.numel()
        assert list(packed.dims) == [4, packed_length(n)]
        packed_bytes += 4 * packed_length(n) + 4 * 4  # planes + alpha
        float_bytes += 4 * n
    # Everything that is not a binarized weight stays float32 (first conv, fc, BN, bias).
    for name, t in model.state_dict().items():
        layer = name.rpartition(".")[0]
        is_binarized = layer in binarized or any(layer.startswith(b + ".") for b in binarized)
        if not is_binarized and t.is_floating_point():
            packed_bytes += 4 * t.numel()
    size = path.stat().st_size
    assert size <= 1.1 * packed_bytes
    assert size < 0.25 * float_bytes
    # ... and against the packed safetensors export of the same model (the check).
    from binarize_cli.export.packed import export_packed_model

    packed_file = export_packed_model(model, META, tmp_path / "model.packed.safetensors")
    assert size <= 1.1 * packed_file.stat().st_size


def test_unpacking_folds_at_load(pa_resnet: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, path = pa_resnet
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = _op_types(optimized)
    assert not ops & {"BitShift", "BitwiseAnd", "ReduceSum", "Cast"}
    assert "Conv" in ops


def _export_and_compare(
    model: nn.Module, meta: dict, path: Path, size: tuple[int, int], batches=(1, 3)
) -> None:
    export_onnx_model(model, meta, path)
    session = onnx_session(path)
    for batch in batches:
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            expected = model(x).numpy()
        _assert_agrees(expected, onnx_logits(path, x.numpy(), session=session))


@pytest.mark.parametrize(
    ("scheme_name", "m", "n"),
    [("pa-like", 4, 3), ("abc-like", 3, 2), ("xnor-like", 1, 1), ("traced", 2, 1)],
)
def test_onnxruntime_matches_torch_standins(
    scheme_name: str, m: int, n: int, tmp_path: Path, make_model
) -> None:
    model = make_model("tiny", STANDINS[scheme_name], m, n, TINY_SIZE)
    kinds = build_export_model(model, float_weights=True)[2]
    assert set(kinds.values()) == {"traced" if scheme_name == "traced" else "staircase"}
    _export_and_compare(model, TINY_META, tmp_path / "m.onnx", TINY_SIZE)


@pytest.mark.parametrize(
    ("scheme_name", "m", "n"),
    [
        ("pa", 4, 3),
        ("pa", 2, 0),
        ("abc", 3, 3),
        ("bnn", 1, 1),
        ("xnor", 1, 1),
        ("bireal", 1, 1),
        ("dorefa", 2, 2),
        ("ttq", 2, 0),
        ("ttq", 2, 2),
        ("realtobin", 1, 1),
    ],
)
def test_registered_schemes(scheme_name: str, m: int, n: int, tmp_path: Path, make_model) -> None:
    scheme = _scheme_or_skip(scheme_name)
    model = make_model("tiny", scheme, m, n, TINY_SIZE)
    kinds = build_export_model(model, float_weights=True)[2]
    # The built-in activation quantizers are exact step functions (or identity for N = 0).
    assert set(kinds.values()) == {"staircase" if n else "identity"}
    _export_and_compare(model, TINY_META, tmp_path / "m.onnx", TINY_SIZE)


class Parallel(nn.Module):
    """Several binarized convolutions applied to the same input, outputs concatenated."""

    def __init__(self, *convs: nn.Module) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([c(x) for c in self.convs], dim=1)


def test_ties_at_the_endpoints_match_torch(tmp_path: Path) -> None:
    """Inputs exactly on every threshold and one ulp either side go where torch sends them
    (``>=`` for the PA/ABC stand-ins, ``>`` for the strict sign)."""
    convs = [
        BinarizedConv2d.from_conv(nn.Conv2d(3, 5, 1, bias=False), STANDINS[name], 2, 3)
        for name in ("pa-like", "abc-like", "xnor-like")
    ]
    model = Parallel(*convs).eval()
    t = np.concatenate([activation_staircase(c.activation_quantizer).thresholds for c in convs])
    big = np.float32(1e30)
    values = np.concatenate([t, np.nextafter(t, -big), np.nextafter(t, big), [0.0, -0.0]])
    x = np.resize(values.astype(np.float32), 3 * 4 * 6).reshape(1, 3, 4, 6)
    x = np.concatenate([x, x[:, ::-1], x[:, :, ::-1]])
    path = export_onnx_model(model, {"input_size": [3, 4, 6]}, tmp_path / "t.onnx")
    with torch.no_grad():
        expected = model(torch.from_numpy(x.copy())).numpy()
    got = onnx_logits(path, x)
    # A single misplaced tie moves an output by a whole level gap (>= 0.1 here).
    assert np.abs(got - expected).max() <= 1e-5


def test_float_target_is_plain_float(pa_resnet: tuple[nn.Module, Path], tmp_path: Path) -> None:
    model, packed_path = pa_resnet
    path = export_onnx_model(model, META, tmp_path / "f.onnx", float_weights=True)
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    assert not _op_types(onnx_model) & {"BitShift", "BitwiseAnd"}
    assert all(i.data_type != onnx.TensorProto.UINT8 for i in onnx_model.graph.initializer)
    props = {p.key: p.value for p in onnx_model.metadata_props}
    assert props["binarize.weights"] == "float"
    assert path.stat().st_size > 4 * packed_path.stat().st_size
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    _assert_agrees(expected, onnx_logits(path, x.numpy()))


def test_full_precision_activations_n0(tmp_path: Path, make_model) -> None:
    model = make_model("tiny", STANDINS["pa-like"], 2, 0, TINY_SIZE)
    path = tmp_path / "n0.onnx"
    _export_and_compare(model, TINY_META, path, TINY_SIZE)
    assert not _op_types(onnx.load(str(path))) & {"Where", "GreaterOrEqual"}


def _preactivation_names(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name -> the tensor its activation step function reads, found from the Conv whose
    weight is ``<layer>.w_hat`` back through the ``Where`` chain to ``GreaterOrEqual``."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1].endswith(".w_hat"):
            where = producer[node.input[0]]
            assert where.op_type == "Where"
            ge = producer[where.input[0]]
            assert ge.op_type == "GreaterOrEqual"
            names[node.input[1][: -len(".w_hat")]] = ge.input[0]
    return names


def _first_flips(model: nn.Module, path: Path, x: np.ndarray) -> list[tuple[str, float]]:
    """For each image: the first layer (execution order) whose activation lands in another
    piece in onnxruntime than in PyTorch, and how far (relative to the layer's largest
    input) the PyTorch input is from the endpoint between the two pieces; ("", inf) if none."""
    export_model, _, _ = build_export_model(model)
    onnx_model = onnx.load(str(path))
    names = _preactivation_names(onnx_model)
    for tensor in names.values():
        onnx_model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, 1, None))
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = dict(
        zip(
            [o.name for o in session.get_outputs()], session.run(None, {INPUT_NAME: x}), strict=True
        )
    )
    inputs: dict[str, np.ndarray] = {}
    order: list[str] = []
    for name, mod in export_model.named_modules():
        if isinstance(mod, ExportConv):

            def hook(_m, args, name=name):
                inputs[name] = args[0].numpy()
                order.append(name)

            mod.register_forward_pre_hook(hook)
    with torch.no_grad():
        export_model(torch.from_numpy(x))
    modules = dict(export_model.named_modules())
    result = []
    for i in range(x.shape[0]):
        found = ("", float("inf"))
        for name in order:
            t = modules[name].act.thresholds.numpy()
            ours, theirs = inputs[name][i], got[names[name]][i]
            flips = np.searchsorted(t, ours, side="right") != np.searchsorted(
                t, theirs, side="right"
            )
            if flips.any():
                dist = np.abs(ours[flips][:, None] - t[None, :]).min()
                found = (name, float(dist / np.abs(inputs[name][i]).max()))
                break
        result.append(found)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100"])
@pytest.mark.parametrize(("scheme_name", "m", "n"), [("pa", 4, 5), ("abc", 3, 3), ("bnn", 1, 1)])
def test_512_images_agree(
    arch: str, scheme_name: str, m: int, n: int, tmp_path: Path, make_model
) -> None:
    """The issue's check on 512 images: same top-1 and max |diff| <= 1e-4 of the logit scale.

    An activation within float rounding (~1e-7 relative) of an endpoint can fall into the
    neighbouring piece in onnxruntime (its convolutions round differently), and in an
    ill-conditioned network (randomly initialised MobileNetV2) that flip grows through the
    layers (with BNN it even flips on every image: dead channels sit exactly on the sign's
    endpoint, and PyTorch float32 then disagrees with float64 on every image too). So: every
    image must agree, except one whose first activation flip is such a rounding-level tie,
    checked by reading onnxruntime's pre-activations.
    """
    model = make_model(arch, _scheme_or_skip(scheme_name), m, n)
    path = export_onnx_model(model, {**META, "model": arch}, tmp_path / "m.onnx")
    x = torch.randn(512, 3, 32, 32)
    with torch.no_grad():
        expected = torch.cat([model(c) for c in x.split(64)]).numpy()
    got = onnx_logits(path, x.numpy())
    diff = np.abs(got - expected).max(axis=1) / np.abs(expected).max()
    bad = np.flatnonzero((diff > 1e-4) | (got.argmax(1) != expected.argmax(1)))
    if len(bad):
        for layer, distance in _first_flips(model, path, x.numpy()[bad]):
            assert layer, "logits differ without any activation flip"
            assert distance <= 1e-5, f"{layer}: a flip {distance:.1e} from an endpoint"


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_leaves_no_file(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, make_model
) -> None:
    model = make_model("tiny", STANDINS["pa-like"], 2, 1, TINY_SIZE)
    path = export_onnx_model(model, TINY_META, tmp_path_factory.mktemp("ok") / "ok.onnx")
    with pytest.raises(BadInputError, match="no binarized convolutions"):
        export_onnx_model(nn.Sequential(nn.Conv2d(3, 4, 3)), META, tmp_path / "a.onnx")
    with pytest.raises(BadInputError, match="opset"):
        export_onnx_model(model, TINY_META, tmp_path / "b.onnx", opset=13)
    with pytest.raises(BadInputError, match="input_size"):
        export_onnx_model(model, {**TINY_META, "input_size": None}, tmp_path / "c.onnx")
    with pytest.raises(BadInputError, match="does not exist"):
        export_onnx_model(model, TINY_META, tmp_path / "missing" / "d.onnx")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadInputError, match="images must be"):
        onnx_logits(path, np.zeros((3, *TINY_SIZE), np.float32))
    with pytest.raises(BadInputError, match="do not fit"):
        onnx_logits(path, np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(BadInputError, match="does not exist"):
        onnx_logits(tmp_path / "nope.onnx", np.zeros((1, 3, 32, 32), np.float32))


def test_export_onnx_from_run_dir(tmp_path: Path, make_run_dir) -> None:
    scheme = _scheme_or_skip("pa")
    from binarize_cli.convert import rebuild

    run = make_run_dir(
        tmp_path / "run",
        model="timm:resnet18",
        scheme=scheme,
        m=4,
        n=3,
        calibrate_on=torch.randn(2, 3, 32, 32),
        bn="reestimate",
        mean=META["mean"],
        std=META["std"],
    )
    written = export_onnx(run)
    assert written == run / "model.onnx"
    # The CLI dispatch: `binarize export RUN --target onnx-float -o DIR`.
    from typer.testing import CliRunner

    from binarize_cli.cli import app

    result = CliRunner().invoke(
        app, ["export", str(run), "--target", "onnx-float", "-o", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    written_float = tmp_path / "model-float.onnx"
    assert written_float.is_file() and "model-float.onnx" in result.output
    x = torch.randn(2, 3, 32, 32)
    model = rebuild.load_run(run).model
    with torch.no_grad():
        expected = model(x).numpy()
    _assert_agrees(expected, onnx_logits(written, x.numpy()))
    _assert_agrees(expected, onnx_logits(written_float, x.numpy()))


# --------------------------------------------------------------------------------------------
# The op table end to end
# --------------------------------------------------------------------------------------------


class AllOps(nn.Module):
    """A small network that uses every op of the packed op table (``runtime/optable.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_body = nn.BatchNorm2d(8)
        self.relu6 = nn.ReLU6()
        self.leaky = nn.LeakyReLU(0.1)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.avgpool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.adaptive_avg = nn.AdaptiveAvgPool2d((2, 2))
        # torch.onnx exports adaptive max pooling only to a global pool (output 1 x 1).
        self.adaptive_max = nn.AdaptiveMaxPool2d((1, 1))
        self.register_buffer("offset", torch.linspace(-0.2, 0.2, 8).reshape(1, 8, 1, 1))
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        y = self.leaky(self.relu6(self.bn_body(self.body(x)))) + x
        y = y * 0.5
        y = torch.sigmoid(y) + torch.tanh(y) + F.silu(y) + F.hardswish(y) + F.hardsigmoid(y)
        y = self.avgpool(self.maxpool(y) + self.offset)
        a = self.adaptive_avg(y)
        z = torch.cat([a, a * self.adaptive_max(y)], dim=1)
        z = z * z.mean(dim=(2, 3), keepdim=True)
        return self.fc(torch.flatten(z, 1))


class SubclassLinear(nn.Linear):
    """timm's ``Linear``: an ``nn.Linear`` subclass whose forward is ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ShapeOps(nn.Module):
    """The ops of format version 2 at odd sizes (17 x 19 input, 5 to 12 channels): slicing
    (channels, strides, negative stops), ``chunk``/``split``, a channel shuffle written with
    ``x.size()``, ``nn.ChannelShuffle``, ``permute``, ``unsqueeze``, constant and cropping
    ``pad``, nearest/bilinear resizing (sizes, a scale factor, both ``align_corners``),
    ``sub``/``div`` with reversed scalars and ``neg``, ``gelu`` (both forms), ``prelu``,
    ``clamp``, functional pools, ``stack`` + ``softmax`` + ``sum`` (selective-kernel
    attention), a ``reshape`` from ``x.size(0)``, Conv2d and Linear subclasses (timm's
    ``Conv2dSame``, ``Linear``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.prelu = nn.PReLU(10)
        self.same = Conv2dSame(10, 10, 4, groups=10)  # TensorFlow "same" padding, even kernel
        self.conv_a = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(11, 12, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(12)
        self.shuffle = nn.ChannelShuffle(3)
        self.gelu = nn.GELU()
        self.zero_pad = nn.ZeroPad2d((1, 0, 0, 1))
        self.up = nn.Upsample(scale_factor=1.5, mode="nearest")
        self.conv_c = nn.Conv2d(12, 7, 3, stride=2, padding=1, bias=False)
        self.bn_c = nn.BatchNorm2d(7)
        self.fc = SubclassLinear(7 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn(self.stem(x)))
        x = x + self.same(x)
        a, b = x.chunk(2, dim=1)
        a = self.conv_a(a)
        b1, b2 = torch.split(b, [2, 3], dim=1)
        x = torch.cat([a, b1 - a[:, 4:], b2 * 0.5], dim=1)
        x = self.bn_b(self.conv_b(x))
        n, c, h, w = x.size()
        x = x.view(n, 3, c // 3, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        x = self.shuffle(x)
        x = self.gelu(x) + F.gelu(x, approximate="tanh")
        x = self.zero_pad(F.pad(F.pad(x, (1, 2, 0, 1), value=0.25), (-1, 0, 0, -1)))
        y = F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=False)
        y = y + F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=True)
        y = y + F.interpolate(x, size=(9, 11), mode="nearest") - x[:, :, ::2, -22::2]
        y = self.up(y).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        y = 1 / (1 + torch.clamp(2 - y, min=0)) - y / 4
        y = -y + y.sigmoid()
        z = F.relu6(self.bn_c(self.conv_c(y)))
        z = F.max_pool2d(z, 3, 2, 1) + F.avg_pool2d(z, 3, 2, 1, count_include_pad=False)
        z = z + F.adaptive_max_pool2d(z, 1) * F.adaptive_avg_pool2d(z, 1)
        attention = F.softmax(torch.stack([z, z.sigmoid()], dim=1), dim=1)  # SK-Net's
        z = (attention * torch.stack([z, -z], 1)).sum(1) + torch.sum(z, (2, 3), keepdim=True)
        z = z * z.mean((2, 3)).unsqueeze(-1).unsqueeze(-1)
        z = F.dropout(z[:, :, 1:, :-1], 0.2, self.training)
        return self.fc(z.reshape(z.size(0), -1))


#: Between them, these networks use every op of the table.
ALL_OPS_NETS = {"v1": AllOps, "v2": ShapeOps}


@pytest.fixture(scope="module")
def all_ops_models(binarized_model) -> dict[str, nn.Module]:
    scheme = STANDINS["pa-like"]
    return {
        key: binarized_model(net, scheme, 2, 2, size=TINY_SIZE, bn="reestimate", surgery=_binarize)
        for key, net in ALL_OPS_NETS.items()
    }


def test_the_all_ops_nets_use_every_table_op(all_ops_models) -> None:
    from binarize_cli.export.packed import build_packed
    from binarize_cli.runtime.optable import OPS

    used: set[str] = set()
    for model in all_ops_models.values():
        _, metadata = build_packed(model, TINY_META)
        used |= {node["op"] for node in json.loads(metadata["graph"])["nodes"]}
    assert used == set(OPS)


@pytest.mark.parametrize("net", ALL_OPS_NETS)
def test_every_table_op_is_written_run_and_exported(net, all_ops_models, tmp_path: Path) -> None:
    """The packed writer emits the ops, the float32 runtime runs each of them as PyTorch
    does (batch 1 and 3), and the ONNX exporter exports the same model."""
    from safetensors.numpy import save_file

    from binarize_cli.export.packed import build_packed
    from binarize_cli.runtime import load_packed

    model = all_ops_models[net]
    tensors, metadata = build_packed(model, TINY_META)
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata=metadata)
    packed = load_packed(tmp_path / "m.safetensors", backend="numpy")
    for batch in (1, 3):
        x = torch.randn(batch, 3, *TINY_SIZE)
        with torch.no_grad():
            expected = model(x).numpy()
        _assert_agrees(expected, packed(x.numpy()))
    _export_and_compare(model, TINY_META, tmp_path / "m.onnx", TINY_SIZE)


@pytest.mark.parametrize("net", ALL_OPS_NETS)
def test_every_table_op_replays_exactly_in_float64(net, all_ops_models) -> None:
    """The runtime in float64 against PyTorch in float64 on the file's parameters (verify's
    reference): the same function, to rounding."""
    from binarize_cli.export.verify import verify_model

    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, *TINY_SIZE))
        result = verify_model(
            all_ops_models[net], TINY_META, x.astype(np.float32), onnx=False, backend="numpy"
        )
        assert result.samples == batch and result.top1_agreement.runtime == 100.0
        assert result.max_rel_logit_diff.runtime < 1e-9
