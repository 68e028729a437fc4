"""The model's hyper-parameters, read once from GGUF metadata and passed explicitly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HParams:
    arch: str             # "llama", "qwen2"
    n_vocab: int          # rows of token_embd
    n_ctx_train: int      # context length the model was trained with
    n_embd: int           # width of the residual stream
    n_layer: int
    n_head: int           # query heads
    n_head_kv: int        # key/value heads (grouped-query attention when < n_head)
    n_ff: int             # hidden width of the SwiGLU feed-forward
    head_dim: int         # n_embd // n_head
    n_rot: int            # how many dimensions of each head RoPE rotates
    rope_freq_base: float
    rope_freq_scale: float
    rms_eps: float
    # Llama 3's RoPE scaling: one divisor per rotated pair (the rope_freqs.weight tensor,
    # [n_rot / 2]); empty when the file has none, which is the same as all ones
    rope_freq_factors: tuple = ()
    rope_neox: bool = False   # NeoX-style RoPE (qwen2): pairs (i, i + n_rot/2), not (2i, 2i+1)

    def rope_factors(self) -> np.ndarray:
        """The frequency divisors as RoPE takes them: [n_rot / 2] f32."""
        if self.rope_freq_factors:
            return np.asarray(self.rope_freq_factors, np.float32)
        return np.ones(self.n_rot // 2, np.float32)

    @property
    def n_embd_kv(self) -> int:
        """Width of one token's K (or V) row in the cache."""
        return self.n_head_kv * self.head_dim

    @property
    def n_gqa(self) -> int:
        """Query heads that share one key/value head."""
        return self.n_head // self.n_head_kv
