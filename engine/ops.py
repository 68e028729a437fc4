"""The forward pass's other kernels: RMSNorm (LayerNorm for encoders), RoPE, attention over the
KV cache, SwiGLU (GELU).

Each follows the arithmetic of ggml's CPU ops (where it rounds to f16, where it sums in
double), because that is what makes our logits equal llama.cpp's and not just close.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .float_ops import expf_ggml, f16_bits_of, f16_to_f32, f32_bits, fma, round_f16, widen_f16
from .quants.kernels import hsum8, reduce4x8_across
from .flash_tiles import GEMM_ROWS, LANES, gemm_tile, row_max


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
def layer_norm(x, weight, bias, eps, out):
    """out[t] = (x[t] - mean) / sqrt(var + eps) * weight + bias: ggml_norm, then ggml_mul and
    ggml_add (llama.cpp's LLM_NORM). The mean is summed in double one by one (ggml_vec_sum_f32);
    the variance from f32 squares of (x - mean), 8 at a time in AVX2's horizontal order (hsum8)
    added into a double, then the tail one by one (ggml_vec_cvar_f32).

    x: [T, D] f32; weight, bias: [D] f32; out: [T, D] f32
    """
    n_tokens, dim = x.shape
    n_simd = dim - dim % 8
    sq = np.empty(8, np.float32)
    for t in range(n_tokens):
        total = 0.0  # float64
        for i in range(dim):
            total += np.float64(x[t, i])
        mean = np.float32(total) / np.float32(dim)
        squares = 0.0  # float64
        for i in range(0, n_simd, 8):
            for j in range(8):
                d = x[t, i + j] - mean
                sq[j] = d * d
            squares += np.float64(hsum8(sq))
        for i in range(n_simd, dim):
            d = x[t, i] - mean
            squares += np.float64(d * d)
        variance = np.float32(squares / dim)
        scale = np.float32(1.0) / np.sqrt(variance + np.float32(eps))
        for i in range(dim):
            out[t, i] = ((x[t, i] - mean) * scale) * weight[i] + bias[i]


@njit(cache=True, nogil=True)
def yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow):
    """ggml_rope_yarn_corr_dims: the pair indices between which YaRN blends interpolated and
    extrapolated angles (low, high), in ggml's f32 arithmetic."""
    two_log_base = np.float32(2.0) * np.float32(np.log(np.float32(freq_base)))
    pi = np.float32(np.pi)
    lo = np.float32(n_dims) * np.float32(np.log(np.float32(n_ctx_orig) / (np.float32(beta_fast) * np.float32(2.0) * pi))) \
        / two_log_base
    hi = np.float32(n_dims) * np.float32(np.log(np.float32(n_ctx_orig) / (np.float32(beta_slow) * np.float32(2.0) * pi))) \
        / two_log_base
    return max(np.float32(0.0), np.float32(np.floor(lo))), min(np.float32(n_dims - 1), np.float32(np.ceil(hi)))


def rope(x, positions, n_heads, head_dim, n_rot, freq_base, freq_scale, freq_factors, neox, mscale, yarn):
    """Rotate pair i of every head by angle freq_scale * pos * base^(-2i/n_rot) /
    freq_factors[i], in place. The pair is (x[2i], x[2i+1]) in llama's "normal" mode and
    (x[i], x[i + n_rot/2]) in NeoX's (qwen2); dimensions past n_rot stay as they are. The angle
    is built by repeated f32 multiplication, as ggml's rope cache does, and divided by the
    pair's factor as ggml_rope_cache_init does (Llama 3's scaling, LongRoPE; 1 otherwise); cos
    and sin are then multiplied by mscale (the context's attn_factor; 1 otherwise), as rope_yarn
    does. yarn = (ext_factor, n_ctx_orig, beta_fast, beta_slow): with ext_factor != 0 (YaRN),
    each pair's angle blends the interpolated (x freq_scale) and the extrapolated one by a ramp
    over the pair index, and mscale grows by 1 + 0.1 ln(1 / freq_scale) (rope_yarn).
    In two steps, rope_angles then rope_rotate: a forward pass takes the angles once for all
    its layers (every layer with the same base and scale has the same ones).

    x: [T, n_heads * head_dim] f32; positions: [T] i32; freq_factors: [n_rot / 2] f32
    """
    rope_rotate(x, rope_angles(positions, n_rot, freq_base, freq_scale, freq_factors, mscale, yarn),
                n_heads, head_dim, n_rot, neox)


@njit(cache=True, nogil=True)
def rope_angles(positions, n_rot, freq_base, freq_scale, freq_factors, mscale, yarn):
    """cos and sin (times mscale) of each token's angle for each pair (see rope): [T, n_rot / 2, 2] f32"""
    ext_factor, n_ctx_orig, beta_fast, beta_slow = yarn
    theta_scale = np.float32(freq_base) ** (np.float32(-2.0) / np.float32(n_rot))
    fs = np.float32(freq_scale)
    ms = np.float32(mscale)
    low, high = np.float32(0.0), np.float32(0.0)
    if ext_factor != 0.0:
        low, high = yarn_corr_dims(n_rot, n_ctx_orig, freq_base, beta_fast, beta_slow)
        ms = ms * fma(np.float32(0.1), np.float32(np.log(np.float32(1.0) / fs)), np.float32(1.0))
    cos_sin = np.empty((positions.shape[0], n_rot // 2, 2), np.float32)
    for t in range(positions.shape[0]):
        theta = np.float32(positions[t])
        for i in range(0, n_rot, 2):
            extrap = theta / freq_factors[i // 2]
            angle = fs * extrap
            if ext_factor != 0.0:
                y = (np.float32(i // 2) - low) / max(np.float32(0.001), high - low)
                mix = (np.float32(1.0) - min(np.float32(1.0), max(np.float32(0.0), y))) * np.float32(ext_factor)
                angle = fma(angle, np.float32(1.0) - mix, extrap * mix)
            cos_sin[t, i // 2, 0] = np.float32(np.cos(angle)) * ms
            cos_sin[t, i // 2, 1] = np.float32(np.sin(angle)) * ms
            theta = theta * theta_scale
    return cos_sin


@njit(cache=True, nogil=True)
def rope_rotate(x, cos_sin, n_heads, head_dim, n_rot, neox):
    """Rotate each head's pairs by the angles of rope_angles, in place (see rope).
    x: [T, n_heads * head_dim] f32; cos_sin: [T, n_rot / 2, 2] f32"""
    for t in range(x.shape[0]):
        for i in range(0, n_rot, 2):
            c = cos_sin[t, i // 2, 0]
            s = cos_sin[t, i // 2, 1]
            for h in range(n_heads):
                if neox:
                    j0 = h * head_dim + i // 2
                    j1 = j0 + n_rot // 2
                else:
                    j0 = h * head_dim + i
                    j1 = j0 + 1
                x0 = x[t, j0]
                x1 = x[t, j1]
                # ggml's C is compiled with FP contraction here: the first product is fused
                x[t, j0] = fma(x0, c, -(x1 * s))
                x[t, j1] = fma(x0, s, x1 * c)


@njit(cache=True, nogil=True)
def yarn_attn_factor(freq_scale, attn_factor):
    """llama_context's yarn_attn_factor for YaRN: get_mscale(1 / freq_scale) times its own
    cancelling 1 / (1 + 0.1 ln factor) (rope_yarn multiplies the latter back), times the
    file's attn_factor; f32 with the products fused as compiled."""
    factor = np.float32(1.0) / np.float32(freq_scale)
    log_factor = np.float32(np.log(factor))
    m = fma(np.float32(0.1), log_factor, np.float32(1.0)) if factor > np.float32(1.0) else np.float32(1.0)
    m = m * (np.float32(1.0) / fma(np.float32(0.1), log_factor, np.float32(1.0)))
    return m * np.float32(attn_factor)


@njit(cache=True, nogil=True)
def store_f16(cache_layer, seq_ids, positions, rows, n_head_kv, head_dim):
    """Write rows [T, n_head_kv * head_dim] as f16 bits into cache_layer
    [n_seq, n_head_kv, n_ctx, head_dim] uint16 at (seq_ids[t], :, positions[t])."""
    for t in range(rows.shape[0]):
        for h in range(n_head_kv):
            for d in range(head_dim):
                cache_layer[seq_ids[t], h, positions[t], d] = f16_bits_of(rows[t, h * head_dim + d])


KEY_CHUNK = 64   # positions per chunk of the transposed key cache (kv_cache.py), scored together
                 # by attention (its lanes scratch: 32 x 64 f32 = 8 KB, in L1)


@njit(cache=True, nogil=True)
def store_keys(cache_layer, seq_ids, positions, rows, n_head_kv, head_dim):
    """Write rows [T, n_head_kv * head_dim] as f16 bits into the chunked, transposed key cache
    cache_layer [n_seq, n_head_kv, n_chunks, head_dim, KEY_CHUNK] uint16."""
    for t in range(rows.shape[0]):
        chunk, at = positions[t] // KEY_CHUNK, positions[t] % KEY_CHUNK
        for h in range(n_head_kv):
            for d in range(head_dim):
                cache_layer[seq_ids[t], h, chunk, d, at] = f16_bits_of(rows[t, h * head_dim + d])


FA_TILE_Q = 64    # ggml's flash attention goes tiled for ubatches of at least this many tokens
FA_TILE_KV = 64   # ... and then takes the cache this many cells at a time (= KEY_CHUNK)

FA_SPLIT_MIN_KV = 512   # ... and splits a lone decode token's cells among its threads from this many
KV_PAD = 256            # llama.cpp's KV view covers the used cells rounded up to this


def kv_cells(n: int) -> int:
    """n cache cells rounded up to KV_PAD, as llama.cpp sizes its caches and their views."""
    return -(-n // KV_PAD) * KV_PAD


def split_kv_chunk(position: int, kv_size: int, n_threads: int) -> int:
    """For a decode token evaluated alone at `position` (its sequence's cells 0 .. position in
    use), the run of cells each of ggml's n_threads attends to, or 0 when ggml does not split:
    the KV view is the used cells rounded up to KV_PAD (at most kv_size), and ggml splits it
    when it has at least FA_SPLIT_MIN_KV cells (llama_kv_cache::get_n_kv; ggml-cpu ops.cpp)."""
    n_kv = min(kv_size, max(KV_PAD, kv_cells(position + 1)))
    return -(-n_kv // n_threads) if n_kv >= FA_SPLIT_MIN_KV else 0


ATTENTION_PARTS = 64   # at most this many scratch sets per call (see attention)
FA_BLOCK_ROWS = 16     # (token, head) rows a tiled job takes together (see _attend_tiled)
F32_PER_CACHE_LINE = 16


@njit(cache=True, nogil=True, inline="always")
def _whole_lines(n):
    """n f32 rounded up to whole cache lines."""
    return -(-n // F32_PER_CACHE_LINE) * F32_PER_CACHE_LINE


@njit(cache=True, nogil=True, inline="always")
def _scores(qh, keys, nj, head_dim, lanes, wide, out):
    """out[j] = qh . key(j) for the first nj positions of one key chunk, each one summed exactly as ggml_vec_dot_f16
    on AVX2: blocks of 32 go through 4 accumulators of 8 lanes (FMA), reduced as
    GGML_F32x8_REDUCE; the tail (head_dim % 32) is summed in double.
    Lane l of every position is kept in lanes[l, :nj], so each loop below runs across positions
    (contiguous in the transposed key cache) and vectorizes; the rows are taken as 1-D views
    because Numba vectorizes those loops and not the same loops written with 2-D indexing.

    qh: [head_dim] f32 (f16 values); keys: [head_dim, KEY_CHUNK] uint16; lanes: [32, KEY_CHUNK] f32
    wide: [KEY_CHUNK] f64 scratch; out: [nj] f32
    """
    n_simd = head_dim - head_dim % 32
    for i in range(0, n_simd, 32):
        for l in range(32):
            ql = qh[i + l]
            lane = lanes[l]
            key = keys[i + l, :nj]
            if i == 0:
                for j in range(nj):
                    lane[j] = fma(ql, f16_to_f32(key[j]), np.float32(0.0))
            else:
                for j in range(nj):
                    lane[j] = fma(ql, f16_to_f32(key[j]), lane[j])
    if n_simd:
        reduce4x8_across(lanes, nj, out)
    else:
        out[:nj] = 0
    if n_simd < head_dim:   # the tail, summed in double (across positions, like the lanes)
        for j in range(nj):
            wide[j] = np.float64(out[j])
        for d in range(n_simd, head_dim):
            qd = qh[d]
            key = keys[d, :nj]
            for j in range(nj):
                wide[j] += np.float64(qd * f16_to_f32(key[j]))
        for j in range(nj):
            out[j] = np.float32(wide[j])


@njit(cache=True, nogil=True, parallel=True)
def attention(q, k_cache, v_cache, seq_ids, positions, n_head, n_head_kv, head_dim, scale, window, tiled, kv_chunk,
              out):
    """Causal grouped-query attention of each token over its own sequence's cache: the
    positions max(0, pos - window + 1) .. pos when window > 0 (a sliding-window layer, whose
    older cells llama.cpp masks to -inf and skips), else 0 .. pos. Scores are scaled by `scale`.
    Tokens marked `tiled` follow ggml's tiled flash attention instead (`_attend_tiled`), which
    ggml uses for a whole ubatch of >= FA_TILE_Q tokens.

    Mirrors ggml's CPU flash attention for an f16 cache (one_chunk): q is rounded to f16,
    scores are f16 x f16 dot products, the softmax is online (running max M and sum S) and the
    weighted sum of V is accumulated in f16 with FMA, rounded after every step. Done in three
    passes with the same arithmetic: all scores (vectorized across positions), then the scalar
    recurrence of M and S, then the V accumulation (vectorized across head_dim).

    q:        [T, n_head * head_dim] f32 (after RoPE)
    k_cache:  [n_seq, n_head_kv, n_chunks, head_dim, KEY_CHUNK] uint16, f16 bits (one layer,
              transposed in chunks of positions, see kv_cache.py)
    v_cache:  [n_seq, n_head_kv, n_ctx, head_dim] uint16, f16 bits
    seq_ids:  [T] i32  which cache row each token reads
    positions:[T] i32  the token attends to cache positions up to positions[t]
    scale:    f32 scores are multiplied by (1/sqrt(head_dim), or 1 where q was scaled before)
    window:   i32 0, or how many positions a sliding-window layer sees
    tiled:    [T] bool  which tokens take the tiled path
    kv_chunk: [T] i32   > 0: the token is a lone decode token over >= 512 cells, which ggml
              splits among its threads in runs of this many cells (see `_attend`); 0 otherwise
    out:      [T, n_head * head_dim] f32
    """
    n_tokens = q.shape[0]
    group = n_head // n_head_kv
    scale = np.float32(scale)
    max_kv = 0
    for t in range(n_tokens):
        max_kv = max(max_kv, positions[t] + 1)
    block_tokens = max(1, FA_BLOCK_ROWS // group)
    job_t0, job_t1, job_h, any_tiled = _attention_jobs(tiled, seq_ids, n_head, n_head_kv, block_tokens)
    n_jobs = len(job_t0)
    # jobs are dealt round-robin to a few parts, each with its scratch arrays allocated once:
    # a prompt pass has thousands of small jobs, and the causal mask makes later tokens' jobs
    # longer, which round-robin spreads evenly over the threads
    n_parts = min(n_jobs, ATTENTION_PARTS)
    # every part's scratch in one allocation per kind (allocated inside the parallel loop, a
    # decode step of 32 heads made 256 small allocations: most of its attention time), each
    # row padded to whole cache lines so that two threads never write the same line
    vectors = np.empty((n_parts, 3, _whole_lines(head_dim)), np.float32)
    scores = np.empty((n_parts, 3, _whole_lines(max(max_kv, FA_TILE_KV))), np.float32)
    all_lanes = np.empty((n_parts, 32, KEY_CHUNK), np.float32)
    all_wide = np.empty((n_parts, KEY_CHUNK), np.float64)
    # the tiled jobs' scratch (_tiled_views), one flat row per part: the parallel function's
    # compile grew with every array it allocated (rows and widths padded for gemm_tile)
    block_rows = -(-block_tokens * group // GEMM_ROWS) * GEMM_ROWS
    padded_dim = -(-head_dim // LANES) * LANES
    scratch_size = _tiled_layout(block_rows, head_dim, padded_dim)[-1] if any_tiled else 0
    tiled_scratch = np.empty((n_parts, scratch_size), np.float32)
    for part in prange(n_parts):
        qh, acc = vectors[part, 0, :head_dim], vectors[part, 1, :head_dim]
        partial = vectors[part, 2, :head_dim]   # one thread's share under ggml's split-KV
        all_scores = scores[part, 0]
        all_ms, all_vs = scores[part, 1, :max_kv], scores[part, 2, :max_kv]
        lanes, wide = all_lanes[part], all_wide[part]
        for job in range(part, n_jobs, n_parts):
            t, h = job_t0[job], job_h[job]
            if job_t1[job] >= 0:
                _attend_tiled(q, k_cache, v_cache, seq_ids, positions, t, job_t1[job], h, group, head_dim, scale,
                              window, out, tiled_scratch[part], block_rows, padded_dim)
            else:
                _attend(q, k_cache, v_cache, seq_ids, positions, t, h, group, head_dim, scale, window, kv_chunk[t],
                        out, qh, acc, partial, all_scores, all_ms, all_vs, lanes, wide)


@njit(cache=True, nogil=True)
def _attention_jobs(tiled, seq_ids, n_head, n_head_kv, block_tokens):
    """attention's jobs, in token order: a run of up to block_tokens consecutive tiled tokens of
    one sequence with the query heads of one KV head (their rows share each tile of the
    cache), or an untiled token with one head. Returns (t0, t1, h) [n_jobs] each: t0 .. t1 - 1
    and KV head h for a run, or t0, t1 = -1 and head h for an untiled token; and whether any
    token is tiled."""
    n_tokens = len(tiled)
    job_t0 = np.empty(n_tokens * n_head, np.int64)
    job_t1 = np.empty(n_tokens * n_head, np.int64)
    job_h = np.empty(n_tokens * n_head, np.int64)
    n_jobs = 0
    any_tiled = False
    t = 0
    while t < n_tokens:
        end = t + 1
        if tiled[t]:
            any_tiled = True
            while end < n_tokens and end - t < block_tokens and tiled[end] and seq_ids[end] == seq_ids[t]:
                end += 1
        for h in range(n_head_kv if tiled[t] else n_head):
            job_t0[n_jobs], job_t1[n_jobs], job_h[n_jobs] = t, end if tiled[t] else -1, h
            n_jobs += 1
        t = end
    return job_t0[:n_jobs], job_t1[:n_jobs], job_h[:n_jobs], any_tiled


@njit(cache=True, nogil=True, inline="always")
def _first_visible(n_end, window):
    """The first cell a token that sees cells up to n_end - 1 attends to: n_end - window in a
    sliding-window layer once it has more than that many, else 0."""
    return n_end - window if window > 0 and n_end > window else 0


# (_attend, _attend_range and _attend_tiled are compiled as functions of their own, not inlined
# into `attention` at Numba's level: inlined, the one parallel function took 15 s of a 20 s cold
# start to compile; called, the whole cold start is 11 s, and decode and prefill are as fast)
@njit(cache=True, nogil=True)
def _attend(q, k_cache, v_cache, seq_ids, positions, t, h, group, head_dim, scale, window, kv_chunk, out,
            qh, acc, part, all_scores, all_ms, all_vs, lanes, wide):
    """One token's attention for one head (see `attention`), in the scratch arrays given: over
    all its visible cells at once, or, with kv_chunk > 0, as ggml's split-KV path for a lone
    decode token: each run of kv_chunk cells (one per thread) is attended on its own, and the
    partial results are merged in order as ggml_flash_attn_ext_reduce_partials merges them."""
    n_end = positions[t] + 1
    first = _first_visible(n_end, window)
    qt = q[t, h * head_dim:(h + 1) * head_dim]
    for d in range(head_dim):
        qh[d] = round_f16(qt[d])
    if kv_chunk <= 0:
        m, total = _attend_range(qh, k_cache, v_cache, seq_ids[t], h // group, head_dim, scale, first, n_end,
                                 acc, all_scores, all_ms, all_vs, lanes, wide)
    else:
        m, total = np.float32(-np.inf), np.float32(0.0)
        acc[:] = 0
        for c0 in range(first - first % kv_chunk, n_end, kv_chunk):
            mc, sc = _attend_range(qh, k_cache, v_cache, seq_ids[t], h // group, head_dim, scale, max(first, c0),
                                   min(n_end, c0 + kv_chunk), part, all_scores, all_ms, all_vs, lanes, wide)
            m_new = max(m, mc)
            scale_old = np.float32(np.exp(np.float32(m - m_new)))
            scale_new = np.float32(np.exp(np.float32(mc - m_new)))
            for d in range(head_dim):   # compiled with contraction: the first product is fused
                acc[d] = fma(acc[d], scale_old, part[d] * scale_new)
            total = fma(total, scale_old, sc * scale_new)
            m = m_new
    inv = np.float32(1.0) / total
    o = out[t, h * head_dim:(h + 1) * head_dim]
    for d in range(head_dim):
        o[d] = acc[d] * inv


@njit(cache=True, nogil=True)
def _attend_range(qh, k_cache, v_cache, seq, kv_head, head_dim, scale, first, n_end, acc,
                  all_scores, all_ms, all_vs, lanes, wide):
    """ggml's one_chunk over cells first .. n_end - 1: fills acc with the f16 accumulator of
    sum_j exp(s_j - M) v_j and returns (M, S), the running max and sum. qh: q rounded to f16."""
    keys = k_cache[seq, kv_head]                 # [n_chunks, head_dim, KEY_CHUNK]
    values = v_cache[seq, kv_head, first:]       # [n_kv, head_dim]
    n_kv = n_end - first
    # 1. scores; the key chunks are scored whole: start at the chunk holding `first`
    chunk0 = first - first % KEY_CHUNK
    chunk_scores = all_scores[:n_end - chunk0]
    for j0 in range(chunk0, n_end, KEY_CHUNK):
        nj = min(KEY_CHUNK, n_end - j0)
        _scores(qh, keys[j0 // KEY_CHUNK], nj, head_dim, lanes, wide, chunk_scores[j0 - chunk0:j0 - chunk0 + nj])
    scores = chunk_scores[first - chunk0:]
    for j in range(n_kv):
        scores[j] = scores[j] * scale
    # 2. online softmax: ms[j] rescales the accumulator, vs[j] weighs v_j
    ms = all_ms[:n_kv]
    vs = all_vs[:n_kv]
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
    acc[:] = 0
    for j in range(n_kv):
        if ms[j] != np.float32(1.0) and j > 0:
            mj = ms[j]
            for d in range(head_dim):
                acc[d] = round_f16(acc[d] * mj)
        w = vs[j]
        if w < np.float32(1e-30):
            continue   # w * |v| < 2^-80: cannot move an f16 accumulator, and sum S is >= 1
        value = values[j]
        for d in range(head_dim):
            acc[d] = round_f16(fma(f16_to_f32(value[d]), w, acc[d]))
    return m, total


@njit(cache=True, nogil=True, inline="always")
def _tiled_layout(block_rows, head_dim, padded_dim):
    """Where each of _attend_tiled's scratch arrays starts in a part's flat row of f32 (each on
    whole cache lines), and the row's length: the rows' q [rows, head_dim] at 0, accumulators
    [rows, padded_dim], tile weights [rows, FA_TILE_KV], running M and S [rows] each, and a
    tile's keys [head_dim, FA_TILE_KV] and values [FA_TILE_KV, padded_dim] in f32."""
    at_acc = _whole_lines(block_rows * head_dim)
    at_e = at_acc + _whole_lines(block_rows * padded_dim)
    at_m = at_e + _whole_lines(block_rows * FA_TILE_KV)
    at_s = at_m + _whole_lines(block_rows)
    at_k = at_s + _whole_lines(block_rows)
    at_v = at_k + _whole_lines(head_dim * FA_TILE_KV)
    return at_acc, at_e, at_m, at_s, at_k, at_v, at_v + _whole_lines(FA_TILE_KV * padded_dim)


@njit(cache=True, nogil=True, inline="always")
def _tiled_views(scratch, block_rows, head_dim, padded_dim):
    """One part's scratch row as its arrays (_tiled_layout)."""
    at_acc, at_e, at_m, at_s, at_k, at_v, _ = _tiled_layout(block_rows, head_dim, padded_dim)
    n_q, n_acc, n_e = block_rows * head_dim, block_rows * padded_dim, block_rows * FA_TILE_KV
    return (scratch[:n_q].reshape(block_rows, head_dim),
            scratch[at_acc:at_acc + n_acc].reshape(block_rows, padded_dim),
            scratch[at_e:at_e + n_e].reshape(block_rows, FA_TILE_KV),
            scratch[at_m:at_m + block_rows], scratch[at_s:at_s + block_rows],
            scratch[at_k:at_k + head_dim * FA_TILE_KV].reshape(head_dim, FA_TILE_KV),
            scratch[at_v:at_v + FA_TILE_KV * padded_dim].reshape(FA_TILE_KV, padded_dim))


@njit(cache=True, nogil=True, inline="always")
def _tile_weights(e, i, lo, hi, scale, acc, run_m, run_s):
    """Row i's scores e[i] (over one tile's cells) -> its softmax weights, as
    ggml_vec_soft_max_f32 takes them on AVX2: cells lo .. hi - 1 are visible (the others weigh
    exp(-inf) = 0); the running max run_m[i] moves to the tile's max, rescaling the row's
    accumulator and sum by expf(M_old - M); the weights (ggml's vectorized exp) are summed 8 at
    a time (hsum order) into a double that run_s[i] takes in."""
    for j in range(FA_TILE_KV):
        e[i, j] = e[i, j] * scale if lo <= j < hi else np.float32(-np.inf)
    tile_max = row_max(e, i)
    m = run_m[i]
    if tile_max > m:
        ms = np.float32(np.exp(np.float32(m - tile_max)))
        for d in range(acc.shape[1]):
            acc[i, d] = acc[i, d] * ms
        run_s[i] = run_s[i] * ms
        m = run_m[i] = tile_max
    for j in range(FA_TILE_KV):
        e[i, j] = expf_ggml(np.float32(e[i, j] - m))
    tile_sum = 0.0
    for b in range(0, FA_TILE_KV, 8):
        tile_sum += np.float64(((e[i, b] + e[i, b + 4]) + (e[i, b + 2] + e[i, b + 6])) +
                               ((e[i, b + 1] + e[i, b + 5]) + (e[i, b + 3] + e[i, b + 7])))
    run_s[i] = np.float32(np.float64(run_s[i]) + tile_sum)


@njit(cache=True, nogil=True)
def _attend_tiled(q, k_cache, v_cache, seq_ids, positions, t0, t1, kv_head, group, head_dim, scale, window, out,
                  scratch, block_rows, padded_dim):
    """Tokens t0 .. t1 - 1 (consecutive, of one sequence) with the `group` query heads of KV
    head kv_head, as ggml_compute_forward_flash_attn_ext_tiled does each of them: q stays f32;
    the cache is taken FA_TILE_KV cells at a time, and per tile every score is a plain chain of
    FMAs over head_dim (simd_gemm), the softmax moves on by one tile (`_tile_weights`), and each
    output dimension adds weight x value as a chain of FMAs (simd_gemm again). Tiles with no
    visible cell, and masked cells (weight 0), change nothing.

    Each (token, head) is one row of the tile products (flash_tiles.gemm_tile, its accumulators
    in registers), so the rows share each widened tile of keys and values; a row's arithmetic
    is the same as alone (a row without a visible cell in a tile adds weights of 0 to its
    values). The rows are padded with rows of zeros to a multiple of GEMM_ROWS, the
    accumulators and values with columns of zeros to padded_dim, as gemm_tile wants them.
    scratch: [_tiled_layout(block_rows, head_dim, padded_dim)[-1]] f32"""
    rows_q, rows_acc, weights, run_m, run_s, keys_f32, values_f32 = _tiled_views(scratch, block_rows, head_dim,
                                                                                 padded_dim)
    n_rows = (t1 - t0) * group                   # row i: token t0 + i // group, head kv_head * group + i % group
    n_padded = -(-n_rows // GEMM_ROWS) * GEMM_ROWS
    qa, acc, e = rows_q[:n_padded], rows_acc[:n_padded], weights[:n_padded]   # [n_padded, ...]
    keys = k_cache[seq_ids[t0], kv_head]         # [n_chunks, head_dim, KEY_CHUNK]
    values = v_cache[seq_ids[t0], kv_head]       # [n_ctx, head_dim]
    first_cell, end_cell = positions[t0] + 1, 0  # the cells any row sees
    for t in range(t0, t1):
        n_end = positions[t] + 1
        first_cell, end_cell = min(first_cell, _first_visible(n_end, window)), max(end_cell, n_end)
    # (loops rather than slice assignments here: each of those costs a compile of its own)
    for i in range(n_padded):
        t, h = t0 + i // group, kv_head * group + i % group
        for d in range(head_dim):
            qa[i, d] = q[t, h * head_dim + d] if i < n_rows else np.float32(0.0)
        for d in range(padded_dim):
            acc[i, d] = 0
        run_m[i], run_s[i] = -np.inf, 0.0
    for j in range(FA_TILE_KV):
        for d in range(head_dim, padded_dim):
            values_f32[j, d] = 0
    for c0 in range(first_cell - first_cell % FA_TILE_KV, end_cell, FA_TILE_KV):
        chunk = keys[c0 // KEY_CHUNK]            # [head_dim, KEY_CHUNK]
        for d in range(head_dim):                # (1-D views: Numba vectorizes these loops)
            widen_f16(chunk[d], keys_f32[d])
        for i in range(n_padded):
            for j in range(FA_TILE_KV):
                e[i, j] = 0
        gemm_tile(e, qa, keys_f32, 0, head_dim)  # e[i, j] = q_i . k_j, for all the tile's cells
        v_lo, v_hi = FA_TILE_KV, 0               # the cells some row weighs
        for token in range(t1 - t0):
            n_end = positions[t0 + token] + 1
            lo = max(_first_visible(n_end, window), c0) - c0
            hi = min(n_end, c0 + FA_TILE_KV) - c0
            for i in range(token * group, (token + 1) * group):
                if lo < hi:
                    _tile_weights(e, i, lo, hi, scale, acc, run_m, run_s)
                else:                            # no cell of this tile is visible to the row
                    for j in range(FA_TILE_KV):
                        e[i, j] = 0
            if lo < hi:
                v_lo, v_hi = min(v_lo, lo), max(v_hi, hi)
        if v_lo < v_hi:
            for j in range(v_lo, v_hi):
                widen_f16(values[c0 + j], values_f32[j])
            gemm_tile(acc, e, values_f32, v_lo, v_hi)   # acc[i] += sum_j e[i, j] v_j
    for i in range(n_rows):
        t, h = t0 + i // group, kv_head * group + i % group
        inv = np.float32(1.0) / run_s[i]
        o = out[t, h * head_dim:(h + 1) * head_dim]
        for d in range(head_dim):
            o[d] = acc[i, d] * inv


@njit(cache=True, nogil=True, error_model="numpy")
def swiglu(gate, up, out):
    """out = silu(gate) * up, silu(x) = x / (1 + exp(-x)), as ggml_vec_swiglu_f32 on AVX2:
    groups of 8 use ggml's vectorised exp, the tail (n_ff % 8) libm's expf.
    All [T, n_ff] f32.
    (NumPy's error model, C's division: with Python's, every division checks for a zero
    divisor and raises, and the branch kept the loop from vectorizing: 6.7x slower.)"""
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


GELU_COEF_A = np.float32(0.044715)
SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)
GELU_TABLE_LIMIT = np.float32(10.0)
F16_QUIET_NAN, F16_SIGN = 0x7E00, 0x8000   # beyond +-10, ggml's GELU is x (or 0) without the table


@njit(cache=True, nogil=True)
def gelu_f16_table():
    """ggml_table_gelu_f16: GELU-tanh of every f16 value, rounded to f16 ([65536] uint16, indexed
    by the input's bits). ggml builds it in ggml_cpu_init from ggml_gelu_f32,
        0.5 x (1 + tanhf(sqrt(2/pi) x (1 + 0.044715 x x))),
    compiled with FP contraction: the inner `1 + 0.044715 x * x` is one fused multiply-add."""
    table = np.empty(1 << 16, np.uint16)
    for bits in range(1 << 16):
        x = f16_to_f32(np.uint16(bits))
        inner = (SQRT_2_OVER_PI * x) * fma(GELU_COEF_A * x, x, np.float32(1.0))
        y = (np.float32(0.5) * x) * (np.float32(1.0) + np.float32(np.tanh(inner)))
        if y != y:   # NaN: ggml's table holds the quiet NaN without payload, sign kept
            table[bits] = F16_QUIET_NAN | (F16_SIGN if f32_bits(y) < 0 else 0)
        else:
            table[bits] = f16_bits_of(y)
    return table


@njit(cache=True, nogil=True, inline="always")
def _gelu_looked_up(g, table):
    """GELU with GGML_GELU_FP16: looked up in `table` (gelu_f16_table) at g rounded to f16,
    except past +-GELU_TABLE_LIMIT, where it is 0 or g."""
    if g <= -GELU_TABLE_LIMIT:
        return np.float32(0.0)
    if g >= GELU_TABLE_LIMIT:
        return g
    return f16_to_f32(table[f16_bits_of(g)])


@njit(cache=True, nogil=True)
def geglu(gate, up, table, out):
    """out = gelu(gate) * up, as ggml_vec_geglu_f32 (gelu: _gelu_looked_up).
    gate, up, out: [T, n_ff] f32"""
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]   # (below the table: exactly +0, not 0 * up, which may be -0)
            out[t, i] = np.float32(0.0) if g <= -GELU_TABLE_LIMIT else _gelu_looked_up(g, table) * up[t, i]


@njit(cache=True, nogil=True)
def gelu(x, table, out):
    """out = gelu(x), as ggml_vec_gelu_f32 (an encoder's FFN; gelu: _gelu_looked_up).
    x, out: [T, n_ff] f32"""
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[t, i] = _gelu_looked_up(x[t, i], table)


@njit(cache=True, nogil=True)
def softcap(x, cap):
    """x = cap * tanh(x / cap) in place, as gemma's ggml_scale(1/cap) -> ggml_tanh -> ggml_scale(cap).
    x: [T, n] f32"""
    inv = np.float32(1.0) / np.float32(cap)
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] = np.float32(np.tanh(x[t, i] * inv)) * np.float32(cap)


@njit(cache=True, nogil=True, parallel=True)
def rms_norm_parallel(x, weight, eps, out, parts):
    """rms_norm with its rows split into `parts` runs among threads (quants.row_parts)."""
    n = x.shape[0]
    for p in prange(parts):
        a, b = p * n // parts, (p + 1) * n // parts
        rms_norm(x[a:b], weight, eps, out[a:b])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def swiglu_parallel(gate, up, out, parts):
    """swiglu with its rows split into `parts` runs among threads (quants.row_parts)."""
    n = gate.shape[0]
    for p in prange(parts):
        a, b = p * n // parts, (p + 1) * n // parts
        swiglu(gate[a:b], up[a:b], out[a:b])


@njit(cache=True, nogil=True, parallel=True)
def geglu_parallel(gate, up, table, out, parts):
    """geglu with its rows split into `parts` runs among threads (quants.row_parts)."""
    n = gate.shape[0]
    for p in prange(parts):
        a, b = p * n // parts, (p + 1) * n // parts
        geglu(gate[a:b], up[a:b], table, out[a:b])
