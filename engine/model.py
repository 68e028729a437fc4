"""The Llama forward pass over a batch of tokens from any number of sequences.

Read `LlamaModel.forward` top to bottom: it is the math of one transformer step.

    x = embed(tokens)                       (x sqrt(n_embd): gemma3)
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = h Wq, h Wk, h Wv          (+ bq, bk, bv: qwen2)
        q, k = rms_norm(q_head) * q_norm, rms_norm(k_head) * k_norm   (qwen3, gemma3)
        rope(q), rope(k); k, v -> KV cache  (a sliding-window layer has its own RoPE base)
        o = attention(q, cache) Wo          (over the last n_swa positions in a sliding-window layer)
        x = x + o                           (o = rms_norm(o) * attn_post_norm first: gemma3)
        h = rms_norm(x) * ffn_norm
        f = (act(h Wgate) * (h Wup)) Wdown  (act: silu, or gelu-tanh for gemma3)
        x = x + f                           (f = rms_norm(f) * ffn_post_norm first: gemma3)
    logits = rms_norm(x) * output_norm  Wout   (cap * tanh(logits / cap) where a cap is set)

Every product W x above also adds scale * B (A x) for each active LoRA adapter that adapts W
(engine/lora.py; `loras` of forward).

Which of these a file takes is in its HParams (see docs/11-model-families.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf_file import GGUFModel, ModelLoadError
from .hparams import HParams
from .kv_cache import KVCache
from .lora import add_lora
from .ops import (FA_TILE_Q, attention, geglu, geglu_parallel, gelu_f16_table, rms_norm, rms_norm_parallel,
                  rope_angles, rope_rotate, softcap, swiglu, swiglu_parallel)
from .pooling import softmax_rows
from .quants import (PARALLEL_ROWS, KernelOrder, PackedWeight, linear, pack_tensor, pack_weight, repacked_order,
                     row_parts)
from .quants.blocks import BLOCK_SIZES, dequantize


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights. Projections that read the same input and share a tensor type are
    packed as one matrix (their rows stacked), so they cost one kernel call: `qkv` is
    (W_qkv,) [n_head*head_dim + 2*n_head_kv*head_dim, n_embd], or (W_q, W_k, W_v) when the
    file mixes types; `gate_up` likewise (W_gate_up,) [2*n_ff, n_embd] or (W_gate, W_up).
    Each output row is computed on its own, so stacking changes no result."""
    attn_norm: np.ndarray     # [n_embd] f32
    qkv: tuple                # PackedWeight(s), see above
    wo: PackedWeight          # [n_embd, n_head * head_dim]
    ffn_norm: np.ndarray      # [n_embd] f32
    gate_up: tuple            # PackedWeight(s), see above
    w_down: PackedWeight      # [n_embd, n_ff]
    qkv_bias: tuple | None = None   # (b_q, b_k, b_v) f32 added after the projections (qwen2)
    q_norm: np.ndarray | None = None          # [head_dim] f32, when hp.qk_norm
    k_norm: np.ndarray | None = None          # [head_dim] f32, when hp.qk_norm
    attn_post_norm: np.ndarray | None = None  # [n_embd] f32, when hp.post_norms
    ffn_post_norm: np.ndarray | None = None   # [n_embd] f32, when hp.post_norms


