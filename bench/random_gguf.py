"""Write a Llama-architecture GGUF of any shape with random weights, so that shapes too big to
ship (a 1B or 8B model) can be made where they run. llama.cpp loads these files too, so they
serve for exactness and speed comparisons. The vocabulary is stories260K's (512 tokens).

    python3 bench/random_gguf.py OUT.gguf --embd 576 --layers 30 --heads 9 --kv-heads 3 --ffn 1536 --type Q4_0
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf import quants as gq

SHAPES = {   # name: (n_embd, n_layer, n_head, n_head_kv, n_ff)
    "smollm2": (576, 30, 9, 3, 1536),
    "1b": (2048, 22, 32, 4, 5632),
    "8b": (4096, 32, 32, 8, 14336),
}


def llama3_rope_factors(head_dim: int, base: float, factor: float = 8.0, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, original_context: int = 8192) -> np.ndarray:
    """Llama 3's RoPE scaling as convert_hf_to_gguf.py writes it into rope_freqs.weight: no
    change for short wavelengths, `factor` for long ones, a smooth mix between. [head_dim/2] f32"""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


def write(path: str, vocab_from: str, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int,
          qtype: str = "Q4_0", seed: int = 0, n_ctx: int = 4096, rope_base: float = 10000.0,
          llama3_rope: bool = False, arch: str = "llama", head_dim: int | None = None,
          n_rot: int | None = None, sliding_window: int = 0, swa_pattern: int = 0, longrope_ctx: int = 0,
          yarn: tuple = (), classifier: tuple = ()) -> str:
    """A random-weight model; matrices in `qtype`, norms in F32, embeddings in Q8_0. Each family
    gets the tensors and keys that make it what it is (docs/11-model-families.md):
    llama3_rope: Llama 3's rope_freqs.weight; qwen2: q/k/v biases; qwen3: per-head q/k norms
    (and head_dim may differ from n_embd / n_head); gemma3: q/k norms, post-attention and
    post-FFN norms, tied output, and `sliding_window` with every `swa_pattern`-th layer global;
    phi3: one fused attn_qkv and one ffn_up holding gate and up, RoPE on the first n_rot dims;
    longrope_ctx: LongRoPE's short and long factor tensors, with that original context length
    and an attn_factor (phi3 128k files); yarn = (factor, original context): YaRN scaling keys;
    classifier = labels: a reranker as convert_hf_to_gguf.py writes Qwen3 rerankers, with a
    cls.output head (one row per label), rank pooling and a rerank prompt template."""
    from numllama.engine.gguf_file import load_gguf
    vocab = load_gguf(vocab_from).vocab
    rng = np.random.default_rng(seed)
    head_dim = head_dim or n_embd // n_head
    n_rot = n_rot or head_dim
    w = GGUFWriter(path, arch)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_feed_forward_length(n_ff)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(n_rot)
    w.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    w.add_rope_freq_base(rope_base)
    if sliding_window:
        w.add_sliding_window(sliding_window)
        if swa_pattern:
            w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)
    w.add_tokenizer_model(vocab.model)
    w.add_token_list(vocab.tokens)
    w.add_token_scores([float(s) for s in vocab.scores])
    w.add_token_types(list(int(t) for t in vocab.token_types))
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)

    def matrix(name: str, rows: int, cols: int, kind: str):
        x = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        t = GGMLQuantizationType[kind]
        w.add_tensor(name, gq.quantize(x, t), raw_dtype=t)

    def norm(name: str, n: int):
        """Around 1, not exactly: a norm weight of all ones would hide a missing multiply."""
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    n_vocab = len(vocab.tokens)
    n_q, n_kv = n_head * head_dim, n_head_kv * head_dim
    matrix("token_embd.weight", n_vocab, n_embd, "Q8_0")
    if llama3_rope:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, rope_base))
    if yarn:
        w.add_string(f"{arch}.rope.scaling.type", "yarn")
        w.add_float32(f"{arch}.rope.scaling.factor", float(yarn[0]))
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", int(yarn[1]))
    if longrope_ctx:
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", longrope_ctx)
        w.add_float32(f"{arch}.rope.scaling.attn_factor", 1.1902380714238083)   # sqrt(1 + ln 32 / ln 4096)
        w.add_tensor("rope_factors_short.weight", (1 + rng.random(n_rot // 2)).astype(np.float32))
        w.add_tensor("rope_factors_long.weight", (1 + 7 * rng.random(n_rot // 2)).astype(np.float32))
    for i in range(n_layer):
        p = f"blk.{i}."
        if arch in ("llama", "qwen2"):   # (files before per-family norms: weights of exactly 1)
            w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
            w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
        else:
            norm(p + "attn_norm.weight", n_embd)
            norm(p + "ffn_norm.weight", n_embd)
        if arch == "phi3":
            matrix(p + "attn_qkv.weight", n_q + 2 * n_kv, n_embd, qtype)
        else:
            matrix(p + "attn_q.weight", n_q, n_embd, qtype)
            matrix(p + "attn_k.weight", n_kv, n_embd, qtype)
            matrix(p + "attn_v.weight", n_kv, n_embd, qtype)
        if arch == "qwen2":
            for name, rows in (("attn_q", n_q), ("attn_k", n_kv), ("attn_v", n_kv)):
                w.add_tensor(p + name + ".bias", rng.standard_normal(rows).astype(np.float32))
        if arch in ("qwen3", "gemma3"):
            norm(p + "attn_q_norm.weight", head_dim)
            norm(p + "attn_k_norm.weight", head_dim)
        if arch == "gemma3":
            norm(p + "post_attention_norm.weight", n_embd)
            norm(p + "post_ffw_norm.weight", n_embd)
        matrix(p + "attn_output.weight", n_embd, n_q, qtype)
        if arch == "phi3":
            matrix(p + "ffn_up.weight", 2 * n_ff, n_embd, qtype)
        else:
            matrix(p + "ffn_gate.weight", n_ff, n_embd, qtype)
            matrix(p + "ffn_up.weight", n_ff, n_embd, qtype)
        matrix(p + "ffn_down.weight", n_embd, n_ff, qtype)
    if classifier:
        w.add_array(f"{arch}.classifier.output_labels", list(classifier))
        w.add_uint32(f"{arch}.pooling_type", 4)   # rank
        w.add_string("tokenizer.chat_template.rerank", "Query: {query}\nDocument: {document}\nRelevant:")
        w.add_tensor("cls.output.weight", (rng.standard_normal((len(classifier), n_embd)) / np.sqrt(n_embd))
                     .astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    if arch != "gemma3":   # gemma3 ties its output projection to token_embd
        matrix("output.weight", n_vocab, n_embd, "Q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_bert(path: str, vocab_from: str, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_ff: int = 128,
               qtype: str = "F16", pooling: int = 2, seed: int = 0, n_ctx: int = 512, classifier: tuple = ()) -> str:
    """A random-weight BERT encoder (bge's layout: token, type and position embeddings, post-
    LayerNorm blocks with biases, GELU) with the WordPiece vocabulary of `vocab_from` (llama.cpp's
    models/ggml-vocab-bert-bge.gguf). pooling: the file's pooling_type (2: cls, as bge's);
    classifier = labels: a reranker's head (cls, cls.output) and rank pooling."""
    from numllama.engine.gguf_file import read_gguf_tensors
    fields, _, _ = read_gguf_tensors(vocab_from)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, "bert")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_feed_forward_length(n_ff)
    w.add_float32("bert.attention.layer_norm_epsilon", 1e-12)
    w.add_bool("bert.attention.causal", False)
    w.add_uint32("bert.pooling_type", 4 if classifier else pooling)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        w.add_string(key, fields[key])
    w.add_token_list(list(fields["tokenizer.ggml.tokens"]))
    w.add_token_types([int(x) for x in fields["tokenizer.ggml.token_type"]])
    w.add_uint32("tokenizer.ggml.token_type_count", 2)
    for key in ("unknown_token_id", "seperator_token_id", "padding_token_id", "cls_token_id", "mask_token_id"):
        w.add_uint32("tokenizer.ggml." + key, int(fields["tokenizer.ggml." + key]))
    n_vocab = len(fields["tokenizer.ggml.tokens"])

    def matrix(name: str, rows: int, cols: int, kind: str = qtype, scale: float = 1.0):
        x = (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            t = GGMLQuantizationType[kind]
            w.add_tensor(name, gq.quantize(x, t), raw_dtype=t)

    def vec(name: str, n: int, around: float = 0.0, spread: float = 0.1):
        w.add_tensor(name, (around + spread * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", n_vocab, n_embd, "F16", scale=8.0)
    matrix("token_types.weight", 2, n_embd, "F32", scale=8.0)
    matrix("position_embd.weight", n_ctx, n_embd, "F16", scale=8.0)
    vec("token_embd_norm.weight", n_embd, 1.0)
    vec("token_embd_norm.bias", n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        for x in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(p + x + ".weight", n_embd, n_embd)
            vec(p + x + ".bias", n_embd)
        vec(p + "attn_output_norm.weight", n_embd, 1.0)
        vec(p + "attn_output_norm.bias", n_embd)
        matrix(p + "ffn_up.weight", n_ff, n_embd)
        vec(p + "ffn_up.bias", n_ff)
        matrix(p + "ffn_down.weight", n_embd, n_ff)
        vec(p + "ffn_down.bias", n_embd)
        vec(p + "layer_output_norm.weight", n_embd, 1.0)
        vec(p + "layer_output_norm.bias", n_embd)
    if classifier:
        w.add_array("bert.classifier.output_labels", list(classifier))
        matrix("cls.weight", n_embd, n_embd, "F32")
        vec("cls.bias", n_embd)
        matrix("cls.output.weight", len(classifier), n_embd, "F32")
        vec("cls.output.bias", len(classifier))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_lora(path: str, base: str, targets: tuple = ("attn_q", "attn_v", "attn_output", "ffn_down"),
               rank: int = 4, alpha: float = 8.0, seed: int = 0, qtype: str = "F32", output: bool = True) -> str:
    """A LoRA adapter for the model file `base`, as convert_lora_to_gguf.py writes one: for each
    layer's target matrix W [n_out, n_in] (and output.weight), NAME.lora_a [rank, n_in] and
    NAME.lora_b [n_out, rank] with random values (B is not zero, as a trained adapter's is not)."""
    from numllama.engine.gguf_file import read_gguf_tensors
    fields, tensors, _ = read_gguf_tensors(base)
    arch = fields["general.architecture"]
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    t = GGMLQuantizationType[qtype]
    names = [f"blk.{i}.{n}.weight" for i in range(int(fields[f"{arch}.block_count"])) for n in targets]
    for name in names + (["output.weight"] if output and "output.weight" in tensors else []):
        n_in, n_out = (int(d) for d in tensors[name].shape[:2])
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (0.5 * rng.standard_normal((n_out, rank)) / np.sqrt(rank)).astype(np.float32)
        for suffix, m in ((".lora_a", a), (".lora_b", b)):
            w.add_tensor(name + suffix, m.astype(np.float16) if qtype == "F16" else gq.quantize(m, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", choices=SHAPES, help="a named shape (else give the numbers)")
    ap.add_argument("--embd", type=int, default=576)
    ap.add_argument("--layers", type=int, default=None, help="overrides the shape's layer count")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--rope-base", type=float, default=10000.0)
    ap.add_argument("--llama3-rope", action="store_true", help="write Llama 3's rope_freqs.weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--head-dim", type=int, help="when not n_embd / n_head (qwen3, gemma3)")
    ap.add_argument("--rot", type=int, help="RoPE dimensions, when fewer than head_dim (phi3)")
    ap.add_argument("--sliding-window", type=int, default=0, help="gemma3: positions a sliding layer sees")
    ap.add_argument("--swa-pattern", type=int, default=0, help="gemma3: every Nth layer is global (file default 6)")
    ap.add_argument("--longrope-ctx", type=int, default=0, help="phi3: LongRoPE factors for this original context")
    ap.add_argument("--yarn", type=float, nargs=2, metavar=("FACTOR", "ORIG_CTX"), help="YaRN scaling")
    ap.add_argument("--vocab-from", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "stories260K.gguf"))
    a = ap.parse_args()
    embd, layers, heads, kv, ffn = SHAPES[a.shape] if a.shape else (a.embd, 30, a.heads, a.kv_heads, a.ffn)
    write(a.out, a.vocab_from, embd, a.layers or layers, heads, kv, ffn, a.type, seed=a.seed,
          rope_base=a.rope_base, llama3_rope=a.llama3_rope, arch=a.arch, head_dim=a.head_dim, n_rot=a.rot,
          sliding_window=a.sliding_window, swa_pattern=a.swa_pattern, longrope_ctx=a.longrope_ctx,
          yarn=tuple(a.yarn) if a.yarn else ())


if __name__ == "__main__":
    main()
