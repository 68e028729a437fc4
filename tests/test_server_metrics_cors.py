"""/metrics (Prometheus text, llama-server's names), CORS, and timing conventions."""
import pytest
import requests

from server_util import TINYLLAMA2, Server


def parse(text):
    types, values = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line.startswith("llamacpp:"):
            name, value = line.split(" ", 1)
            values[name] = (types[name], float(value))
    return values


@pytest.fixture(scope="module")
def server(stories_path):
    s = Server(TINYLLAMA2 + ["--metrics", "--slots"], model=stories_path)
    yield s
    s.stop()


def test_metrics_count_tokens(server):
    server.post("/completion", {"prompt": "I believe", "n_predict": 8, "id_slot": 0})
    b = server.post("/completion", {"prompt": "I believe", "n_predict": 8, "id_slot": 0}).json()
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Process-Start-Time-Unix" in r.headers
    m = parse(r.text)
    assert m["llamacpp:tokens_predicted_total"] == ("counter", 16.0)
    assert m["llamacpp:prompt_tokens_cached_total"][1] == b["timings"]["cache_n"] > 0
    assert m["llamacpp:n_tokens_max"][0] == "counter" and m["llamacpp:n_decode_total"][1] > 0
    assert m["llamacpp:requests_processing"] == ("gauge", 0.0)
    for name in ("prompt_tokens_seconds", "predicted_tokens_seconds", "requests_deferred", "n_busy_slots_per_decode"):
        assert m["llamacpp:" + name][0] == "gauge"


def test_metrics_disabled(stories_path):
    s = Server(TINYLLAMA2, model=stories_path)
    try:
        r = s.get("/metrics")
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"
    finally:
        s.stop()


def test_generation_rate_excludes_first_token(server):
    t = server.post("/completion", {"prompt": "I believe", "n_predict": 1}).json()["timings"]
    assert t["predicted_n"] == 1 and t["predicted_per_second"] == 0.0 and t["predicted_per_token_ms"] == 0.0
    t = server.post("/completion", {"prompt": "I believe", "n_predict": 16}).json()["timings"]
    assert abs(t["predicted_per_second"] - 1e3 / t["predicted_ms"] * 15) < 1e-6


def test_idle_slot_after_completion(server):
    server.post("/completion", {"prompt": "I believe", "n_predict": 8})
    for slot in server.get("/slots").json():
        assert slot["is_processing"] is False
        if "next_token" in slot:
            assert slot["next_token"][0]["n_decoded"] == 0


def test_cors_preflight_and_reflection(server):
    r = requests.options(server.url + "/completions", timeout=30, headers={
        "Origin": "web.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
    assert r.headers["Access-Control-Allow-Headers"] == "*"
    assert r.headers["Access-Control-Allow-Origin"] == "web.example"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_localhost_only(stories_path):
    s = Server(TINYLLAMA2 + ["--cors-origins", "localhost"], model=stories_path)
    try:
        for origin, ok in (("http://localhost:8080", True), ("http://[::1]", True), ("http://127.0.0.1:3000", True),
                           ("http://evil.com", False), ("http://localhost.evil.com", False)):
            r = requests.get(s.url + "/health", headers={"Origin": origin}, timeout=30)
            assert (r.headers.get("Access-Control-Allow-Origin") == origin) is ok, origin
    finally:
        s.stop()
