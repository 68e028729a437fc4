"""The optional GPU path: numba.cuda twins of the CPU kernels (install the `[cuda]` extra,
which brings the maintained `numba-cuda` package).

Each kernel computes one output element per GPU thread with the *same* operations in the same
order as its CPU twin (quants/kernels.py, ops.py): the lane order of ggml's dot products, FMAs
where ggml has them, f16 roundings in attention. So with the same inputs the GPU gives the
CPU's bits wherever the device's elementary functions agree (FMA, sqrt and f16 conversion are
correctly rounded on both; `expf` is not, so attention differs in the last bits).

Everything here also runs under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which is how
the tests check it on machines without a GPU.
"""
from __future__ import annotations

import math

import numpy as np
from numba import config, cuda

from .quants.kernels import TAIL_FUSED, TINYBLAS_ROWS

SIMULATED = bool(config.ENABLE_CUDASIM)

if SIMULATED:
    @cuda.jit(device=True)
    def fma(a, b, c):
        """f32 FMA, emulated exactly in float64 (the simulator's libdevice.fmaf is not usable)."""
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))

    @cuda.jit(device=True)
    def mul(a, b):
        return np.float32(a * b)
else:  # pragma: no cover - needs a GPU
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def fma(a, b, c):
        return libdevice.fmaf(a, b, c)

    @cuda.jit(device=True)
    def mul(a, b):
        """An f32 product rounded on its own: NVVM may not fuse it into a following add."""
        return libdevice.fmul_rn(a, b)


@cuda.jit(device=True)
def hsum8(l0, l1, l2, l3, l4, l5, l6, l7):
    return ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))


@cuda.jit(device=True)
def reduce4x8(lanes):
    """GGML_F32x8_REDUCE of 4 accumulators of 8 lanes (lanes[0:32]), as kernels.reduce4x8."""
    for i in range(8):
        lanes[i] = lanes[i] + lanes[16 + i]
        lanes[8 + i] = lanes[8 + i] + lanes[24 + i]
    for i in range(8):
        lanes[i] = lanes[i] + lanes[8 + i]
    return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))


@cuda.jit
def matmul_q32(xq, xd, xs, wq, wd, wm, has_min, whole_blocks, out):
    """Twin of quants.kernels.matmul_q32_lanes for 32-weight blocks (Q4_0 .. Q8_0), and with
    whole_blocks of the repacked Q4_0 order (one integer sum per block, one accumulator).

    xq: [T, NB, 32] int8; xd, xs: [T, NB] f32
    wq: [N, NB, 32] int8 (unpacked quants); wd, wm: [N, NB] f32; out: [T, N] f32
    One thread per (token, row)."""
    t, r = cuda.grid(2)
    if t >= out.shape[0] or r >= out.shape[1]:
        return
    l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = np.float32(0.0)
    summs = np.float32(0.0)
    for b in range(xq.shape[1]):
        d = wd[r, b] * xd[t, b]
        s = cuda.local.array(8, np.int32)
        for i in range(8):
            acc = 0
            for k in range(4):
                acc += np.int32(wq[r, b, 4 * i + k]) * np.int32(xq[t, b, 4 * i + k])
            s[i] = acc
        if whole_blocks:
            l0 = fma(np.float32(s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7]), d, l0)
            continue
        l0 = fma(d, np.float32(s[0]), l0)
        l1 = fma(d, np.float32(s[1]), l1)
        l2 = fma(d, np.float32(s[2]), l2)
        l3 = fma(d, np.float32(s[3]), l3)
        l4 = fma(d, np.float32(s[4]), l4)
        l5 = fma(d, np.float32(s[5]), l5)
        l6 = fma(d, np.float32(s[6]), l6)
        l7 = fma(d, np.float32(s[7]), l7)
        if has_min:
            summs = fma(wm[r, b], xs[t, b], summs)
    if whole_blocks:
        out[t, r] = l0
        return
    out[t, r] = hsum8(l0, l1, l2, l3, l4, l5, l6, l7) + summs


