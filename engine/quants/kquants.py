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

The blocks are unpacked once at load (pack_k): one int8 per weight (Q4_K on AVX2: its nibble
bytes, regrouped), integer sub-block scales, and the super-block scales widened to f32, in tiles
of 32 rows; the integer loops run in simd.k_dot on AVX2 (vpdpbusd where the CPU has VNNI), 4
prompt tokens per load of the weights. Checked against an AVX2 build of llama-server with
bench/compare_tokens.py, and against NumPy twins of these orders in tests/test_kquants.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..float_ops import fma
from .blocks import QK_K
from .kernels import ROW_TILE, hsum8, tile_rows
from .simd import AVX2   # the integer loops in simd.py (vpdpbusd or vpmaddubsw), else the portable ones below
from .simd import (K_TOKEN_TILE, k_groups_16, k_groups_16_tokens, k_groups_32, k_groups_32_tokens, k_lanes_16,
                   k_lanes_32, q4_k_gemm, q4_k_gemm_tokens, q4_k_gemv, q4_k_gemv_tokens)


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


@njit(cache=True, nogil=True, parallel=True)
def quantize_q8_k_rows_parallel(x, xq, xd, bsums, parts):
    """quantize_q8_k_rows with its rows split into `parts` runs among threads (each row is
    quantized alone)."""
    n = x.shape[0]
    for p in prange(parts):
        a, b = p * n // parts, (p + 1) * n // parts
        quantize_q8_k_rows(x[a:b], xq[a:b], xd[a:b], bsums[a:b])


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
    q [n_tiles, n_super, 256, ROW_TILE] int8 (on AVX2 simd.k_dot's layouts: Q4_K's nibble bytes
    [n_tiles, n_super, 4, 8, ROW_TILE, 4] uint8, the others [n_tiles, n_super, 8, 8, ROW_TILE, 4]
    int8, Q3_K's plus 4 so that every stored weight is unsigned), sub [n_tiles, n_super, 16 or
    32, ROW_TILE] int8 (every K-quant scale and min fits: a decode step reads 16 bytes of them per
    256 weights, not 64), d and dmin [n_tiles, n_super, ROW_TILE]."""
    q, sub, d, dmin = unpack_k(type_name, raw, n_rows, n_cols)
    n_super = n_cols // QK_K
    if AVX2 and type_name == "Q4_K":   # weight 64c + 4l + k low, 64c + 32 + 4l + k high, in byte (c, l, k)
        halves = q.reshape(n_rows, n_super, 4, 2, 32).astype(np.uint8)
        q = tile_rows(halves[:, :, :, 0] | (halves[:, :, :, 1] << 4))            # [tiles, n_super, 4, 32, R]
        q = np.ascontiguousarray(q.reshape(q.shape[0], n_super, 4, 8, 4, ROW_TILE).transpose(0, 1, 2, 3, 5, 4))
    else:
        if AVX2 and type_name == "Q3_K":
            q = q + np.int8(Q3_K_OFFSET)
        q = tile_rows(q)                                              # [tiles, n_super, 256, ROW_TILE]
        if AVX2:   # -> [tiles, n_super, 8 groups, 8 lanes, ROW_TILE, 4 weights] for simd.k_dot
            q = np.ascontiguousarray(q.reshape(q.shape[0], n_super, 8, 8, 4, ROW_TILE).transpose(0, 1, 2, 3, 5, 4))
    return q, tile_rows(sub.astype(np.int8)), tile_rows(d), tile_rows(dmin)


Q3_K_OFFSET = 4   # Q3_K's weights (-4..3) are stored plus this on AVX2: unsigned for vpdpbusd


def offset_starts(xq: np.ndarray, type_name: str) -> np.ndarray:
    """What simd.k_dot starts each 4-weight sum from for a type stored with an offset (Q3_K on
    AVX2): minus the offset times each 4 activations' sum, [T, K / 4] int32; an empty array
    (read as "no offset") for every other type."""
    if not (AVX2 and type_name == "Q3_K"):
        return np.zeros(0, np.int32)
    return -Q3_K_OFFSET * xq.reshape(xq.shape[0], -1, 4).astype(np.int32).sum(axis=2, dtype=np.int32)


@njit(cache=True, nogil=True, inline="always")
def _group_dots(q, y, group, group_dot):
    """group_dot[i, r] = sum of q[e, r] * y[e] over sub-block i (`group` weights), for ROW_TILE
    rows. q: [256, ROW_TILE] int8; y: [256] int8; group_dot: [256 / group, ROW_TILE] int32"""
    group_dot[:, :] = 0
    for e in range(QK_K):
        ye = np.int32(y[e])
        qe = q[e]
        gd = group_dot[e // group]
        for r in range(ROW_TILE):
            gd[r] += np.int32(np.int32(qe[r]) * ye)


@njit(cache=True, nogil=True, inline="always")
def _lane_sums(q, sub, group, y, quad, lane_sum):
    """For ROW_TILE rows at once: lane_sum[l, r] = sum over the weights e of ggml's AVX2 lane l
    (elements 4l..4l+3 of every group of 32) of scale(e, r) * q[e, r] * y[e], the scale being
    sub[e // group, r]. Exact integers. Every loop runs across rows (contiguous).
    q: [256, ROW_TILE] int8; sub: [16, ROW_TILE] int8; y: [256] int8; quad: [ROW_TILE] int32 scratch;
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
                ls[r] += np.int32(np.int32(sc[r]) * quad[r])


def _make_int_sums(group: int):
    """int_sums for sub-blocks of `group` weights (32: Q4_K/Q5_K, 16: Q2_K/Q3_K/Q6_K)."""
    k_groups_tokens = k_groups_32_tokens if group == 32 else k_groups_16_tokens
    k_groups = k_groups_32 if group == 32 else k_groups_16
    k_lanes = k_lanes_32 if group == 32 else k_lanes_16

    @njit(cache=True, nogil=True, inline="always")
    def int_sums(wq, wsub, tile, s, xq, corr, t0, n, sums_only, tiled, lane_sum, group_dot, quad):
        """The integers of super-block s of a tile for tokens t0..t0+n: for a token whose path
        needs only the sub-blocks' sums (sums_only: repacked; or tiled[t]), group_dot[j, i, r]
        = the dot product of sub-block i of row r with the token's; for the others ggml's lanes,
        lane_sum[j] (see _lane_sums). In simd.k_dot on AVX2, K_TOKEN_TILE tokens at a time."""
        if AVX2:
            if n == K_TOKEN_TILE and (sums_only or tiled[t0:t0 + n].all()):
                k_groups_tokens(wq, wsub, tile, s, xq, corr, t0, group_dot)
                return
            for j in range(n):
                if sums_only or tiled[t0 + j]:
                    k_groups(wq, wsub, tile, s, xq, corr, t0 + j, group_dot[j:j + 1])
                else:
                    k_lanes(wq, wsub, tile, s, xq, corr, t0 + j, lane_sum[j:j + 1])
            return
        for j in range(n):
            y = xq[t0 + j, s * QK_K:(s + 1) * QK_K]
            if sums_only or tiled[t0 + j]:
                _group_dots(wq[tile, s], y, group, group_dot[j])
            else:
                _lane_sums(wq[tile, s], wsub[tile, s], group, y, quad, lane_sum[j])

    return int_sums


int_sums_32, int_sums_16 = _make_int_sums(32), _make_int_sums(16)


@njit(cache=True, nogil=True, inline="always")
def _scale_into_lanes(yd, d_w, lane_sum, lanes):
    """ggml's vec_dot step for one super-block of one token: lanes[l, r] = fma(d_y * d_w[r],
    float(lane_sum[l, r]), lanes[l, r]) for the 8 lanes of ROW_TILE rows. Row by row (a
    decode step's Q6_K product took 19-24 us lane by lane, 14-19 us so; same bits).
    d_w: [ROW_TILE] f32; lane_sum: [8, ROW_TILE] int32; lanes: [8, ROW_TILE] f32"""
    for r in range(ROW_TILE):
        scale = yd * d_w[r]
        for l in range(8):
            lanes[l, r] = fma(scale, np.float32(lane_sum[l, r]), lanes[l, r])


@njit(cache=True, nogil=True, inline="always")
def _scaled_sums(sub, group_dot, ysums, g0, g1, m0, m1, s1, s2):
    """For ROW_TILE rows of a Q4_K/Q5_K super-block: s1[r] = sum over sub-blocks g0..g1-1 of
    scale_g x dot_g, and s2[r] = sum over sub-blocks m0..m1-1 of min_g x ysum_g (exact integers).
    Row by row, each sum in a register: sub-block by sub-block instead, s1 and s2 were loaded
    and stored once per sub-block and the loop did not vectorize (see matmul_k16).
    sub: [16, ROW_TILE] int8 (8 scales, 8 mins); group_dot: [8, ROW_TILE] int32; ysums: [8] int32"""
    for r in range(ROW_TILE):
        a = np.int32(0)
        for g in range(g0, g1):
            a += np.int32(sub[g, r]) * group_dot[g, r]
        b = np.int32(0)
        for g in range(m0, m1):
            b += np.int32(sub[8 + g, r]) * ysums[g]
        s1[r] = a
        s2[r] = b


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_k(xq, xd, bsums, wq, wsub, wd, wdmin, repacked, tiled, grouped, q5, out):
    """out[t, r] = row r of a Q4_K (or, with q5, Q5_K) matrix (pack_k) times Q8_K activations
    (quantize_q8_k_rows), in llama.cpp's order (module docstring). Tokens go K_TOKEN_TILE at a
    time, each with its own accumulators, so that they share each load of the weights.
    wq: pack_k's; wsub: [n_tiles, n_super, 16, ROW_TILE] int8;
    wd, wdmin: [n_tiles, n_super, ROW_TILE] f32; out: [T, n_tiles * ROW_TILE]"""
    n_tokens = xq.shape[0]
    n_tiles, n_super = wq.shape[0], wq.shape[1]
    no_offset = np.zeros(0, np.int32)
    for tile in prange(n_tiles):
        lanes = np.empty((K_TOKEN_TILE, 8, ROW_TILE), np.float32)
        mins = np.empty((K_TOKEN_TILE, 4, ROW_TILE), np.float32)
        acc = np.empty((K_TOKEN_TILE, ROW_TILE), np.float32)
        acc_min = np.empty((K_TOKEN_TILE, ROW_TILE), np.float32)
        lane_sum = np.empty((K_TOKEN_TILE, 8, ROW_TILE), np.int32)
        group_dot = np.empty((K_TOKEN_TILE, 8, ROW_TILE), np.int32)
        quad = np.empty(ROW_TILE, np.int32)
        s1 = np.empty(ROW_TILE, np.int32)
        s2 = np.empty(ROW_TILE, np.int32)
        ysums = np.empty(8, np.int32)
        for t0 in range(0, n_tokens, K_TOKEN_TILE):
            n = min(K_TOKEN_TILE, n_tokens - t0)
            acc[:, :] = 0
            acc_min[:, :] = 0
            lanes[:, :, :] = 0
            mins[:, :, :] = 0
            for s in range(n_super):
                int_sums_32(wq, wsub, tile, s, xq, no_offset, t0, n, repacked, tiled, lane_sum, group_dot, quad)
                sub = wsub[tile, s]
                d_w, dmin_w = wd[tile, s], wdmin[tile, s]
                for j in range(n):
                    t = t0 + j
                    yd = xd[t, s]
                    for g in range(8):
                        ysums[g] = np.int32(bsums[t, s, 2 * g] + bsums[t, s, 2 * g + 1])
                    if repacked and grouped[t]:   # ggml_gemm_q4_K_8x8_q8_K: one FMA per 64 weights
                        for c in range(4):
                            _scaled_sums(sub, group_dot[j], ysums, 2 * c, 2 * c + 2, 2 * c, 2 * c + 2, s1, s2)
                            for r in range(ROW_TILE):
                                acc[j, r] = fma(np.float32(s1[r]), d_w[r] * yd, acc[j, r])
                                acc_min[j, r] = fma(np.float32(s2[r]), dmin_w[r] * yd, acc_min[j, r])
                    elif repacked or tiled[t]:   # one integer per super-block: s1 = sum of scale x sub-block dot
                        _scaled_sums(sub, group_dot[j], ysums, 0, 8, 0, 8, s1, s2)
                        if repacked:   # ggml_gemv_q4_K_8x8_q8_K
                            for r in range(ROW_TILE):
                                acc[j, r] = fma(np.float32(s1[r]), d_w[r] * yd, acc[j, r])
                                acc_min[j, r] = fma(np.float32(s2[r]), dmin_w[r] * yd, acc_min[j, r])
                        else:          # tiled: res = d_w * s1 - dmin_w * s2 (one rounding), acc += res * d_y
                            for r in range(ROW_TILE):
                                res = fma(-dmin_w[r], np.float32(s2[r]), d_w[r] * np.float32(s1[r]))
                                acc[j, r] = fma(res, yd, acc[j, r])
                    else:              # ggml_vec_dot_q4_K_q8_K / _q5_K_q8_K
                        _scale_into_lanes(yd, d_w, lane_sum[j], lanes[j])
                        if q5:         # Q5_K: one scalar sum of the mins, summs += dmin * M
                            _scaled_sums(sub, group_dot[j], ysums, 0, 0, 0, 8, s1, s2)   # (the mins alone)
                            for r in range(ROW_TILE):
                                acc_min[j, r] = fma(-yd * dmin_w[r], np.float32(s2[r]), acc_min[j, r])
                            continue
                        for m in range(4):
                            y_a = np.int32(bsums[t, s, 4 * m] + bsums[t, s, 4 * m + 1])
                            y_b = np.int32(bsums[t, s, 4 * m + 2] + bsums[t, s, 4 * m + 3])
                            m_a, m_b, mm = sub[8 + 2 * m], sub[8 + 2 * m + 1], mins[j, m]
                            for r in range(ROW_TILE):
                                pair = np.int32(m_a[r] * y_a + m_b[r] * y_b)
                                mm[r] = fma(-yd * dmin_w[r], np.float32(pair), mm[r])
            for j in range(n):
                t = t0 + j
                o = out[t, tile * ROW_TILE:(tile + 1) * ROW_TILE]
                for r in range(ROW_TILE):
                    if repacked:
                        o[r] = acc[j, r] - acc_min[j, r]
                    elif tiled[t]:
                        o[r] = acc[j, r]
                    else:
                        o[r] = hsum8(lanes[j, :, r]) + (acc_min[j, r] if q5 else
                                                        (mins[j, 0, r] + mins[j, 2, r]) + (mins[j, 1, r] + mins[j, 3, r]))


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_k_repacked(xq, xd, bsums, wq, wsub, wd, wdmin, grouped, out):
    """matmul_q4_k for a repacked Q4_K matrix on AVX2 (pack_k's nibble layout), each call of
    simd.q4_k_gemv / q4_k_gemm doing whole rows for K_TOKEN_TILE tokens (or one): the same
    arithmetic in the same order (tests compare the two paths), without Numba loops between
    the super-blocks. grouped: [T] bool, the tokens ggml_gemm_q4_K_8x8_q8_K takes."""
    n_tokens = xq.shape[0]
    n_tiles = wq.shape[0]
    for tile in prange(n_tiles):
        rows = np.empty((K_TOKEN_TILE, ROW_TILE), np.float32)
        for t0 in range(0, n_tokens, K_TOKEN_TILE):
            n = min(K_TOKEN_TILE, n_tokens - t0)
            if n == K_TOKEN_TILE and grouped[t0:t0 + n].all():
                q4_k_gemm_tokens(wq, wsub, wd, wdmin, tile, xq, xd, bsums, t0, rows)
            elif n == K_TOKEN_TILE and not grouped[t0:t0 + n].any():
                q4_k_gemv_tokens(wq, wsub, wd, wdmin, tile, xq, xd, bsums, t0, rows)
            else:
                for j in range(n):
                    if grouped[t0 + j]:
                        q4_k_gemm(wq, wsub, wd, wdmin, tile, xq, xd, bsums, t0 + j, rows[j:j + 1])
                    else:
                        q4_k_gemv(wq, wsub, wd, wdmin, tile, xq, xd, bsums, t0 + j, rows[j:j + 1])
            for j in range(n):
                out[t0 + j, tile * ROW_TILE:(tile + 1) * ROW_TILE] = rows[j]


@njit(cache=True, nogil=True, parallel=True)
def matmul_k16(xq, xd, bsums, wq, wsub, wd, wdmin, offset, corr, tiled, out):
    """out[t, r] = row r of a K-quant matrix with one scale per 16 weights and no minimum
    (pack_k: Q6_K, offset 32, its quants stored unsigned; Q3_K, offset 0, signed, or plus 4 on
    AVX2 with corr = offset_starts) or with 16 mins too (Q2_K: wsub holds 16 scales then 16
    mins) times Q8_K activations, in the order of ggml_vec_dot_q{6,3,2}_K_q8_K on AVX2, or of
    the tiled kernel for long prompt passes. Tokens go K_TOKEN_TILE at a time.
    wq: pack_k's; wsub: [n_tiles, n_super, 16 or 32, ROW_TILE] int8;
    wd: [n_tiles, n_super, ROW_TILE] f32; out: [T, n_tiles * ROW_TILE]"""
    n_tokens = xq.shape[0]
    n_tiles, n_super = wq.shape[0], wq.shape[1]
    has_min = wsub.shape[2] == 32
    for tile in prange(n_tiles):
        lanes = np.empty((K_TOKEN_TILE, 8, ROW_TILE), np.float32)
        acc = np.empty((K_TOKEN_TILE, ROW_TILE), np.float32)
        lane_sum = np.empty((K_TOKEN_TILE, 8, ROW_TILE), np.int32)
        group_dot = np.empty((K_TOKEN_TILE, 16, ROW_TILE), np.int32)
        min_lane = np.empty((8, ROW_TILE), np.int32)
        quad = np.empty(ROW_TILE, np.int32)
        s1 = np.empty(ROW_TILE, np.int32)
        s2 = np.empty(ROW_TILE, np.int32)
        taken_out = np.empty(16, np.int32)
        for t0 in range(0, n_tokens, K_TOKEN_TILE):
            n = min(K_TOKEN_TILE, n_tokens - t0)
            lanes[:, :, :] = 0
            acc[:, :] = 0
            for s in range(n_super):
                int_sums_16(wq, wsub, tile, s, xq, corr, t0, n, False, tiled, lane_sum, group_dot, quad)
                sc = wsub[tile, s]
                d_w, dmin_w = wd[tile, s], wdmin[tile, s]
                for j in range(n):
                    t = t0 + j
                    yd = xd[t, s]
                    if has_min:   # Q2_K: the 16 mins times the 16 bsums, as 8 lanes of pairs
                        for l in range(8):
                            b0, b1 = np.int32(bsums[t, s, 2 * l]), np.int32(bsums[t, s, 2 * l + 1])
                            m0, m1 = sc[16 + 2 * l], sc[16 + 2 * l + 1]
                            for r in range(ROW_TILE):
                                min_lane[l, r] = np.int32(m0[r] * b0 + m1[r] * b1)
                    if tiled[t]:   # tiled: one integer per super-block, res = d_w * s1 (- dmin_w * s2), acc += res * d_y
                        s2[:] = 0
                        for i in range(16):   # Q6_K's weights are u6 - 32: take 32 * scale * bsum out
                            taken_out[i] = np.int32(offset * bsums[t, s, i])
                        # row by row, each row's 16 sub-blocks summed in a register (exact
                        # integers: any order gives the same s1). Sub-block by sub-block, with
                        # s1[r] loaded and stored 16 times, the loop did not vectorize and took
                        # 80% of a Q6_K prompt pass (SmolLM2's ffn_down: 13.4 -> 3.5 ms)
                        gd = group_dot[j]
                        for r in range(ROW_TILE):
                            row_sum = np.int32(0)
                            for i in range(16):
                                row_sum += np.int32(sc[i, r]) * (gd[i, r] - taken_out[i])
                            s1[r] = row_sum
                        if has_min:
                            for l in range(8):
                                ml = min_lane[l]
                                for r in range(ROW_TILE):
                                    s2[r] += ml[r]
                        for r in range(ROW_TILE):
                            res = d_w[r] * np.float32(s1[r])
                            if has_min:
                                res = fma(-dmin_w[r], np.float32(s2[r]), res)
                            acc[j, r] = fma(res, yd, acc[j, r])
                        continue
                    for l in range(8 if offset else 0):   # Q6_K's weights are u6 - 32: take 32 * scale * y out
                        b0, b1 = np.int32(bsums[t, s, 2 * l]), np.int32(bsums[t, s, 2 * l + 1])
                        c0, c1, ls = sc[2 * l], sc[2 * l + 1], lane_sum[j, l]
                        for r in range(ROW_TILE):
                            ls[r] -= np.int32(offset * (b0 * c0[r] + b1 * c1[r]))
                    if has_min:   # ggml_vec_dot_q2_K_q8_K: the mins go into the lanes first
                        for l in range(8):
                            lane, ml = lanes[j, l], min_lane[l]
                            for r in range(ROW_TILE):
                                lane[r] = fma(-yd * dmin_w[r], np.float32(ml[r]), lane[r])
                    _scale_into_lanes(yd, d_w, lane_sum[j], lanes[j])
            for j in range(n):
                t = t0 + j
                o = out[t, tile * ROW_TILE:(tile + 1) * ROW_TILE]
                for r in range(ROW_TILE):
                    o[r] = acc[j, r] if tiled[t] else hsum8(lanes[j, :, r])
