"""Tokens and top log-probabilities of numllama-server and llama-server on one model.

Both servers get the same prompts, greedy (temperature 0) and seeded (temperature 0.8, seeds
1..N), 48 tokens each with n_probs 5. The script counts the positions before each pair of
sequences first differs, and every difference among them in the five top log-probabilities
(ids and values): exact agreement prints 0 differences.

    python3 bench/compare_tokens.py MODEL.gguf --llama-server /path/to/llama-server

Use a llama-server built for AVX2 (cmake -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON): numllama reproduces ggml's AVX2 arithmetic, and an AVX-512 build adds in
another order.
"""
from __future__ import annotations

import argparse
import contextlib
import json
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


# --long: one prompt of some 300 tokens. A prompt of >= 64 tokens takes ggml's tiled attention,
# and decoding past 256 cells its split-KV attention: other summation orders than short prompts
LONG_PROMPT = " ".join(
    ["Once upon a time there was a little girl named Lily who loved to play outside in the sun.",
     "One day she found a big red ball in the park and ran to show it to her mom.",
     "Her mom smiled and said they could play with it after lunch."] * 5)


def start(binary: str, model: str, flags: tuple = ("-c", "2048", "-np", "1", "-t", "2")) -> tuple[subprocess.Popen, str]:
    """Start a server on a free loopback port and wait for /health."""
    port = free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": os.path.dirname(os.path.abspath(binary))}
    proc = subprocess.Popen([binary, "-m", model, "--port", str(port), "--host", "127.0.0.1", *flags],
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


@contextlib.contextmanager
def running(binary: str, model: str, flags: tuple = ("-c", "2048", "-np", "1", "-t", "2")):
    """A started server's URL, for the length of the with-block."""
    proc, url = start(binary, model, flags)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait()


def write_golden(path: str, script: str, **content) -> None:
    """A golden file of llama-server's answers, for the tests to replay: what `script` recorded,
    and which llama-server produced it."""
    with open(path, "w") as f:
        json.dump({"producer": f"bench/{script} --record, llama-server built for AVX2 from the "
                               "llama-cpp-python 0.3.36 sdist", **content}, f, indent=1)


def recording_args(doc: str) -> argparse.Namespace:
    """The command line of a comparison that can record llama-server's answers: the two servers,
    --record JSON (a golden file for the tests) and -v (print every difference)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(ap)
    ap.add_argument("--record", metavar="JSON")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args()


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The two servers compared: an AVX2 llama-server and numllama-server."""
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN"))
    ap.add_argument("--numllama-server", default=shutil.which("numllama-server"))


N_PROBS = 5


def runs(n_seeds: int) -> list[tuple[str, dict]]:
    """(label, sampling fields) of every request: greedy, then the seeded ones."""
    out = [("greedy", {"temperature": 0})]
    out += [(f"seed {seed}", {"temperature": 0.8, "seed": seed}) for seed in range(1, n_seeds + 1)]
    return out


def sample(url: str, n_predict: int, n_seeds: int, prompts: list[str]) -> list[tuple[list, list]]:
    """Per request: (the token ids generated, and per position whose text was sent: (token,
    logprob, ((id, logprob) x N_PROBS))). A token that leaves its text an incomplete UTF-8
    sequence (a byte token) is sent with a later one, and has no entry of its own there."""
    out = []
    for prompt in prompts:
        for _, fields in runs(n_seeds):
            r = requests.post(url + "/completion", json={"prompt": prompt, "n_predict": n_predict, "n_probs": N_PROBS,
                                                        "cache_prompt": False, "return_tokens": True, **fields},
                              timeout=600)
            r.raise_for_status()
            body = r.json()
            out.append((body["tokens"],
                        [(c["id"], c["logprob"], tuple((t["id"], t["logprob"]) for t in c["top_logprobs"]))
                         for c in body.get("completion_probabilities", [])]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    add_server_args(ap)
    ap.add_argument("-n", "--n-predict", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=4, help="seeded runs per prompt (temperature 0.8)")
    ap.add_argument("--record", metavar="JSON", help="also write llama-server's answers there (a golden file: "
                    "tests/data/stories260K-top5.json was made with -n 24 --seeds 2)")
    ap.add_argument("--long", action="store_true", help="one long prompt (LONG_PROMPT) instead of the eight short ones")
    args = ap.parse_args()
    prompts = [LONG_PROMPT] if args.long else PROMPTS
    if not args.llama_server:
        ap.error("give --llama-server (or set LLAMA_SERVER_BIN)")
    results = []
    for binary in (args.llama_server, args.numllama_server):
        with running(binary, args.model) as url:
            results.append(sample(url, args.n_predict, args.seeds, prompts))
    if args.record:
        requests_made = [{"prompt": prompt, "n_predict": args.n_predict, "n_probs": N_PROBS, **fields}
                         for prompt in prompts for _, fields in runs(args.seeds)]
        with open(args.record, "w") as f:
            json.dump({"model": os.path.basename(args.model), "producer": "bench/compare_tokens.py --record, "
                       "llama-server built for AVX2 (GGML_NATIVE=OFF, GGML_AVX2/FMA/F16C=ON) from the "
                       "llama-cpp-python 0.3.36 sdist", "requests": requests_made,
                       "answers": [probs for _, probs in results[0]],
                       "tokens": [tokens for tokens, _ in results[0]]}, f)
    labels = [label for _ in prompts for label, _ in runs(args.seeds)]
    same, total, differing, max_diff = {}, {}, 0, 0.0
    for label, (their_tokens, theirs), (our_tokens, ours) in zip(labels, *results):
        kind = label.split()[0]
        for a, b in zip(their_tokens, our_tokens):
            if a != b:
                break
            same[kind] = same.get(kind, 0) + 1
        total[kind] = total.get(kind, 0) + len(their_tokens)
        differing += len(theirs) != len(ours)
        for (a, la, ta), (b, lb, tb) in zip(theirs, ours):
            if a != b:
                break
            pairs = [(la, lb)] + [(x[1], y[1]) for x, y in zip(ta, tb)]
            differing += (la != lb or [x[0] for x in ta] != [y[0] for y in tb]
                          or any(x != y for x, y in pairs))
            max_diff = max([max_diff] + [abs(x - y) for x, y in pairs])
    for kind in total:
        print(f"{kind}: positions before divergence {same.get(kind, 0)}/{total[kind]}")
    print(f"positions whose top-{N_PROBS} log-probabilities differ: {differing} (largest difference {max_diff:.2e})")
    return 0 if same == total and not differing else 1


if __name__ == "__main__":
    sys.exit(main())
