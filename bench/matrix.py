"""The speed matrix: numllama against llama.cpp over models x thread counts, ratios from one run.

For each model and thread count, numllama-server and llama-server are started with the same
flags and measured the same way over HTTP (server `timings`, or tokens / wall time):

* prefill        a PROMPT-token prompt, n_predict 1, no prompt cache
* decode         one stream, greedy, ignore_eos, from an 8-token prompt (depth 0)
* decode @ D     the same after a D-token prompt already in the slot's cache (`--depth`)
* prefill @ D    a PROMPT-token prompt after a D-token one already in the slot's cache (long
                 contexts: each new token attends to all the cells before it)
* N streams      N concurrent requests on N slots (`--streams`), tokens / wall time

and llama-bench, the peer's own benchmark (pp PROMPT at depth 0 and D, tg at depth 0 and D), runs beside them
with the same threads; its figures are printed with numllama's ratio to them.

Models (`--models`, names below): files people bring (stories260K, SmolLM2 Q4_1 and the same
requantized to Q4_K_M by llama-quantize) and random-weight 1B and 8B shapes
(bench/random_gguf.py; Q4_K by llama-quantize --pure from the Q8_0 file), written once into
bench/.cache/models.

    python bench/matrix.py --bin-dir /path/to/llama.cpp/build/bin            # everything
    python bench/matrix.py --bin-dir DIR --models 1b-q4_0 --threads 2 --streams 4 --depth 0

--bin-dir holds llama-server, llama-bench and llama-quantize (build them with the best flags
the machine runs; say which in the report). Results: a table per model, and --json.
--competing measures a busy machine: one busy process beside the servers all along.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from run import REPO, Server, prompt_of   # bench/run.py, beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS_DIR = os.path.join(HERE, ".cache", "models")
SHAPED = [f"{shape}-{qtype}" for shape in ("1b", "8b") for qtype in ("q4_0", "q8_0", "q4_k")]
MODEL_NAMES = ["stories260k", "smollm2-q4_1", "smollm2-q4_k_m"] + SHAPED


def model_path(name: str, bin_dir: str) -> str:
    """The GGUF file of a matrix model, written on first use."""
    if name == "stories260k":
        return os.path.join(os.path.dirname(REPO), "shared", "models", "stories260K.gguf")
    from numllama.engine.model_files import default_model_path
    if name == "smollm2-q4_1":
        return default_model_path()
    os.makedirs(MODELS_DIR, exist_ok=True)
    out = os.path.join(MODELS_DIR, name + ".gguf")
    if os.path.exists(out):
        return out
    quantize = os.path.join(bin_dir, "llama-quantize")
    if name == "smollm2-q4_k_m":
        subprocess.run([quantize, "--allow-requantize", default_model_path(), out, "Q4_K_M"], check=True,
                       stdout=subprocess.DEVNULL)
        return out
    shape, qtype = name.split("-")
    if qtype == "q4_k":   # gguf-py cannot write K-quants: requantize the Q8_0 file, every matrix Q4_K
        subprocess.run([quantize, "--allow-requantize", "--pure", model_path(f"{shape}-q8_0", bin_dir), out,
                        "Q4_K_S"], check=True, stdout=subprocess.DEVNULL)
        return out
    subprocess.run([sys.executable, os.path.join(HERE, "random_gguf.py"), out, "--shape", shape,
                    "--type", qtype.upper()], check=True)
    return out


def completion(server: Server, prompt, n_predict: int, cache_prompt: bool = False) -> dict:
    return server.completion({"prompt": prompt, "n_predict": n_predict, "temperature": 0.0,
                              "ignore_eos": True, "cache_prompt": cache_prompt})


def measure_server(cmd: list[str], model: str, threads: int, args) -> dict:
    """One server binary on one model: every HTTP row of the matrix."""
    prompt = prompt_of(model, args.prompt)
    streams = max(args.streams)
    per_slot = args.prompt + args.n_predict + 16
    flags = ["-m", model, "-t", str(threads), "-b", "512", "--no-slots"]
    rows = {}
    server = Server(cmd + flags + ["-np", str(streams), "-c", str(streams * per_slot)])
    try:
        completion(server, prompt[:8], 4)   # warm-up
        rows["prefill"] = max(completion(server, prompt, 1)["timings"]["prompt_per_second"]
                              for _ in range(args.repeat))
        rows["decode"] = max(completion(server, prompt[:8], args.n_predict)["timings"]["predicted_per_second"]
                             for _ in range(args.repeat))
        for n in args.streams:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as ex:
                outs = list(ex.map(lambda i: completion(server, prompt[i:i + 8], args.n_predict), range(n)))
            rows[f"{n} streams"] = sum(o["timings"]["predicted_n"] for o in outs) / (time.perf_counter() - t0)
    finally:
        server.stop()
    depth = decode_depth(model, args)
    if depth:
        long_prompt = prompt_of(model, depth)
        server = Server(cmd + flags + ["-np", "1", "-c", str(depth + args.n_predict + 64)])
        try:
            completion(server, long_prompt, 1, cache_prompt=True)   # the prompt into the slot's cache
            rows[f"decode @ {depth}"] = completion(server, long_prompt, args.n_predict,
                                                        cache_prompt=True)["timings"]["predicted_per_second"]
        finally:
            server.stop()
    depth = prefill_depth(model, args)
    if depth:
        long_prompt = prompt_of(model, depth + args.prompt)
        server = Server(cmd + flags + ["-np", "1", "-c", str(depth + args.prompt + 64)])
        try:
            best = 0.0
            for _ in range(args.repeat):   # the first D tokens into the slot's cache, then PROMPT more
                completion(server, long_prompt[:depth], 1, cache_prompt=True)
                timings = completion(server, long_prompt, 1, cache_prompt=True)["timings"]
                assert timings["prompt_n"] <= args.prompt + 1, timings   # (the rest came from the cache)
                best = max(best, timings["prompt_per_second"])
            rows[f"prefill @ {depth}"] = best
        finally:
            server.stop()
    return rows


@functools.lru_cache(maxsize=None)
def n_ctx_train(model: str) -> int:
    """The context the model was trained on (read once per file: every server run asks)."""
    from numllama.engine.gguf_file import load_gguf
    return load_gguf(model).hparams.n_ctx_train


def decode_depth(model: str, args) -> int:
    """--depth, or less where the model was trained on a shorter context (llama-server refuses
    a prompt beyond it); the row is named for the depth measured."""
    if not args.depth:
        return 0
    return min(args.depth, n_ctx_train(model) - args.n_predict - 64)


def prefill_depth(model: str, args) -> int:
    """The depth of the prefill @ D row: --depth, less where PROMPT more tokens would pass the
    model's training context, rounded down to a whole ubatch (512) so that both servers take the
    new tokens as whole ubatches."""
    if not args.depth:
        return 0
    return max(0, min(args.depth, n_ctx_train(model) - args.prompt - 64) // 512 * 512)


def llama_bench(bin_dir: str, model: str, threads: int, args) -> dict:
    """llama-bench's pp and tg (and tg at depth) for the same model and threads, tokens/s."""
    out = {}
    runs = [("prefill", ["-p", str(args.prompt), "-n", "0"]), ("decode", ["-p", "0", "-n", str(args.n_predict)])]
    depth = decode_depth(model, args)
    if depth:
        runs.append((f"decode @ {depth}", ["-p", "0", "-n", str(args.n_predict), "-d", str(depth)]))
    depth = prefill_depth(model, args)
    if depth:
        runs.append((f"prefill @ {depth}", ["-p", str(args.prompt), "-n", "0", "-d", str(depth)]))
    for key, extra in runs:
        r = subprocess.run([os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(threads), "-r",
                            str(args.repeat), "-o", "json"] + extra, capture_output=True, text=True, check=True)
        out[key] = json.loads(r.stdout)[0]["avg_ts"]
    return out


