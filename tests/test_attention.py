"""ops.attention (three passes, chunked key cache) against NumPy twins of ggml's flash attention
for an f16 cache, written as ggml writes it: one position at a time, online softmax, f16
accumulator (one_chunk); 64 cells a tile in f32 (tiled); per thread, then merged (split-KV). Bit for bit, across head sizes (with and without a tail past the 32-wide blocks),
chunk boundaries of the key cache and several sequences. And the tiled path's register
kernels (engine/flash_tiles.py) against plain loops."""
import math

import numpy as np
import pytest
from numba import njit

from numllama.engine.hparams import HParams
from numllama.engine.kv_cache import KVCache
from numllama.engine.ops import attention
from numllama.engine.float_ops import expf_ggml
from numllama.engine.flash_tiles import GEMM_ROWS, LANES, gemm_tile, row_max
from twins import expf, hsum8_twin
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


def visible(j, n_kv, window):
    """Whether cell j is seen by the token at position n_kv - 1 (llama_hparams::is_masked_swa)."""
    return j < n_kv and not (window and (n_kv - 1) - j >= window)


def chunk_twin(q, keys, values, lo, hi, n_kv, scale, window):
    """ggml's one_chunk over cells lo .. hi - 1 for one token and head: the f16 accumulator
    (unnormalized), M and S. keys, values: [n, hd] f16 values as f32. Masked cells are skipped."""
    hd = len(q)
    qh = q.astype(f16).astype(f32)
    m, s_sum = f32(-np.inf), f32(0)
    acc = np.zeros(hd, f32)   # VKQ16, f16 values
    for j in range(lo, hi):
        if not visible(j, n_kv, window):
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
    return acc, m, s_sum


def twin(q, keys, values, n_kv, scale, window):
    """ggml's one_chunk over the whole cache, normalized."""
    acc, _, s_sum = chunk_twin(q, keys, values, 0, n_kv, n_kv, scale, window)
    return acc * (f32(1) / s_sum)


def split_twin(q, keys, values, n_kv, scale, window, chunk):
    """ggml's split-KV path: one_chunk per run of `chunk` cells, then
    ggml_flash_attn_ext_reduce_partials (compiled with contraction: the first product fused)."""
    acc_f, m_f, s_f = np.zeros(len(q), f32), f32(-np.inf), f32(0)
    for c0 in range(0, n_kv, chunk):
        acc, m, s_sum = chunk_twin(q, keys, values, c0, min(c0 + chunk, n_kv), n_kv, scale, window)
        if s_sum == 0:
            continue
        m_new = max(m_f, m)
        scale_old, scale_new = expf(f32(m_f - m_new)), expf(f32(m - m_new))
        acc_f = np.array([fma(acc_f[d], scale_old, f32(acc[d] * scale_new)) for d in range(len(q))], f32)
        s_f = fma(s_f, scale_old, f32(s_sum * scale_new))
        m_f = m_new
    return acc_f * (f32(1) / s_f)


def tiled_twin(q, keys, values, n_kv, scale, window):
    """ggml_compute_forward_flash_attn_ext_tiled for one token and head: q in f32, 64 cells a
    tile, scores and the V update as chains of FMAs (simd_gemm), the tile's exps (ggml's
    vectorized exp) summed 8 at a time into a double."""
    hd = len(q)
    m, s_sum = f32(-np.inf), f32(0)
    acc = np.zeros(hd, f32)
    for c0 in range(0, n_kv, 64):
        cells = [j for j in range(c0, c0 + 64) if visible(j, n_kv, window)]
        if not cells:
            continue
        kq = np.full(64, -np.inf, f32)
        for j in cells:
            dot = f32(0)
            for d in range(hd):
                dot = fma(q[d], keys[j, d], dot)
            kq[j - c0] = f32(dot * scale)
        m_new = max(m, kq.max())
        if m_new > m:
            ms = expf(f32(m - m_new))
            acc = (acc * ms).astype(f32)
            s_sum = f32(s_sum * ms)
        m = m_new
        e = np.array([expf_ggml(f32(x - m)) for x in kq], f32)
        s_sum = f32(np.float64(s_sum) + sum(np.float64(hsum8_twin(e[b:b + 8])) for b in range(0, 64, 8)))
        for j in cells:
            acc = np.array([fma(e[j - c0], values[j, d], acc[d]) for d in range(hd)], f32)
    return acc * (f32(1) / s_sum)


@pytest.mark.parametrize("path", ["one_chunk", "tiled", "split"])
@pytest.mark.parametrize("head_dim,window,q_scaled", [(8, 0, False), (48, 0, False), (64, 0, False),
                                                      (80, 0, False), (128, 0, False),
                                                      (64, 40, False), (256, 70, True)])
