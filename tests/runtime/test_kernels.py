"""Bitwise kernels of the packed runtime against integer and float oracles, on odd shapes.

Hand-made planes (no scheme code): weight planes are random bits, activation codes are
PA-like (one-hot piece indicators, {0,1}) or ABC-like (shifted signs, {-1,+1}). The integer
oracle computes every popcount as a float64 convolution of 0/1 arrays (exact for these
sizes); the float oracle is ``conv(W_hat, A_hat)`` in float64.
"""

from __future__ import annotations

import itertools
import platform

import numpy as np
import pytest

from binarize_cli.runtime import ops
from binarize_cli.runtime._build import load_kernel
from binarize_cli.runtime.bitconv import BinaryConv2d
from binarize_cli.runtime.kernels import (
    OP_AND,
    OP_XNOR,
    WORD_BITS,
    CBackend,
    NumpyBackend,
    conv_output_size,
    get_backend,
    pack_channel_words,
    words_for,
)
from binarize_cli.runtime.staircase import Staircase

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _c_backend(flags: tuple[str, ...] | None = None) -> CBackend:
    kernel, why = load_kernel(flags)
    if kernel is None:
        pytest.skip(f"C kernel unavailable: {why}")
    return CBackend(kernel, threads=2)


@pytest.fixture(scope="module")
def c_backend() -> CBackend:
    return _c_backend()


def _backends(c_backend: CBackend) -> list:
    return [NumpyBackend(), c_backend]


def pa_code(n: int, rng: np.random.Generator) -> Staircase:
    """PA eq. 18: N endpoints, piece 0 -> no plane, piece i -> plane i (one-hot), {0,1}."""
    thr = np.sort(rng.standard_normal(n)).astype(np.float32)
    codes = np.zeros((n + 1, n), np.uint8)
    codes[np.arange(1, n + 1), np.arange(n)] = 1
    return Staircase(thr, codes=codes, scales=rng.uniform(0.2, 2.0, n), domain="zero_one")


def abc_code(n: int, rng: np.random.Generator) -> Staircase:
    """ABC: plane n is +1 iff x >= t_n (thermometer code), {-1,+1}."""
    thr = np.sort(rng.standard_normal(n)).astype(np.float32)
    codes = np.tril(np.ones((n + 1, n), np.uint8), k=-1)
    return Staircase(thr, codes=codes, scales=rng.uniform(0.2, 2.0, n), domain="plus_minus_one")


