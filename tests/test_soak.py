"""Sustained load, bounded (about a minute): under a mixed workload that keeps displacing
conversations into the host-RAM prompt cache, the server's memory stops growing once the cache
is at its budget. bench/soak.py is the long version, side by side with llama-server."""
from __future__ import annotations

import random
import threading
import time

import requests

from server_util import Server

BUDGET_MIB = 48
KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 2      # SmolLM2: layers x KV heads x head dim x (K, V) x f16
N_CTX = 4096                                  # two slots of 2048
WORDS = "once upon a time there was a little girl named lily she liked to play in the park".split()


def test_memory_stays_bounded_under_load(smollm_path):
    s = Server(["-np", "2", "-c", str(N_CTX), "--metrics", "--cache-ram", str(BUDGET_MIB), "--seed", "1"],
               model=smollm_path)
    stop = time.time() + 45
    served, errors = [0], [0]

    def client(seed: int):
        rng = random.Random(seed)
        while time.time() < stop:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))   # a new conversation
            body = {"prompt": prompt, "n_predict": rng.randint(1, 8), "temperature": rng.choice([0, 0.8])}
            r = requests.post(s.url + "/completion", json=body, timeout=120)
            served[0] += 1
            errors[0] += r.status_code != 200

    def cache_bytes() -> float:
        for line in requests.get(s.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("numllama:prompt_cache_bytes "):
                return float(line.split()[1])
        raise AssertionError("no numllama:prompt_cache_bytes in /metrics")

    try:
        base = s.rss_mb()
        clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for c in clients:
            c.start()
        samples = []
        while time.time() < stop:
            time.sleep(5)
            samples.append((s.rss_mb(), cache_bytes()))
        for c in clients:
            c.join()
        assert errors[0] == 0 and served[0] >= 20, (served, errors)
        assert all(b <= BUDGET_MIB * 2 ** 20 for _, b in samples), samples
        assert samples[-1][1] > 0.5 * BUDGET_MIB * 2 ** 20, samples   # the workload did fill the cache
        # RSS: what the process held at start, plus the slots' K/V, plus the cache's budget, plus
        # slack for the allocator and Python's own growth: nothing grows without bound
        bound = base + (N_CTX * KV_BYTES_PER_TOKEN + BUDGET_MIB * 2 ** 20) / 2 ** 20 + 80
        assert max(r for r, _ in samples) < bound, (base, bound, samples)
    finally:
        s.stop()