def test_attention_equals_ggml_order(head_dim, window, q_scaled, path):
    """window: a sliding-window layer (gemma3); q_scaled: q was scaled before, scores by 1;
    path: ggml's one_chunk (short ubatches), tiled (ubatches of >= 64 tokens) or split-KV (a
    lone decode token over >= 512 cells, here in runs of 48 cells)."""
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
    tiled = np.full(4, path == "tiled")
    kv_chunk = np.full(4, 48 if path == "split" else 0, np.int32)
    attention(q, cache.k[0], cache.v[0], seq_ids, positions, n_head, n_head_kv, head_dim, scale, window, tiled,
              kv_chunk, out)
    keys = k.astype(f16).astype(f32)
    values = v.astype(f16).astype(f32)
    for t in range(4):
        for h in range(n_head):
            kvh = h // (n_head // n_head_kv)
            cols = slice(kvh * head_dim, (kvh + 1) * head_dim)
            args = (q[t, h * head_dim:(h + 1) * head_dim], keys[seq_ids[t], :, cols], values[seq_ids[t], :, cols],
                    positions[t] + 1, scale, window)
            want = tiled_twin(*args) if path == "tiled" else split_twin(*args, 48) if path == "split" else twin(*args)
            np.testing.assert_array_equal(out[t, h * head_dim:(h + 1) * head_dim], want, err_msg=f"t={t} h={h}")


@pytest.mark.parametrize("head_dim,window,n_head,n_head_kv", [(64, 0, 4, 2), (48, 0, 6, 2), (64, 40, 4, 1),
                                                                (80, 0, 4, 4)])
def test_tiled_blocks_equal_each_token_alone(head_dim, window, n_head, n_head_kv):
    """A token's attention does not depend on the batch around it: in a batch of two sequences,
    with runs of consecutive tokens and a non-tiled token between them, every token's result is
    the one it gets alone (which test_attention_equals_ggml_order checks against ggml's order).
    Tiled tokens are attended in runs of consecutive tokens of one sequence, the query heads of
    a KV head together (runs of 8, 5, 4 and 16 tokens here, rows padded to GEMM_ROWS)."""
    rng = np.random.default_rng(7 + head_dim + window)
    n_ctx = 200
    hp = HParams("llama", 32, n_ctx, n_head * head_dim, 1, n_head, n_head_kv, 8, head_dim, head_dim,
                 10000.0, 1.0, 1e-5)
    cache = KVCache(hp, n_seq=2, n_ctx=n_ctx)
    for seq in range(2):
        k = rng.standard_normal((n_ctx, n_head_kv * head_dim)).astype(f32)
        v = rng.standard_normal((n_ctx, n_head_kv * head_dim)).astype(f32)
        cache.store(0, np.full(n_ctx, seq, np.int32), np.arange(n_ctx, dtype=np.int32), k, v)
    seq_ids = np.array([0] * 19 + [1] * 11 + [0] + [1] * 3, np.int32)
    positions = np.concatenate([np.arange(50, 69), np.arange(120, 131), [190], np.arange(180, 183)]).astype(np.int32)
    tiled = np.ones(len(seq_ids), bool)
    tiled[30] = False
    n = len(seq_ids)
    q = (rng.standard_normal((n, n_head * head_dim)) * 2).astype(f32)
    scale = f32(1.0) / f32(math.sqrt(f32(head_dim)))
    out = np.empty_like(q)
    attention(q, cache.k[0], cache.v[0], seq_ids, positions, n_head, n_head_kv, head_dim, scale, window, tiled,
              np.zeros(n, np.int32), out)
    for t in range(n):
        alone = np.empty((1, q.shape[1]), f32)
        attention(q[t:t + 1], cache.k[0], cache.v[0], seq_ids[t:t + 1], positions[t:t + 1], n_head, n_head_kv,
                  head_dim, scale, window, tiled[t:t + 1], np.zeros(1, np.int32), alone)
        np.testing.assert_array_equal(out[t], alone[0], err_msg=f"t={t}")


@njit
def _gemm_tile(c, a, b, k_lo, k_hi):
    gemm_tile(c, a, b, k_lo, k_hi)


@njit
def _row_max(rows, i):
    return row_max(rows, i)


@pytest.mark.parametrize("m,n,k,k_lo,k_hi", [(4, 64, 64, 0, 64), (16, 64, 8, 0, 8), (8, 80, 64, 5, 40),
                                             (4, 16, 64, 63, 64), (12, 128, 64, 7, 7)])
def test_gemm_tile_is_a_chain_of_fmas(m, n, k, k_lo, k_hi):
    """Every element of C gets one FMA per step of k, in order, from its own value: what
    ggml's simd_gemm does, whichever register blocks (GEMM_ROWS rows, vectors of LANES) take it."""
    assert m % GEMM_ROWS == 0 and n % LANES == 0
    rng = np.random.default_rng(m * n + k)
    a = rng.standard_normal((m, k)).astype(f32)
    b = rng.standard_normal((k, n)).astype(f32)
    c = rng.standard_normal((m, n)).astype(f32)
    want = c.copy()
    for i in range(m):
        for j in range(n):
            for kk in range(k_lo, k_hi):
                want[i, j] = fma(a[i, kk], b[kk, j], want[i, j])
    got = c.copy()
    _gemm_tile(got, a, b, k_lo, k_hi)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_row_max_is_the_largest_element():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((3, 64)).astype(f32)
    rows[1, 63] = 50.0           # in the last vector
    rows[2, :] = -np.inf         # a row of masked cells
    rows[0, 17] = 9.5
    for i in range(3):
        assert _row_max(rows, i) == rows[i].max()
    assert _row_max(np.zeros((1, 5), f32) - 1, 0) == -1.0   # a tail shorter than a vector
