"""LoRA adapters against numllama-server and llama-server on the same files: stories260K with two
random adapters (bench/random_gguf.write_lora): one F32 of rank 4 with alpha 8 on attn_q, attn_v,
attn_output, ffn_down and output, one F16 of rank 8 without alpha on attn_k, ffn_gate, ffn_up
(loaded with --lora and --lora-scaled ...:0.5). Compared: GET /lora-adapters, the tokens and top
log-probabilities of greedy and seeded completions under the server's scales, a request's own
"lora" scales, the scales POST /lora-adapters sets, and refused inputs.

Every request says cache_prompt false. llama-server keeps a slot's cached tokens when the
server's scales change and reuses them (a prompt's BOS, at least) under the new ones, so its
answer to a request can depend on the adapters of the request before it (checked: the same
request after one with other adapters got other tokens); numllama drops a slot's cache when its
adapters change, and its answers do not move.

    python3 bench/compare_lora.py --llama-server /path/to/llama-server [--record tests/data/lora.json] [-v]
"""
from __future__ import annotations

import json
import os
import sys

import requests

from compare_tokens import recording_args, running, write_golden   # beside this file
from random_gguf import write_lora

HERE = os.path.dirname(os.path.abspath(__file__))
STORIES = os.path.join(HERE, "..", "tests", "data", "stories260K.gguf")


def write_adapters(folder: str) -> tuple[str, str]:
    a = write_lora(os.path.join(folder, "lora-a.gguf"), STORIES)
    b = write_lora(os.path.join(folder, "lora-b.gguf"), STORIES, targets=("attn_k", "ffn_gate", "ffn_up"),
                   rank=8, alpha=0.0, seed=1, qtype="F16", output=False)
    return a, b


def flags(a: str, b: str) -> tuple:
    return ("-c", "512", "-np", "1", "-t", "2", "--lora", a, "--lora-scaled", b + ":0.5")


BASE = {"prompt": "Once upon a time", "n_predict": 24, "temperature": 0, "n_probs": 3,
        "return_tokens": True, "cache_prompt": False}
STEPS = [   # (method, path, body), in order on one server
    ("GET", "/lora-adapters", None),
    ("POST", "/completion", BASE),
    ("POST", "/completion", {**BASE, "temperature": 0.8, "seed": 3}),
    ("POST", "/completion", {**BASE, "prompt": "Lily", "lora": [{"id": 1, "scale": 2.0}]}),
    ("POST", "/completion", {**BASE, "prompt": "Lily", "lora": [{"id": 0, "scale": 0.0}]}),
    ("POST", "/completion", {**BASE, "prompt": "Lily", "lora": [{"id": 0, "scale": -0.5}, {"id": 1, "scale": 1.0}]}),
    ("POST", "/completion", {**BASE, "lora": {"id": 0}}),
    ("POST", "/lora-adapters", [{"id": 0, "scale": 0.3}]),
    ("GET", "/lora-adapters", None),
    ("POST", "/completion", {**BASE, "prompt": "The dog"}),
    ("POST", "/lora-adapters", {"id": 0, "scale": 0.3}),
]


def answer(url: str, method: str, path: str, body) -> dict:
    r = requests.request(method, url + path, json=body, timeout=120)
    out = r.json()
    if path == "/lora-adapters" and method == "GET":
        out = [{**e, "path": os.path.basename(e["path"])} for e in out]
    elif path == "/completion" and r.status_code == 200:
        out = {"tokens": out["tokens"], "content": out["content"],
               "top": [[[t["id"], t["logprob"]] for t in p["top_logprobs"]] for p in out["completion_probabilities"]]}
    elif r.status_code != 200:
        out = {"message": out["error"]["message"]}
    return {"status": r.status_code, "body": out}


def main() -> int:
    args = recording_args(__doc__)
    a, b = write_adapters("/tmp")
    answers = {}
    for name, binary in (("llama-server", args.llama_server), ("numllama", args.numllama_server)):
        with running(binary, STORIES, flags(a, b)) as url:
            answers[name] = [answer(url, *step) for step in STEPS]
    same = 0
    for step, x, y in zip(STEPS, answers["llama-server"], answers["numllama"]):
        same += x == y
        if x != y and args.verbose:
            print(f"{step[0]} {step[1]} {json.dumps(step[2])[:100]}\n  llama-server: {json.dumps(x)[:300]}\n"
                  f"  numllama:     {json.dumps(y)[:300]}")
    if args.record:
        write_golden(args.record, "compare_lora.py", steps=[
            {"method": m, "path": p, "request": body, "answer": x}
            for (m, p, body), x in zip(STEPS, answers["llama-server"])])
    print(f"identical: {same}/{len(STEPS)}")
    return 0 if same == len(STEPS) else 1


if __name__ == "__main__":
    sys.exit(main())
