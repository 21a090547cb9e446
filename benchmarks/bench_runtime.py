"""Benchmark: the packed runtime's bitwise convolutions vs torch's float32 convolutions.

Two measurements, in one process, with the same number of threads for both sides
(``torch.set_num_threads(T)`` and the runtime's kernel threads ``T``):

1. **Per layer.** For every distinct binarized convolution of PA-ResNet18 (M=4, N=5) at
   224x224, batch 1: the runtime's whole binarized layer (activation quantization + bit
   packing + im2col + AND/popcount GEMM + scaling) vs ``torch.nn.functional.conv2d`` on the
   same input and weight shape in float32. Rates: *binary MACs/s* = ``M*N*MACs / t_runtime``
   (each of the M x N plane products is a bitwise convolution, PA eq. 19-20) and *float
   MACs/s* = ``MACs / t_torch``. Target: binary rate >= 5x torch's float rate.
2. **End to end.** PA-ResNet18 (4, 5) packed file through the runtime vs the full-precision
   timm ResNet-18 in torch, 224x224, batch 1. Target: runtime latency within 4x of torch's.

Timing: after warm-up, the two sides alternate (so background load hits both alike), each
timed call after a 20 ms pause (torch's OpenMP workers spin-wait after a parallel region and
would otherwise steal the cores from the runtime's threads); the per-layer rates use the best
of the repeats, the end-to-end table gives best and median. Random weights (no download);
calibration on random images (speed does not depend on accuracy). On a shared or busy
machine prefer ``--threads 1``: a 2-thread OpenMP convolution stalls whenever one of its
threads is descheduled, which inflates torch's times.

Usage::

    python benchmarks/bench_runtime.py [--threads 2] [--repeats 20] [--output FILE.md]

The result is a markdown section (stdout, or ``--output``) that ``docs/benchmarks.md``
includes.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _cmdline import shown_args

#: Seconds of idle time before each timed call (lets spinning OpenMP workers go to sleep).
PAUSE_S = 0.02


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _alternate(
    a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: int = 3
) -> tuple[float, float, float, float]:
    """Seconds of ``a`` and ``b``, run alternately: (min a, min b, median a, median b)."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        # A pause before each timed call: torch's OpenMP workers spin-wait for a while after
        # a parallel region and would otherwise steal the cores from whatever runs next.
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        time.sleep(PAUSE_S)
        t2 = time.perf_counter()
        b()
        t3 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t3 - t2)
    return min(ta), min(tb), statistics.median(ta), statistics.median(tb)


def _time_layer(layer, be, x: torch.Tensor, mod, repeats: int) -> tuple[float, float, float]:
    """Best-of-``repeats`` seconds: (runtime layer, popcount GEMM alone, torch F.conv2d)."""
    xn = x.numpy()
    w = torch.randn(mod.weight.shape)
    t_bin, t_fp, _, _ = _alternate(
        lambda: layer(xn, be), lambda: F.conv2d(x, w, None, mod.stride, mod.padding), repeats
    )
    ho, wo = layer.output_hw(xn.shape[2], xn.shape[3])
    act = be.quantize_pack(xn, layer.act.thresholds, layer.act.masks, layer.n, 1, layer.padding)
    cols = be.im2col(
        act, 0, layer.cwg, (layer.kh, layer.kw), layer.stride, layer.dilation, (ho, wo)
    )
    t_kernel, _, _, _ = _alternate(
        lambda: be.bgemm(
            layer.wts[0], layer.og, layer.m, cols, layer.phi32, layer.op, layer.cmul, layer.cadd
        ),
        lambda: None,
        repeats,
    )
    return t_bin, t_kernel, t_fp


def _converted_resnet18(size: int) -> torch.nn.Module:
    import timm

    from binarize_cli.convert.surgery import binarize_model
    from binarize_cli.quant.layers import BinarizedConv2d

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1000)
    binarize_model(model, "pa", 4, 5)
    model.eval()
    samples: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_pre_hook(
            lambda _m, a, k=name: samples.__setitem__(k, a[0].detach().flatten()[::7])
        )
        for name, mod in model.named_modules()
        if isinstance(mod, BinarizedConv2d)
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    for name, mod in model.named_modules():
        if isinstance(mod, BinarizedConv2d):
            mod.activation_quantizer.calibrate(samples[name])
    return model


