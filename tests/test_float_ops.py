"""The exact-arithmetic building blocks, checked against NumPy twins."""
import math

import numpy as np
import pytest
from numba import njit

from numllama.engine.float_ops import expf_array, expf_ggml, fma
from numllama.engine.quants import KernelOrder, pack_weight
from numllama.engine.quants.kernels import matmul_float
from twins import expf, fma_twin, hsum8_twin


@njit
def _fma_many(a, b, c, out):
    for i in range(a.shape[0]):
        out[i] = fma(a[i], b[i], c[i])


def test_fma_rounds_once():
    a = np.float32(1 + 2.0 ** -13)
    assert fma(a, a, np.float32(-1.0)) == np.float32(2.0 ** -12 + 2.0 ** -26)
    assert a * a - np.float32(1.0) == np.float32(2.0 ** -12)  # two roundings lose the 2^-26
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(10000).astype(np.float32) for _ in range(3))
    out = np.empty_like(a)
    _fma_many(a, b, c, out)
    np.testing.assert_array_equal(out, [fma_twin(x, y, z) for x, y, z in zip(a, b, c)])


@njit
def _expf_ggml_many(x, out):
    for i in range(x.shape[0]):
        out[i] = expf_ggml(x[i])


def test_ggml_expf_is_accurate_everywhere():
    x = np.linspace(-87, 88, 100001).astype(np.float32)
    out = np.empty_like(x)
    _expf_ggml_many(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - ref) / ref) < 3 * 2.0 ** -23   # a few ulps, as ggml documents
    # far ranges go through ggml's overflow/underflow branches
    big = np.array([100.0, -100.0, -150.0, 89.0], np.float32)
    out = np.empty_like(big)
    _expf_ggml_many(big, out)
    assert math.isinf(out[0]) and out[1] < 1e-40 and out[2] == 0.0 and math.isinf(out[3])


def test_expf_array_is_libm():
    x = np.random.default_rng(1).normal(scale=5, size=3000).astype(np.float32)
    np.testing.assert_array_equal(expf_array(x), [expf(v) for v in x])


