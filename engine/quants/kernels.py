"""Numba kernels for `out = x @ W.T` straight from quantized weights.

* `matmul_float_tiles`: float weights (F32, F16 kept as f16, BF16 widened at load) times float
  activations, in the summation order of llamafile's tinyBLAS (prompt tokens) or ggml_vec_dot
  (decode). `matmul_float` is its plain twin, one row at a time, which the tests compare it with.
* `matmul_q32_lanes`: 32-weight blocks (Q5_0, Q5_1, Q8_0) times Q8_0/Q8_1 activations, in
  the order of ggml's AVX2 vec_dot kernels; `matmul_q4_lanes` the same for Q4_0/Q4_1 read
  from their packed nibbles (`*_simd`: the same sums through simd.py's AVX2 intrinsics).
* The K-quants are in kquants.py.

Why the exact order matters: with 8-bit activations, a one-ulp difference in a layer's output
can flip one activation's rounding to int8 in the next layer, and over 30 layers such flips
change tokens. So the float kernels reproduce ggml's AVX2 lanes: element k of a block goes to
lane (k % 32) // 4 (int8) or k % 8 (float), each lane accumulates with FMA, and the 8 lanes are
added in the fixed tree of hsum_float_8.

Layout (row tiles, `tile_rows`): weights are packed in tiles of ROW_TILE rows with the row
index innermost, so the inner loops run across the rows of a tile, each SIMD lane computing
its own row's dot product in that row's exact order, instead of ending every block in a
horizontal sum across lanes (docs/09-performance.md).

Batch invariance: each output element (token t, row r) is computed by the same loops, in the
same order, whatever the number of tokens in the batch, so a sequence's logits do not depend on
what else is in the batch.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from ..float_ops import f16_to_f32, fma, round_f16, widen
from .simd import PROMPT_TOKEN_TILE, float_lanes, int8_dot, int8_dot_tokens, q4_dot, q4_dot_tokens, q8_lanes


# llamafile's tinyBLAS takes a float matrix only when its row count is a multiple of this (and
# its row length of 8, and from 2 tokens on); others go through ggml_vec_dot (tinyBLAS::matmul)
TINYBLAS_ROWS = 4

# ggml_vec_dot_f32's scalar tail (K % 32 elements), as GCC vectorizes it for AVX2: products in
# vectors of 8, then 4, rounded and added one by one; the last K % TAIL_FUSED one at a time, fused
TAIL_FUSED = 4


@njit(cache=True, nogil=True, inline="always")
def hsum8(a):
    """ggml's hsum_float_8 / tinyBLAS hsum of one 8-lane vector: ((0+4)+(2+6)) + ((1+5)+(3+7))."""
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


@njit(cache=True, nogil=True, inline="always")
def reduce4x8(a):
    """GGML_F32x8_REDUCE of 4 accumulators of 8 lanes a[0:32]: v0+v2, v1+v3, v0+v1, then
    the two 128-bit halves and two horizontal adds: ((0+4)+(1+5)) + ((2+6)+(3+7))."""
    for l in range(8):
        a[l] = a[l] + a[16 + l]
        a[8 + l] = a[8 + l] + a[24 + l]
    for l in range(8):
        a[l] = a[l] + a[8 + l]
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))


@njit(cache=True, nogil=True, inline="always")
def reduce4x8_across(lanes, n, out):
    """reduce4x8 for n dot products side by side: lanes [32, >= n] holds lane l of product j
    in lanes[l, j] (clobbered); out[j] gets the reduced sum. Each loop runs across the
    products, over 1-D row views, so it vectorizes."""
    for l in range(8):
        a, b, c, d = lanes[l], lanes[16 + l], lanes[8 + l], lanes[24 + l]
        for j in range(n):
            a[j] = a[j] + b[j]
            c[j] = c[j] + d[j]
    for l in range(8):
        a, c = lanes[l], lanes[8 + l]
        for j in range(n):
            a[j] = a[j] + c[j]
    l0, l1, l2, l3, l4, l5, l6, l7 = lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]
    for j in range(n):
        out[j] = ((l0[j] + l4[j]) + (l1[j] + l5[j])) + ((l2[j] + l6[j]) + (l3[j] + l7[j]))


