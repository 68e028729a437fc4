"""Three numllama-server replicas behind HAProxy (deploy/haproxy.cfg), on loopback: requests
spread over them, a session keeps its replica (and its prompt cache), a replica that dies loses
no request the balancer can retry, and one that is told to stop (SIGTERM) finishes its streams
while the others take the new work.

HAProxy must be installed (Debian: apt-get install haproxy; .ci/run installs it when it can)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster(stories_path, tmp_path_factory):
    from server_util import Server, free_port
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if haproxy is None:
        pytest.fail("haproxy not found: install it (Debian: apt-get install haproxy; .ci/run does)")
    replicas = [Server(["-c", "2048", "-np", "2", "--alias", f"r{i + 1}", "--drain-timeout", "60"], model=stories_path)
                for i in range(3)]
    port = free_port()
    env = {**os.environ, "LISTEN": f"127.0.0.1:{port}",
           **{f"REPLICA_{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)}}
    log = open(tmp_path_factory.mktemp("haproxy") / "haproxy.log", "w")
    proc = subprocess.Popen([haproxy, "-db", "-f", os.path.join(REPO, "deploy", "haproxy.cfg")], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:   # every replica healthy in HAProxy's eyes: a request per session lands anywhere
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.time() < deadline, "HAProxy did not come up"
        time.sleep(0.1)
    time.sleep(1.5)   # (one round of health checks: all three are up)
    yield url, replicas
    proc.terminate()
    proc.wait(10)
    for r in replicas:
        r.stop()


def _complete(url, session, prompt, n=4, **extra):
    """A client as the issue has it: it retries a 503 (HAProxy's own, in the moment between a
    replica's death and the balancer's next look; a replica's, with Retry-After) a few times."""
    for attempt in range(5):
        r = requests.post(url + "/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0, **extra},
                          headers={"X-Session-Id": session}, timeout=60)
        if r.status_code != 503:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    return r.json()


def test_sessions_spread_and_keep_their_replica(cluster):
    url, _ = cluster
    served = {}
    for i in range(24):
        served[f"session-{i}"] = _complete(url, f"session-{i}", "Once upon a time")["model"]
    assert set(served.values()) == {"r1", "r2", "r3"}   # spread over the three
    # a conversation's turns: one replica, whose prompt cache holds the turns before
    prompt, cached, held = "Once upon a time", [], []
    for turn in range(5):
        answer = _complete(url, "session-7", prompt, n=8)
        assert answer["model"] == served["session-7"]
        cached.append(answer["timings"]["cache_n"])      # prompt tokens reused
        held.append(answer["tokens_cached"])             # the slot's tokens after the answer
        prompt += answer["content"] + " And then"
    assert all(c > 0 for c in cached[1:]) and cached == sorted(cached) and held == sorted(held)


def test_no_header_hashes_the_prompt(cluster):
    url, _ = cluster
    body = {"prompt": "Lily had a red ball. She", "n_predict": 2, "temperature": 0}
    models = {requests.post(url + "/completion", json=body, timeout=60).json()["model"] for _ in range(6)}
    assert len(models) == 1


def test_a_stopping_replica_finishes_its_streams_and_a_dead_one_loses_nothing(cluster):
    url, replicas = cluster
    by_name = {f"r{i + 1}": r for i, r in enumerate(replicas)}
    session = next(s for s in (f"drain-{i}" for i in range(50))
                   if _complete(url, s, "Once", n=1)["model"] == "r2")
    chunks, started = [], threading.Event()

    def stream():
        with requests.post(url + "/completion", json={"prompt": "Once", "n_predict": 600, "ignore_eos": True,
                                                       "stream": True},
                           headers={"X-Session-Id": session}, stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    chunks.append(json.loads(line[6:]))
                    started.set()
    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    by_name["r2"].proc.send_signal(signal.SIGTERM)          # r2 drains: its stream goes on
    answers = [_complete(url, session, "Once upon a time") for _ in range(5)]   # retried elsewhere
    assert all(a["model"] in ("r1", "r3") for a in answers)
    reader.join(120)
    assert len(chunks) == 601 and chunks[-1]["stop"] and chunks[-1]["tokens_predicted"] == 600
    assert by_name["r2"].proc.wait(30) == 0
    by_name["r3"].proc.kill()                               # r3 dies at once
    answers = [_complete(url, f"after-{i}", "Once upon a time") for i in range(12)]
    assert {a["model"] for a in answers} == {"r1"}
