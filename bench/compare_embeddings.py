"""The embedding and rerank routes against numllama-server and llama-server on the same files:
stories260K with each pooling type (mean, cls, last, none), a random-weight Qwen3 reranker with a
classifier head (bench/random_gguf.py, classifier=("yes", "no")), and random-weight BERT encoders
with bge's vocabulary (random_gguf.write_bert: an embedder with cls pooling, and a reranker with
bert's cls/tanh/cls.output head). Every answer is compared whole: status, shape, and every float
bit for bit (the "model" field, a path, aside).

The four inputs of one request fill one batch of fewer than 64 tokens. From 64 on, ggml's flash
attention goes tiled, 64 cache cells at a time, and llama-server's sequences share one cache
whose cells it hands out in turn (llama_kv_cache::find_slot): a sequence that does not start at
cell 0 is cut into other tiles than numllama's, which keeps each sequence in a row of its own,
and its last bits differ (measured: a batch of four inputs, 74 tokens). numllama does not model
llama.cpp's cell allocation yet.

Not compared: llama-server with a non-unified KV cache (-np N without -kvu) and several inputs
of unequal lengths in one request. It cuts such a batch into ubatches of equal tokens per
sequence (split_equal) and pools each sequence over its last ubatch only, so a longer input's
mean covers its last tokens (checked: it equals the mean of those tokens alone); numllama pools
the whole input. Nor /embedding on a --reranking server, where llama-server copies n_embd floats
out of the head's n_cls_out; nor several documents on a reranker without a classifier head,
where llama-server reads the score of a batch's sequence i at offset i of the pooled rows
(n_cls_out * i), which is element i of the first sequence's row (checked: a second document got
the first's row[1]); numllama scores each document by its own row.

    python3 bench/compare_embeddings.py --llama-server /path/to/llama-server [--record tests/data/embeddings.json] [-v]
"""
from __future__ import annotations

import json
import os
import sys

import requests

from compare_tokens import recording_args, running, write_golden   # beside this file
from random_gguf import write as write_random_gguf
from random_gguf import write_bert

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from llama_tree import tree_root  # noqa: E402  (llama.cpp's vocabulary files: tests/llama_tree.py fetches them)

HERE = os.path.dirname(os.path.abspath(__file__))
STORIES = os.path.join(HERE, "..", "tests", "data", "stories260K.gguf")
FLAGS = ("-c", "2048", "-t", "2")   # llama-server's defaults otherwise: 4 slots, one KV cache
TEXTS = ["Once upon a time, there was a little girl named Lily.", "She liked to play outside.", "The sun",
         "a" * 20]
