"""The K-quants (Q2_K .. Q6_K) times Q8_K activations, in the order llama.cpp's AVX2 kernels add.

A K-quant super-block holds 256 weights in sub-blocks (of 16 or 32) with small integer scales
(and, for Q2_K/Q4_K/Q5_K, integer mins) under one f16 scale. llama.cpp keeps the sub-block
scales as integers: products are summed exactly as integers, and only then scaled in floats.
Which integers are summed together, and how the floats are added, depends on the path
llama.cpp takes, and these kernels copy each of them:

1. ggml_vec_dot_qN_K_q8_K (decoding, short prompts). 8 lanes: lane l of a super-block is the
   integer sum, over its 32-weight groups g, of scale * q * y for weights 32g+4l..32g+4l+3;
   lane = fma(d_y * d_w, float(lane sum), lane), and the result is hsum8 of the lanes. Then:
   * Q6_K: its quants are u6 - 32; the lane sum takes out 32 * (bsum[2l] * sc[2l] +
     bsum[2l+1] * sc[2l+1]). Q3_K: signed quants, nothing to take out.
   * Q2_K: before the scaled quants, its mins enter the same lanes:
     lane = fma(-d_y * dmin_w, float(min_2l * bsum_2l + min_2l+1 * bsum_2l+1), lane).
   * Q4_K: 4 more lanes of min pairs, fma(-d_y * dmin_w, float(min_2m * ysum_2m +
     min_2m+1 * ysum_2m+1), .); the result is hsum8(lanes) + ((m0 + m2) + (m1 + m3)).
   * Q5_K: its mins go to one scalar, summs = fma(-d_y * dmin_w, float(sum_s min_s * ysum_s),
     summs), added to hsum8(lanes).
2. Repacked Q4_K (llama.cpp repacks Q4_K matrices of 8k rows on AVX2): per super-block
   I = sum_s scale_s * (q4 . y)_s and M = sum_s min_s * ysum_s, acc = fma(float(I), d_w * d_y,
   acc), acc_min = fma(float(M), dmin_w * d_y, acc_min), result acc - acc_min
   (ggml_gemv_q4_K_8x8_q8_K). Tokens it takes in groups of 4 (ggml_gemm_q4_K_8x8_q8_K: the
   first n - n % 4 of a batch) get one FMA per 64 weights instead of one per super-block.
3. Prompt passes of 8 tokens or more (ggml-cpu's tiled K-quant matmul, matrices not
   repacked): per super-block one integer s1 (and s2 = sum of mins * ysums where there are
   mins), res = d_w * float(s1) (minus dmin_w * float(s2) in one FMA), acc = fma(res, d_y, acc).

The blocks are unpacked once at load (pack_k): one int8 per weight, integer sub-block scales,
and the super-block scales widened to f32, in tiles of 32 rows; the integer loops run in
simd.k_lane_sums on AVX2. Checked against an AVX2 build of llama-server with
bench/compare_tokens.py, and against NumPy twins of these orders in tests/test_kquants.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..float_ops import fma
from .blocks import QK_K
from .kernels import ROW_TILE, hsum8, tile_rows
from .simd import AVX2   # the integer loops in simd.py (vpmaddubsw), else the portable ones below
from .simd import k_lane_sums_16, k_lane_sums_32


@njit(cache=True, nogil=True)
def quantize_q8_k_rows(x, xq, xd, bsums):
    """ggml's quantize_row_q8_K_ref: per super-block of 256, iscale = -127 / v (v the value of
    largest magnitude), q = min(127, round-half-even(iscale * x)), d = 1 / iscale, and the sums of
    each 16 quants (bsums).  x: [T, K] f32; xq: [T, K] int8; xd: [T, K/256] f32;
    bsums: [T, K/256, 16] int32"""
    n_tokens, n_cols = x.shape
    for t in range(n_tokens):
        for s in range(n_cols // QK_K):
            base = s * QK_K
            vmax = np.float32(0.0)
            amax = np.float32(0.0)
            for j in range(QK_K):
                v = x[t, base + j]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if amax == 0:
                xq[t, base:base + QK_K] = 0
                xd[t, s] = 0
                bsums[t, s, :] = 0
                continue
            iscale = np.float32(-127.0) / vmax
            for j in range(QK_K):
                xq[t, base + j] = min(127, np.int32(np.rint(iscale * x[t, base + j])))
            for g in range(16):
                total = 0
                for j in range(16):
                    total += np.int32(xq[t, base + 16 * g + j])
                bsums[t, s, g] = total
            xd[t, s] = np.float32(1.0) / iscale


def unpack_k(type_name: str, raw: np.ndarray, n_rows: int, n_cols: int):
    """The integers of K-quant blocks, row-major: q [N, n_super, 256] int8 (Q2_K/Q4_K/Q5_K
    unsigned, Q3_K signed, Q6_K the unsigned u6), sub [N, n_super, 16 or 32] int32 (scales, then
    Q2_K's 16 or Q4_K/Q5_K's 8 mins), d and dmin [N, n_super] f32 (dmin zero without mins)."""
    from . import blocks
    n_super = n_cols // QK_K
    bb, _ = blocks.BLOCK_SIZES[type_name]
    flat = np.asarray(raw, np.uint8).reshape(n_rows * n_super, bb)
    sub = np.zeros((n_rows * n_super, 32 if type_name == "Q2_K" else 16), np.int32)
    if type_name == "Q2_K":     # 16 four-bit scales, then 16 four-bit mins
        q, _, _, _ = blocks.unpack_q2_k(flat)
        sub[:, :16], sub[:, 16:] = flat[:, 0:16] & 0x0F, flat[:, 0:16] >> 4
        d, dmin = blocks._f16(flat, 80), blocks._f16(flat, 82)
    elif type_name in ("Q4_K", "Q5_K"):
        q, _, _, _ = (blocks.unpack_q4_k if type_name == "Q4_K" else blocks.unpack_q5_k)(flat)
        sc, mn = blocks._k4_scales_mins(flat[:, 4:16])
        sub[:, :8], sub[:, 8:] = sc, mn
        d, dmin = blocks._f16(flat, 0), blocks._f16(flat, 2)
    elif type_name == "Q3_K":   # signed quants (-4..3) and scales (-32..31), as ggml sums them
        q, _, _, _ = blocks.unpack_q3_k(flat)
        sub[:] = blocks._q3_k_scales(flat[:, 96:108])
        d, dmin = blocks._f16(flat, 108), np.zeros((n_rows * n_super, 1), np.float32)
    else:
        q, _, _, _ = blocks.unpack_q6_k(flat)
        q = q + np.int8(32)
        sub[:] = np.ascontiguousarray(flat[:, 192:208]).view(np.int8)
        d, dmin = blocks._f16(flat, 208), np.zeros((n_rows * n_super, 1), np.float32)
    return (q.reshape(n_rows, n_super, QK_K), sub.reshape(n_rows, n_super, -1),
            d.reshape(n_rows, n_super), dmin.reshape(n_rows, n_super))


def pack_k(type_name: str, raw: np.ndarray, n_rows: int, n_cols: int):
    """unpack_k's arrays in tiles of ROW_TILE rows, as the kernels read them:
    q [n_tiles, n_super, 256, ROW_TILE] int8 (on AVX2 [n_tiles, n_super, 8, 8, ROW_TILE, 4], see
    simd.k_lane_sums), sub [n_tiles, n_super, 16 or 32, ROW_TILE], d and dmin [n_tiles, n_super, ROW_TILE]."""
    q, sub, d, dmin = unpack_k(type_name, raw, n_rows, n_cols)
    n_super = n_cols // QK_K
    q = tile_rows(q)                                                  # [tiles, n_super, 256, ROW_TILE]
    if AVX2:   # -> [tiles, n_super, 8 sub-blocks, 8 lanes, ROW_TILE, 4 weights] for simd.k_lane_sums
        q = np.ascontiguousarray(q.reshape(q.shape[0], n_super, 8, 8, 4, ROW_TILE).transpose(0, 1, 2, 3, 5, 4))
    return q, tile_rows(sub), tile_rows(d), tile_rows(dmin)


@njit(cache=True, nogil=True, inline="always")
def _group_dots(q, y, group_dot):
    """group_dot[g, r] = sum of q[e, r] * y[e] over sub-block g (32 weights), for ROW_TILE rows.
    q: [256, ROW_TILE] int8; y: [256] int8; group_dot: [8, ROW_TILE] int32"""
    group_dot[:, :] = 0
    for e in range(QK_K):
        ye = np.int32(y[e])
        qe = q[e]
        gd = group_dot[e // 32]
        for r in range(ROW_TILE):
            gd[r] += np.int32(np.int32(qe[r]) * ye)


@njit(cache=True, nogil=True, inline="always")
def _lane_sums(q, sub, group, y, quad, lane_sum):
    """For ROW_TILE rows at once: lane_sum[l, r] = sum over the weights e of ggml's AVX2 lane l
    (elements 4l..4l+3 of every group of 32) of scale(e, r) * q[e, r] * y[e], the scale being
    sub[e // group, r]. Exact integers. Every loop runs across rows (contiguous).
    q: [256, ROW_TILE] int8; sub: [16, ROW_TILE] int32; y: [256] int8; quad: [ROW_TILE] int32 scratch;
    lane_sum: [8, ROW_TILE] int32"""
    lane_sum[:, :] = 0
    for g in range(QK_K // 32):
        for l in range(8):
            e = 32 * g + 4 * l
            y0, y1, y2, y3 = np.int32(y[e]), np.int32(y[e + 1]), np.int32(y[e + 2]), np.int32(y[e + 3])
            q0, q1, q2, q3 = q[e], q[e + 1], q[e + 2], q[e + 3]
            sc = sub[e // group]
            ls = lane_sum[l]
            for r in range(ROW_TILE):
                quad[r] = np.int32(np.int32(q0[r]) * y0 + np.int32(q1[r]) * y1
                                   + np.int32(q2[r]) * y2 + np.int32(q3[r]) * y3)
            for r in range(ROW_TILE):
                ls[r] += np.int32(sc[r] * quad[r])


@njit(cache=True, nogil=True, inline="always")
def _group_dots_simd(q, y, group_dot):
    """_group_dots for the SIMD layout, q: [8, 8, ROW_TILE, 4] int8."""
    group_dot[:, :] = 0
    for g in range(8):
        gd = group_dot[g]
        for i in range(8):
            for k in range(4):
                ye = np.int32(y[32 * g + 4 * i + k])
                for r in range(ROW_TILE):
                    gd[r] += np.int32(np.int32(q[g, i, r, k]) * ye)


if AVX2:
    @njit(cache=True, nogil=True, inline="always")
    def lane_sums(wq, wsub, tile, s, xq, t, group, quad, lane_sum):
        """Lane sums of super-block s of a tile for token t (see _lane_sums), in AVX2."""
        if group == 32:
            k_lane_sums_32(wq, wsub, tile, s, xq, t, lane_sum)
        else:
            k_lane_sums_16(wq, wsub, tile, s, xq, t, lane_sum)

    @njit(cache=True, nogil=True, inline="always")
    def group_dots(wq, tile, s, xq, t, group_dot):
        _group_dots_simd(wq[tile, s], xq[t, s * QK_K:(s + 1) * QK_K], group_dot)
else:
    @njit(cache=True, nogil=True, inline="always")
    def lane_sums(wq, wsub, tile, s, xq, t, group, quad, lane_sum):
        """Lane sums of super-block s of a tile for token t (see _lane_sums)."""
        _lane_sums(wq[tile, s], wsub[tile, s], group, xq[t, s * QK_K:(s + 1) * QK_K], quad, lane_sum)

    @njit(cache=True, nogil=True, inline="always")
    def group_dots(wq, tile, s, xq, t, group_dot):
        _group_dots(wq[tile, s], xq[t, s * QK_K:(s + 1) * QK_K], group_dot)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_k(xq, xd, bsums, wq, wsub, wd, wdmin, repacked, tiled, grouped, q5, out):
    """out[t, r] = row r of a Q4_K (or, with q5, Q5_K) matrix (pack_k) times Q8_K activations
    (quantize_q8_k_rows), in llama.cpp's order (module docstring).
    wq: [n_tiles, n_super, 256, ROW_TILE] int8; wsub: [n_tiles, n_super, 16, ROW_TILE] int32;
    wd, wdmin: [n_tiles, n_super, ROW_TILE] f32; out: [T, n_tiles * ROW_TILE]"""
    n_tokens = xq.shape[0]
    n_tiles, n_super = wq.shape[0], wq.shape[1]
    for tile in prange(n_tiles):
        lanes = np.empty((8, ROW_TILE), np.float32)
        mins = np.empty((4, ROW_TILE), np.float32)
        acc = np.empty(ROW_TILE, np.float32)
        acc_min = np.empty(ROW_TILE, np.float32)
        lane_sum = np.empty((8, ROW_TILE), np.int32)
        quad = np.empty(ROW_TILE, np.int32)
        s1 = np.empty(ROW_TILE, np.int32)
        s2 = np.empty(ROW_TILE, np.int32)
        group_dot = np.empty((8, ROW_TILE), np.int32)
        for t in range(n_tokens):
            acc[:] = 0
            acc_min[:] = 0
            lanes[:, :] = 0
            mins[:, :] = 0
            for s in range(n_super):
                sub = wsub[tile, s]
                yd = xd[t, s]
                d_w, dmin_w = wd[tile, s], wdmin[tile, s]
                if repacked and grouped[t]:
                    group_dots(wq, tile, s, xq, t, group_dot)
                else:
                    lane_sums(wq, wsub, tile, s, xq, t, 32, quad, lane_sum)
                if repacked and grouped[t]:   # ggml_gemm_q4_K_8x8_q8_K: one FMA per 64 weights
                    for c in range(4):
                        s1[:] = 0
                        s2[:] = 0
                        for g in (2 * c, 2 * c + 1):
                            sg, mg = sub[g], sub[8 + g]
                            ysum = np.int32(bsums[t, s, 2 * g] + bsums[t, s, 2 * g + 1])
                            for r in range(ROW_TILE):
                                s1[r] += np.int32(sg[r] * group_dot[g, r])
                                s2[r] += np.int32(mg[r] * ysum)
                        for r in range(ROW_TILE):
                            acc[r] = fma(np.float32(s1[r]), d_w[r] * yd, acc[r])
                            acc_min[r] = fma(np.float32(s2[r]), dmin_w[r] * yd, acc_min[r])
                elif repacked or tiled[t]:
                    s1[:] = 0
                    s2[:] = 0
                    for l in range(8):
                        ls = lane_sum[l]
                        for r in range(ROW_TILE):
                            s1[r] += ls[r]
                    for g in range(8):
                        ysum = np.int32(bsums[t, s, 2 * g] + bsums[t, s, 2 * g + 1])
                        mg = sub[8 + g]
                        for r in range(ROW_TILE):
                            s2[r] += np.int32(mg[r] * ysum)
                    if repacked:   # ggml_gemv_q4_K_8x8_q8_K
                        for r in range(ROW_TILE):
                            acc[r] = fma(np.float32(s1[r]), d_w[r] * yd, acc[r])
                            acc_min[r] = fma(np.float32(s2[r]), dmin_w[r] * yd, acc_min[r])
                    else:          # tiled: res = d_w * s1 - dmin_w * s2 (one rounding), acc += res * d_y
                        for r in range(ROW_TILE):
                            res = fma(-dmin_w[r], np.float32(s2[r]), d_w[r] * np.float32(s1[r]))
                            acc[r] = fma(res, yd, acc[r])
                else:              # ggml_vec_dot_q4_K_q8_K / _q5_K_q8_K
                    for l in range(8):
                        lane, ls = lanes[l], lane_sum[l]
                        for r in range(ROW_TILE):
                            lane[r] = fma(yd * d_w[r], np.float32(ls[r]), lane[r])
                    if q5:         # Q5_K: one scalar sum of the mins, summs += dmin * M
                        s2[:] = 0
                        for g in range(8):
                            ysum = np.int32(bsums[t, s, 2 * g] + bsums[t, s, 2 * g + 1])
                            mg = sub[8 + g]
                            for r in range(ROW_TILE):
                                s2[r] += np.int32(mg[r] * ysum)
                        for r in range(ROW_TILE):
                            acc_min[r] = fma(-yd * dmin_w[r], np.float32(s2[r]), acc_min[r])
                        continue
                    for m in range(4):
                        y_a = np.int32(bsums[t, s, 4 * m] + bsums[t, s, 4 * m + 1])
                        y_b = np.int32(bsums[t, s, 4 * m + 2] + bsums[t, s, 4 * m + 3])
                        m_a, m_b, mm = sub[8 + 2 * m], sub[8 + 2 * m + 1], mins[m]
                        for r in range(ROW_TILE):
                            pair = np.int32(m_a[r] * y_a + m_b[r] * y_b)
                            mm[r] = fma(-yd * dmin_w[r], np.float32(pair), mm[r])
            o = out[t, tile * ROW_TILE:(tile + 1) * ROW_TILE]
            for r in range(ROW_TILE):
                if repacked:
                    o[r] = acc[r] - acc_min[r]
                elif tiled[t]:
                    o[r] = acc[r]
                else:
                    o[r] = hsum8(lanes[:, r]) + (acc_min[r] if q5 else (mins[0, r] + mins[2, r]) + (mins[1, r] + mins[3, r]))


@njit(cache=True, nogil=True, parallel=True)
def matmul_k16(xq, xd, bsums, wq, wsub, wd, wdmin, offset, tiled, out):
    """out[t, r] = row r of a K-quant matrix with one scale per 16 weights and no minimum
    (pack_k: Q6_K, offset 32, its quants stored unsigned; Q3_K, offset 0, signed) or with
    16 mins too (Q2_K: wsub holds 16 scales then 16 mins) times Q8_K activations, in the order
    of ggml_vec_dot_q{6,3,2}_K_q8_K on AVX2, or of the tiled kernel for long prompt passes.
    wq: [n_tiles, n_super, 256, ROW_TILE] int8; wsub: [n_tiles, n_super, 16, ROW_TILE] int32;
    wd: [n_tiles, n_super, ROW_TILE] f32; out: [T, n_tiles * ROW_TILE]"""
    n_tokens = xq.shape[0]
    n_tiles, n_super = wq.shape[0], wq.shape[1]
    for tile in prange(n_tiles):
        lanes = np.empty((8, ROW_TILE), np.float32)
        acc = np.empty(ROW_TILE, np.float32)
        lane_sum = np.empty((8, ROW_TILE), np.int32)
        min_lane = np.empty((8, ROW_TILE), np.int32)
        quad = np.empty(ROW_TILE, np.int32)
        s1 = np.empty(ROW_TILE, np.int32)
        s2 = np.empty(ROW_TILE, np.int32)
        for t in range(n_tokens):
            lanes[:, :] = 0
            acc[:] = 0
            for s in range(n_super):
                sc = wsub[tile, s]
                lane_sums(wq, wsub, tile, s, xq, t, 16, quad, lane_sum)
                for l in range(8 if offset else 0):   # Q6_K's weights are u6 - 32: take 32 * scale * y out
                    b0, b1 = np.int32(bsums[t, s, 2 * l]), np.int32(bsums[t, s, 2 * l + 1])
                    c0, c1, ls = sc[2 * l], sc[2 * l + 1], lane_sum[l]
                    for r in range(ROW_TILE):
                        ls[r] -= np.int32(offset * (b0 * c0[r] + b1 * c1[r]))
                yd = xd[t, s]
                d_w, dmin_w = wd[tile, s], wdmin[tile, s]
                has_min = wsub.shape[2] == 32
                if has_min:   # Q2_K: the 16 mins times the 16 bsums, as 8 lanes of pairs
                    for l in range(8):
                        b0, b1 = np.int32(bsums[t, s, 2 * l]), np.int32(bsums[t, s, 2 * l + 1])
                        m0, m1 = sc[16 + 2 * l], sc[16 + 2 * l + 1]
                        for r in range(ROW_TILE):
                            min_lane[l, r] = np.int32(m0[r] * b0 + m1[r] * b1)
                if tiled[t]:   # tiled: one integer per super-block, res = d_w * s1 (- dmin_w * s2), acc += res * d_y
                    s1[:] = 0
                    s2[:] = 0
                    for l in range(8):
                        ls, ml = lane_sum[l], min_lane[l]
                        for r in range(ROW_TILE):
                            s1[r] += ls[r]
                            if has_min:
                                s2[r] += ml[r]
                    for r in range(ROW_TILE):
                        res = d_w[r] * np.float32(s1[r])
                        if has_min:
                            res = fma(-dmin_w[r], np.float32(s2[r]), res)
                        acc[r] = fma(res, yd, acc[r])
                    continue
                if has_min:   # ggml_vec_dot_q2_K_q8_K: the mins go into the lanes first
                    for l in range(8):
                        lane, ml = lanes[l], min_lane[l]
                        for r in range(ROW_TILE):
                            lane[r] = fma(-yd * dmin_w[r], np.float32(ml[r]), lane[r])
                for l in range(8):
                    lane, ls = lanes[l], lane_sum[l]
                    for r in range(ROW_TILE):
                        lane[r] = fma(yd * d_w[r], np.float32(ls[r]), lane[r])
            o = out[t, tile * ROW_TILE:(tile + 1) * ROW_TILE]
            for r in range(ROW_TILE):
                o[r] = acc[r] if tiled[t] else hsum8(lanes[:, r])
