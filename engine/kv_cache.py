"""The KV cache: every past token's keys and values, per layer, per sequence.

Each sequence (a server slot) owns a row of `n_ctx` cells; the token at position p of a
sequence lives in cell p. llama.cpp stores the cache in f16 by default and so do we: as uint16
bit patterns (Numba has no f16 type on the CPU), widened exactly in `ops.attention`.

Keys are stored transposed, [head_dim, n_ctx] per head: attention's score pass then reads, for
each dimension, a contiguous run of positions, and SIMD lanes work on 8 positions at once while
each position's dot product keeps ggml's own lane order. Values stay [n_ctx, head_dim]: the
weighted sum runs across head_dim. `cells`/`put_cells` give both in one position-major layout
for slot files and the prompt cache.
"""
from __future__ import annotations

import numpy as np

from .hparams import HParams
from .ops import rope, store_f16, store_f16_transposed


class KVCache:
    def __init__(self, hp: HParams, n_seq: int, n_ctx: int):
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        self.n_head_kv, self.head_dim = hp.n_head_kv, hp.head_dim
        self.hp = hp
        self.k = np.zeros((hp.n_layer, n_seq, hp.n_head_kv, hp.head_dim, n_ctx), np.uint16)  # f16 bits
        self.v = np.zeros((hp.n_layer, n_seq, hp.n_head_kv, n_ctx, hp.head_dim), np.uint16)  # f16 bits

    def store(self, layer: int, seq_ids: np.ndarray, positions: np.ndarray,
              k: np.ndarray, v: np.ndarray) -> None:
        """Write a batch's keys and values [T, n_embd_kv] into their sequences' cells."""
        if positions.size and positions.max() >= self.n_ctx:
            raise IndexError(f"position {int(positions.max())} is past the cache size {self.n_ctx}")
        store_f16_transposed(self.k[layer], seq_ids, positions, k, self.n_head_kv, self.head_dim)
        store_f16(self.v[layer], seq_ids, positions, v, self.n_head_kv, self.head_dim)

    def cells(self, seq: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of a sequence's first n cells: keys and values [n_layer, n_head_kv, n, head_dim]."""
        return (np.ascontiguousarray(self.k[:, seq, :, :, :n].transpose(0, 1, 3, 2)),
                self.v[:, seq, :, :n].copy())

    def put_cells(self, seq: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write cells as `cells` returns them into a sequence's first cells."""
        n = k.shape[2]
        self.k[:, seq, :, :, :n] = k.transpose(0, 1, 3, 2)
        self.v[:, seq, :, :n] = v

    def shift(self, seq: int, n_keep: int, n_discard: int, n_past: int) -> None:
        """Context shift: drop cells [n_keep, n_keep + n_discard) of a sequence and slide the
        later ones down. Their keys were rotated for their old positions, so they are rotated
        back by n_discard positions (RoPE of a difference is a rotation by it), as llama.cpp's
        K-shift does, and rounded to f16 again."""
        hp = self.hp
        src, dst, m = n_keep + n_discard, n_keep, n_past - n_keep - n_discard
        delta = np.full(m, -n_discard, np.int32)
        for layer in range(hp.n_layer):
            k = self.k[layer, seq, :, :, src:src + m].view(np.float16).astype(np.float32)  # [n_kv, hd, m]
            k = np.ascontiguousarray(k.transpose(2, 0, 1).reshape(m, -1))                   # [m, n_kv*hd]
            rope(k, delta, hp.n_head_kv, hp.head_dim, hp.n_rot, hp.rope_freq_base, hp.rope_freq_scale)
            k = k.reshape(m, hp.n_head_kv, hp.head_dim).transpose(1, 2, 0)
            self.k[layer, seq, :, :, dst:dst + m] = k.astype(np.float16).view(np.uint16)
            self.v[layer, seq, :, dst:dst + m] = self.v[layer, seq, :, src:src + m].copy()
