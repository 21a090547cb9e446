"""Accounting of `realtobin` (docs/accounting.md): the binary convolution as xnor's, its channel
gate as a full-precision row of its own (real parameters, real MACs, absent from the
full-precision model). Numbers computed by hand."""

from __future__ import annotations

import json

from torch import nn
from typer.testing import CliRunner

from binarize_cli.analyze.profile import GATE_KIND, profile_model
from binarize_cli.cli import app
from binarize_cli.quant.base import get_scheme
from binarize_cli.quant.layers import BinarizedConv2d

runner = CliRunner()


def test_one_gated_grouped_layer_by_hand() -> None:
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=2, bias=False)
    layer = BinarizedConv2d.from_conv(conv, get_scheme("realtobin"), 1, 1)
    prof = profile_model(nn.Sequential(layer, nn.BatchNorm2d(24)), (16, 9, 9))
    assert [r.name for r in prof.layers] == ["0", "0.gate", "1"] and not prof.warnings
    binary, gate, bn = prof.layers
    # Binary conv: 24 x 8 x 3 x 3 = 1728 one-bit weights, alpha folded (not counted);
    # 5 x 5 outputs x 24 channels x 72 MACs = 43200 MACs, all bitwise: 43200 / 64 FLOPs.
    assert (binary.params_binary, binary.params_real, binary.scales) == (1728, 0, 0)
    assert (binary.macs, binary.bops, binary.flops, binary.fp_flops) == (43200, 43200, 675.0, 43200)
    # Gate: hidden 16 // 8 = 2; W_1 2 x 16 + W_2 24 x 2 = 80 real values and 80 real MACs.
    assert (gate.kind, gate.module, gate.binarized) == (GATE_KIND, "ChannelGate", False)
    assert (gate.params_real, gate.params_binary, gate.bits) == (80, 0, 80 * 32)
    assert (gate.macs, gate.bops, gate.flops) == (80, 0, 80.0)
    assert (gate.fp_params, gate.fp_bits, gate.fp_flops) == (0, 0, 0)
    assert bn.params_real == 48
    assert prof.memory_bits == 1728 + 80 * 32 + 48 * 32
    assert prof.flops == 675.0 + 80 and prof.fp_flops == 43200 and prof.macs == 43280
    assert prof.fp_memory_bits == (1728 + 48) * 32


def _report(scheme: str) -> dict:
    args = ["report", "resnet18", "--scheme", scheme, "--input-size", "224", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def test_report_resnet18_realtobin_json() -> None:
    d = _report("realtobin")
    x = _report("xnor")
    assert (d["scheme"], d["M"], d["N"]) == ("realtobin", 1, 1)
    gates = {r["name"]: r for r in d["layers"] if r["kind"] == GATE_KIND}
    # One gate per binarized 3x3 conv (16; the 1x1 downsamples stay real). Params per gate
    # (C_in / 8) (C_in + C_out): layer1 4 x 8 x 128 = 4096; layer2 8 x 192 + 3 x 16 x 256 =
    # 13824; layer3 16 x 384 + 3 x 32 x 512 = 55296; layer4 32 x 768 + 3 x 64 x 1024 = 221184.
    assert len(gates) == 16
    assert gates["layer1.0.conv1.gate"]["params_real"] == 1024
    assert gates["layer2.0.conv1.gate"]["params_real"] == 1536
    assert gates["layer4.1.conv2.gate"]["params_real"] == 65536
    total = 4096 + 13824 + 55296 + 221184
    assert total == 294400 == sum(r["params_real"] for r in gates.values())
    assert all(r["macs"] == r["params_real"] == r["flops"] for r in gates.values())
    assert all(r["fp_flops"] == 0 == r["fp_bits"] for r in gates.values())
    # Everything else is xnor's accounting.
    assert d["memory_bits"] == x["memory_bits"] + 32 * total == 42_935_552
    assert d["flops"] == x["flops"] + total
    assert d["bops"] == x["bops"] == 1_676_279_808
    assert d["fp_flops"] == x["fp_flops"] == 1_814_073_344
    assert d["fp_memory_bits"] == x["fp_memory_bits"]
    assert d["params"]["real"] == x["params"]["real"] + total
    assert d["params"]["binary"] == x["params"]["binary"]
