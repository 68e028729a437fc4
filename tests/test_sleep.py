"""--sleep-idle-seconds: the model is let go after that long without work and loaded again for
the next request that needs it; the read-only routes answer meanwhile without waking it."""
from __future__ import annotations

import time

import pytest

GREEDY = {"prompt": "Once upon a time", "n_predict": 8, "temperature": 0}


@pytest.fixture
def sleepy(stories_path):
    from server_util import Server
    s = Server(["-c", "256", "-np", "2", "--sleep-idle-seconds", "1", "--metrics", "--api-key", "k"],
               model=stories_path)
    yield s
    s.stop()


KEY = {"Authorization": "Bearer k"}


def _sleeping(s) -> bool:
    return s.get("/props", headers=KEY).json()["is_sleeping"]


def _wait_for_sleep(s, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _sleeping(s):
            return
        time.sleep(0.1)
    raise TimeoutError("the server did not fall asleep")


def _metrics(s) -> dict:
    """One scrape (which starts a new throughput window)."""
    text = s.get("/metrics", headers=KEY).text
    return {line.split()[0][len("llamacpp:"):]: float(line.split()[1])
            for line in text.splitlines() if line.startswith("llamacpp:")}


def test_sleep_and_wake_keep_answers_and_counters(sleepy):
    s = sleepy
    first = s.post("/completion", GREEDY, headers=KEY).json()
    models = s.get("/models", headers=KEY).json()
    _wait_for_sleep(s)
    assert "numllama-server: sleeping" in s.output()
    # read-only routes answer from what they knew; none of them wakes the server
    assert s.get("/health").status_code == 200
    assert s.get("/models", headers=KEY).json() == models
    m = _metrics(s)
    assert m["tokens_predicted_total"] == 8 and m["predicted_tokens_seconds"] > 0   # the window so far
    assert _metrics(s)["predicted_tokens_seconds"] == 0                              # then an empty one
    assert _sleeping(s)
    # a request without the key is refused and does not wake it either
    assert s.post("/completion", GREEDY).status_code == 401
    assert _sleeping(s)
    # a request that needs the model wakes it, and gets the same answer as before
    again = s.post("/completion", GREEDY, headers=KEY).json()
    assert again["content"] == first["content"] and not _sleeping(s)
    m = _metrics(s)
    assert m["tokens_predicted_total"] == 16 and m["predicted_tokens_seconds"] > 0   # the counters went on


def test_a_running_stream_keeps_the_server_awake(stories_path):
    """A generation longer than the idle time runs to its end; the server sleeps after it."""
    from server_util import Server
    s = Server(["-c", "512", "-np", "1", "--sleep-idle-seconds", "0.2"], model=stories_path)
    try:
        t0 = time.time()
        chunks = list(s.stream("/completion", {"prompt": "Once", "n_predict": 400, "stream": True,
                                               "ignore_eos": True}))
        took = time.time() - t0
        assert len(chunks) == 401 and chunks[-1]["stop"] and chunks[-1]["tokens_predicted"] == 400
        assert "sleeping" not in s.output() or took < 0.2
        deadline = time.time() + 10
        while not s.get("/props").json()["is_sleeping"]:
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        s.stop()