def make_layer(
    rng: np.random.Generator,
    *,
    c: int,
    o: int,
    k: int,
    stride: int,
    pad: int,
    m: int,
    act: Staircase | None,
    weight_domain: str,
    groups: int = 1,
    dilation: int = 1,
    per_channel: bool = False,
    bias: bool = False,
) -> BinaryConv2d:
    planes = rng.random((m, o, c // groups, k, k)) < 0.45
    alpha = (
        rng.uniform(0.1, 1.0, (o, m)) if per_channel else np.tile(rng.uniform(0.1, 1.0, m), (o, 1))
    )
    return BinaryConv2d(
        planes=planes,
        alpha=alpha,
        weight_domain=weight_domain,
        bias=rng.standard_normal(o).astype(np.float32) if bias else None,
        act=act,
        stride=(stride, stride),
        padding=(pad, pad),
        dilation=(dilation, dilation),
        groups=groups,
    )


def oracle_counts(layer: BinaryConv2d, x: np.ndarray, op: int) -> np.ndarray:
    """count(o, i, j, q) from float64 convolutions of 0/1 arrays (exact integers)."""
    assert layer.act is not None and layer.groups == 1
    a = layer.act.planes(x).astype(np.float64)  # [N, B, C, H, W]
    ph, pw = layer.padding
    ap = np.pad(a, ((0, 0), (0, 0), (0, 0), (ph, ph), (pw, pw)))  # padded activations are 0 bits
    w = layer.planes.astype(np.float64)  # [M, O, C, kh, kw]
    m, o, n = w.shape[0], w.shape[1], a.shape[0]
    b = x.shape[0]
    ho, wo = layer.output_hw(x.shape[2], x.shape[3])
    out = np.zeros((o, m, n, b * ho * wo))
    for i in range(m):
        for j in range(n):
            conv = ops.conv2d(ap[j], w[i], None, layer.stride, (0, 0), layer.dilation, 1)
            if op == OP_XNOR:
                conv = conv + ops.conv2d(
                    1 - ap[j], 1 - w[i], None, layer.stride, (0, 0), layer.dilation, 1
                )
            out[:, i, j] = conv.transpose(1, 0, 2, 3).reshape(o, -1)
    if op == OP_XNOR:  # channel-padding bits: 0 on both sides, equal
        out += layer.taps * (layer.cwg * WORD_BITS - layer.cg)
    return out


SHAPES = list(itertools.product((1, 3, 63, 65, 130), (1, 3), (1, 2), (0, 1)))


@pytest.mark.parametrize("scheme", ["pa", "abc"])
@pytest.mark.parametrize(("c", "k", "stride", "pad"), SHAPES)
def test_counts_are_exact_integers(c_backend, scheme, c, k, stride, pad) -> None:
    rng = np.random.default_rng(c * 100 + k * 10 + stride + pad)
    n, m = (3, 4) if scheme == "pa" else (3, 3)
    act = pa_code(n, rng) if scheme == "pa" else abc_code(n, rng)
    domain = "zero_one" if scheme == "pa" else "plus_minus_one"
    layer = make_layer(
        rng, c=c, o=5, k=k, stride=stride, pad=pad, m=m, act=act, weight_domain=domain
    )
    op = OP_AND if scheme == "pa" else OP_XNOR
    assert layer.op == op
    x = rng.standard_normal((2, c, 7, 6)).astype(np.float32)
    ho, wo = layer.output_hw(7, 6)
    expected = oracle_counts(layer, x, op)
    q = 2 * ho * wo
    for be in _backends(c_backend):
        act_bits = be.quantize_pack(x, act.thresholds, act.masks, n, 1, layer.padding)
        cols = be.im2col(act_bits, 0, layer.cwg, (k, k), layer.stride, layer.dilation, (ho, wo))
        counts = be.bgemm_counts(layer.wts[0], 5, m, cols, op)
        assert counts.dtype == np.int32
        np.testing.assert_array_equal(counts[..., :q], expected.astype(np.int64), err_msg=be.name)


@pytest.mark.parametrize("scheme", ["pa", "abc"])
@pytest.mark.parametrize(("c", "k", "stride", "pad"), SHAPES)
def test_layer_matches_float_oracle(c_backend, scheme, c, k, stride, pad) -> None:
    rng = np.random.default_rng(1000 + c * 100 + k * 10 + stride + pad)
    n, m = (5, 4) if scheme == "pa" else (3, 3)
    act = pa_code(n, rng) if scheme == "pa" else abc_code(n, rng)
    domain = "zero_one" if scheme == "pa" else "plus_minus_one"
    layer = make_layer(
        rng, c=c, o=6, k=k, stride=stride, pad=pad, m=m, act=act, weight_domain=domain, bias=True
    )
    x = rng.standard_normal((2, c, 9, 8)).astype(np.float32)
    ref = layer.reference(x)
    scale = np.abs(ref).max()
    for be in _backends(c_backend):
        y32 = layer(x, be)
        assert y32.dtype == np.float32 and y32.shape == ref.shape
        np.testing.assert_allclose(
            y32, ref, rtol=0, atol=2e-6 * scale * np.sqrt(c * k * k), err_msg=be.name
        )
        y64 = layer(x.astype(np.float64), be)
        assert y64.dtype == np.float64
        np.testing.assert_allclose(y64, ref, rtol=0, atol=1e-12 * scale, err_msg=be.name)


@pytest.mark.parametrize(
    ("weight_domain", "act_domain"),
    [
        ("plus_minus_one", "zero_one"),
        ("zero_one", "plus_minus_one"),
        ("zero_one", "zero_one"),
        ("plus_minus_one", "plus_minus_one"),
    ],
)
def test_mixed_domains_with_border(c_backend, weight_domain, act_domain) -> None:
    """DoReFa ({-1,+1} weights, {0,1} activations) and the converse, with zero padding."""
    rng = np.random.default_rng(7)
    base = pa_code(3, rng) if act_domain == "zero_one" else abc_code(3, rng)
    act = Staircase(base.thresholds, codes=base.codes, scales=base.scales, domain=act_domain)
    layer = make_layer(
        rng, c=37, o=4, k=3, stride=1, pad=1, m=2, act=act, weight_domain=weight_domain
    )
    x = rng.standard_normal((1, 37, 5, 5)).astype(np.float32)
    ref = layer.reference(x)
    for be in _backends(c_backend):
        np.testing.assert_allclose(layer(x.astype(np.float64), be), ref, atol=1e-10, rtol=0)


def test_groups_dilation_and_per_channel_scales(c_backend) -> None:
    rng = np.random.default_rng(3)
    layer = make_layer(
        rng, c=70, o=6, k=3, stride=2, pad=2, m=2, act=abc_code(2, rng), weight_domain="plus_minus_one",
        groups=2, dilation=2, per_channel=True, bias=True,
    )  # fmt: skip
    x = rng.standard_normal((3, 70, 11, 10)).astype(np.float32)
    ref = layer.reference(x)
    for be in _backends(c_backend):
        np.testing.assert_allclose(layer(x.astype(np.float64), be), ref, atol=1e-10, rtol=0)
        np.testing.assert_allclose(layer(x, be), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_zero_padding_is_exact_in_zero_one_but_needs_correction_in_plus_minus_one(
    c_backend,
) -> None:
    """The border correction is what makes {-1,+1} padding exact: without it the border differs."""
    rng = np.random.default_rng(11)
    layer = make_layer(
        rng,
        c=16,
        o=3,
        k=3,
        stride=1,
        pad=1,
        m=1,
        act=abc_code(1, rng),
        weight_domain="plus_minus_one",
    )
    x = rng.standard_normal((1, 16, 6, 6))
    y = layer(x, c_backend)
    geo = layer._geometry[(6, 6)]
    assert geo.corr is not None
    corr = geo.corr.reshape(3, 6, 6)
    assert np.all(corr[:, 1:-1, 1:-1] == 0)  # interior: no correction
    assert np.abs(corr[:, 0, :]).sum() > 0  # border: corrected
    np.testing.assert_allclose(y, layer.reference(x), atol=1e-10, rtol=0)


def test_quantize_pack_matches_code_and_nan_goes_to_piece_zero(c_backend) -> None:
    rng = np.random.default_rng(5)
    act = pa_code(4, rng)
    x = rng.standard_normal((2, 40, 3, 4)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1, 5, 1, 1] = act.thresholds[2]  # exactly on an endpoint: the piece to its right
    planes = act.planes(x)  # [N, B, C, H, W]
    assert planes[:, 0, 0, 0, 0].sum() == 0
    assert planes[2, 1, 5, 1, 1]
    expected = np.zeros((2, 5, 6, 4, 2), np.uint32)  # padding (1, 1)
    expected[:, 1:4, 1:5] = pack_channel_words(planes.transpose(1, 3, 4, 0, 2))
    for be in _backends(c_backend):
        got = be.quantize_pack(x, act.thresholds, act.masks, 4, 1, (1, 1))
        np.testing.assert_array_equal(got, expected, err_msg=be.name)
        got64 = be.quantize_pack(x.astype(np.float64), act.thresholds, act.masks, 4, 1, (1, 1))
        np.testing.assert_array_equal(got64, expected, err_msg=be.name)


def test_pack_channel_words_bit_order() -> None:
    bits = np.zeros((1, 40), bool)
    bits[0, [0, 5, 31, 32, 39]] = True
    words = pack_channel_words(bits)
    assert words.shape == (1, words_for(40)) == (1, 2)
    assert words[0, 0] == (1 << 0) | (1 << 5) | (1 << 31)
    assert words[0, 1] == (1 << 0) | (1 << 7)


@pytest.mark.skipif(not X86, reason="x86 SIMD variants")
@pytest.mark.parametrize(
    ("flags", "simd"),
    [(("-march=native", "-mno-avx512f"), "avx2"), (("-march=x86-64",), "portable-c")],
)
def test_other_simd_paths_agree(flags, simd) -> None:
    """The AVX2 and portable C paths compute the same counts as the default build."""
    be = _c_backend(flags)
    if be.simd != simd:
        pytest.skip(f"build gave {be.simd}")
    rng = np.random.default_rng(9)
    for op in (OP_AND, OP_XNOR):
        for kw, q in ((1, 16), (9, 48), (41, 80)):
            wts = rng.integers(0, 2**32, (14, kw), dtype=np.uint64).astype(np.uint32)
            cols = rng.integers(0, 2**32, (3, kw, q), dtype=np.uint64).astype(np.uint32)
            expected = NumpyBackend().bgemm_counts(wts, 7, 2, cols, op)
            np.testing.assert_array_equal(be.bgemm_counts(wts, 7, 2, cols, op), expected)
            phi = rng.standard_normal((7, 2, 3)).astype(np.float32)
            ref = np.einsum("omnq,omn->oq", (2 * expected - 5).astype(np.float64), phi)
            np.testing.assert_allclose(
                be.bgemm(wts, 7, 2, cols, phi, op, 2, -5), ref, rtol=1e-5, atol=1e-3
            )


def test_many_threads_and_row_split(c_backend) -> None:
    """Few pixels, many rows: the work is split over rows; results do not depend on threads."""
    rng = np.random.default_rng(2)
    wts = rng.integers(0, 2**32, (4 * 300, 19), dtype=np.uint64).astype(np.uint32)
    cols = rng.integers(0, 2**32, (5, 19, 16), dtype=np.uint64).astype(np.uint32)
    expected = NumpyBackend().bgemm_counts(wts, 300, 4, cols, OP_AND)
    for threads in (1, 3, 8):
        be = CBackend(c_backend.kernel, threads=threads)
        np.testing.assert_array_equal(be.bgemm_counts(wts, 300, 4, cols, OP_AND), expected)


def test_backend_selection(monkeypatch) -> None:
    monkeypatch.setenv("BINARIZE_KERNEL", "numpy")
    assert get_backend().name == "numpy"
    monkeypatch.delenv("BINARIZE_KERNEL")
    monkeypatch.setenv("BINARIZE_CC", "/nonexistent/cc")
    be = get_backend("auto", arch_flags=("-DNO_SUCH_BUILD",))
    assert be.name == "numpy" and "compiler" in be.fallback_reason  # type: ignore[union-attr]
    with pytest.raises(RuntimeError):
        get_backend("c", arch_flags=("-DNO_SUCH_BUILD",))
    with pytest.raises(ValueError):
        get_backend("gpu")


def test_conv_output_size_matches_torch_rule() -> None:
    assert conv_output_size(7, 3, 2, 1, 1) == 4
    assert conv_output_size(6, 3, 2, 0, 1) == 2
    assert conv_output_size(11, 3, 2, 2, 2) == 6
