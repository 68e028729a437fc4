"""ops.attention (three passes, chunked key cache) against a NumPy twin of ggml's flash attention
for an f16 cache, written as ggml writes it: one position at a time, online softmax, f16
accumulator. Bit for bit, across head sizes (with and without a tail past the 32-wide blocks),
chunk boundaries of the key cache and several sequences."""
import math

import numpy as np
import pytest

from numllama.engine.hparams import HParams
from numllama.engine.kv_cache import KVCache
from numllama.engine.ops import attention
from twins import expf
from twins import fma_twin as fma

f32, f16 = np.float32, np.float16


def dot_f16(q, k):
    """ggml_vec_dot_f16 on AVX2: 4 x 8 lanes over blocks of 32 (FMA), GGML_F32x8_REDUCE, and the
    tail in double. q, k: f16 values as f32."""
    n = len(q)
    n_simd = n - n % 32
    lanes = np.zeros(32, f32)
    for i in range(0, n_simd, 32):
        for l in range(32):
            lanes[l] = fma(q[i + l], k[i + l], lanes[l])
    total = 0.0
    if n_simd:
        a = [f32(lanes[l] + lanes[16 + l]) for l in range(8)]
        b = [f32(lanes[8 + l] + lanes[24 + l]) for l in range(8)]
        c = [f32(a[l] + b[l]) for l in range(8)]
        total = float(f32(f32(f32(c[0] + c[4]) + f32(c[1] + c[5])) + f32(f32(c[2] + c[6]) + f32(c[3] + c[7]))))
    for d in range(n_simd, n):
        total += float(f32(q[d] * k[d]))
    return f32(total)


def twin(q, keys, values, n_kv, scale, window):
    """One token and head. keys, values: [n_kv, hd] f16 values as f32. A sliding window masks
    the older positions to -inf, which ggml's loop skips."""
    hd = len(q)
    qh = q.astype(f16).astype(f32)
    m, s_sum = f32(-np.inf), f32(0)
    acc = np.zeros(hd, f32)   # VKQ16, f16 values
    for j in range(n_kv):
        if window and (n_kv - 1) - j >= window:   # llama_hparams::is_masked_swa
            continue
        s = f32(dot_f16(qh, keys[j]) * scale)
        ms = vs = f32(1)
        if s > m:
            m_old, m = m, s
            ms = expf(f32(m_old - m)) if np.isfinite(m_old) else f32(0)
            acc = (acc * ms).astype(f16).astype(f32)            # ggml_vec_scale_f16
        else:
            vs = expf(f32(s - m))
        acc = np.array([fma(values[j, d], vs, acc[d]) for d in range(hd)], f32).astype(f16).astype(f32)
        s_sum = fma(s_sum, ms, vs)
    return acc * (f32(1) / s_sum)


@pytest.mark.parametrize("head_dim,window,q_scaled", [(8, 0, False), (48, 0, False), (64, 0, False),
                                                      (80, 0, False), (128, 0, False),
                                                      (64, 40, False), (256, 70, True)])
def test_attention_equals_ggml_order(head_dim, window, q_scaled):
    """window: a sliding-window layer (gemma3); q_scaled: q was scaled before, scores by 1."""
    rng = np.random.default_rng(head_dim)
    n_head, n_head_kv, n_ctx = 4, 2, 160
    hp = HParams("llama", 32, n_ctx, n_head * head_dim, 1, n_head, n_head_kv, 8, head_dim, head_dim,
                 10000.0, 1.0, 1e-5)
    cache = KVCache(hp, n_seq=2, n_ctx=n_ctx)
    k = rng.standard_normal((2, n_ctx, n_head_kv * head_dim)).astype(f32)
    v = rng.standard_normal((2, n_ctx, n_head_kv * head_dim)).astype(f32)
    for seq in range(2):
        cache.store(0, np.full(n_ctx, seq, np.int32), np.arange(n_ctx, dtype=np.int32), k[seq], v[seq])
    # tokens at positions inside the first key chunk, on its edge and two chunks on
    seq_ids = np.array([0, 1, 0, 1], np.int32)
    positions = np.array([5, 63, 64, 150], np.int32)
    q = (rng.standard_normal((4, n_head * head_dim)) * 2).astype(f32)
    out = np.empty_like(q)
    scale = f32(1.0) if q_scaled else f32(1.0) / f32(math.sqrt(f32(head_dim)))
    attention(q, cache.k[0], cache.v[0], seq_ids, positions, n_head, n_head_kv, head_dim, scale, window, out)
    keys = k.astype(f16).astype(f32)
    values = v.astype(f16).astype(f32)
    for t in range(4):
        for h in range(n_head):
            kvh = h // (n_head // n_head_kv)
            cols = slice(kvh * head_dim, (kvh + 1) * head_dim)
            want = twin(q[t, h * head_dim:(h + 1) * head_dim], keys[seq_ids[t], :, cols], values[seq_ids[t], :, cols],
                        positions[t] + 1, scale, window)
            np.testing.assert_array_equal(out[t, h * head_dim:(h + 1) * head_dim], want, err_msg=f"t={t} h={h}")
