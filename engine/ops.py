"""The forward pass's other kernels: RMSNorm, RoPE, attention over the KV cache, SwiGLU.

Each follows the arithmetic of ggml's CPU ops (where it rounds to f16, where it sums in
double), because that is what makes our logits equal llama.cpp's and not just close.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .float_ops import expf_ggml, f16_bits_of, f16_to_f32, fma, round_f16


@njit(cache=True, nogil=True)
def rms_norm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight.  Each square is an f32 product,
    summed in double, as in ggml_compute_forward_rms_norm_f32.

    x: [T, D] f32; weight: [D] f32; out: [T, D] f32
    """
    n_tokens, dim = x.shape
    for t in range(n_tokens):
        total = 0.0  # float64
        for i in range(dim):
            total += np.float64(x[t, i] * x[t, i])
        mean = np.float32(total / dim)
        scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
        for i in range(dim):
            out[t, i] = (x[t, i] * scale) * weight[i]


@njit(cache=True, nogil=True)
def rope(x, positions, n_heads, head_dim, n_rot, freq_base, freq_scale):
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by angle pos * base^(-2i/n_rot),
    in place (llama's "normal" RoPE mode). The angle is built by repeated f32 multiplication,
    as ggml's rope cache does.

    x: [T, n_heads * head_dim] f32; positions: [T] i32
    """
    theta_scale = np.float32(freq_base) ** (np.float32(-2.0) / np.float32(n_rot))
    for t in range(x.shape[0]):
        theta = np.float32(positions[t])
        for i in range(0, n_rot, 2):
            angle = np.float32(freq_scale) * theta
            c = np.float32(np.cos(angle))
            s = np.float32(np.sin(angle))
            for h in range(n_heads):
                j = h * head_dim + i
                x0 = x[t, j]
                x1 = x[t, j + 1]
                # ggml's C is compiled with FP contraction: the first product is fused
                x[t, j] = fma(x0, c, -(x1 * s))
                x[t, j + 1] = fma(x0, s, x1 * c)
            theta = theta * theta_scale


@njit(cache=True, nogil=True)
def store_f16(cache_layer, seq_ids, positions, rows, n_head_kv, head_dim):
    """Write rows [T, n_head_kv * head_dim] as f16 bits into cache_layer
    [n_seq, n_head_kv, n_ctx, head_dim] uint16 at (seq_ids[t], :, positions[t])."""
    for t in range(rows.shape[0]):
        for h in range(n_head_kv):
            for d in range(head_dim):
                cache_layer[seq_ids[t], h, positions[t], d] = f16_bits_of(rows[t, h * head_dim + d])


@njit(cache=True, nogil=True)
def widen_f16(bits, out):
    """out[i] = the f16 value stored in bits[i].  bits: [n] uint16; out: [n] f32"""
    for i in range(bits.shape[0]):
        out[i] = f16_to_f32(bits[i])


@njit(cache=True, nogil=True, inline="always")
def _dot_f16(qh, k_row, head_dim, lanes):
    """ggml_vec_dot_f16 on AVX2: blocks of 32 go through 4 accumulators of 8 lanes (FMA),
    reduced as GGML_F32x8_REDUCE; the tail (head_dim % 32) is summed in double.
    lanes: [32] f32 scratch."""
    n_simd = head_dim - head_dim % 32
    total = 0.0
    if n_simd:
        lanes[:] = 0
        for i in range(0, n_simd, 32):
            for l in range(32):
                lanes[l] = fma(qh[i + l], k_row[i + l], lanes[l])
        for l in range(8):
            lanes[l] = lanes[l] + lanes[16 + l]
            lanes[8 + l] = lanes[8 + l] + lanes[24 + l]
        for l in range(8):
            lanes[l] = lanes[l] + lanes[8 + l]
        t0 = lanes[0] + lanes[4]
        t1 = lanes[1] + lanes[5]
        t2 = lanes[2] + lanes[6]
        t3 = lanes[3] + lanes[7]
        total = np.float64((t0 + t1) + (t2 + t3))
    for d in range(n_simd, head_dim):
        total += np.float64(qh[d] * k_row[d])
    return np.float32(total)


@njit(cache=True, nogil=True, parallel=True)
def attention(q, k_cache, v_cache, seq_ids, positions, n_head, n_head_kv, head_dim, out):
    """Causal grouped-query attention of each token over its own sequence's cache.

    Mirrors ggml's CPU flash attention for an f16 cache (one_chunk): q is rounded to f16,
    scores are f16 x f16 dot products, the softmax is online (running max M and sum S) and the
    weighted sum of V is accumulated in f16 with FMA, rounded after every step. Done in three
    passes with the same arithmetic: all scores, then the scalar recurrence of M and S, then
    the V accumulation (vectorized across head_dim).

    q:        [T, n_head * head_dim] f32 (after RoPE)
    k_cache:  [n_seq, n_head_kv, n_ctx, head_dim] uint16, f16 bits (one layer)
    v_cache:  same shape as k_cache
    seq_ids:  [T] i32  which cache row each token reads
    positions:[T] i32  the token attends to cache positions 0..positions[t]
    out:      [T, n_head * head_dim] f32
    """
    n_tokens = q.shape[0]
    group = n_head // n_head_kv
    scale = np.float32(1.0) / np.sqrt(np.float32(head_dim))
    for job in prange(n_tokens * n_head):
        t = job // n_head
        h = job % n_head
        keys = k_cache[seq_ids[t], h // group]       # [n_ctx, head_dim]
        values = v_cache[seq_ids[t], h // group]     # [n_ctx, head_dim]
        n_kv = positions[t] + 1
        lanes = np.empty(32, np.float32)
        row = np.empty(head_dim, np.float32)
        qh = np.empty(head_dim, np.float32)
        for d in range(head_dim):
            qh[d] = round_f16(q[t, h * head_dim + d])
        # 1. scores
        scores = np.empty(n_kv, np.float32)
        for j in range(n_kv):
            widen_f16(keys[j], row)
            scores[j] = _dot_f16(qh, row, head_dim, lanes) * scale
        # 2. online softmax: ms[j] rescales the accumulator, vs[j] weighs v_j
        ms = np.empty(n_kv, np.float32)
        vs = np.empty(n_kv, np.float32)
        m = scores[0]
        ms[0] = np.float32(0.0)
        vs[0] = np.float32(1.0)
        total = np.float32(1.0)
        for j in range(1, n_kv):
            sj = scores[j]
            if sj > m:
                ms[j] = np.float32(np.exp(np.float32(m - sj)))
                vs[j] = np.float32(1.0)
                m = sj
            else:
                ms[j] = np.float32(1.0)
                vs[j] = np.float32(np.exp(np.float32(sj - m)))
            total = fma(total, ms[j], vs[j])
        # 3. the f16 accumulator of sum_j p_j * v_j
        acc = np.zeros(head_dim, np.float32)
        for j in range(n_kv):
            if ms[j] != np.float32(1.0) and j > 0:
                for d in range(head_dim):
                    acc[d] = round_f16(acc[d] * ms[j])
            w = vs[j]
            if w < np.float32(1e-30):
                continue   # w * |v| < 2^-80: cannot move an f16 accumulator, and sum S is >= 1
            widen_f16(values[j], row)
            for d in range(head_dim):
                acc[d] = round_f16(fma(row[d], w, acc[d]))
        inv = np.float32(1.0) / total
        for d in range(head_dim):
            out[t, h * head_dim + d] = acc[d] * inv


@njit(cache=True, nogil=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, silu(x) = x / (1 + exp(-x)), as ggml_vec_swiglu_f32 on AVX2:
    groups of 8 use ggml's vectorised exp, the tail (n_ff % 8) libm's expf.
    All [T, n_ff] f32."""
    n = gate.shape[1]
    n_simd = n - n % 8
    one = np.float32(1.0)
    for t in range(gate.shape[0]):
        for i in range(n_simd):
            g = gate[t, i]
            out[t, i] = (g / (one + expf_ggml(np.float32(0.0) - g))) * up[t, i]
        for i in range(n_simd, n):
            g = gate[t, i]
            out[t, i] = (g / (one + np.float32(np.exp(-g)))) * up[t, i]