@njit(cache=True, nogil=True, inline="always")
def _dot_tinyblas(x, w, t, r, n_cols, lanes):
    """llamafile tinyBLAS order (K % 8 == 0): lane i sums elements k = i mod 8 with FMA, hsum8."""
    lanes[:8] = 0
    for l in range(0, n_cols, 8):
        for i in range(8):
            lanes[i] = fma(w[r, l + i], x[t, l + i], lanes[i])
    return hsum8(lanes)


@njit(cache=True, nogil=True, inline="always")
def _dot_vecdot(x, w, t, r, n_cols, lanes, tail_in_double):
    """ggml_vec_dot_f32 / _f16 order: 4 accumulators of 8 lanes over blocks of 32 (FMA),
    reduce4x8, then the tail element by element, added in f32 in order; or, for the f16
    variant, added in double. The f32 tail is as GCC compiled it for AVX2 (libggml-cpu's
    disassembly): its products are rounded first (vmulps, 8 then 4 at a time) except the last
    K % 4, which are fused (vfmadd231ss) -- see TAIL_FUSED."""
    n_simd = n_cols - n_cols % 32
    lanes[:] = 0
    for l in range(0, n_simd, 32):
        for i in range(32):
            lanes[i] = fma(w[r, l + i], x[t, l + i], lanes[i])
    total = reduce4x8(lanes) if n_simd else np.float32(0.0)
    if tail_in_double:
        wide = np.float64(total)
        for k in range(n_simd, n_cols):
            wide += np.float64(w[r, k] * x[t, k])
        return np.float32(wide)
    n_rounded = n_cols - n_cols % TAIL_FUSED
    for k in range(n_simd, n_rounded):
        total = total + w[r, k] * x[t, k]
    for k in range(n_rounded, n_cols):
        total = fma(w[r, k], x[t, k], total)
    return total


@njit(cache=True, nogil=True, parallel=True)
def matmul_float(x, w, tinyblas_rows, tail_in_double, out):
    """out[t, r] = sum_k w[r, k] * x[t, k] in the order llama.cpp uses for that token:
    tinyBLAS for tokens of a multi-token prompt pass (when K % 8 == 0 and N % 4 == 0), ggml_vec_dot
    otherwise (single-token decode). The choice is per token, never per batch, so a sequence's
    result does not depend on what else is in the batch.

    x: [T, K] f32; w: [N, K] f32; tinyblas_rows: [T] bool; out: [T, N] f32
    """
    n_tokens, n_cols = x.shape
    tinyblas_ok = n_cols % 8 == 0 and w.shape[0] % TINYBLAS_ROWS == 0
    for r in prange(w.shape[0]):
        lanes = np.empty(32, np.float32)
        for t in range(n_tokens):
            if tinyblas_ok and tinyblas_rows[t]:
                out[t, r] = _dot_tinyblas(x, w, t, r, n_cols, lanes)
            else:
                out[t, r] = _dot_vecdot(x, w, t, r, n_cols, lanes, tail_in_double)


# Row-wise ops over a prompt pass (activation quantization, norms, the FFN's activation): each
# row is computed alone, so splitting the rows among threads changes no result; below this many
# rows (a decode step) a parallel region costs more than it saves
PARALLEL_ROWS = 16

ROW_TILE = 32  # rows interleaved per tile: the inner loops run across rows, one SIMD lane each
# float weights take longer tiles: their inner loop is one FMA per row, so a longer run pays
# for the loop overhead of each K step (a 384 x 1536 product over 672 tokens, 2 threads: 11.7
# GMAC/s with 32 rows, 16.5 with 64); longer still leaves too few tiles to share among threads
# in narrow models (measured on a bge-small-shaped BERT pass: 32 rows 0.77 s, 64 rows 0.66 s,
# 128 rows 0.70 s; SmolLM2 F16 prefill 177 -> 195 tok/s, decode unchanged)
FLOAT_ROW_TILE = 64