@dataclass
class Batch:
    """Tokens to evaluate together: each from some sequence, at some position in it."""
    tokens: np.ndarray       # [T] i32
    positions: np.ndarray    # [T] i32
    seq_ids: np.ndarray      # [T] i32  KV-cache row of each token's sequence
    want_logits: np.ndarray  # [T] bool  which tokens' logits to return
    prompt_pass: np.ndarray  # [T] bool  token belongs to a prompt evaluated >= 2 tokens at a time
    # [T] bool  token's ubatch has >= FA_TILE_Q tokens, so ggml's attention takes its tiled path
    # (None: the batch is one ubatch)
    attn_tiled: np.ndarray | None = None
    # [T] i32  > 0 for a lone decode token whose attention ggml splits among threads (ops.split_kv_chunk)
    attn_kv_chunk: np.ndarray | None = None

    @staticmethod
    def single(tokens, start_pos: int, seq_id: int = 0, all_logits: bool = False,
               prompt_pass: bool | None = None) -> "Batch":
        """One sequence's tokens. By default a call with several tokens is a prompt pass and a
        single token a decode step, as llama.cpp sees them."""
        n = len(tokens)
        want = np.ones(n, bool) if all_logits else np.arange(n) == n - 1
        if prompt_pass is None:
            prompt_pass = n >= 2
        return Batch(np.asarray(tokens, np.int32), np.arange(start_pos, start_pos + n, dtype=np.int32),
                     np.full(n, seq_id, np.int32), want, np.full(n, prompt_pass, bool))


class TokenEmbedding:
    """Rows of token_embd, dequantized on demand (get_rows): the table itself stays in the mmap."""

    def __init__(self, tensor):
        self.type_name = tensor.tensor_type.name
        self.n_embd = int(tensor.shape[0])
        self.data = tensor.data  # [n_vocab, row_bytes] u8, or [n_vocab, n_embd] float

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        rows = self.data[tokens]
        if self.type_name == "F32":
            return np.array(rows, dtype=np.float32)
        if self.type_name == "F16":
            return rows.view(np.float16).astype(np.float32)
        if self.type_name == "BF16":
            return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return dequantize(self.type_name, rows, len(tokens), self.n_embd)


