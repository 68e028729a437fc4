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


def write(path: str, vocab_from: str, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int,
          qtype: str = "Q4_0", seed: int = 0, n_ctx: int = 4096, rope_base: float = 10000.0,
          llama3_rope: bool = False, arch: str = "llama") -> str:
    """A random-weight model; matrices in `qtype`, norms in F32, embeddings in Q8_0; with
    llama3_rope, Llama 3's rope_freqs.weight; arch "qwen2" adds q/k/v biases (and llama.cpp
    then rotates NeoX-style)."""
    from numllama.engine.gguf_file import load_gguf
    vocab = load_gguf(vocab_from).vocab
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    w = GGUFWriter(path, arch)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_feed_forward_length(n_ff)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_base)
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

    n_vocab = len(vocab.tokens)
    matrix("token_embd.weight", n_vocab, n_embd, "Q8_0")
    if llama3_rope:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, rope_base))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
        matrix(p + "attn_q.weight", n_head * head_dim, n_embd, qtype)
        matrix(p + "attn_k.weight", n_head_kv * head_dim, n_embd, qtype)
        matrix(p + "attn_v.weight", n_head_kv * head_dim, n_embd, qtype)
        if arch == "qwen2":
            for name, rows in (("attn_q", n_head), ("attn_k", n_head_kv), ("attn_v", n_head_kv)):
                w.add_tensor(p + name + ".bias", rng.standard_normal(rows * head_dim).astype(np.float32))
        matrix(p + "attn_output.weight", n_embd, n_head * head_dim, qtype)
        matrix(p + "ffn_gate.weight", n_ff, n_embd, qtype)
        matrix(p + "ffn_up.weight", n_ff, n_embd, qtype)
        matrix(p + "ffn_down.weight", n_embd, n_ff, qtype)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    matrix("output.weight", n_vocab, n_embd, "Q8_0")
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
    ap.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    ap.add_argument("--vocab-from", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "stories260K.gguf"))
    a = ap.parse_args()
    embd, layers, heads, kv, ffn = SHAPES[a.shape] if a.shape else (a.embd, 30, a.heads, a.kv_heads, a.ffn)
    write(a.out, a.vocab_from, embd, a.layers or layers, heads, kv, ffn, a.type, seed=a.seed,
          rope_base=a.rope_base, llama3_rope=a.llama3_rope, arch=a.arch)


if __name__ == "__main__":
    main()