def layer_rows(model, runtime, size: int, threads: int, repeats: int) -> list[dict]:
    """One row per distinct binarized layer shape (input channels, output, kernel, stride, spatial)."""
    from binarize_cli.quant.layers import BinarizedConv2d

    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_pre_hook(
            lambda _m, a, k=name: inputs.__setitem__(k, a[0].detach().clone())
        )
        for name, mod in model.named_modules()
        if isinstance(mod, BinarizedConv2d)
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    layers = {n.name: n.layer for n in runtime.nodes if n.layer is not None}
    seen: set[tuple] = set()
    rows = []
    for spec in runtime.graph["nodes"]:
        if spec["op"] != "bconv2d":
            continue
        target = spec["tensors"]["weight_planes"].rsplit(".weight_planes", 1)[0]
        mod = model.get_submodule(target)
        x = inputs[target]
        key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, tuple(x.shape[2:]))
        if key in seen:
            continue
        seen.add(key)
        layer = layers[spec["name"]]
        t_bin, t_kernel, t_fp = _time_layer(layer, runtime.backend, x, mod, repeats)
        ho, wo = layer.output_hw(x.shape[2], x.shape[3])
        macs = (
            mod.out_channels
            * (mod.in_channels // mod.groups)
            * mod.kernel_size[0]
            * mod.kernel_size[1]
            * ho
            * wo
        )
        mn = layer.m * layer.n
        rows.append(
            {
                "layer": target,
                "shape": f"{mod.in_channels}->{mod.out_channels} {mod.kernel_size[0]}x{mod.kernel_size[1]}/{mod.stride[0]} @ {x.shape[2]}x{x.shape[3]}",
                "macs": macs,
                "t_bin_ms": 1e3 * t_bin,
                "t_kernel_ms": 1e3 * t_kernel,
                "t_fp_ms": 1e3 * t_fp,
                "bin_rate": mn * macs / t_bin,
                "kernel_rate": mn * macs / t_kernel,
                "fp_rate": macs / t_fp,
            }
        )
    return rows


def end_to_end(model_fp, runtime, size: int, repeats: int) -> tuple[float, float, float, float]:
    """(runtime best, torch best, runtime median, torch median) seconds, batch 1."""
    x = torch.randn(1, 3, size, size)
    xn = x.numpy()
    with torch.no_grad():
        return _alternate(lambda: runtime(xn), lambda: model_fp(x), repeats)


def render(rows: list[dict], e2e: dict, info: dict) -> str:
    lines = [
        f"## Packed runtime: bitwise convolutions vs torch float32, {info['threads']} thread(s)",
        "",
        f"Date: {info['date']}. Command: `{info['command']}`",
        "",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs visible, load average at start {info['load']}; "
        f"threads: {info['threads']} for torch and for the runtime kernel; kernel path: {info['kernel']}; "
        f"torch {info['torch']}, NumPy {info['numpy']}. Best of {info['repeats']} alternating repeats (runtime and torch take turns, so background load hits both; best-of-N is the least load-sensitive estimate). "
        "PA-ResNet18 (M=4, N=5), 224x224, batch 1, random weights.",
        "",
        "### Per layer (distinct binarized convolution shapes)",
        "",
        "binary MAC/s = M x N x MACs / runtime layer time (quantize + pack + im2col + popcount GEMM + scaling); "
        "kernel = the popcount GEMM alone; float MAC/s = MACs / torch `F.conv2d` time.",
        "",
        "| layer | shape | MACs | runtime ms | kernel ms | torch fp32 ms | binary GMAC/s | kernel bin. GMAC/s | torch GMAC/s | ratio (layer) | ratio (kernel) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tot_bin = tot_fp = tot_kernel = 0.0
    tot_binmacs = tot_macs = 0.0
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['macs'] / 1e6:.1f}M | {r['t_bin_ms']:.2f} | {r['t_kernel_ms']:.2f} | {r['t_fp_ms']:.2f} | "
            f"{r['bin_rate'] / 1e9:.0f} | {r['kernel_rate'] / 1e9:.0f} | {r['fp_rate'] / 1e9:.1f} | "
            f"{r['bin_rate'] / r['fp_rate']:.2f}x | {r['kernel_rate'] / r['fp_rate']:.2f}x |"
        )
        tot_bin += r["t_bin_ms"]
        tot_kernel += r["t_kernel_ms"]
        tot_fp += r["t_fp_ms"]
        tot_binmacs += 20 * r["macs"]
        tot_macs += r["macs"]
    agg_bin = tot_binmacs / (tot_bin / 1e3)
    agg_kernel = tot_binmacs / (tot_kernel / 1e3)
    agg_fp = tot_macs / (tot_fp / 1e3)
    geo = math.exp(statistics.fmean(math.log(r["bin_rate"] / r["fp_rate"]) for r in rows))
    geo_k = math.exp(statistics.fmean(math.log(r["kernel_rate"] / r["fp_rate"]) for r in rows))
    lines += [
        f"| **all rows** | | {tot_macs / 1e6:.0f}M | {tot_bin:.2f} | {tot_kernel:.2f} | {tot_fp:.2f} | {agg_bin / 1e9:.0f} | {agg_kernel / 1e9:.0f} | "
        f"{agg_fp / 1e9:.1f} | **{agg_bin / agg_fp:.2f}x** | {agg_kernel / agg_fp:.2f}x |",
        "",
        f"Geometric mean of the per-layer ratios: {geo:.2f}x (layer), {geo_k:.2f}x (kernel).",
        "",
        f"Target binary MAC rate >= 5x torch's float MAC rate: **{'met' if min(geo, agg_bin / agg_fp) >= 5 else 'not met'}** "
        f"({agg_bin / agg_fp:.2f}x over all rows, {geo:.2f}x geometric mean of the layers; "
        f"{agg_kernel / agg_fp:.2f}x for the popcount kernel alone).",
        "",
        "### End to end",
        "",
        "| model | best ms | median ms |",
        "|---|---:|---:|",
        f"| timm ResNet-18, full precision, torch | {e2e['torch_ms']:.1f} | {e2e['torch_med_ms']:.1f} |",
        f"| PA-ResNet18 (4, 5), packed runtime, C kernel | {e2e['runtime_ms']:.1f} | {e2e['runtime_med_ms']:.1f} |",
    ]
    if "numpy_ms" in e2e:
        lines.append(
            f"| PA-ResNet18 (4, 5), packed runtime, NumPy backend | {e2e['numpy_ms']:.1f} | {e2e['numpy_med_ms']:.1f} |"
        )
    ratio = e2e["runtime_ms"] / e2e["torch_ms"]
    lines += [
        "",
        f"Runtime / torch latency: **{ratio:.2f}x** (target: within 4x despite the 20 plane products): "
        f"**{'met' if ratio <= 4 else 'not met'}**.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--numpy", action="store_true", help="also time the NumPy backend end to end"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    import timm

    from binarize_cli.export.packed import export_packed_model
    from binarize_cli.runtime import load_packed

    torch.set_num_threads(args.threads)
    os.environ["BINARIZE_THREADS"] = str(args.threads)
    model = _converted_resnet18(args.size)
    meta = {
        "model": "timm:resnet18",
        "scheme": "pa",
        "M": 4,
        "N": 5,
        "num_classes": 1000,
        "input_size": [3, args.size, args.size],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = export_packed_model(model, meta, Path(tmp) / "pa-resnet18.safetensors")
        runtime = load_packed(path, backend="c", threads=args.threads)
        numpy_rt = load_packed(path, backend="numpy") if args.numpy else None
    info = {
        "cpu": _cpu_name(),
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "threads": args.threads,
        "kernel": runtime.backend.simd,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "repeats": args.repeats,
        "command": "python benchmarks/bench_runtime.py " + " ".join(shown_args(argv)),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    rows = layer_rows(model, runtime, args.size, args.threads, args.repeats)
    fp = timm.create_model("resnet18", num_classes=1000).eval()
    t_rt, t_fp, m_rt, m_fp = end_to_end(fp, runtime, args.size, args.repeats)
    e2e = {
        "runtime_ms": 1e3 * t_rt,
        "torch_ms": 1e3 * t_fp,
        "runtime_med_ms": 1e3 * m_rt,
        "torch_med_ms": 1e3 * m_fp,
    }
    if numpy_rt is not None:
        t_np, _, m_np, _ = end_to_end(fp, numpy_rt, args.size, max(3, args.repeats // 5))
        e2e["numpy_ms"] = 1e3 * t_np
        e2e["numpy_med_ms"] = 1e3 * m_np
    text = render(rows, e2e, info)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
