"""An outside reader of the `binarize-packed` format, written from docs/format.md alone.

numpy + json + PIL (+ safetensors not needed: the container is parsed by hand as section 1
describes).  Runs the graph in float64.  Implements section 8 (Preprocessing) for `digits`
(scikit-learn's stored arrays, `resampler` "torch") and ImageFolder directories
(`resampler` "pil").
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------------
# op table (section 3): op -> (since, (min_inputs, max_inputs or None), required attrs,
# optional attrs, required tensors, optional tensors)
_SC = ("scalar", "reverse")
OPS = {
    "conv2d": (1, (1, 1), ("stride", "padding", "dilation", "groups"), (), ("weight",), ("bias",)),
    "bconv2d": (
        1,
        (1, 1),
        (
            "stride",
            "padding",
            "dilation",
            "groups",
            "in_channels",
            "out_channels",
            "kernel_size",
            "weight_bases",
            "weight_domain",
            "activation_bases",
        ),
        ("activation_domain", "activation_pieces", "scheme", "scales_folded_into"),
        ("weight_planes", "weight_scales"),
        ("bias", "act_thresholds", "act_codes", "act_scales"),
    ),
    "batchnorm": (1, (1, 1), (), (), ("scale", "shift"), ()),
    "linear": (1, (1, 1), (), (), ("weight",), ("bias",)),
    "relu": (1, (1, 1), (), (), (), ()),
    "clip": (1, (1, 1), ("min", "max"), (), (), ()),
    "leaky_relu": (1, (1, 1), ("negative_slope",), (), (), ()),
    "sigmoid": (1, (1, 1), (), (), (), ()),
    "tanh": (1, (1, 1), (), (), (), ()),
    "silu": (1, (1, 1), (), (), (), ()),
    "hardswish": (1, (1, 1), (), (), (), ()),
    "hardsigmoid": (1, (1, 1), (), (), (), ()),
    "gelu": (2, (1, 1), ("approximate",), (), (), ()),
    "prelu": (2, (1, 1), (), (), ("weight",), ()),
    "maxpool2d": (
        1,
        (1, 1),
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
        (),
        (),
        (),
    ),
    "avgpool2d": (
        1,
        (1, 1),
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
        ("divisor_override",),
        (),
        (),
    ),
    "adaptive_avgpool2d": (1, (1, 1), ("output_size",), (), (), ()),
    "adaptive_maxpool2d": (1, (1, 1), ("output_size",), (), (), ()),
    "flatten": (1, (1, 1), ("start_dim", "end_dim"), (), (), ()),
    "mean": (1, (1, 1), ("dims", "keepdim"), (), (), ()),
    "sum": (2, (1, 1), ("dims", "keepdim"), (), (), ()),
    "softmax": (2, (1, 1), ("dim",), (), (), ()),
    "add": (1, (1, 2), (), _SC, (), ()),
    "mul": (1, (1, 2), (), _SC, (), ()),
    "sub": (2, (1, 2), (), _SC, (), ()),
    "div": (2, (1, 2), (), _SC, (), ()),
    "cat": (1, (1, None), ("dim",), (), (), ()),
    "constant": (1, (0, 0), (), (), ("value",), ()),
    "slice": (2, (1, 1), ("dims", "starts", "stops", "steps"), (), (), ()),
    "reshape": (2, (1, 1), ("shape",), (), (), ()),
    "transpose": (2, (1, 1), ("perm",), (), (), ()),
    "pad": (2, (1, 1), ("pads", "value"), (), (), ()),
    "resize": (2, (1, 1), ("size", "mode", "align_corners"), ("scale_factor",), (), ()),
}
SCHEMES = {"pa", "abc", "bnn", "xnor", "bireal", "dorefa", "ttq", "realtobin"}


class FormatError(ValueError):
    pass


def _fail(msg):
    raise FormatError(msg)


# --------------------------------------------------------------------------------------------
# container (section 1)
_DTYPES = {"U8": np.uint8, "F32": np.float32}


def read_container(path):
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        _fail("file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        _fail("header length past the end of the file")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict):
        _fail("no __metadata__")
    tensors = {}
    for name, ent in header.items():
        dt = ent["dtype"]
        if dt not in _DTYPES:
            _fail(f"tensor {name}: dtype {dt} is not U8 or F32")
        b, e = ent["data_offsets"]
        shape = tuple(int(s) for s in ent["shape"])
        dtype = np.dtype(_DTYPES[dt]).newbyteorder("<")
        if (
            not (0 <= b <= e <= len(data))
            or e - b != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ):
            _fail(f"tensor {name}: data_offsets {b, e} do not fit shape {shape} {dt}")
        tensors[name] = np.frombuffer(data[b:e], dtype=dtype).reshape(shape)
    return meta, tensors


# --------------------------------------------------------------------------------------------
# validation (sections 2, 3, 5)
def validate(meta, tensors):
    for k, v in meta.items():
        if not isinstance(v, str):
            _fail(f"metadata {k} is not a string")
    if meta.get("format") != "binarize-packed":
        _fail(f"format {meta.get('format')!r} is not binarize-packed")
    if meta.get("format_version") not in ("1", "2"):
        _fail(f"format_version {meta.get('format_version')!r} is not 1 or 2")
    version = int(meta["format_version"])
    if meta.get("bit_order") != "lsb-first":
        _fail(f"bit_order {meta.get('bit_order')!r} is not lsb-first")
    for key in (
        "producer",
        "scheme",
        "M",
        "N",
        "source_model",
        "num_classes",
        "input_size",
        "mean",
        "std",
        "data",
        "graph",
    ):
        if key not in meta:
            _fail(f"metadata key {key} missing")
    if version >= 2 and "preprocessing" not in meta:
        pass  # section 2 makes it optional (only "a reader of version 1 files must not require it")
    if meta["scheme"] not in SCHEMES:
        _fail(f"scheme {meta['scheme']!r}")
    int(meta["M"]), int(meta["N"])
    num_classes = int(meta["num_classes"])
    input_size = json.loads(meta["input_size"])
    if not (isinstance(input_size, list) and len(input_size) == 3):
        _fail("input_size is not [C, H, W]")
    for key in ("mean", "std"):
        v = json.loads(meta[key])
        if v is not None and (not isinstance(v, list) or len(v) != input_size[0]):
            _fail(f"{key} is not a list of C numbers or null")
    pre = json.loads(meta["preprocessing"]) if "preprocessing" in meta else None
    if pre is not None:
        validate_preprocessing(pre)
    graph = json.loads(meta["graph"])
    if len(graph["inputs"]) != 1 or len(graph["outputs"]) != 1:
        _fail("graph must have one input and one output")
    known = {graph["inputs"][0]}
    for node in graph["nodes"]:
        name, op = node["name"], node["op"]
        if op not in OPS:
            _fail(f"node {name}: op {op!r} is not in the op table")
        since, (lo, hi), req_a, opt_a, req_t, opt_t = OPS[op]
        if since > version:
            _fail(f"node {name}: op {op} is since version {since}, file is version {version}")
        if name in known:
            _fail(f"node name {name} is not unique")
        ins = node.get("inputs", [])
        if len(ins) < lo or (hi is not None and len(ins) > hi):
            _fail(f"node {name}: {len(ins)} inputs for {op}")
        for i in ins:
            if i not in known:
                _fail(f"node {name}: input {i} is not the graph input or an earlier node")
        attrs, tens = node.get("attrs", {}), node.get("tensors", {})
        for a in req_a:
            if a not in attrs:
                _fail(f"node {name}: attr {a} missing")
        for a in attrs:
            if a not in req_a and a not in opt_a:
                _fail(f"node {name}: unknown attr {a}")
        for t in req_t:
            if t not in tens:
                _fail(f"node {name}: tensor {t} missing")
        for t, tn in tens.items():
            if t not in req_t and t not in opt_t:
                _fail(f"node {name}: unknown tensor role {t}")
            if tn not in tensors:
                _fail(f"node {name}: tensor {tn} not in the file")
            want = "U8" if t in ("weight_planes", "act_codes") else "F32"
            if tensors[tn].dtype != _DTYPES[want]:
                _fail(f"node {name}: tensor {t} is not {want}")
        if op in ("add", "mul", "sub", "div"):
            if len(ins) == 1 and "scalar" not in attrs:
                _fail(f"node {name}: one input without scalar")
            if len(ins) == 2 and "scalar" in attrs:
                _fail(f"node {name}: scalar with two inputs")
        if op == "bconv2d":
            _validate_bconv(node, tensors)
        known.add(name)
    if graph["outputs"][0] not in known:
        _fail("graph output is not produced")
    return version, num_classes, input_size, pre, graph


def _validate_bconv(node, tensors):
    a, t, name = node["attrs"], node["tensors"], node["name"]
    n_out, C, g = a["out_channels"], a["in_channels"], a["groups"]
    kh, kw = a["kernel_size"]
    M, N = a["weight_bases"], a["activation_bases"]
    if a["weight_domain"] not in ("zero_one", "plus_minus_one"):
        _fail(f"{name}: weight_domain")
    nbits = n_out * (C // g) * kh * kw
    if tensors[t["weight_planes"]].shape != (M, (nbits + 7) // 8):
        _fail(f"{name}: weight_planes shape {tensors[t['weight_planes']].shape}")
    ws = tensors[t["weight_scales"]].shape
    if ws not in ((M,), (M, n_out), (1,)):
        _fail(f"{name}: weight_scales shape {ws}")
    if "bias" in t and tensors[t["bias"]].shape != (n_out,):
        _fail(f"{name}: bias shape")
    if N == 0:
        if any(k in t for k in ("act_thresholds", "act_codes", "act_scales")):
            _fail(f"{name}: act_* tensors with N = 0")
        return
    for k in ("act_thresholds", "act_codes", "act_scales"):
        if k not in t:
            _fail(f"{name}: {k} missing with N = {N}")
    if a.get("activation_domain") not in ("zero_one", "plus_minus_one"):
        _fail(f"{name}: activation_domain")
    L = a.get("activation_pieces")
    th = tensors[t["act_thresholds"]]
    if L is None:
        L = th.shape[0] + 1  # GAP: is activation_pieces required? (assumed: taken from the tensors)
    if th.shape != (L - 1,) or np.any(np.diff(th.astype(np.float64)) <= 0):
        _fail(f"{name}: act_thresholds not [L-1] strictly increasing")
    if tensors[t["act_codes"]].shape != (L, (N + 7) // 8):
        _fail(f"{name}: act_codes shape")
    if tensors[t["act_scales"]].shape != (N,):
        _fail(f"{name}: act_scales shape")


def validate_preprocessing(p):
    if p.get("channels") not in (1, 3):
        _fail("preprocessing.channels")
    if not p.get("pixel_scale", 0) > 0:
        _fail("preprocessing.pixel_scale")
    for k in ("mean", "std"):
        if len(p[k]) != p["channels"]:
            _fail(f"preprocessing.{k}")
    if any(s <= 0 for s in p["std"]):
        _fail("preprocessing.std")
    if p.get("interpolation") not in ("bilinear", "bicubic", "nearest"):
        _fail("preprocessing.interpolation")
    if p.get("resampler") not in ("pil", "torch"):
        _fail("preprocessing.resampler")
    if p.get("resize") is not None and len(p["resize"]) not in (1, 2):
        _fail("preprocessing.resize")
    if p.get("crop") is not None and len(p["crop"]) != 2:
        _fail("preprocessing.crop")


# --------------------------------------------------------------------------------------------
# ops in float64
def _unpack_bits(rows, nbits):
    return np.unpackbits(np.ascontiguousarray(rows), axis=-1, bitorder="little")[..., :nbits]


def _conv2d(x, w, stride, padding, dilation, groups, bias=None):
    B, C, H, W = x.shape
    n_out, Cg, kh, kw = w.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((B, C, kh, kw, Ho, Wo), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[
                :,
                :,
                i * dh : i * dh + sh * (Ho - 1) + 1 : sh,
                j * dw : j * dw + sw * (Wo - 1) + 1 : sw,
            ]
    Og = n_out // groups
    out = np.empty((B, n_out, Ho, Wo), dtype=np.float64)
    for g in range(groups):
        cg = cols[:, g * Cg : (g + 1) * Cg].reshape(B, Cg * kh * kw, Ho * Wo)
        wg = w[g * Og : (g + 1) * Og].reshape(Og, Cg * kh * kw)
        out[:, g * Og : (g + 1) * Og] = np.einsum("ok,bkp->bop", wg, cg).reshape(B, Og, Ho, Wo)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def _pool_out(i, k, s, p, d, ceil_mode):
    num = i + 2 * p - d * (k - 1) - 1
    o = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (o - 1) * s >= i + p:
        o -= 1
    return o


def _maxpool(x, k, s, p, d, ceil_mode):
    B, C, H, W = x.shape
    Ho, Wo = (
        _pool_out(H, k[0], s[0], p[0], d[0], ceil_mode),
        _pool_out(W, k[1], s[1], p[1], d[1], ceil_mode),
    )
    out = np.full((B, C, Ho, Wo), -np.inf)
    for oy in range(Ho):
        for ox in range(Wo):
            ys = [oy * s[0] - p[0] + a * d[0] for a in range(k[0])]
            xs = [ox * s[1] - p[1] + b * d[1] for b in range(k[1])]
            ys = [y for y in ys if 0 <= y < H]
            xs = [v for v in xs if 0 <= v < W]
            if ys and xs:
                out[:, :, oy, ox] = x[:, :, ys][:, :, :, xs].max(axis=(2, 3))
    return out


def _avgpool(x, k, s, p, ceil_mode, count_include_pad, divisor_override):
    B, C, H, W = x.shape
    Ho, Wo = (
        _pool_out(H, k[0], s[0], p[0], 1, ceil_mode),
        _pool_out(W, k[1], s[1], p[1], 1, ceil_mode),
    )
    out = np.zeros((B, C, Ho, Wo))
    for oy in range(Ho):
        for ox in range(Wo):
            h0, w0 = oy * s[0] - p[0], ox * s[1] - p[1]
            h1, w1 = min(h0 + k[0], H + p[0]), min(w0 + k[1], W + p[1])
            pool = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, H), min(w1, W)
            if divisor_override:
                div = divisor_override
            elif count_include_pad:
                div = pool
            else:
                div = (h1 - h0) * (w1 - w0)
            out[:, :, oy, ox] = x[:, :, h0:h1, w0:w1].sum(axis=(2, 3)) / div
    return out


def _adaptive(x, output_size, fn):
    B, C, H, W = x.shape
    oh = output_size[0] if output_size[0] is not None else H
    ow = output_size[1] if output_size[1] is not None else W
    out = np.empty((B, C, oh, ow))
    for i in range(oh):
        y0, y1 = (i * H) // oh, -(-((i + 1) * H) // oh)
        for j in range(ow):
            x0, x1 = (j * W) // ow, -(-((j + 1) * W) // ow)
            out[:, :, i, j] = fn(x[:, :, y0:y1, x0:x1], axis=(2, 3))
    return out


def _resize(x, size, mode, align_corners, scale_factor):
    B, C, H, W = x.shape
    oh, ow = size

    def coords(i_n, o_n, sf):
        i = np.arange(o_n)
        if mode == "nearest":
            r = np.float32(1.0 / sf) if sf else np.float32(i_n) / np.float32(o_n)
            return np.minimum(np.floor(i.astype(np.float32) * r), i_n - 1).astype(np.int64), None
        if align_corners:
            src = i * ((i_n - 1) / (o_n - 1)) if o_n > 1 else np.zeros(o_n)
        else:
            r = 1.0 / sf if sf else i_n / o_n
            src = np.maximum((i + 0.5) * r - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), i_n - 1)
        i1 = np.minimum(i0 + 1, i_n - 1)
        lam = src - i0
        return (i0, i1), lam

    sfh, sfw = scale_factor if scale_factor else (None, None)
    (yi, ly), (xi, lx) = coords(H, oh, sfh), coords(W, ow, sfw)
    if mode == "nearest":
        return x[:, :, yi][:, :, :, xi]
    if mode != "bilinear":
        _fail(f"resize mode {mode}")
    y0, y1 = yi
    x0, x1 = xi
    top = x[:, :, y0] * (1 - ly)[:, None] + x[:, :, y1] * ly[:, None]
    return top[:, :, :, x0] * (1 - lx) + top[:, :, :, x1] * lx


def _staircase_planes(x, thresholds, codes, N):
    piece = np.zeros(x.shape, dtype=np.int64)
    for t in thresholds.astype(np.float64):
        piece += x >= t
    bits = _unpack_bits(codes, N)  # [L, N]
    return bits[piece]  # [..., N]


def _bconv2d(x, a, T):
    n_out, C, g = a["out_channels"], a["in_channels"], a["groups"]
    kh, kw = a["kernel_size"]
    M, N = a["weight_bases"], a["activation_bases"]
    shape = (n_out, C // g, kh, kw)
    planes = (
        _unpack_bits(T["weight_planes"], int(np.prod(shape)))
        .astype(np.float64)
        .reshape((M,) + shape)
    )
    if a["weight_domain"] == "plus_minus_one":
        planes = 2 * planes - 1
    alpha = T["weight_scales"].astype(np.float64)
    if alpha.shape == (1,):
        alpha = np.broadcast_to(alpha, (M,))
    if alpha.ndim == 1:
        alpha = alpha[:, None]
    w_hat = (alpha[:, :, None, None, None] * planes).sum(axis=0)
    if N == 0:
        a_hat = x
    else:
        bits = _staircase_planes(x, T["act_thresholds"], T["act_codes"], N).astype(np.float64)
        if a["activation_domain"] == "plus_minus_one":
            bits = 2 * bits - 1
        a_hat = bits @ T["act_scales"].astype(np.float64)
    bias = T["bias"].astype(np.float64) if "bias" in T else None
    return _conv2d(a_hat, w_hat, a["stride"], a["padding"], a["dilation"], g, bias)


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _binop(op, ins, a):
    f = {"add": np.add, "mul": np.multiply, "sub": np.subtract, "div": np.divide}[op]
    if len(ins) == 2:
        return f(ins[0], ins[1])
    s = float(a["scalar"])
    return f(s, ins[0]) if a.get("reverse", False) else f(ins[0], s)


def run_node(node, ins, tensors):
    op, a = node["op"], node.get("attrs", {})
    T = {r: tensors[n] for r, n in node.get("tensors", {}).items()}
    x = ins[0] if ins else None
    if op == "conv2d":
        return _conv2d(
            x,
            T["weight"].astype(np.float64),
            a["stride"],
            a["padding"],
            a["dilation"],
            a["groups"],
            T["bias"].astype(np.float64) if "bias" in T else None,
        )
    if op == "bconv2d":
        return _bconv2d(x, a, T)
    if op == "batchnorm":
        sh = (1, -1) + (1,) * (x.ndim - 2)
        return x * T["scale"].astype(np.float64).reshape(sh) + T["shift"].astype(
            np.float64
        ).reshape(sh)
    if op == "linear":
        y = x @ T["weight"].astype(np.float64).T
        return y + T["bias"].astype(np.float64) if "bias" in T else y
    if op == "relu":
        return np.maximum(x, 0)
    if op == "clip":
        lo = -np.inf if a["min"] is None else a["min"]
        hi = np.inf if a["max"] is None else a["max"]
        return np.minimum(np.maximum(x, lo), hi)
    if op == "leaky_relu":
        return np.where(x >= 0, x, a["negative_slope"] * x)
    if op == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if op == "tanh":
        return np.tanh(x)
    if op == "silu":
        return x / (1 + np.exp(-x))
    if op == "hardswish":
        return x * np.clip(x + 3, 0, 6) / 6
    if op == "hardsigmoid":
        return np.clip(x / 6 + 0.5, 0, 1)
    if op == "gelu":
        if a["approximate"] == "tanh":
            return x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))) / 2
        return x * (1 + _erf(x / math.sqrt(2))) / 2
    if op == "prelu":
        w = T["weight"].astype(np.float64)
        w = w.reshape((1, -1) + (1,) * (x.ndim - 2)) if w.shape[0] > 1 else w[0]
        return np.where(x >= 0, x, w * x)
    if op == "maxpool2d":
        return _maxpool(
            x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]
        )
    if op == "avgpool2d":
        return _avgpool(
            x,
            a["kernel_size"],
            a["stride"],
            a["padding"],
            a["ceil_mode"],
            a["count_include_pad"],
            a.get("divisor_override"),
        )
    if op == "adaptive_avgpool2d":
        return _adaptive(x, a["output_size"], np.mean)
    if op == "adaptive_maxpool2d":
        return _adaptive(x, a["output_size"], np.max)
    if op == "flatten":
        s, e = a["start_dim"] % x.ndim, a["end_dim"] % x.ndim
        return x.reshape(x.shape[:s] + (-1,) + x.shape[e + 1 :])
    if op == "mean":
        return x.mean(axis=tuple(a["dims"]), keepdims=a["keepdim"])
    if op == "sum":
        return x.sum(axis=tuple(a["dims"]), keepdims=a["keepdim"])
    if op == "softmax":
        e = np.exp(x - x.max(axis=a["dim"], keepdims=True))
        return e / e.sum(axis=a["dim"], keepdims=True)
    if op in ("add", "mul", "sub", "div"):
        return _binop(op, ins, a)
    if op == "cat":
        return np.concatenate(ins, axis=a["dim"])
    if op == "constant":
        return T["value"].astype(np.float64)
    if op == "slice":
        idx = [slice(None)] * x.ndim
        for d, s0, s1, st in zip(a["dims"], a["starts"], a["stops"], a["steps"], strict=False):
            idx[d] = slice(s0, s1, st)
        return x[tuple(idx)]
    if op == "reshape":
        return x.reshape((x.shape[0],) + tuple(a["shape"]))
    if op == "transpose":
        return x.transpose(a["perm"])
    if op == "pad":
        pads, nd = a["pads"], x.ndim
        width = [[0, 0] for _ in range(nd)]
        for k in range(len(pads) // 2):
            width[nd - 1 - k] = [pads[2 * k], pads[2 * k + 1]]
        crop = [slice(max(-b, 0), x.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(width)]
        x = x[tuple(crop)]
        return np.pad(x, [(max(b, 0), max(e, 0)) for b, e in width], constant_values=a["value"])
    if op == "resize":
        return _resize(x, a["size"], a["mode"], a["align_corners"], a.get("scale_factor"))
    _fail(f"op {op} not implemented")


class Packed:
    def __init__(self, path):
        self.meta, self.tensors = read_container(path)
        (self.version, self.num_classes, self.input_size, self.preprocessing, self.graph) = (
            validate(self.meta, self.tensors)
        )
        self.mean = json.loads(self.meta["mean"])
        self.std = json.loads(self.meta["std"])
        self.data = self.meta["data"]

    def ops(self):
        return sorted({n["op"] for n in self.graph["nodes"]})

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        values = {self.graph["inputs"][0]: x}
        for node in self.graph["nodes"]:
            values[node["name"]] = run_node(
                node, [values[i] for i in node.get("inputs", [])], self.tensors
            )
        out = values[self.graph["outputs"][0]]
        if out.shape != (x.shape[0], self.num_classes):
            _fail(f"output shape {out.shape}")
        return out


def load(path):
    return Packed(path)


# --------------------------------------------------------------------------------------------
# preprocessing (section 8)
def _target_size(resize, H0, W0):
    if resize is None:
        return H0, W0
    if len(resize) == 2:
        return resize[0], resize[1]
    S = resize[0]
    if H0 <= W0:
        return S, int(S * W0 / H0)
    return int(S * H0 / W0), S


def _torch_interp(x, H, W, mode, antialias):
    """F.interpolate(x[None], size=(H, W), mode, align_corners=False) on float32 [C, H0, W0]."""
    C, H0, W0 = x.shape
    if antialias and (H < H0 or W < W0):
        raise NotImplementedError(
            "antialiased torch downsampling is not implemented by this reader"
        )
    if mode == "nearest":
        yi = np.minimum(
            np.floor(np.arange(H, dtype=np.float32) * (np.float32(H0) / np.float32(H))), H0 - 1
        ).astype(int)
        xi = np.minimum(
            np.floor(np.arange(W, dtype=np.float32) * (np.float32(W0) / np.float32(W))), W0 - 1
        ).astype(int)
        return x[:, yi][:, :, xi]
    if mode != "bilinear":
        raise NotImplementedError(f"torch {mode} is not implemented by this reader")

    def idx(i_n, o_n):
        r = np.float32(i_n) / np.float32(o_n)
        src = np.maximum(
            r * (np.arange(o_n, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
            np.float32(0),
        )
        i0 = src.astype(np.int64)
        i1 = np.where(i0 < i_n - 1, i0 + 1, i0)
        l1 = (src - i0.astype(np.float32)).astype(np.float32)
        return i0, i1, (np.float32(1) - l1).astype(np.float32), l1

    y0, y1, ly0, ly1 = idx(H0, H)
    x0, x1, lx0, lx1 = idx(W0, W)
    a = x[:, y0][:, :, x0]
    b = x[:, y0][:, :, x1]
    c = x[:, y1][:, :, x0]
    d = x[:, y1][:, :, x1]
    LY0, LY1, LX0, LX1 = ly0[:, None], ly1[:, None], lx0[None, :], lx1[None, :]
    return (LY0 * (LX0 * a + LX1 * b) + LY1 * (LX0 * c + LX1 * d)).astype(np.float32)


_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _crop(x, crop):
    if crop is None:
        return x
    h, w = crop
    H, W = x.shape[-2:]
    top, left = int(round((H - h) / 2)), int(round((W - w) / 2))
    return x[..., top : top + h, left : left + w]


def _finish(x, p):
    x = _crop(x, p.get("crop"))
    x = (x.astype(np.float32) / np.float32(p["pixel_scale"])).astype(np.float32)
    if x.shape[0] == 1 and p["channels"] == 3:
        x = np.repeat(x, 3, axis=0)
    mean = np.asarray(p["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(p["std"], dtype=np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def preprocess_array(arr, p):
    """`resampler` torch: a stored array [C0, H0, W0] (or [H0, W0]) -> the model input [C, h, w] float32."""
    x = np.asarray(arr, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    H, W = _target_size(p.get("resize"), *x.shape[1:])
    if x.shape[1:] != (H, W):
        x = _torch_interp(x, H, W, p["interpolation"], p.get("antialias", False))
        if p.get("round_resized"):
            x = np.clip(np.round(x), 0, 255).astype(np.float32)
    return _finish(x, p)


def preprocess_image_file(path, p):
    """`resampler` pil: an image file -> the model input [C, h, w] float32."""
    img = Image.open(path).convert("RGB")
    W0, H0 = img.size
    H, W = _target_size(p.get("resize"), H0, W0)
    if img.size != (W, H):
        img = img.resize((W, H), _PIL_FILTERS[p["interpolation"]])
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return _finish(x, p)


def digits_inputs(p):
    """All 1797 scikit-learn digits preprocessed, [1797, C, h, w] float32, and their labels.
    (Which of them form the validation split is not in docs/format.md: see the test.)"""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.stack([preprocess_array(im, p) for im in d.images]), d.target


IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")


def imagefolder_inputs(root, p, split="val"):
    """ImageFolder `root/split/<class>/*`: classes and files in sorted order (assumed, torchvision's)."""
    base = os.path.join(root, split)
    classes = sorted(e for e in os.listdir(base) if os.path.isdir(os.path.join(base, e)))
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(base, c))):
            if f.lower().endswith(IMG_EXT):
                xs.append(preprocess_image_file(os.path.join(base, c, f), p))
                ys.append(ci)
    return np.stack(xs), np.asarray(ys), classes


def predict(model, x, batch=64):
    out = np.concatenate([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    return out, out.argmax(axis=1)


if __name__ == "__main__":
    import sys

    m = load(sys.argv[1])
    print(
        json.dumps(
            {
                "version": m.version,
                "ops": m.ops(),
                "preprocessing": m.preprocessing,
                "input_size": m.input_size,
            },
            indent=1,
        )
    )