def run_matrix(args, threads: list[int], results: dict) -> None:
    for name in args.models.split(","):
        model = model_path(name, args.bin_dir)
        for t in threads:
            ours = measure_server(["numllama-server"], model, t, args)
            theirs = measure_server([os.path.join(args.bin_dir, "llama-server")], model, t, args)
            bench = {} if args.no_llama_bench else llama_bench(args.bin_dir, model, t, args)
            results[f"{name} t{t}"] = {"numllama": ours, "llama-server": theirs, "llama-bench": bench}
            print(f"\n{name}, {t} thread(s)  (tok/s; ratio = numllama / peer)")
            print(f"{'':16s} {'numllama':>9s} {'llama-server':>12s} {'ratio':>6s} {'llama-bench':>11s} {'ratio':>6s}")
            for key, value in ours.items():
                peer, lb = theirs.get(key), bench.get(key)
                print(f"{key:16s} {value:9.1f} {peer:12.1f} {value / peer:6.2f} "
                      + (f"{lb:11.1f} {value / lb:6.2f}" if lb else f"{'':11s} {'':6s}"))
            sys.stdout.flush()
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", required=True, help="llama.cpp's bin folder: llama-server, llama-bench, llama-quantize")
    ap.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated, of: " + ", ".join(MODEL_NAMES))
    ap.add_argument("--threads", default=f"1,2,{os.cpu_count()}", help="comma-separated thread counts")
    ap.add_argument("--streams", default="4,16", help="comma-separated concurrent streams")
    ap.add_argument("--prompt", type=int, default=512, help="prefill prompt tokens")
    ap.add_argument("--n-predict", type=int, default=64, help="tokens per decode measurement")
    ap.add_argument("--depth", type=int, default=4096, help="decode and prefill depth (0: skip)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-llama-bench", action="store_true")
    ap.add_argument("--competing", action="store_true",
                    help="keep one busy process (a Python loop) running beside the servers throughout")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    sys.path.insert(0, REPO)
    threads = sorted({int(t) for t in args.threads.split(",")})
    results = {}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.competing else None
    try:
        run_matrix(args, threads, results)
    finally:
        if hog:
            hog.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