class LlamaModel:
    cpu_ops: type   # the ops of the layers on the CPU: CPU_OPS (engine/compile_ahead.py swaps it in a warm-up)

    def __init__(self, gguf: GGUFModel, on_layer=None):
        """on_layer(1) is called after each layer is packed (a progress bar's update)."""
        self.gguf = gguf
        self.hp: HParams = gguf.hparams
        self.cpu_ops = CPU_OPS
        t = gguf.tensors
        need = gguf.tensor

        def weight(name):
            tensor = need(name)
            n_cols = int(tensor.shape[0])
            tname = tensor.tensor_type.name
            if tname in BLOCK_SIZES and n_cols % BLOCK_SIZES[tname][1]:
                raise ModelLoadError(f"tensor {name}: row length {n_cols} is not a multiple of "
                                     f"the {tname} block size")
            return pack_tensor(tensor)

        def stacked(*names) -> tuple:
            """One packed matrix of the tensors' rows when they share type and width."""
            tensors = [need(n) for n in names]
            kinds = {(x.tensor_type, int(x.shape[0])) for x in tensors}
            ttype = tensors[0].tensor_type.name
            orders = {repacked_order(ttype, int(x.shape[1])) for x in tensors}
            total_rows = sum(int(x.shape[1]) for x in tensors)
            # llama.cpp picks each matrix's summation order from its own row count
            if len(kinds) > 1 or orders != {repacked_order(ttype, total_rows)}:
                return tuple(weight(n) for n in names)
            for n in names:
                weight(n)   # (the checks only: the tensors are small)
            (ttype, n_cols), = kinds
            rows = np.concatenate([np.asarray(x.data) for x in tensors])
            return (pack_weight(ttype.name, rows, rows.shape[0], n_cols),)

        def vector(name):
            return np.asarray(need(name).data, dtype=np.float32)

        def biases(*names):
            """The projections' bias vectors, where the file has them (all or none)."""
            present = [n in t for n in names]
            if not any(present):
                return None
            if not all(present):
                raise ModelLoadError(f"{gguf.path} has some of {', '.join(names)} but not all")
            return tuple(vector(n) for n in names)

        def layer(i):
            p = f"blk.{i}."
            hp = self.hp
            if p + "attn_qkv.weight" in t:      # phi3: q, k, v are one tensor already
                qkv, qkv_names = (weight(p + "attn_qkv.weight"),), (p + "attn_qkv.weight",)
            else:
                qkv_names = (p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight")
                qkv = stacked(*qkv_names)
            if p + "ffn_gate.weight" in t:
                gate_up_names = (p + "ffn_gate.weight", p + "ffn_up.weight")
                gate_up = stacked(*gate_up_names)
            else:                               # phi3: ffn_up is [2 n_ff, n_embd], gate rows first
                gate_up_names = (p + "ffn_up.weight",)
                gate_up = (weight(p + "ffn_up.weight"),)
            packed = LayerWeights(
                attn_norm=vector(p + "attn_norm.weight"),
                qkv=qkv,
                wo=weight(p + "attn_output.weight"),
                ffn_norm=vector(p + "ffn_norm.weight"),
                gate_up=gate_up,
                w_down=weight(p + "ffn_down.weight"),
                qkv_bias=biases(p + "attn_q.bias", p + "attn_k.bias", p + "attn_v.bias"),
                q_norm=vector(p + "attn_q_norm.weight") if hp.qk_norm else None,
                k_norm=vector(p + "attn_k_norm.weight") if hp.qk_norm else None,
                attn_post_norm=vector(p + "post_attention_norm.weight") if hp.post_norms else None,
                ffn_post_norm=vector(p + "post_ffw_norm.weight") if hp.post_norms else None,
            )
            # which file tensors each packed matrix holds, for a GPU copy (cuda_backend)
            for names in (qkv_names, gate_up_names, (p + "attn_output.weight", p + "ffn_down.weight")):
                for name in names:
                    self.source_rows[name] = int(t[name].shape[1])
            self.sources[id(packed.wo)] = (p + "attn_output.weight",)
            self.sources[id(packed.w_down)] = (p + "ffn_down.weight",)
            for group, names in ((qkv, qkv_names), (gate_up, gate_up_names)):
                for w, src in zip(group, (names,) if len(group) == 1 else ((n,) for n in names)):
                    self.sources[id(w)] = src
            gguf.drop_resident_pages()   # the layer's GGUF pages were copied: out of our RSS now
            if on_layer:
                on_layer(1)
            return packed

        hp = self.hp
        self.sources: dict[int, tuple] = {}   # id(PackedWeight) -> the GGUF tensor names it stacks
        self.source_rows: dict[str, int] = {}  # those names -> their rows (what a LoRA adapter may adapt)
        self.qkv_sizes = (hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_head_kv * hp.head_dim)
        self.gelu_table = gelu_f16_table() if hp.ffn_act == "gelu_tanh" else None   # [65536] u16
        self.token_embd = TokenEmbedding(need("token_embd.weight"))
        self.layers = [layer(i) for i in range(self.hp.n_layer)]
        self.output_norm = vector("output_norm.weight")
        # models with tied embeddings reuse token_embd as the output projection
        self.output = weight("output.weight" if "output.weight" in t else "token_embd.weight")
        if "output.weight" in t:   # (a tied output is token_embd, which adapters do not adapt here)
            self.sources[id(self.output)] = ("output.weight",)
            self.source_rows["output.weight"] = int(t["output.weight"].shape[1])
        # a reranker's classifier head (qwen3 rerankers carry one): [n_cls_out, n_embd], bias [n_cls_out]
        self.cls_out = weight("cls.output.weight") if "cls.output.weight" in t else None
        self.cls_out_b = vector("cls.output.bias") if "cls.output.bias" in t else None
        gguf.drop_resident_pages()

    gpu = None   # CudaLayers when some layers run on a GPU (use_gpu)

    def use_gpu(self, n_layers: int) -> str:
        """Run the first n_layers on a CUDA device; raises CudaUnavailable (with the reason)."""
        from .cuda_backend import CudaLayers
        self.gpu = CudaLayers(self, n_layers) if n_layers > 0 else None
        return self.gpu.device_name if self.gpu else "cpu"

    def new_cache(self, n_seq: int, n_ctx: int) -> KVCache:
        return KVCache(self.hp, n_seq, n_ctx)

    def forward(self, batch: Batch, cache: KVCache, hidden: bool = False, loras: tuple = ()) -> np.ndarray:
        """Evaluate the batch, writing its keys and values into `cache`.
        Returns logits [n_wanted, n_vocab] for the tokens with want_logits, in batch order; with
        `hidden`, their rows after the final norm instead, [n_wanted, n_embd] (what embeddings
        are pooled from: engine.pooling). loras: ((lora.LoraAdapter, scale), ...) to apply."""
        hp = self.hp
        n_tokens = len(batch.tokens)
        x = self.token_embd(batch.tokens)                          # [T, n_embd]
        if hp.embd_scale != 1.0:                                   # gemma3
            x *= np.float32(hp.embd_scale)
        attn_out = np.empty((n_tokens, hp.n_head * hp.head_dim), np.float32)
        # llama scales the scores by 1/sqrt(head_dim); gemma3 and phi3 scale q instead
        score_scale = np.float32(1.0) if hp.q_scale else np.float32(1.0) / np.sqrt(np.float32(hp.head_dim))
        # each token's matmuls sum in the order llama.cpp would use for it (prompt pass or
        # decode step, and how big its sequence's prompt chunk is): see quants.KernelOrder
        order = KernelOrder.for_batch(batch.prompt_pass, batch.seq_ids)
        tiled = batch.attn_tiled if batch.attn_tiled is not None else np.full(n_tokens, n_tokens >= FA_TILE_Q)
        kv_chunk = batch.attn_kv_chunk if batch.attn_kv_chunk is not None else np.zeros(n_tokens, np.int32)
        last = len(self.layers) - 1
        angles = {}   # RoPE's cos and sin, taken once for all the layers that share a base and scale
        for il, layer in enumerate(self.layers):
            ops = self.gpu if self.gpu is not None and il < self.gpu.n_layers else self.cpu_ops
            # attention block
            h = ops.rms_norm(x, layer.attn_norm, hp.rms_eps)       # [T, n_embd]
            q, k, v = split(self.linear(ops, h, layer.qkv, order, loras), self.qkv_sizes)  # [T, n_head*hd], [T, n_kv*hd] x2
            if layer.qkv_bias is not None:                         # qwen2
                bq, bk, bv = layer.qkv_bias
                q += bq
                k += bk
                v += bv
            if hp.qk_norm:                                         # qwen3, gemma3: each head on its own
                q = ops.rms_norm(q.reshape(-1, hp.head_dim), layer.q_norm, hp.rms_eps).reshape(n_tokens, -1)
                k = ops.rms_norm(k.reshape(-1, hp.head_dim), layer.k_norm, hp.rms_eps).reshape(n_tokens, -1)
            base_scale = hp.layer_rope(il)                        # (freq_base, freq_scale)
            if base_scale not in angles:                           # [T, n_rot/2, 2]: RoPE's cos and sin
                angles[base_scale] = rope_angles(batch.positions, hp.n_rot, *base_scale, cache.rope_factors,
                                                 cache.rope_mscale, cache.rope_yarn)
            rope_rotate(q, angles[base_scale], hp.n_head, hp.head_dim, hp.n_rot, hp.rope_neox)
            rope_rotate(k, angles[base_scale], hp.n_head_kv, hp.head_dim, hp.n_rot, hp.rope_neox)
            if hp.q_scale:
                q *= np.float32(hp.q_scale)
            cache.store(il, batch.seq_ids, batch.positions, k, v)
            ops.attention(q, cache.k[il], cache.v[il], batch.seq_ids, batch.positions,
                          hp.n_head, hp.n_head_kv, hp.head_dim, score_scale, hp.layer_window(il), tiled, kv_chunk,
                          attn_out)
            (o,) = self.linear(ops, attn_out, (layer.wo,), order, loras)   # [T, n_embd]
            if il == last and not batch.want_logits.all():
                # only the rows whose logits are wanted go on (llama.cpp's inp_out_ids); these
                # few rows are multiplied one by one there, hence vec_dot order from here on
                # (when every row is wanted, the matmuls stay the batch's own)
                x = np.ascontiguousarray(x[batch.want_logits])     # [n_wanted, n_embd]
                o = np.ascontiguousarray(o[batch.want_logits])
                order = KernelOrder.vec_dot(len(x))
            if hp.post_norms:                                      # gemma3
                o = ops.rms_norm(o, layer.attn_post_norm, hp.rms_eps)
            x += o                                                 # residual
            # feed-forward block (gated: SwiGLU or GeGLU)
            h = ops.rms_norm(x, layer.ffn_norm, hp.rms_eps)
            gate, up = split(self.linear(ops, h, layer.gate_up, order, loras), (hp.n_ff, hp.n_ff))  # [T, n_ff] x2
            act = np.empty_like(gate)
            if len(gate) >= PARALLEL_ROWS:   # a prompt pass: rows split among threads
                if hp.ffn_act == "gelu_tanh":
                    geglu_parallel(gate, up, self.gelu_table, act, row_parts(len(gate)))
                else:
                    swiglu_parallel(gate, up, act, row_parts(len(gate)))
            elif hp.ffn_act == "gelu_tanh":
                geglu(gate, up, self.gelu_table, act)
            else:
                swiglu(gate, up, act)
            (down,) = self.linear(ops, act, (layer.w_down,), order, loras)   # [T, n_embd]
            if hp.post_norms:                                      # gemma3
                down = ops.rms_norm(down, layer.ffn_post_norm, hp.rms_eps)
            x += down                                              # residual
        normed = rms_norm_rows(x, self.output_norm, hp.rms_eps)   # [n_wanted, n_embd]
        if hidden:
            return normed
        (logits,) = self.linear(CPU_OPS, normed, (self.output,), order, loras)   # [n_wanted, n_vocab]
        if hp.logit_softcap:
            softcap(logits, hp.logit_softcap)
        return logits


    def linear(self, ops, x: np.ndarray, weights: tuple, order, loras: tuple) -> list[np.ndarray]:
        """x times each weight (ops.linear), plus each active LoRA adapter's delta (engine.lora)."""
        outs = ops.linear(x, *weights, order=order)
        if loras:
            add_lora(outs, weights, self.sources, self.source_rows, x, loras, order)
        return outs

    def classify(self, pooled: np.ndarray) -> np.ndarray:
        """Rank pooling's head for a causal model (build_pooling, LLAMA_POOLING_TYPE_RANK): the
        pooled rows through cls.output (+ its bias) where the file has one, and a softmax over
        the classes for qwen3 rerankers. Without a head the rows are the scores.
        pooled [n_seqs, n_embd] -> [n_seqs, n_cls_out]"""
        if self.cls_out is None:
            return pooled
        # one product over every sequence of the batch
        (out,) = linear(np.ascontiguousarray(pooled), self.cls_out, order=KernelOrder.columns(len(pooled)))
        if self.cls_out_b is not None:
            out += self.cls_out_b
        return softmax_rows(out) if self.hp.arch == "qwen3" else out


def split(outputs: list, sizes: tuple) -> list:
    """The outputs of separate projections, or the column blocks of a stacked one."""
    if len(outputs) == len(sizes):
        return outputs
    (stacked,) = outputs
    parts, at = [], 0
    for n in sizes:   # one decode row's slices are contiguous already: no copy then
        parts.append(np.ascontiguousarray(stacked[:, at:at + n]))
        at += n
    return parts


def rms_norm_rows(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    if len(x) >= PARALLEL_ROWS:   # a prompt pass: rows split among threads
        rms_norm_parallel(x, weight, eps, out, row_parts(len(x)))
    else:
        rms_norm(x, weight, eps, out)
    return out


class CPU_OPS:
    """The ops a layer runs with (CudaLayers has the same three for GPU layers)."""
    linear = staticmethod(linear)
    rms_norm = staticmethod(rms_norm_rows)
    attention = staticmethod(attention)
