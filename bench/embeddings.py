"""Embedding throughput, numllama-server against llama-server on the same file: a BERT of
bge-small's shape (384 wide, 12 layers, F16, bge's vocabulary; random weights,
bench/random_gguf.write_bert), cls pooling. Measured: 16 single-text requests one after the other
(latency-bound), and one request of 32 texts (batch-bound), each text some 60 tokens; tokens
per second over the wall time, best of 3, and the ratio ours / theirs.

    python3 bench/embeddings.py --llama-server /path/to/llama-server
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import requests

from compare_tokens import add_server_args, running   # beside this file
from random_gguf import write_bert

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from llama_tree import tree_root  # noqa: E402

TEXT = ("Once upon a time there was a little girl named Lily who loved to play outside in the sun. "
        "One day she found a big red ball in the park and ran to show it to her mom.")


def measure(url: str) -> tuple[float, float]:
    texts = [f"{i}: {TEXT}" for i in range(32)]
    n_tokens = sum(len(requests.post(url + "/tokenize", json={"content": t, "add_special": True}).json()["tokens"])
                   for t in texts)
    single, batch = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        for t in texts[:16]:
            requests.post(url + "/embeddings", json={"input": t}, timeout=600).raise_for_status()
        single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        requests.post(url + "/embeddings", json={"input": texts}, timeout=600).raise_for_status()
        batch.append(time.perf_counter() - t0)
    return n_tokens / 2 / min(single), n_tokens / min(batch)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(ap)
    ap.add_argument("--threads", default="2")
    args = ap.parse_args()
    model = "/tmp/numllama-bge-small-shape.gguf"
    if not os.path.exists(model):
        write_bert(model, os.path.join(tree_root(), "models/ggml-vocab-bert-bge.gguf"),
                   n_embd=384, n_layer=12, n_head=12, n_ff=1536)
    flags = ("-c", "8192", "-t", args.threads, "--embeddings", "-ub", "4096", "-b", "4096")
    rates = {}
    for name, binary in (("numllama", args.numllama_server), ("llama.cpp", args.llama_server)):
        with running(binary, model, flags) as url:
            rates[name] = measure(url)
        print(f"{name:10s} one text per request {rates[name][0]:7.0f} tok/s   32 texts per request "
              f"{rates[name][1]:7.0f} tok/s", flush=True)
    (a1, a2), (b1, b2) = rates["numllama"], rates["llama.cpp"]
    print(f"ratio numllama / llama.cpp: one text {a1 / b1:.2f}, 32 texts {a2 / b2:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
