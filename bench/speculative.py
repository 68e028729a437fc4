"""Speculative decoding: tokens per second with and without a draft model, numllama-server and
llama-server on the same files, and whether the drafted text is the undrafted one.

The target is SmolLM2-135M widened to F16 (every matrix of the Q4_1 file dequantized: a model 3.6x
bigger in memory, whose decode step costs what reading it costs); the draft is the Q4_1 file
itself, the same network, so it guesses well. Each server decodes the same prompts greedily,
128 tokens each, alone, then with --model-draft; the rate is llama-server's own measure
(timings.predicted_per_second), the ratio ours / theirs.

    python3 bench/speculative.py --llama-server /path/to/llama-server [--draft-max 8]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import requests
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from compare_tokens import add_server_args, running   # beside this file

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "List three colors:",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Water boils at"]
N_PREDICT = 128


def retyped_copy(src: str, dst: str, qtype: str = "F16") -> str:
    """src with every matrix stored as `qtype` (F16: dequantized; Q8_0...: requantized; norms and
    other vectors stay F32): the same network in another size, e.g. a bigger, slower target
    that a quantized draft guesses well for."""
    if os.path.exists(dst):
        return dst
    new_type = GGMLQuantizationType[qtype]
    reader = GGUFReader(src, "r")
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    writer = GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        block = GGML_QUANT_SIZES[new_type][0]
        if len(t.shape) < 2 or t.tensor_type == new_type or t.shape[0] % block:   # (rows that do not fit: as they are)
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        rows = dequantize(np.asarray(t.data), t.tensor_type)
        if new_type == GGMLQuantizationType.F16:
            writer.add_tensor(t.name, rows.astype(np.float16), raw_dtype=new_type)
        else:
            writer.add_tensor(t.name, quantize(rows.astype(np.float32), new_type), raw_dtype=new_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def decode(url: str) -> tuple[float, list[list[int]], dict]:
    """Mean decode rate over the prompts, the tokens, and the draft counts."""
    rates, tokens, drafted, accepted = [], [], 0, 0
    for p in PROMPTS:
        r = requests.post(url + "/completion", json={"prompt": p, "n_predict": N_PREDICT, "temperature": 0,
                                                      "ignore_eos": True, "cache_prompt": False,
                                                      "return_tokens": True}, timeout=600).json()
        rates.append(r["timings"]["predicted_per_second"])
        tokens.append(r["tokens"])
        drafted += r["timings"].get("draft_n", 0)
        accepted += r["timings"].get("draft_n_accepted", 0)
    return float(np.mean(rates)), tokens, {"draft_n": drafted, "draft_n_accepted": accepted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(ap)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--threads", default="2")
    args = ap.parse_args()
    from numllama.engine.model_files import default_model_path
    draft = default_model_path()
    target = retyped_copy(draft, "/tmp/SmolLM2-135M-Instruct.F16.gguf", "F16")
    flags = ("-c", "2048", "-np", "1", "-t", args.threads)
    spec = flags + ("-md", draft, "--spec-type", "draft-simple", "--spec-draft-n-max", str(args.draft_max))
    rows = []
    for name, binary in (("numllama", args.numllama_server), ("llama.cpp", args.llama_server)):
        with running(binary, target, flags) as url:
            plain, plain_tokens, _ = decode(url)
        with running(binary, target, spec) as url:
            fast, fast_tokens, counts = decode(url)
        same = sum(a == b for a, b in zip(plain_tokens, fast_tokens))
        rows.append((name, plain, fast, counts, same))
        print(f"{name:10s} no draft {plain:6.1f} tok/s   draft {fast:6.1f} tok/s   speedup {fast / plain:4.2f}x   "
              f"accepted {counts['draft_n_accepted']}/{counts['draft_n']}   text as without draft: "
              f"{same}/{len(PROMPTS)}", flush=True)
    (_, ours_plain, ours_fast, _, _), (_, theirs_plain, theirs_fast, _, _) = rows
    print(f"ratio numllama / llama.cpp: no draft {ours_plain / theirs_plain:.2f}, draft {ours_fast / theirs_fast:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
