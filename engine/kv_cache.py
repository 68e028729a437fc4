"""The KV cache: every past token's keys and values, per layer, per sequence.

Each sequence (a server slot) owns a row of `n_ctx` cells; the token at position p of a
sequence lives in cell p. llama.cpp stores the cache in f16 by default and so do we: as uint16
bit patterns (Numba has no f16 type on the CPU), widened exactly in `ops.attention`.

Keys are stored transposed in chunks of KEY_CHUNK positions, [n_ctx / 64, head_dim, 64] per
head: attention's score pass then reads, for each dimension, a contiguous run of positions, and
SIMD lanes work on 8 positions at once while each position's dot product keeps ggml's own lane
order. (Whole-context rows, [head_dim, n_ctx], would do the same, but one new token would then
touch a memory page in each of n_layer x n_head_kv x head_dim rows: ~23 MB per SmolLM2 sequence
before its second token.) Values stay [n_ctx, head_dim]: the weighted sum runs across head_dim.
`cells`/`put_cells` give both in one position-major layout for slot files and the prompt cache.
"""
from __future__ import annotations

import mmap

import numpy as np

from .hparams import HParams
from .ops import KEY_CHUNK, rope, store_f16, store_keys, yarn_attn_factor


def _mapped_f16_bits(shape: tuple) -> np.ndarray:
    """A zeroed uint16 array in an anonymous mapping of its own: its memory is taken page by
    page as it is written, and given back to the system when the array is freed.
    The cache itself needs the first: np.zeros asks Linux for 2 MB huge pages on large arrays,
    and then the first token of each of n_layer x n_head_kv rows would make 2 MB resident (~300 MB
    for one short SmolLM2 sequence). The prompt cache's states need the second: they are a few MB
    each and evicted as it turns over, and from malloc glibc would serve them from its heap once
    its adaptive mmap threshold has risen past them, where the holes they leave stay in RSS.
    (Fixing that threshold for the whole process instead put every large temporary of a prompt
    pass in a fresh mapping: 12% of a 1B model's prefill went to page faults.)"""
    n = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(2 * n, 1)), np.uint16, n).reshape(shape)


class KVCache:
    def __init__(self, hp: HParams, n_seq: int, n_ctx: int):
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        self.n_head_kv, self.head_dim = hp.n_head_kv, hp.head_dim
        self.hp = hp
        # RoPE's divisors for sequences of n_ctx positions (LongRoPE picks by context length)
        self.rope_factors = hp.rope_factors(n_ctx)   # [n_rot / 2] f32
        # what scales cos and sin (llama_context's yarn_attn_factor), and YaRN's parameters
        self.rope_mscale = float(yarn_attn_factor(hp.rope_freq_scale, hp.rope_attn_factor)) if hp.rope_ext_factor \
            else hp.rope_attn_factor
        self.rope_yarn = (float(hp.rope_ext_factor), int(hp.n_ctx_orig or hp.n_ctx_train),
                          float(hp.yarn_beta_fast), float(hp.yarn_beta_slow))
        n_chunks = -(-n_ctx // KEY_CHUNK)
        # f16 bits: k [n_layer, n_seq, n_head_kv, n_chunks, head_dim, KEY_CHUNK]
        #           v [n_layer, n_seq, n_head_kv, n_ctx, head_dim]
        self.k = _mapped_f16_bits((hp.n_layer, n_seq, hp.n_head_kv, n_chunks, hp.head_dim, KEY_CHUNK))
        self.v = _mapped_f16_bits((hp.n_layer, n_seq, hp.n_head_kv, n_ctx, hp.head_dim))

    def store(self, layer: int, seq_ids: np.ndarray, positions: np.ndarray,
              k: np.ndarray, v: np.ndarray) -> None:
        """Write a batch's keys and values [T, n_embd_kv] into their sequences' cells."""
        if positions.size and positions.max() >= self.n_ctx:
            raise IndexError(f"position {int(positions.max())} is past the cache size {self.n_ctx}")
        store_keys(self.k[layer], seq_ids, positions, k, self.n_head_kv, self.head_dim)
        store_f16(self.v[layer], seq_ids, positions, v, self.n_head_kv, self.head_dim)

    def _keys(self, seq: int, start: int, n: int):
        """Index of positions start..start+n-1 of a sequence in self.k: [:, seq, :, chunk, :, at]
        selects them as [n, n_layer, n_head_kv, head_dim]."""
        p = np.arange(start, start + n)
        return slice(None), seq, slice(None), p // KEY_CHUNK, slice(None), p % KEY_CHUNK

    def cells(self, seq: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of a sequence's first n cells: keys and values [n_layer, n_head_kv, n, head_dim],
        each in memory of its own (what the prompt cache keeps: _mapped_f16_bits)."""
        keys = self.k[self._keys(seq, 0, n)]                                # [n, n_layer, n_kv, hd]
        k = _mapped_f16_bits((self.hp.n_layer, self.n_head_kv, n, self.head_dim))
        v = _mapped_f16_bits(k.shape)
        k[...] = keys.transpose(1, 2, 0, 3)
        v[...] = self.v[:, seq, :, :n]
        return k, v

    def put_cells(self, seq: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write cells as `cells` returns them into a sequence's first cells."""
        n = k.shape[2]
        self.k[self._keys(seq, 0, n)] = k.transpose(2, 0, 1, 3)
        self.v[:, seq, :, :n] = v

    def shift(self, seq: int, n_keep: int, n_discard: int, n_past: int) -> None:
        """Context shift: drop cells [n_keep, n_keep + n_discard) of a sequence and slide the
        later ones down. Their keys were rotated for their old positions, so they are rotated
        back by n_discard positions (RoPE of a difference is a rotation by it), as llama.cpp's
        K-shift does, and rounded to f16 again."""
        hp = self.hp
        src, dst, m = n_keep + n_discard, n_keep, n_past - n_keep - n_discard
        delta = np.full(m, -n_discard, np.int32)
        keys = self.k[self._keys(seq, src, m)].view(np.float16).astype(np.float32)   # [m, L, n_kv, hd]
        moved = np.empty_like(keys)
        for layer in range(hp.n_layer):
            k = np.ascontiguousarray(keys[:, layer].reshape(m, -1))                     # [m, n_kv*hd]
            freq_base, freq_scale = hp.layer_rope(layer)
            rope(k, delta, hp.n_head_kv, hp.head_dim, hp.n_rot, freq_base, freq_scale, self.rope_factors, hp.rope_neox,
                 self.rope_mscale, self.rope_yarn)
            moved[:, layer] = k.reshape(m, hp.n_head_kv, hp.head_dim)
        self.k[self._keys(seq, dst, m)] = moved.astype(np.float16).view(np.uint16)
        self.v[:, seq, :, dst:dst + m] = self.v[:, seq, :, src:src + m].copy()
