"""Greedy tokens and top-1 log-probabilities of numllama-server and llama-server on one model.

For a model without a golden file: both servers get the same prompts (temperature 0, 48 tokens,
n_probs 1), and the script counts the positions before the two greedy sequences first differ and
the largest top-1 log-probability difference among them.

    python3 bench/compare_tokens.py MODEL.gguf --llama-server /path/to/llama-server

Use a llama-server built for AVX2 (cmake -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON): numllama reproduces ggml's AVX2 arithmetic, and an AVX-512 build adds in
another order.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import requests

from run import free_port   # bench/run.py, beside this file

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "List three colors:",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "In 1905, Albert Einstein",
           "The quick brown fox", "Water boils at"]


def start(binary: str, model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": os.path.dirname(os.path.abspath(binary))}
    proc = subprocess.Popen([binary, "-m", model, "--port", str(port), "--host", "127.0.0.1",
                             "-c", "2048", "-np", "1", "-t", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{binary} exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"{binary} was not ready within 120 s")


def greedy(url: str, n_predict: int) -> list[list[tuple[int, float]]]:
    out = []
    for prompt in PROMPTS:
        r = requests.post(url + "/completion", json={"prompt": prompt, "n_predict": n_predict, "temperature": 0,
                                                    "n_probs": 1, "cache_prompt": False}, timeout=600)
        r.raise_for_status()
        out.append([(c["id"], c["logprob"]) for c in r.json()["completion_probabilities"]])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN"), required=False)
    ap.add_argument("--numllama-server", default=shutil.which("numllama-server"))
    ap.add_argument("-n", "--n-predict", type=int, default=48)
    args = ap.parse_args()
    if not args.llama_server:
        ap.error("give --llama-server (or set LLAMA_SERVER_BIN)")
    results = []
    for binary in (args.llama_server, args.numllama_server):
        proc, url = start(binary, args.model)
        try:
            results.append(greedy(url, args.n_predict))
        finally:
            proc.terminate()
            proc.wait()
    same = total = 0
    max_diff = 0.0
    for theirs, ours in zip(*results):
        for (a, la), (b, lb) in zip(theirs, ours):
            if a != b:
                break
            same += 1
            max_diff = max(max_diff, abs(la - lb))
        total += len(theirs)
    print(f"greedy positions before divergence {same}/{total}; max top-1 logprob diff {max_diff:.2e}")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
