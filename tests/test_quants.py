"""Every kernel against gguf-py's NumPy reference (`gguf.quants`), on random data and odd shapes."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQ
from gguf import quants as gq

from numllama.engine.quants import ACT_FORMAT, blocks, linear, pack_weight, prepare, round_bf16

K_TYPES = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _quantized(name, rng, n_rows, n_cols):
    """(raw bytes, reference f32 weights) for a random matrix of type `name`."""
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    if name == "F32":
        return w, w
    if name == "F16":
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if name == "BF16":
        r = round_bf16(w)
        return (r.view(np.uint32) >> 16).astype(np.uint16), r
    try:
        raw = gq.quantize(w, GQ[name])
    except NotImplementedError:
        # gguf-py cannot quantize K-types: random blocks with sane f16 scales, dequantized by it
        bb, bw = blocks.BLOCK_SIZES[name]
        raw = rng.integers(0, 256, size=(n_rows, n_cols // bw * bb), dtype=np.uint8)
        flat = raw.reshape(-1, bb)
        for at in K_TYPES[name]:
            d = rng.uniform(0.001, 0.02, flat.shape[0]).astype(np.float16)
            flat[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw, gq.dequantize(raw, GQ[name])


@pytest.mark.parametrize("name", list(blocks.BLOCK_SIZES))
def test_unpack_equals_gguf_dequantize(name):
    rng = np.random.default_rng(1)
    n_cols = 512
    raw, ref = _quantized(name, rng, 7, n_cols)
    np.testing.assert_array_equal(blocks.dequantize(name, raw, 7, n_cols), ref)


def _dequantized_activations(act, fmt, x):
    if fmt in ("f32", "f16", "bf16"):
        return act.x.astype(np.float64)
    n = x.shape[0]
    if fmt == "q8_k_rows":  # [T, K], one scale per 256
        return act.q.astype(np.float64) * np.repeat(act.d, 256, axis=1)
    return (act.q.astype(np.float64) * act.d[:, :, None]).reshape(n, -1)  # [T, n_blocks, 32]


@pytest.mark.parametrize("name", list(ACT_FORMAT))
@pytest.mark.parametrize("n_rows,n_tokens", [(1, 1), (37, 3), (64, 9)])
def test_matmul_equals_reference(name, n_rows, n_tokens):
    rng = np.random.default_rng(n_rows * 100 + n_tokens)
    n_cols = 768  # 3 super-blocks of 256, 24 blocks of 32
    raw, ref_w = _quantized(name, rng, n_rows, n_cols)
    w = pack_weight(name, raw, n_rows, n_cols)
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    (out,) = linear(x, w)
    # twin: the same activations, dequantized, times gguf-py's weights, in float64
    act = prepare(x, *w.act_key)
    xd = _dequantized_activations(act, w.act_format, x)
    ref = xd @ ref_w.astype(np.float64).T
    if w.act_format == "q8_1":  # Q8_1 stores sum*d as f16: the min term carries that rounding
        tol = 2e-3
    else:
        tol = 1e-5
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= tol * scale
    # the quantized activations are within half a step of the true ones (plus the f16
    # rounding of the stored scale: up to 127 * 2^-11 of a step)
    if w.act_format.startswith("q8"):
        step = np.abs(np.repeat(act.d, w.group, axis=1))
        assert np.all(np.abs(xd - x) <= step * 0.57 + 1e-6)


@pytest.mark.parametrize("name", ["F32", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_batch_invariance(name):
    """A row's result is bit-identical whatever else is in the batch."""
    rng = np.random.default_rng(5)
    raw, _ = _quantized(name, rng, 33, 512)
    w = pack_weight(name, raw, 33, 512)
    x = rng.standard_normal((11, 512)).astype(np.float32)
    (full,) = linear(x, w)
    for i in (0, 5, 10):
        (alone,) = linear(x[i:i + 1], w)
        np.testing.assert_array_equal(alone[0], full[i])
    (part,) = linear(x[3:8], w)
    np.testing.assert_array_equal(part, full[3:8])


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("n_rows,n_cols,n_tokens", [(1, 32, 1), (40, 96, 3), (64, 768, 9)])
def test_avx2_kernels_equal_portable_twins(name, n_rows, n_cols, n_tokens):
    """simd.py's hand-written vpmaddubsw loops give the portable kernels' results bit for bit
    (each reads its own layout of the same GGUF bytes)."""
    from numllama.engine.quants.simd import have_avx2
    if not have_avx2():
        pytest.skip("this CPU has no AVX2: the portable kernels are the only ones used")
    rng = np.random.default_rng(n_rows + n_cols)
    raw, _ = _quantized(name, rng, n_rows, n_cols)
    if name == "Q8_0":   # -128, which ggml's quantizer never writes but a file may hold
        raw = raw.copy()
        raw.reshape(-1, 34)[::3, 2 + 5] = 0x80
    fast = pack_weight(name, raw, n_rows, n_cols, simd=True)
    plain = pack_weight(name, raw, n_rows, n_cols, simd=False)
    assert fast.q.ndim == 5 and plain.q.ndim == 4
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32) * 3
    x[0, :32] = 0          # an all-zero activation block (d = 0)
    (a,) = linear(x, fast)
    (b,) = linear(x, plain)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1", "Q6_K"])
def test_large_matrices_pack_in_chunks_to_the_same_arrays(name, monkeypatch):
    """An output projection is packed a few thousand rows at a time (to keep load memory
    low); the arrays equal those packed in one piece, whatever the last chunk's size."""
    import numllama.engine.quants as Q
    rng = np.random.default_rng(9)
    raw, _ = _quantized(name, rng, 97, 256)
    whole = pack_weight(name, raw, 97, 256)
    monkeypatch.setattr(Q, "PACK_CHUNK_ROWS", 64)     # chunks of 64 rows, the last of 33
    parts = pack_weight(name, raw, 97, 256)
    for field in ("q", "scale", "minimum"):
        np.testing.assert_array_equal(getattr(parts, field), getattr(whole, field))


def test_q8_0_activations_match_gguf_quantizer():
    """Our activation quantizer agrees with gguf-py's Q8_0 to within one rounding tie."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    act = prepare(x, "q8_0", 32)
    ours = (act.q.astype(np.float32) * act.d[:, :, None]).reshape(4, -1)
    theirs = gq.dequantize(gq.quantize(x, GQ.Q8_0), GQ.Q8_0)
    assert np.mean(ours == theirs) > 0.99