POOLED = [
    ("/embedding", {"content": TEXTS[0]}),
    ("/embeddings", {"input": TEXTS}),                               # one batch of four sequences
    ("/embeddings", {"input": TEXTS[1], "embd_normalize": -1}),
    ("/embeddings", {"input": TEXTS[2], "embd_normalize": 0}),
    ("/embeddings", {"input": TEXTS[3], "embd_normalize": 3}),
    ("/embeddings", {"input": [[1, 400, 200, 300, 5, 6, 7]]}),        # token ids
    ("/embeddings", {"input": [{"content": [{"type": "text", "text": TEXTS[0]}]}]}),
    ("/v1/embeddings", {"input": TEXTS[:2]}),
    ("/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"}),
    ("/v1/embeddings", {"input": TEXTS[0], "encoding_format": "bits"}),
    ("/v1/embeddings", {"model": "x"}),
    ("/rerank", {"query": "a", "documents": ["b"]}),                  # 501 without --reranking
]
CASES = {   # name: (model, server flags, requests)
    "mean": ("stories", ("--embedding", "--pooling", "mean"), POOLED),
    "cls": ("stories", ("--embedding", "--pooling", "cls"), POOLED[:3]),
    # first on a fresh server, a prompt of >= 64 tokens (ggml's tiled flash attention): its cells
    # start at 0 in llama-server's shared KV cache, as in numllama's (see the note above)
    "last": ("stories", ("--embedding", "--pooling", "last"), [("/embeddings", {"input": TEXTS[0] * 6})] + POOLED[:3]),
    "none": ("stories", ("--embeddings", "--pooling", "none"),
             [("/embedding", {"content": TEXTS[1]}), ("/embeddings", {"input": TEXTS[1:3]}),
              ("/v1/embeddings", {"input": TEXTS[0]})]),
    "rerank": ("reranker", ("--reranking",), [
        ("/rerank", {"query": "What is a panda?", "documents": [
            "hi", "The giant panda is a bear species endemic to China.", "it's a bear", "Once upon a time"]}),
        ("/v1/rerank", {"query": "cats", "documents": ["dogs", "cats are nice", "a"], "top_n": 2}),
        ("/reranking", {"query": "x", "texts": ["a b c", "d e f"], "return_text": True}),
        ("/v1/reranking", {"query": 5, "documents": ["a"]}),
        ("/rerank", {"query": "x", "documents": []}),
    ]),
    # no head and no template: [BOS] query [EOS] document [EOS] as the vocabulary adds them, and
    # the last token's first hidden value as the score; one document per request (see above)
    # an encoder: every token sees its whole input; [CLS] text [SEP]; the file's cls pooling
    "bert": ("bert", ("--embeddings",), [
        ("/embeddings", {"input": [TEXTS[0], TEXTS[1], "word " * 70]}),   # (70 words: tiled attention)
        ("/v1/embeddings", {"input": TEXTS[2]}),
        ("/embeddings", {"input": TEXTS[0], "embd_normalize": -1}),
        ("/completion", {"prompt": "a"}),                               # an encoder makes no logits
    ]),
    "bert-mean": ("bert", ("--embeddings", "--pooling", "mean"), [("/embeddings", {"input": TEXTS[:3]})]),
    "bert-rerank": ("bert-reranker", ("--reranking",), [
        ("/rerank", {"query": "What is a panda?", "documents": ["hi", "The giant panda is a bear.", "a bear"]}),
        ("/rerank", {"query": "x", "texts": ["a b c", "d e f"]}),
    ]),
    "rerank-plain": ("stories", ("--reranking",), [
        ("/rerank", {"query": "Lily", "documents": ["Lily went to the park."]}),
        ("/rerank", {"query": "Lily", "documents": ["The sun was hot."]})]),
}


def write_reranker(path: str) -> str:
    """A small Qwen3 reranker with random weights: rank pooling, a two-label head, a rerank template."""
    return write_random_gguf(path, STORIES, 64, 2, 4, 2, 128, "Q8_0", arch="qwen3", classifier=("yes", "no"))


BERT_VOCAB = "models/ggml-vocab-bert-bge.gguf"


def write_bert_embedder(path: str) -> str:
    return write_bert(path, os.path.join(tree_root(), BERT_VOCAB))


def write_bert_reranker(path: str) -> str:
    return write_bert(path, os.path.join(tree_root(), BERT_VOCAB), classifier=("LABEL_0",), seed=3)


def answer(url: str, path: str, body: dict) -> dict:
    r = requests.post(url + path, json=body, timeout=120)
    out = r.json()
    if isinstance(out, dict):
        out.pop("model", None)   # the file's path, which differs between runs
    return {"status": r.status_code, "body": out}


def main() -> int:
    args = recording_args(__doc__)
    models = {"stories": STORIES, "reranker": write_reranker("/tmp/numllama-reranker.gguf"),
              "bert": write_bert_embedder("/tmp/numllama-bert.gguf"),
              "bert-reranker": write_bert_reranker("/tmp/numllama-bert-reranker.gguf")}
    record, same, total = {}, 0, 0
    for name, (model, flags, cases) in CASES.items():
        with running(args.llama_server, models[model], FLAGS + flags) as url:
            theirs = [answer(url, path, body) for path, body in cases]
        with running(args.numllama_server, models[model], FLAGS + flags) as url:
            ours = [answer(url, path, body) for path, body in cases]
        record[name] = [{"path": path, "request": body, "answer": a} for (path, body), a in zip(cases, theirs)]
        for (path, body), x, y in zip(cases, theirs, ours):
            total += 1
            same += x == y
            if x != y and args.verbose:
                print(f"{name} {path} {json.dumps(body)[:100]}\n  llama-server: {json.dumps(x)[:400]}\n"
                      f"  numllama:     {json.dumps(y)[:400]}")
    if args.record:
        write_golden(args.record, "compare_embeddings.py", flags=FLAGS,
                     cases={name: {"model": CASES[name][0], "flags": CASES[name][1], "requests": r}
                            for name, r in record.items()})
    print(f"identical: {same}/{total}")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
