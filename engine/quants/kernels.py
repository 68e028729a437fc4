"""Numba kernels for `out = x @ W.T` straight from quantized weights.

Two kernels cover every GGUF type:

* `matmul_float`: float weights (F32, or F16/BF16 widened at load) times float activations.
* `matmul_int8`: integer quants times activations quantized to int8 the way llama.cpp does it
  (Q8_0 / Q8_1 blocks of 32, or Q8_K super-blocks of 256), so sums are exact integer dot
  products and only the per-group scaling is float.

Layout ("block-minor"): a row's int8 quants are stored as [group_size, n_groups]: for a
position p inside the group, the p-th quant of *every* group of the row is contiguous. The inner
loop then runs across groups, each SIMD lane accumulating its own group's integer sum, instead
of ending every 32-step loop in a horizontal sum (see ../shared/spec/kernel-notes.md).

Batch invariance: each output element (token t, row r) is computed by the same loops, in the
same order, whatever the number of tokens in the batch, so a sequence's logits do not depend on
what else is in the batch.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def matmul_float(x, w, out):
    """out[t, r] = sum_k w[r, k] * x[t, k].

    x:   [T, K] f32   activations
    w:   [N, K] f32   weight rows (GGUF stores a matrix as one row per output)
    out: [T, N] f32
    """
    n_tokens, n_cols = x.shape
    for r in prange(w.shape[0]):
        for t in range(n_tokens):
            acc = np.float32(0.0)
            for k in range(n_cols):
                acc += w[r, k] * x[t, k]
            out[t, r] = acc


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def matmul_int8(xq, xd, xs, wq, wd, wm, out):
    """out[t, r] = sum_g (wd[r,g] * xd[t,g]) * isum[g] + wm[r,g] * xs[t,g],
    where isum[g] = sum_p wq[r,p,g] * xq[t,p,g] is an exact int32 dot product.

    xq:  [T, G, NG] int8  activation quants, block-minor (G = weights per group)
    xd:  [T, NG]    f32   activation scale of each group
    xs:  [T, NG]    f32   activation scale * sum of the group's quants (feeds the min term)
    wq:  [N, G, NG] int8  weight quants, block-minor
    wd:  [N, NG]    f32   weight scale of each group
    wm:  [N, NG]    f32   weight offset of each group (zeros for symmetric types)
    out: [T, N]     f32
    """
    n_tokens = xq.shape[0]
    n_rows, group, n_groups = wq.shape
    for r in prange(n_rows):
        isum = np.empty(n_groups, np.int32)
        for t in range(n_tokens):
            isum[:] = 0
            for p in range(group):
                for g in range(n_groups):
                    isum[g] += np.int32(wq[r, p, g]) * np.int32(xq[t, p, g])
            acc = np.float32(0.0)
            for g in range(n_groups):
                acc += wd[r, g] * xd[t, g] * np.float32(isum[g]) + wm[r, g] * xs[t, g]
            out[t, r] = acc


@njit(cache=True, nogil=True)
def quantize_q8_blocks(x, group, xq, xd, xs):
    """Quantize activations like ggml's quantize_row_q8_0 / q8_1 (blocks of 32 = `group`):
    d = max|x| / 127, q = round-half-even(x * 127 / max|x|).

    x:  [T, K] f32;  xq: [T, group, K // group] int8 (block-minor)
    xd: [T, K // group] f32  d (caller rounds it to f16, as ggml stores it)
    xs: [T, K // group] f32  d * sum(q) (Q8_1's `s`; caller rounds it to f16)
    """
    n_tokens, n_cols = x.shape
    n_groups = n_cols // group
    for t in range(n_tokens):
        for g in range(n_groups):
            amax = np.float32(0.0)
            for p in range(group):
                amax = max(amax, abs(x[t, g * group + p]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            total = 0
            for p in range(group):
                v = np.int32(np.rint(x[t, g * group + p] * inv))
                xq[t, p, g] = v
                total += v
            xd[t, g] = d
            xs[t, g] = d * np.float32(total)


@njit(cache=True, nogil=True)
def quantize_q8_k(x, group, xq, xd, xs):
    """Quantize activations like ggml's quantize_row_q8_K: super-blocks of 256 with an f32
    scale d = 1 / (-127 / v), v the value of largest magnitude (sign kept).
    `xd`/`xs` are filled per weight group (16 or 32) so the int8 kernel reads one layout.

    x: [T, K] f32; xq: [T, group, K // group] int8; xd, xs: [T, K // group] f32
    """
    n_tokens, n_cols = x.shape
    per_super = 256 // group
    for t in range(n_tokens):
        for s in range(n_cols // 256):
            vmax = np.float32(0.0)
            amax = np.float32(0.0)
            for j in range(256):
                v = x[t, s * 256 + j]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if amax == 0:
                for j in range(256):
                    xq[t, j % group, s * per_super + j // group] = 0
                for g in range(per_super):
                    xd[t, s * per_super + g] = 0.0
                    xs[t, s * per_super + g] = 0.0
                continue
            iscale = np.float32(-127.0) / vmax
            d = np.float32(1.0) / iscale
            for g in range(per_super):
                total = 0
                for p in range(group):
                    v = min(127, np.int32(np.rint(iscale * x[t, s * 256 + g * group + p])))
                    xq[t, p, s * per_super + g] = v
                    total += v
                xd[t, s * per_super + g] = d
                xs[t, s * per_super + g] = d * np.float32(total)
