"""SIGTERM drains the server (webapp/lifecycle.py): new requests get 503 with Retry-After (a load
balancer retries them elsewhere), /health says not ready, /live says alive, the requests in
flight run to their end, and the process exits 0."""
from __future__ import annotations

import signal
import threading
import time

import requests


def test_sigterm_finishes_the_streams_in_flight_and_refuses_new_work(stories_path):
    from server_util import Server
    s = Server(["-c", "4096", "-np", "1", "--drain-timeout", "120"], model=stories_path)
    chunks: list = []
    started = threading.Event()

    def stream():
        for chunk in s.stream("/completion", {"prompt": "Once", "n_predict": 1000, "ignore_eos": True,
                                              "stream": True}):
            chunks.append(chunk)
            started.set()
    reader = threading.Thread(target=stream)
    try:
        reader.start()
        assert started.wait(30)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert len(chunks) < 1001, "the stream ended before the drain began: make it longer"
        r = requests.post(s.url + "/completion", json={"prompt": "x", "n_predict": 1}, timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"] == {"code": 503, "message": "Server is shutting down", "type": "unavailable_error"}
        assert requests.get(s.url + "/health", timeout=10).status_code == 503
        assert requests.get(s.url + "/live", timeout=10).json() == {"status": "alive"}
        reader.join(120)
        assert len(chunks) == 1001 and chunks[-1]["stop"] and chunks[-1]["tokens_predicted"] == 1000
        assert s.proc.wait(timeout=30) == 0
        assert "draining: 1 requests in flight" in s.output() and "drained, exiting" in s.output()
    finally:
        s.stop()


def test_live_answers_while_the_model_loads_and_health_does_not():
    from numllama.webapp.app import create_app
    client = create_app(None).test_client()   # (no ServerContext yet: the model is loading)
    assert client.get("/live").get_json() == {"status": "alive"}
    r = client.get("/health")
    assert r.status_code == 503 and r.get_json()["error"]["message"] == "Loading model"
