"""Three numllama-server replicas behind HAProxy (deploy/haproxy.cfg) on this machine: the
latency the balancer adds to a request, and the prompt-cache hit rate of 20 sessions x 5 turns
with session affinity and with plain round robin.

    python3 bench/replicas.py [MODEL.gguf]     # default: tests/data/stories260K.gguf

On one machine this is about correctness and overhead, not throughput: the replicas share its
cores.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
from server_util import Server, free_port  # noqa: E402

SESSIONS, TURNS = 20, 5


def start_haproxy(replicas, config_text: str):
    port = free_port()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False)
    cfg.write(config_text)
    cfg.close()
    env = {**os.environ, "LISTEN": f"127.0.0.1:{port}",
           **{f"REPLICA_{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)}}
    proc = subprocess.Popen(["haproxy", "-db", "-f", cfg.name], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    time.sleep(1.5)
    return proc, url


def hit_rate(url: str, tag: str) -> float:
    """Prompt tokens reused from a cache over all prompt tokens, for SESSIONS x TURNS turns."""
    cached = total = 0
    prompts = {s: f"Session {s} of {tag}: once upon a time" for s in range(SESSIONS)}
    for _ in range(TURNS):
        for s in range(SESSIONS):
            r = requests.post(url + "/completion", json={"prompt": prompts[s], "n_predict": 16, "temperature": 0},
                              headers={"X-Session-Id": f"{tag}-{s}"}, timeout=120).json()
            cached += r["timings"]["cache_n"]
            total += r["timings"]["cache_n"] + r["timings"]["prompt_n"]
            prompts[s] += r["content"] + " Then"
    return cached / total


def latency_ms(url: str, n: int = 200) -> float:
    times = []
    with requests.Session() as http:
        for _ in range(n):
            t = time.perf_counter()
            http.post(url + "/tokenize", json={"content": "Once upon a time"}, timeout=30)
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "tests", "data", "stories260K.gguf")
    affinity_cfg = open(os.path.join(REPO, "deploy", "haproxy.cfg")).read()
    round_robin_cfg = "\n".join(line for line in affinity_cfg.splitlines()
                                if "txn.affinity" not in line and "hash-type" not in line
                                ).replace("    option httpchk", "    balance roundrobin\n    option httpchk") + "\n"
    replicas = [Server(["-c", "4096", "-np", "4"], model=model) for _ in range(3)]
    try:
        direct = latency_ms(replicas[0].url)
        proc, url = start_haproxy(replicas, affinity_cfg)
        through = latency_ms(url)
        with_affinity = hit_rate(url, "affinity")
        proc.terminate()
        proc.wait()
        proc, url = start_haproxy(replicas, round_robin_cfg)
        without = hit_rate(url, "roundrobin")
        proc.terminate()
        proc.wait()
    finally:
        for r in replicas:
            r.stop()
    print(f"median /tokenize latency: direct {direct:.2f} ms, through HAProxy {through:.2f} ms "
          f"(+{through - direct:.2f} ms)")
    print(f"prompt-cache hit rate, {SESSIONS} sessions x {TURNS} turns: with affinity {with_affinity:.1%}, "
          f"round robin {without:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