@cuda.jit
def matmul_kquant(xq, xd, bsums, wq, wsub, wd, wdmin, kind, offset, repacked, tiled, grouped, out):
    """Twin of quants/kquants.py: the K-quants in llama.cpp's orders, one thread per
    (token, row). kind: 0 Q4_K, 1 Q5_K, 2 the types with one scale per 16 weights (Q2_K with
    mins, wsub holding 32 values; Q3_K; Q6_K with offset 32). tiled, grouped: [T] bool.

    xq: [T, K] int8; xd: [T, n_super] f32; bsums: [T, n_super, 16] int32
    wq: [N, n_super, 256] int8; wsub: [N, n_super, 16 or 32] int32; wd, wdmin: [N, n_super] f32"""
    t, r = cuda.grid(2)
    if t >= out.shape[0] or r >= out.shape[1]:
        return
    lanes = cuda.local.array(8, np.float32)
    mins = cuda.local.array(4, np.float32)
    lane_sum = cuda.local.array(8, np.int32)
    group_dot = cuda.local.array(8, np.int32)
    for l in range(8):
        lanes[l] = 0
    for m in range(4):
        mins[m] = 0
    acc = np.float32(0.0)
    acc_min = np.float32(0.0)
    group = 32 if kind < 2 else 16
    has_min = kind < 2 or wsub.shape[2] == 32
    for s in range(wq.shape[1]):
        for l in range(8):
            lane_sum[l] = 0
            group_dot[l] = 0
        for e in range(256):
            p = np.int32(wq[r, s, e]) * np.int32(xq[t, s * 256 + e])
            lane_sum[(e % 32) // 4] += wsub[r, s, e // group] * p
            group_dot[e // 32] += p
        yd = xd[t, s]
        d_w = wd[r, s]
        dmin_w = wdmin[r, s]
        if kind == 2:
            s1 = 0
            s2 = 0
            for l in range(8):
                if offset:
                    lane_sum[l] -= offset * (bsums[t, s, 2 * l] * wsub[r, s, 2 * l]
                                             + bsums[t, s, 2 * l + 1] * wsub[r, s, 2 * l + 1])
                s1 += lane_sum[l]
            if tiled[t]:
                res = d_w * np.float32(s1)
                if has_min:
                    for l in range(8):
                        s2 += wsub[r, s, 16 + 2 * l] * bsums[t, s, 2 * l] + wsub[r, s, 17 + 2 * l] * bsums[t, s, 2 * l + 1]
                    res = fma(-dmin_w, np.float32(s2), res)
                acc = fma(res, yd, acc)
                continue
            for l in range(8):
                if has_min:
                    pair = wsub[r, s, 16 + 2 * l] * bsums[t, s, 2 * l] + wsub[r, s, 17 + 2 * l] * bsums[t, s, 2 * l + 1]
                    lanes[l] = fma(-yd * dmin_w, np.float32(pair), lanes[l])
                lanes[l] = fma(yd * d_w, np.float32(lane_sum[l]), lanes[l])
            continue
        if repacked and grouped[t]:   # ggml_gemm_q4_K_8x8_q8_K: one FMA per 64 weights
            for c in range(4):
                s1 = 0
                s2 = 0
                for g in range(2 * c, 2 * c + 2):
                    s1 += wsub[r, s, g] * group_dot[g]
                    s2 += wsub[r, s, 8 + g] * (bsums[t, s, 2 * g] + bsums[t, s, 2 * g + 1])
                acc = fma(np.float32(s1), d_w * yd, acc)
                acc_min = fma(np.float32(s2), dmin_w * yd, acc_min)
            continue
        s1 = 0
        s2 = 0
        for l in range(8):
            s1 += lane_sum[l]
        for g in range(8):
            s2 += wsub[r, s, 8 + g] * (bsums[t, s, 2 * g] + bsums[t, s, 2 * g + 1])
        if repacked:
            acc = fma(np.float32(s1), d_w * yd, acc)
            acc_min = fma(np.float32(s2), dmin_w * yd, acc_min)
        elif tiled[t]:
            acc = fma(fma(-dmin_w, np.float32(s2), d_w * np.float32(s1)), yd, acc)
        else:
            for l in range(8):
                lanes[l] = fma(yd * d_w, np.float32(lane_sum[l]), lanes[l])
            if kind == 1:
                acc_min = fma(-yd * dmin_w, np.float32(s2), acc_min)
            else:
                for m in range(4):
                    pair = (wsub[r, s, 8 + 2 * m] * (bsums[t, s, 4 * m] + bsums[t, s, 4 * m + 1])
                            + wsub[r, s, 9 + 2 * m] * (bsums[t, s, 4 * m + 2] + bsums[t, s, 4 * m + 3]))
                    mins[m] = fma(-yd * dmin_w, np.float32(pair), mins[m])
    lane_total = hsum8(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7])
    if kind == 2:
        out[t, r] = acc if tiled[t] else lane_total
    elif repacked:
        out[t, r] = acc - acc_min
    elif tiled[t]:
        out[t, r] = acc
    elif kind == 1:
        out[t, r] = lane_total + acc_min
    else:
        out[t, r] = lane_total + ((mins[0] + mins[2]) + (mins[1] + mins[3]))


@cuda.jit
def matmul_float(x, w, tinyblas_rows, tail_in_double, out):
    """Twin of quants.kernels.matmul_float: tinyBLAS order for prompt tokens (K % 8 == 0),
    ggml_vec_dot order otherwise.  x: [T, K] f32; w: [N, K] f32; out: [T, N] f32"""
    t, r = cuda.grid(2)
    if t >= out.shape[0] or r >= out.shape[1]:
        return
    n_cols = x.shape[1]
    lanes = cuda.local.array(32, np.float32)
    if n_cols % 8 == 0 and w.shape[0] % TINYBLAS_ROWS == 0 and tinyblas_rows[t]:
        for i in range(8):
            lanes[i] = 0
        for l in range(0, n_cols, 8):
            for i in range(8):
                lanes[i] = fma(w[r, l + i], x[t, l + i], lanes[i])
        out[t, r] = hsum8(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7])
        return
    n_simd = n_cols - n_cols % 32
    for i in range(32):
        lanes[i] = 0
    for l in range(0, n_simd, 32):
        for i in range(32):
            lanes[i] = fma(w[r, l + i], x[t, l + i], lanes[i])
    total = reduce4x8(lanes) if n_simd else np.float32(0.0)
    if tail_in_double:
        wide = np.float64(total)
        for k in range(n_simd, n_cols):
            wide += np.float64(w[r, k] * x[t, k])
        out[t, r] = np.float32(wide)
    else:
        n_rounded = n_cols - n_cols % TAIL_FUSED
        for k in range(n_simd, n_rounded):   # products rounded, then added, as on the CPU
            total = total + mul(w[r, k], x[t, k])
        for k in range(n_rounded, n_cols):   # the last K % 4 fused (quants.kernels.TAIL_FUSED)
            total = fma(w[r, k], x[t, k], total)
        out[t, r] = total


