"""The model's hyper-parameters, read once from GGUF metadata and passed explicitly."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HParams:
    arch: str             # "llama"
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

    @property
    def n_embd_kv(self) -> int:
        """Width of one token's K (or V) row in the cache."""
        return self.n_head_kv * self.head_dim

    @property
    def n_gqa(self) -> int:
        """Query heads that share one key/value head."""
        return self.n_head // self.n_head_kv
