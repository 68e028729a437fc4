"""The forward pass's other kernels: RMSNorm, RoPE, attention over the KV cache, SwiGLU.

Each follows the arithmetic of ggml's CPU ops (where it rounds to f16, where it sums in
double), because that is what makes our logits equal llama.cpp's and not just close.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


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
                x[t, j] = x0 * c - x1 * s
                x[t, j + 1] = x0 * s + x1 * c
            theta = theta * theta_scale


@njit(cache=True, nogil=True, inline="always")
def _round_f16(v):
    """f32 -> nearest f16 (ties to even) -> f32, on a uint32 view of the bits."""
    sign = v & np.uint32(0x80000000)
    a = v & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):          # inf or nan
        return v
    if a >= np.uint32(0x477FF000):          # rounds past 65504
        return sign | np.uint32(0x7F800000)
    if a >= np.uint32(0x38800000):          # normal f16: keep 10 mantissa bits
        lsb = (a >> np.uint32(13)) & np.uint32(1)
        return sign | ((a + np.uint32(0xFFF) + lsb) & np.uint32(0xFFFFE000))
    return np.uint32(0xFFFFFFFF)            # subnormal: caller rounds arithmetically


@njit(cache=True, nogil=True)
def round_f16_inplace(a):
    """Round every element of the f32 vector `a` to the nearest f16 value.  a: [n] f32"""
    bits = a.view(np.uint32)
    for i in range(a.shape[0]):
        r = _round_f16(bits[i])
        if r == np.uint32(0xFFFFFFFF):      # f16 subnormals are multiples of 2^-24
            a[i] = np.float32(np.rint(a[i] * np.float32(16777216.0)) / np.float32(16777216.0))
        else:
            bits[i] = r


@njit(cache=True, nogil=True, parallel=True)
def attention(q, k_cache, v_cache, seq_ids, positions, n_head, n_head_kv, head_dim, out):
    """Causal grouped-query attention of each token over its own sequence's cache.

    Mirrors ggml's CPU flash attention for an f16 cache: q is rounded to f16, scores are
    f16 x f16 dot products summed in double, the softmax is online (running max M and sum S)
    and the weighted sum of V is accumulated in f16, rounded after every step.

    q:        [T, n_head * head_dim] f32 (after RoPE)
    k_cache:  [n_seq, n_ctx, n_head_kv * head_dim] f32 holding f16 values (one layer)
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
        kv = (h // group) * head_dim
        s_id = seq_ids[t]
        qh = np.empty(head_dim, np.float32)
        for d in range(head_dim):
            qh[d] = q[t, h * head_dim + d]
        round_f16_inplace(qh)
        acc = np.zeros(head_dim, np.float32)   # the f16 accumulator of sum_j p_j * v_j
        m = -np.inf
        total = np.float32(0.0)
        for j in range(positions[t] + 1):
            dot = 0.0
            for d in range(head_dim):
                dot += np.float64(qh[d] * k_cache[s_id, j, kv + d])
            s = np.float32(dot) * scale
            ms = np.float32(1.0)
            vs = np.float32(1.0)
            if s > m:
                if m != -np.inf:
                    ms = np.float32(np.exp(np.float32(m - s)))
                    for d in range(head_dim):
                        acc[d] = acc[d] * ms
                    round_f16_inplace(acc)
                else:
                    ms = np.float32(0.0)
                m = s
            else:
                vs = np.float32(np.exp(np.float32(s - m)))
            for d in range(head_dim):
                acc[d] = acc[d] + v_cache[s_id, j, kv + d] * vs
            round_f16_inplace(acc)
            total = total * ms + vs
        inv = np.float32(1.0) / total
        for d in range(head_dim):
            out[t, h * head_dim + d] = acc[d] * inv


@njit(cache=True, nogil=True, fastmath=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, silu(x) = x / (1 + exp(-x)).  All [T, n_ff] f32."""
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]