@cuda.jit
def rms_norm(x, weight, eps, out):
    """Twin of ops.rms_norm: squares in f32, summed in double.  One thread per token."""
    t = cuda.grid(1)
    if t >= x.shape[0]:
        return
    total = 0.0
    for i in range(x.shape[1]):
        total += np.float64(x[t, i] * x[t, i])
    mean = np.float32(total / x.shape[1])
    scale = np.float32(1.0) / math.sqrt(mean + np.float32(eps))
    for i in range(x.shape[1]):
        out[t, i] = (x[t, i] * np.float32(scale)) * weight[i]


@cuda.jit(device=True)
def round_f16(v):
    return np.float32(np.float16(v))


@cuda.jit
def attention(q, k_cache, v_cache, seq_ids, positions, n_head, n_head_kv, head_dim, scale, window,
              scores, out):
    """Twin of ops.attention (ggml's flash attention with an f16 cache): one thread per
    (token, head) over positions max(0, pos - window + 1) .. pos (all up to pos when window is
    0); f16 dot products (lane order for head_dim >= 32), online softmax, f16 accumulator with FMA.  k_cache: [n_seq, n_kv, n_chunks, hd, k_chunk] f16 (as on the host);
    v_cache: [n_seq, n_kv, n_ctx, hd] f16;
    scores: [T * n_head, n_ctx] f32 scratch; out: [T, n_head * hd] f32"""
    job = cuda.grid(1)
    if job >= q.shape[0] * n_head:
        return
    t = job // n_head
    h = job % n_head
    kvh = h // (n_head // n_head_kv)
    s_id = seq_ids[t]
    n_kv = positions[t] + 1
    first = 0
    if window > 0 and n_kv > window:
        first = n_kv - window
    k_chunk = k_cache.shape[4]
    lanes = cuda.local.array(32, np.float32)
    n_simd = head_dim - head_dim % 32
    for j in range(first, n_kv):
        for i in range(32):
            lanes[i] = 0
        for l in range(0, n_simd, 32):
            for i in range(32):
                key = np.float32(k_cache[s_id, kvh, j // k_chunk, l + i, j % k_chunk])
                lanes[i] = fma(round_f16(q[t, h * head_dim + l + i]), key, lanes[i])
        total = np.float64(reduce4x8(lanes)) if n_simd else 0.0
        for d in range(n_simd, head_dim):
            key = np.float32(k_cache[s_id, kvh, j // k_chunk, d, j % k_chunk])
            total += np.float64(round_f16(q[t, h * head_dim + d]) * key)
        scores[job, j] = np.float32(total) * scale
    m = scores[job, first]
    s_total = np.float32(1.0)
    for d in range(head_dim):
        out[t, h * head_dim + d] = np.float32(v_cache[s_id, kvh, first, d])
    for j in range(first + 1, n_kv):
        sj = scores[job, j]
        ms = np.float32(1.0)
        vs = np.float32(1.0)
        if sj > m:
            ms = np.float32(math.exp(np.float32(m - sj)))
            m = sj
            for d in range(head_dim):
                out[t, h * head_dim + d] = round_f16(out[t, h * head_dim + d] * ms)
        else:
            vs = np.float32(math.exp(np.float32(sj - m)))
        s_total = fma(s_total, ms, vs)
        for d in range(head_dim):
            out[t, h * head_dim + d] = round_f16(fma(np.float32(v_cache[s_id, kvh, j, d]), vs,
                                                     out[t, h * head_dim + d]))
    inv = np.float32(1.0) / s_total
    for d in range(head_dim):
        out[t, h * head_dim + d] = out[t, h * head_dim + d] * inv
