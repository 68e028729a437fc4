"""The model's hyper-parameters, read once from GGUF metadata and passed explicitly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# the GGUF key {arch}.pooling_type, as llama.cpp's enum llama_pooling_type numbers them
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")


def pooling_name(value) -> str:
    """A file's {arch}.pooling_type as a name ("" when the file does not say)."""
    if value is None or not 0 <= int(value) < len(POOLING_TYPES):
        return ""
    return POOLING_TYPES[int(value)]


@dataclass(frozen=True)
class HParams:
    arch: str             # "llama", "qwen2", "qwen3", "gemma3", "phi3"; "bert" (an encoder: engine/encoder.py)
    n_vocab: int          # rows of token_embd
    n_ctx_train: int      # context length the model was trained with
    n_embd: int           # width of the residual stream
    n_layer: int
    n_head: int           # query heads
    n_head_kv: int        # key/value heads (grouped-query attention when < n_head)
    n_ff: int             # hidden width of the SwiGLU feed-forward
    head_dim: int         # n_embd // n_head, unless the file says (key_length: qwen3, gemma3)
    n_rot: int            # how many dimensions of each head RoPE rotates
    rope_freq_base: float
    rope_freq_scale: float
    rms_eps: float        # the norms' epsilon (LayerNorm's, for an encoder)
    # Llama 3's RoPE scaling: one divisor per rotated pair (the rope_freqs.weight tensor,
    # [n_rot / 2]); empty when the file has none, which is the same as all ones
    rope_freq_factors: tuple = ()
    rope_neox: bool = False   # NeoX-style RoPE (qwen2): pairs (i, i + n_rot/2), not (2i, 2i+1)
    # LongRoPE (phi3 128k): divisors for contexts up to the original length (short) and beyond
    # (long), chosen by the context each sequence gets; cos and sin are scaled by attn_factor
    rope_factors_short: tuple = ()
    rope_factors_long: tuple = ()
    n_ctx_orig: int = 0       # rope.scaling.original_context_length (0: n_ctx_train)
    rope_attn_factor: float = 1.0
    # YaRN (rope.scaling.type yarn): blend interpolated and extrapolated angles between the pairs
    # that beta_fast and beta_slow select over n_ctx_orig; 0 = no YaRN
    rope_ext_factor: float = 0.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # what the families do differently (docs/11-model-families.md); the defaults are llama's
    qk_norm: bool = False     # RMSNorm over each head of q and of k before RoPE (qwen3, gemma3)
    post_norms: bool = False  # RMSNorm on the attention and FFN outputs before each residual add (gemma3)
    ffn_act: str = "silu"     # the gated FFN's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gemma3)
    embd_scale: float = 1.0   # token embeddings are multiplied by this (gemma3: sqrt(n_embd))
    # q is multiplied by this before attention, which then scores with scale 1 (gemma3, phi3);
    # 0: the scores themselves are scaled by 1/sqrt(head_dim) (llama, qwen)
    q_scale: float = 0.0
    logit_softcap: float = 0.0   # logits -> cap * tanh(logits / cap) when > 0 (gemma3 files may set it)
    # sliding-window attention: a layer marked in swa_layers sees only its last n_swa positions
    # and rotates with its own RoPE base and scale (gemma3: 5 of every 6 layers)
    n_swa: int = 0
    swa_layers: tuple = ()    # [n_layer] bool, empty when no layer slides
    rope_freq_base_swa: float = 10000.0
    rope_freq_scale_swa: float = 1.0
    causal: bool = True       # a token attends to earlier positions only (False: to its whole sequence, bert)
    # embeddings: how the file says a sequence's rows are pooled into one vector
    # ("none", "mean", "cls", "last", "rank"; "" when it does not say: engine.pooling)
    pooling: str = ""

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

    def layer_window(self, il: int) -> int:
        """How many positions back layer il attends (0: all of them)."""
        return self.n_swa if self.is_swa(il) else 0

    def layer_rope(self, il: int) -> tuple[float, float]:
        """(freq_base, freq_scale) of layer il's RoPE, as llama_model::get_rope_freq_base/scale."""
        if self.is_swa(il):
            return self.rope_freq_base_swa, self.rope_freq_scale_swa
        return self.rope_freq_base, self.rope_freq_scale

    def rope_factors(self, n_ctx_seq: int = 0) -> np.ndarray:
        """The frequency divisors as RoPE takes them, for sequences of n_ctx_seq positions:
        [n_rot / 2] f32 (llama_model::get_rope_factors)."""
        if self.rope_freq_factors:
            return np.asarray(self.rope_freq_factors, np.float32)
        if self.rope_factors_long and n_ctx_seq > (self.n_ctx_orig or self.n_ctx_train):
            return np.asarray(self.rope_factors_long, np.float32)
        if self.rope_factors_short:
            return np.asarray(self.rope_factors_short, np.float32)
        return np.ones(self.n_rot // 2, np.float32)

    @property
    def n_embd_kv(self) -> int:
        """Width of one token's K (or V) row in the cache."""
        return self.n_head_kv * self.head_dim

    @property
    def n_gqa(self) -> int:
        """Query heads that share one key/value head."""
        return self.n_head // self.n_head_kv