def tile_rows(a: np.ndarray, rows: int = ROW_TILE) -> np.ndarray:
    """[n_rows, ...] -> [n_tiles, ..., rows], rows zero-padded to a multiple of `rows` (the
    layout every packed weight is read in: ROW_TILE, FLOAT_ROW_TILE for float weights)."""
    ROW_TILE = rows
    pad = -a.shape[0] % ROW_TILE
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    tiled = a.reshape((a.shape[0] // ROW_TILE, ROW_TILE) + a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(tiled, 1, -1))


@njit(cache=True, nogil=True, parallel=True)
def matmul_float_tiles(x, wt, tinyblas_rows, tail_in_double, out):
    """matmul_float (its twin, summed row by row) with FLOAT_ROW_TILE rows per SIMD pass: the
    weights are stored transposed per tile, so for each k the loop over rows reads contiguous
    floats and every row's lanes get exactly the FMAs, in the same order, as in matmul_float.
    A prompt token's 8 tinyBLAS lanes are made by simd.float_lanes, which keeps them in
    registers (1.4-1.6x the loop that stores them at every k). (The tiles hide the real row
    count: the caller clears tinyblas_rows when it is not a multiple of TINYBLAS_ROWS.)

    (x C-contiguous; R a multiple of simd.FLOAT_ROWS.)

    x: [T, K] f32; wt: [n_tiles, K, R] f32, or f16 bits (uint16: F16 weights stay half their
    size in memory, and a decode step reads half the bytes), rows zero-padded to the tile; tinyblas_rows: [T]
    bool; out: [T, n_tiles * R] f32
    """
    n_tokens, n_cols = x.shape
    n_tiles, _, n_r = wt.shape
    tinyblas_ok = n_cols % 8 == 0
    n_simd = n_cols - n_cols % 32
    for tile in prange(n_tiles):
        w = wt[tile]                                  # [K, R]
        lanes = np.empty((32, n_r), np.float32)
        k_lanes = np.empty((8, n_r), np.float32)
        total = np.empty(n_r, np.float32)
        wide = np.empty(n_r, np.float64)
        for t in range(n_tokens):
            xt = x[t]
            o = out[t, tile * n_r:(tile + 1) * n_r]
            if tinyblas_ok and tinyblas_rows[t]:      # 8 lanes: k mod 8 (simd.float_lanes), then hsum8
                float_lanes(wt, tile, x, t, k_lanes)
                for r in range(n_r):
                    o[r] = hsum8(k_lanes[:, r])
                continue
            # ggml_vec_dot: 32 lanes over the blocks of 32, reduce4x8, then the tail
            lanes[:, :] = 0
            for k in range(n_simd):
                lane, wk, xk = lanes[k % 32], w[k], xt[k]
                for r in range(n_r):
                    lane[r] = fma(widen(wk[r]), xk, lane[r])
            if n_simd:
                reduce4x8_across(lanes, n_r, total)
            else:
                total[:] = 0
            if tail_in_double:
                for r in range(n_r):
                    wide[r] = np.float64(total[r])
                for k in range(n_simd, n_cols):
                    wk, xk = w[k], xt[k]
                    for r in range(n_r):
                        wide[r] += np.float64(widen(wk[r]) * xk)
                for r in range(n_r):
                    total[r] = np.float32(wide[r])
            else:   # products rounded, then added; the last K % 4 fused (_dot_vecdot)
                n_rounded = n_cols - n_cols % TAIL_FUSED
                for k in range(n_simd, n_rounded):
                    wk, xk = w[k], xt[k]
                    for r in range(n_r):
                        total[r] = total[r] + widen(wk[r]) * xk
                for k in range(n_rounded, n_cols):
                    wk, xk = w[k], xt[k]
                    for r in range(n_r):
                        total[r] = fma(widen(wk[r]), xk, total[r])
            o[:] = total


@njit(cache=True, nogil=True, parallel=True)
def matmul_q32_lanes(xq, xd, xs, wq, wd, wm, has_min, out):
    """ggml's AVX2 vec_dot for 32-weight blocks (and tinyBLAS's Q8_0), for every row:
    per block, lane i gets the exact integer sum of elements 4i..4i+3, then
    lane_i = fma(d_w * d_x, sum_i, lane_i); the result is hsum8(lanes) + summs, where
    summs accumulates fma(m_w, s_x) for types with a minimum (Q4_1, Q5_1).

    Layout: ROW_TILE rows are interleaved so the innermost loop runs across rows, each SIMD
    lane serving one row; every row's own sequence of float operations is unchanged.

    xq: [T, NB, 32] int8   activation quants, block by block
    xd, xs: [T, NB] f32    activation scale, and scale * sum of quants (Q8_1's s)
    wq: [n_tiles, NB, 32, R] int8  weight quants, R rows interleaved
    wd, wm: [n_tiles, NB, R] f32   weight scale and minimum per block
    out: [T, n_tiles * R] f32
    """
    n_tokens = xq.shape[0]
    n_tiles, n_blocks, group, n_r = wq.shape
    for tile in prange(n_tiles):
        lanes = np.empty((8, n_r), np.float32)
        summs = np.empty(n_r, np.float32)
        d = np.empty(n_r, np.float32)
        for t in range(n_tokens):
            lanes[:, :] = 0
            summs[:] = 0
            for b in range(n_blocks):
                xdb = xd[t, b]
                for r in range(n_r):
                    d[r] = wd[tile, b, r] * xdb
                for i in range(8):
                    x0 = np.int32(xq[t, b, 4 * i])
                    x1 = np.int32(xq[t, b, 4 * i + 1])
                    x2 = np.int32(xq[t, b, 4 * i + 2])
                    x3 = np.int32(xq[t, b, 4 * i + 3])
                    for r in range(n_r):
                        s = np.int32(np.int32(wq[tile, b, 4 * i, r]) * x0 + np.int32(wq[tile, b, 4 * i + 1, r]) * x1
                                     + np.int32(wq[tile, b, 4 * i + 2, r]) * x2 + np.int32(wq[tile, b, 4 * i + 3, r]) * x3)
                        lanes[i, r] = fma(d[r], np.float32(s), lanes[i, r])
                if has_min:
                    xsb = xs[t, b]
                    for r in range(n_r):
                        summs[r] = fma(wm[tile, b, r], xsb, summs[r])
            for r in range(n_r):
                out[t, tile * n_r + r] = hsum8(lanes[:, r]) + summs[r]


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_lanes(xq, xd, xs, wq4, wd, wm, offset, has_min, whole_blocks, out):
    """matmul_q32_lanes for Q4_0 / Q4_1 read straight from their packed nibbles (half the
    memory traffic of int8): byte k of a block holds weight k (low nibble) and weight k + 16
    (high nibble), so lane i < 4 sums the low nibbles of bytes 4i..4i+3 and lane i + 4 their
    high nibbles, the same elements and order as ggml. Weight value = nibble - offset
    (8 for Q4_0, 0 for Q4_1 whose minimum enters through summs). The portable kernel (used
    where AVX2 is missing) and the twin of `matmul_q4_dot`.

    whole_blocks: llama.cpp's repacked Q4_0 order instead (it repacks Q4_0 matrices whose row
    count is a multiple of 8, on AVX2): one integer sum per block, then one accumulator,
    acc = fma(float(sum), d_w * d_x, acc).

    xq: [T, NB, 32] int8; xd, xs: [T, NB] f32
    wq4: [n_tiles, NB, 16, R] uint8  nibble bytes, R rows interleaved
    wd, wm: [n_tiles, NB, R] uint16  the blocks' f16 scale and minimum, as stored in GGUF
    out: [T, n_tiles * R] f32
    """
    n_tokens = xq.shape[0]
    n_tiles, n_blocks, n_bytes, n_r = wq4.shape
    off = np.int32(offset)
    for tile in prange(n_tiles):
        lanes = np.empty((8, n_r), np.float32)
        summs = np.empty(n_r, np.float32)
        d = np.empty(n_r, np.float32)
        block_sum = np.zeros(n_r, np.int32)
        # widen this tile's f16 scales once, not once per token
        scale = np.empty((n_blocks, n_r), np.float32)
        minimum = np.empty((n_blocks, n_r), np.float32)
        for b in range(n_blocks):
            for r in range(n_r):
                scale[b, r] = f16_to_f32(wd[tile, b, r])
                minimum[b, r] = f16_to_f32(wm[tile, b, r])
        for t in range(n_tokens):
            lanes[:, :] = 0
            summs[:] = 0
            for b in range(n_blocks):
                xdb = xd[t, b]
                for r in range(n_r):
                    d[r] = scale[b, r] * xdb
                for i in range(4):
                    x0 = np.int32(xq[t, b, 4 * i])
                    x1 = np.int32(xq[t, b, 4 * i + 1])
                    x2 = np.int32(xq[t, b, 4 * i + 2])
                    x3 = np.int32(xq[t, b, 4 * i + 3])
                    y0 = np.int32(xq[t, b, 16 + 4 * i])
                    y1 = np.int32(xq[t, b, 16 + 4 * i + 1])
                    y2 = np.int32(xq[t, b, 16 + 4 * i + 2])
                    y3 = np.int32(xq[t, b, 16 + 4 * i + 3])
                    for r in range(n_r):
                        b0 = np.int32(wq4[tile, b, 4 * i, r])
                        b1 = np.int32(wq4[tile, b, 4 * i + 1, r])
                        b2 = np.int32(wq4[tile, b, 4 * i + 2, r])
                        b3 = np.int32(wq4[tile, b, 4 * i + 3, r])
                        # the sums fit 16 bits; saying so keeps LLVM out of 64-bit lanes
                        s_lo = np.int16(((b0 & 15) - off) * x0 + ((b1 & 15) - off) * x1
                                        + ((b2 & 15) - off) * x2 + ((b3 & 15) - off) * x3)
                        s_hi = np.int16(((b0 >> 4) - off) * y0 + ((b1 >> 4) - off) * y1
                                        + ((b2 >> 4) - off) * y2 + ((b3 >> 4) - off) * y3)
                        if whole_blocks:
                            block_sum[r] += np.int32(s_lo) + np.int32(s_hi)
                        else:
                            lanes[i, r] = fma(d[r], np.float32(s_lo), lanes[i, r])
                            lanes[i + 4, r] = fma(d[r], np.float32(s_hi), lanes[i + 4, r])
                if whole_blocks:
                    for r in range(n_r):
                        lanes[0, r] = fma(np.float32(block_sum[r]), d[r], lanes[0, r])
                        block_sum[r] = 0
                if has_min:
                    xsb = xs[t, b]
                    for r in range(n_r):
                        summs[r] = fma(minimum[b, r], xsb, summs[r])
            for r in range(n_r):
                out[t, tile * n_r + r] = lanes[0, r] if whole_blocks else hsum8(lanes[:, r]) + summs[r]


@njit(cache=True, nogil=True, inline="always")
def _lanes_to_rows(lanes, xs, t, minimum, has_min, summs, o):
    """One token's output rows from its 8 lanes [8, R]: hsum8 of the lanes + summs, the minimum
    term fma(m_w, s_x) over the blocks (Q4_1, Q5_1), as ggml adds them. minimum: [NB, R] f32
    (read only with has_min)"""
    summs[:] = 0
    if has_min:
        for b in range(minimum.shape[0]):
            xsb = xs[t, b]
            mb = minimum[b]
            for r in range(o.shape[0]):
                summs[r] = fma(mb[r], xsb, summs[r])
    for r in range(o.shape[0]):
        o[r] = hsum8(lanes[:, r]) + summs[r]


@njit(cache=True, nogil=True, inline="always")
def _widened(wm, has_min):
    """A tile's f16 block minimums [NB, R] widened to f32 once, not once per token; [0, R]
    where the type has none (nothing is read from it, and a decode step is not worth a
    zero-filled copy of every tile)."""
    minimum = np.empty((wm.shape[0] if has_min else 0, wm.shape[1]), np.float32)
    if has_min:
        for b in range(wm.shape[0]):
            mb, wmb = minimum[b], wm[b]
            for r in range(wm.shape[1]):
                mb[r] = f16_to_f32(wmb[r])
    return minimum


@njit(cache=True, nogil=True)
def offset_sums(xq, offset, nibbles, whole_blocks):
    """Where simd's dot kernels start each integer sum for weights stored with an offset, once
    per matmul rather than once per row: minus offset * the sum of each lane's 4 activations,
    [T, NB, 8], or of all 32 (whole_blocks), [T, NB, 1]. A lane's 4 activations: elements
    4i..4i+3 (int8 weights), or for nibbles bytes 4i..4i+3 (lane i < 4, low nibbles) and
    16+4i..16+4i+3 (lane i + 4, high nibbles).

    xq: [T, NB, 32] int8 -> int32
    (Lane by lane, each lane's sum in a register: scattering each activation to its lane's
    total instead took 4-6x as long over a prompt pass.)"""
    n_tokens, n_blocks, _ = xq.shape
    n_lanes = 1 if whole_blocks else 8
    out = np.empty((n_tokens, n_blocks, n_lanes), np.int32)
    for t in range(n_tokens):
        for b in range(n_blocks):
            x = xq[t, b]
            for lane in range(n_lanes):
                if whole_blocks:
                    first, n = 0, 32
                else:
                    first, n = (4 * (lane % 4) + 16 * (lane // 4) if nibbles else 4 * lane), 4
                total = np.int32(0)
                for k in range(first, first + n):
                    total += np.int32(x[k])
                out[t, b, lane] = -offset * total
    return out   # (whole_blocks: matmul_q4_dot takes it as [T, NB], out[:, :, 0])


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_dot(xq, xd, xs, wq4, wd, wm, corr, out):
    """matmul_q4_lanes on AVX2 (simd.q4_dot: vpdpbusd on 16 or 8 rows at a time where the CPU
    has VNNI, else vpmaddubsw + vpmaddwd on 8), with PROMPT_TOKEN_TILE prompt tokens sharing
    each load and unpack of a block's weights; bit for bit the sums of matmul_q4_lanes.
    Arguments as matmul_q4_lanes, except the nibble bytes, in groups of 4 (pack_weight(...,
    simd=True)): wq4: [n_tiles, NB, 4, R, 4] uint8, slot i holding bytes 4i..4i+3 of each
    row's block; and, in place of offset, has_min and whole_blocks, corr (offset_sums): [0]
    for Q4_1, [T, NB] for Q4_0 in the repacked order (one sum per block), [T, NB, 8] for Q4_0's
    lanes."""
    n_tokens = xq.shape[0]
    n_tiles, n_blocks, _, n_r, _ = wq4.shape
    has_min, whole_blocks = corr.ndim == 1, corr.ndim == 2
    for tile in prange(n_tiles):
        lanes = np.empty((PROMPT_TOKEN_TILE, 8, n_r), np.float32)
        summs = np.empty(n_r, np.float32)
        minimum = _widened(wm[tile], has_min)
        for t0 in range(0, n_tokens, PROMPT_TOKEN_TILE):
            n = min(PROMPT_TOKEN_TILE, n_tokens - t0)
            if n == PROMPT_TOKEN_TILE:
                q4_dot_tokens(wq4, wd, tile, xq, xd, corr, t0, lanes)
            else:   # the last few tokens (or a decode step) one at a time
                for j in range(n):
                    q4_dot(wq4, wd, tile, xq, xd, corr, t0 + j, lanes[j:j + 1])
            for j in range(n):
                o = out[t0 + j, tile * n_r:(tile + 1) * n_r]
                if whole_blocks:
                    o[:] = lanes[j, 0]
                else:
                    _lanes_to_rows(lanes[j], xs, t0 + j, minimum, has_min, summs, o)


@njit(cache=True, nogil=True, parallel=True)
def matmul_int8_dot(xq, xd, xs, wq, wd, wm, has_min, corr, out):
    """matmul_q32_simd on CPUs with VNNI (simd.int8_dot: vpdpbusd), with PROMPT_TOKEN_TILE
    prompt tokens sharing each load of a block's weights; bit for bit the sums of
    matmul_q32_lanes. Arguments as matmul_q32_simd, except the weights, plus 128 as unsigned
    bytes (pack_weight(..., simd=True) where simd.VNNI_ROWS):
    wq: [n_tiles, NB, 8, R, 4] uint8, slot i holding weights 4i..4i+3 (+ 128) of each row;
    corr: [T, NB, 8] int32, minus 128 x each lane's activations (offset_sums)."""
    n_tokens = xq.shape[0]
    n_tiles, n_blocks, _, n_r, _ = wq.shape
    for tile in prange(n_tiles):
        lanes = np.empty((PROMPT_TOKEN_TILE, 8, n_r), np.float32)
        summs = np.empty(n_r, np.float32)
        for t0 in range(0, n_tokens, PROMPT_TOKEN_TILE):
            n = min(PROMPT_TOKEN_TILE, n_tokens - t0)
            if n == PROMPT_TOKEN_TILE:
                int8_dot_tokens(wq, wd, tile, xq, xd, corr, t0, lanes)
            else:
                for j in range(n):
                    int8_dot(wq, wd, tile, xq, xd, corr, t0 + j, lanes[j:j + 1])
            for j in range(n):
                _lanes_to_rows(lanes[j], xs, t0 + j, wm[tile], has_min, summs, out[t0 + j, tile * n_r:(tile + 1) * n_r])


@njit(cache=True, nogil=True, parallel=True)
def matmul_q32_simd(xq, xd, xs, wq, wd, wm, has_min, out):
    """matmul_q32_lanes with its block loop in AVX2 (simd.q8_lanes: vpmaddubsw and vpmaddwd on
    8 rows at a time), bit for bit the same. Arguments as matmul_q32_lanes, except the weights,
    in groups of 4 (pack_weight(..., simd=True)):
    wq: [n_tiles, NB, 8, R, 4] int8, slot i holding weights 4i..4i+3 of each row."""
    n_tokens = xq.shape[0]
    n_tiles, n_blocks, _, n_r, _ = wq.shape
    for tile in prange(n_tiles):
        lanes = np.empty((8, n_r), np.float32)
        summs = np.empty(n_r, np.float32)
        for t in range(n_tokens):
            q8_lanes(wq, wd, tile, xq, xd, t, lanes)
            summs[:] = 0
            if has_min:
                for b in range(n_blocks):
                    xsb = xs[t, b]
                    mb = wm[tile, b]
                    for r in range(n_r):
                        summs[r] = fma(mb[r], xsb, summs[r])
            o = out[t, tile * n_r:(tile + 1) * n_r]
            for r in range(n_r):
                o[r] = hsum8(lanes[:, r]) + summs[r]


@njit(cache=True, nogil=True)
def quantize_q8_blocks(x, xq, xd, xs):
    """Quantize activations like ggml's quantize_row_q8_0 / q8_1 (AVX2): per block of 32,
    d = max|x| / 127, q = round-half-even(x * (127 / max|x|)); d and Q8_1's s = d * sum(q) are
    stored rounded to f16, as in ggml's block_q8_0 / block_q8_1.

    x:  [T, K] f32;  xq: [T, K // 32, 32] int8;  xd, xs: [T, K // 32] f32
    """
    n_tokens, n_cols = x.shape
    for t in range(n_tokens):
        for g in range(n_cols // 32):
            amax = np.float32(0.0)
            for p in range(32):
                amax = max(amax, abs(x[t, g * 32 + p]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            total = 0
            for p in range(32):
                v = np.int32(np.rint(x[t, g * 32 + p] * inv))
                xq[t, g, p] = v
                total += v
            xd[t, g] = round_f16(d)
            xs[t, g] = round_f16(d * np.float32(total))


def row_parts(n_rows: int) -> int:
    """How many runs of rows a row-wise op splits n_rows into: one per thread of the calling
    thread's count. (Asked here, in Python: numba.get_num_threads inside a kernel is a dynamic
    global, and Numba would not cache the kernel.)"""
    return max(1, min(n_rows, get_num_threads()))


@njit(cache=True, nogil=True, parallel=True)
def quantize_q8_blocks_parallel(x, xq, xd, xs, parts):
    """quantize_q8_blocks with its rows split into `parts` runs among threads (each row is
    quantized alone)."""
    n = x.shape[0]
    for p in prange(parts):
        a, b = p * n // parts, (p + 1) * n // parts
        quantize_q8_blocks(x[a:b], xq[a:b], xd[a:b], xs[a:b])