@pytest.mark.parametrize("n_rows,n_cols", [(8, 64), (8, 172), (8, 175), (5, 64)])
def test_float_kernel_orders_equal_numpy_twins(n_rows, n_cols):
    """172: tinyBLAS declines (K % 8), vec_dot with a tail; 175: its last K % 4 products fused;
    5 rows: tinyBLAS declines (rows % 4) and token 0 goes through vec_dot too."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    x = np.stack([rng.standard_normal(n_cols).astype(np.float32)] * 2)   # both tokens alike
    out = np.empty((2, n_rows), np.float32)
    matmul_float(x, w, np.array([True, False]), False, out)
    for r in range(n_rows):
        # token 0: tinyBLAS (8 lanes, hsum8) when K % 8 == 0 and the rows a multiple of 4
        if n_cols % 8 == 0 and n_rows % 4 == 0:
            lanes = np.zeros(8, np.float32)
            for l in range(0, n_cols, 8):
                for i in range(8):
                    lanes[i] = fma_twin(w[r, l + i], x[0, l + i], lanes[i])
            assert out[0, r] == hsum8_twin(lanes)
        else:
            assert out[0, r] == out[1, r]   # declined: the same vec_dot as token 1
        # token 1: ggml_vec_dot_f32 (4x8 lanes, reduce, then the tail: each product rounded
        # to f32, then added, except the last K % 4, which GCC's AVX2 code fuses)
        acc = np.zeros(32, np.float32)
        n_simd = n_cols - n_cols % 32
        for l in range(0, n_simd, 32):
            for i in range(32):
                acc[i] = fma_twin(w[r, l + i], x[1, l + i], acc[i])
        v = (acc[0:8] + acc[16:24]).astype(np.float32)
        v = (v + (acc[8:16] + acc[24:32]).astype(np.float32)).astype(np.float32)
        total = np.float32(np.float32(np.float32(v[0] + v[4]) + np.float32(v[1] + v[5])) +
                           np.float32(np.float32(v[2] + v[6]) + np.float32(v[3] + v[7])))
        for k in range(n_simd, n_cols):
            if k < n_cols - n_cols % 4:
                total = np.float32(total + np.float32(w[r, k] * x[1, k]))
            else:
                total = fma_twin(w[r, k], x[1, k], total)
        assert out[1, r] == total


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("n_rows,n_cols", [(5, 64), (37, 172), (33, 40), (64, 576)])
def test_float_tiles_equal_the_row_by_row_kernel(type_name, n_rows, n_cols):
    """The row-tiled float kernel (what linear uses) against matmul_float, checked above
    against its NumPy twin: bit-identical in both summation orders, tail in f32 and in double."""
    from numllama.engine.quants import float_rows, linear, prepare
    rng = np.random.default_rng(n_rows)
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    raw = {"F32": w, "F16": w.astype(np.float16),
           "BF16": (w.view(np.uint32) >> 16).astype(np.uint16)}[type_name]
    packed = pack_weight(type_name, raw, n_rows, n_cols)
    x = rng.standard_normal((6, n_cols)).astype(np.float32)
    order = np.array([True, False, True, True, False, False])
    (tiled,) = linear(x, packed, order=KernelOrder.of(6, tinyblas=order))
    plain = np.empty((6, n_rows), np.float32)
    matmul_float(prepare(x, packed.act_format, 0).x, float_rows(type_name, raw, n_rows, n_cols), order,
                 type_name == "F16", plain)
    np.testing.assert_array_equal(tiled, plain)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_0", "Q5_1", "Q8_0"])
def test_q32_lanes_equal_numpy_twin(type_name):
    """ggml's vec_dot order for 32-blocks (shown for vec_dot_q4_1_q8_1): lane i = exact int sum of elements 4i..4i+3 of each
    block, lane = fma(d_w * d_x, sum, lane), result hsum8(lanes) + sum of fma(m_w, s_x)."""
    from gguf import GGMLQuantizationType as GQ
    from gguf import quants as gq
    from numllama.engine.quants import blocks, matmul, prepare
    rng = np.random.default_rng(3)
    n_rows, n_cols = 37, 128   # 37: rows are padded to the 32-row tile
    raw = gq.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32), GQ[type_name])
    w = pack_weight(type_name, raw, n_rows, n_cols)
    q, scale, minimum, _ = blocks.unpack(type_name, raw, n_rows, n_cols)   # [rows, K], [rows, K/32]
    if minimum is None:
        minimum = np.zeros_like(scale)
    x = rng.standard_normal((2, n_cols)).astype(np.float32)
    act = prepare(x, w.act_format, 32)
    out = matmul(act, w)   # Q4_1 is read from its packed nibbles (matmul_q4_lanes)
    for t in range(2):
        for r in range(n_rows):
            lanes = np.zeros(8, np.float32)
            summs = np.float32(0)
            for b in range(n_cols // 32):
                d = np.float32(scale[r, b] * act.d[t, b])
                for i in range(8):
                    cols = slice(b * 32 + 4 * i, b * 32 + 4 * i + 4)
                    isum = int(np.dot(q[r, cols].astype(np.int64), act.q[t, b, 4 * i:4 * i + 4].astype(np.int64)))
                    lanes[i] = fma_twin(d, np.float32(isum), lanes[i])
                if w.act_format == "q8_1":
                    summs = fma_twin(minimum[r, b], act.s[t, b], summs)
            assert out[t, r] == np.float32(hsum8_twin(lanes) + summs)


@pytest.mark.parametrize("simd", [True, False])
def test_q4_0_repacked_order_equals_numpy_twin(simd):
    """Q4_0 matrices of 8k rows follow llama.cpp's repacked kernels (ggml_gemv_q4_0_8x8_q8_0):
    each block's integer sum, then one accumulator per row, acc = fma(float(sum), d_w * d_x, acc)."""
    from gguf import GGMLQuantizationType as GQ
    from gguf import quants as gq
    from numllama.engine.quants import blocks, matmul, prepare, repacked_order
    from numllama.engine.quants.simd import have_avx2
    if simd and not have_avx2():
        pytest.skip("no AVX2 on this CPU")
    rng = np.random.default_rng(4)
    n_rows, n_cols = 40, 128
    assert repacked_order("Q4_0", n_rows) and not repacked_order("Q4_0", 37)
    assert not repacked_order("Q4_1", 40)
    raw = gq.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32), GQ.Q4_0)
    w = pack_weight("Q4_0", raw, n_rows, n_cols, simd=simd)
    q, scale, _, _ = blocks.unpack("Q4_0", raw, n_rows, n_cols)
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    act = prepare(x, w.act_format, 32)
    out = matmul(act, w)
    for t in range(3):
        for r in range(n_rows):
            acc = np.float32(0)
            for b in range(n_cols // 32):
                isum = int(np.dot(q[r, b * 32:(b + 1) * 32].astype(np.int64), act.q[t, b].astype(np.int64)))
                acc = fma_twin(np.float32(isum), np.float32(scale[r, b] * act.d[t, b]), acc)
            assert out[t, r] == acc


def _elementwise(fn):
    @njit
    def many(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])
    return many


@pytest.mark.parametrize("impl", ["hardware", "soft"])
def test_f16_encoding_rounding_and_widening_are_exact(impl):
    """The KV cache's f16 bits and attention's f16 rounding: encoding equals NumPy's float16 cast
    (ties to even, subnormals, overflow), rounding equals the cast and back, and widening gives
    back every one of the 65536 halves. Both the F16C versions and the bit-twiddling fallback."""
    from numllama.engine import float_ops as F
    suffix = "_soft" if impl == "soft" else ""
    to_bits, rounded, widen = (_elementwise(getattr(F, n + suffix)) for n in ("f16_bits_of", "round_f16", "f16_to_f32"))
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(50000) * 10.0 ** rng.integers(-9, 6, 50000),
                        [0.0, -0.0, 65504, 65519, 65520, 1e-8, -2.0 ** -25, 3 * 2.0 ** -25, 6e-5, np.inf]])
    x = x.astype(np.float32)
    out = np.empty(len(x), np.uint16)
    to_bits(x, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, x.astype(np.float16).view(np.uint16))
        r = np.empty_like(x)
        rounded(x, r)
        np.testing.assert_array_equal(r.view(np.uint32), x.astype(np.float16).astype(np.float32).view(np.uint32))
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    wide = np.empty(65536, np.float32)
    widen(bits, wide)
    ref = bits.view(np.float16).astype(np.float32)
    assert np.all((wide == ref) | (np.isnan(wide) & np.isnan(ref)))
