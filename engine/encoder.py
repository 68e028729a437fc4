"""The BERT forward pass: an encoder, whose output is one vector per token for embeddings (bge,
MiniLM, e5, ...), not next-token logits.

It differs from the decoder of model.py in four ways, each a line below: every token sees its
whole sequence (no causal mask), positions are learned vectors added to the input (no RoPE),
LayerNorm (mean and variance, with a bias) comes after each block rather than RMSNorm before it,
and every projection has a bias. Read `EncoderModel.forward` top to bottom:

    x = embed(tokens) + type_embd[0] + pos_embd[positions]
    x = layer_norm(x) * embd_norm + b
    for each layer:
        q, k, v = x Wq + bq, x Wk + bk, x Wv + bv
        o = attention(q, k, v over the whole sequence) Wo + bo
        x = layer_norm(o + x) * attn_out_norm + b
        f = gelu(x Wup + bup) Wdown + bdown
        x = layer_norm(f + x) * layer_out_norm + b
    hidden = x                                   (pooled by engine.pooling)

as llama.cpp's src/models/bert.cpp builds it; the kernels are those of the decoder (the same
matmul orders, ggml's flash attention over f16 keys and values, its GELU table).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .float_ops import tanhf_array
from .gguf_file import GGUFModel, ModelLoadError
from .hparams import HParams
from .kv_cache import KVCache
from .model import Batch, TokenEmbedding, split
from .ops import FA_TILE_Q, attention, gelu, gelu_f16_table, layer_norm
from .quants import KernelOrder, PackedWeight, linear, pack_tensor

TOKEN_TYPE_A = 0   # llama.cpp gives every token type 0 ("sentence A")


@dataclass(frozen=True)
class EncoderLayer:
    qkv: tuple                 # (W_q, W_k, W_v) PackedWeights, [n_embd, n_embd] each
    qkv_bias: tuple            # (b_q, b_k, b_v) [n_embd] f32
    wo: PackedWeight
    bo: np.ndarray | None
    attn_out_norm: tuple       # (weight, bias) [n_embd] f32
    up: PackedWeight           # [n_ff, n_embd]
    up_bias: np.ndarray | None
    down: PackedWeight         # [n_embd, n_ff]
    down_bias: np.ndarray | None
    layer_out_norm: tuple      # (weight, bias)


class EncoderModel:
    gpu = None   # (no GPU layers for encoders)

    def __init__(self, gguf: GGUFModel, on_layer=None):
        self.gguf = gguf
        self.hp: HParams = gguf.hparams
        t = gguf.tensors
        need = gguf.tensor

        def vector(name, required=True):
            if not required and name not in t:
                return None
            return np.asarray(need(name).data, dtype=np.float32)

        def norm(prefix):
            return vector(prefix + ".weight"), vector(prefix + ".bias")

        def layer(i):
            p = f"blk.{i}."
            if p + "attn_qkv.weight" in t:
                raise ModelLoadError(f"{gguf.path}: a fused attn_qkv in a BERT file is not supported yet")
            packed = EncoderLayer(
                qkv=tuple(pack_tensor(need(p + f"attn_{x}.weight")) for x in "qkv"),
                qkv_bias=tuple(vector(p + f"attn_{x}.bias") for x in "qkv"),
                wo=pack_tensor(need(p + "attn_output.weight")), bo=vector(p + "attn_output.bias", False),
                attn_out_norm=norm(p + "attn_output_norm"),
                up=pack_tensor(need(p + "ffn_up.weight")), up_bias=vector(p + "ffn_up.bias", False),
                down=pack_tensor(need(p + "ffn_down.weight")), down_bias=vector(p + "ffn_down.bias", False),
                layer_out_norm=norm(p + "layer_output_norm"))
            if on_layer:
                on_layer(1)
            return packed

        hp = self.hp
        self.sources: dict = {}        # (LoRA adapters are not applied to encoders: lora.py refuses them)
        self.source_rows: dict = {}
        self.qkv_sizes = (hp.n_embd, hp.n_embd, hp.n_embd)
        self.gelu_table = gelu_f16_table()                           # [65536] u16
        self.token_embd = TokenEmbedding(need("token_embd.weight"))
        self.pos_embd = TokenEmbedding(need("position_embd.weight"))
        types = t.get("token_types.weight")
        self.type_row = TokenEmbedding(types)(np.array([TOKEN_TYPE_A]))[0] if types is not None else None
        self.embd_norm = norm("token_embd_norm")
        self.layers = [layer(i) for i in range(hp.n_layer)]
        # a reranker's classification head (cls, then tanh, then cls.output), where the file has one
        self.cls = pack_tensor(t["cls.weight"]) if "cls.weight" in t else None
        self.cls_b = vector("cls.bias", False)
        self.cls_out = pack_tensor(t["cls.output.weight"]) if "cls.output.weight" in t else None
        self.cls_out_b = vector("cls.output.bias", False)
        gguf.drop_resident_pages()

    def use_gpu(self, n_layers: int) -> str:
        from .cuda_backend import CudaUnavailable
        raise CudaUnavailable("numllama runs encoders (bert) on the CPU only")

    def new_cache(self, n_seq: int, n_ctx: int) -> KVCache:
        """Scratch rows for the keys and values of the batch being encoded (nothing is kept for
        later tokens: an encoder has no next token)."""
        return KVCache(self.hp, n_seq, n_ctx)

    def forward(self, batch: Batch, cache: KVCache, hidden: bool = True, loras: tuple = ()) -> np.ndarray:
        """Encode the batch: each sequence's tokens see all of that sequence's tokens in it.
        Returns the rows of the tokens with want_logits, [n_wanted, n_embd] (an encoder has no
        logits, so `hidden` changes nothing)."""
        if loras:
            raise ValueError("LoRA adapters are not applied to encoders")
        hp = self.hp
        n_tokens = len(batch.tokens)
        eps = np.float32(hp.rms_eps)
        x = self.token_embd(batch.tokens)                          # [T, n_embd]
        if self.type_row is not None:
            x += self.type_row
        x = self.pos_embd(batch.positions) + x                     # learned absolute positions
        x = self._norm(x, self.embd_norm, eps)
        # no causal mask: a token sees up to the last position of its sequence in this batch
        last = np.zeros(int(batch.seq_ids.max()) + 1, np.int32)
        np.maximum.at(last, batch.seq_ids, batch.positions)
        visible = last[batch.seq_ids]                              # [T] i32
        order = KernelOrder.for_batch(batch.prompt_pass, batch.seq_ids)
        tiled = batch.attn_tiled if batch.attn_tiled is not None else np.full(n_tokens, n_tokens >= FA_TILE_Q)
        no_split = np.zeros(n_tokens, np.int32)
        score_scale = np.float32(1.0) / np.sqrt(np.float32(hp.head_dim))
        attn_out = np.empty((n_tokens, hp.n_head * hp.head_dim), np.float32)
        final = len(self.layers) - 1
        for il, layer in enumerate(self.layers):
            q, k, v = split(linear(x, *layer.qkv, order=order), self.qkv_sizes)   # [T, n_embd] x3
            bq, bk, bv = layer.qkv_bias
            q += bq
            k += bk
            v += bv
            cache.store(il, batch.seq_ids, batch.positions, k, v)  # (as f16: llama.cpp casts them for its attention)
            attention(q, cache.k[il], cache.v[il], batch.seq_ids, visible, hp.n_head, hp.n_head_kv, hp.head_dim,
                      score_scale, 0, tiled, no_split, attn_out)
            (o,) = linear(attn_out, layer.wo, order=order)        # [T, n_embd]
            if layer.bo is not None:
                o += layer.bo
            if il == final and not batch.want_logits.all():       # only the rows wanted go on
                x, o = x[batch.want_logits], o[batch.want_logits]
                order = KernelOrder.vec_dot(len(x))
            x = self._norm(o + x, layer.attn_out_norm, eps)        # [T, n_embd]
            (f,) = linear(x, layer.up, order=order)               # [T, n_ff]
            if layer.up_bias is not None:
                f += layer.up_bias
            act = np.empty_like(f)
            gelu(f, self.gelu_table, act)
            (f,) = linear(act, layer.down, order=order)           # [T, n_embd]
            if layer.down_bias is not None:
                f += layer.down_bias
            x = self._norm(f + x, layer.layer_out_norm, eps)
        return x

    @staticmethod
    def _norm(x: np.ndarray, weight_bias: tuple, eps) -> np.ndarray:
        out = np.empty_like(x)
        layer_norm(np.ascontiguousarray(x), weight_bias[0], weight_bias[1], eps, out)
        return out

    def classify(self, pooled: np.ndarray) -> np.ndarray:
        """Rank pooling's head for an encoder (build_pooling, LLAMA_POOLING_TYPE_RANK): the [CLS]
        row through cls (+ bias) and tanh, then cls.output (+ bias), where the file has them.
        pooled [n_seqs, n_embd] -> [n_seqs, n_cls_out]"""
        order = KernelOrder.columns(len(pooled))   # one product over every sequence of the batch
        cur = np.ascontiguousarray(pooled)
        if self.cls is not None:
            (cur,) = linear(cur, self.cls, order=order)
            if self.cls_b is not None:
                cur += self.cls_b
            cur = tanhf_array(cur.ravel()).reshape(cur.shape)
        if self.cls_out is not None:
            (cur,) = linear(np.ascontiguousarray(cur), self.cls_out, order=order)
            if self.cls_out_b is not None:
                cur += self.cls_out_b
        return cur
