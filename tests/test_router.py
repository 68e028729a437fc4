"""Router mode (--models-dir, --models-preset, --models-max, --no-models-autoload): one address,
a numllama-server per model, started on demand and stopped least-recently-used first."""
from __future__ import annotations

import os
import shutil
import time

import pytest
import requests

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
KEY = {"Authorization": "Bearer k"}


def _status(s) -> dict:
    return {m["id"]: m["status"]["value"] for m in s.get("/models", headers=KEY).json()["data"]}


def _wait(s, name, want, timeout=120):
    deadline = time.time() + timeout
    while _status(s)[name] != want:
        assert time.time() < deadline, f"{name} never became {want}: {_status(s)}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    from server_util import Server
    models = tmp_path_factory.mktemp("models")
    shutil.copy(os.path.join(DATA, "stories260K.gguf"), models / "stories.gguf")
    (models / "qwen").mkdir()   # a model in a folder of its own
    shutil.copy(os.path.join(DATA, "qwen2-tiny.gguf"), models / "qwen" / "qwen2-tiny.gguf")
    s = Server(["--models-dir", str(models), "--models-max", "1", "-c", "256", "--api-key", "k"])
    yield s
    s.stop()


def test_models_start_on_demand_one_at_a_time(router):
    s = router
    assert _status(s) == {"qwen": "unloaded", "stories": "unloaded"}
    props = s.get("/props", headers=KEY).json()
    assert (props["role"], props["max_instances"], props["models_autoload"]) == ("router", 1, True)
    r = s.post("/completion", {"model": "stories", "prompt": "Once upon a time", "n_predict": 6, "temperature": 0},
               headers=KEY)
    assert r.status_code == 200 and r.json()["model"] == "stories" and r.json()["tokens_predicted"] == 6
    assert _status(s) == {"qwen": "unloaded", "stories": "loaded"}
    # the answer streams through the router; the other model takes the one place
    chunks = list(s.stream("/v1/chat/completions", {"model": "qwen", "max_tokens": 3, "stream": True,
                                                    "messages": [{"role": "user", "content": "hi"}]}, headers=KEY))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert _status(s) == {"qwen": "loaded", "stories": "unloaded"}
    again = s.post("/completion", {"model": "stories", "prompt": "Once upon a time", "n_predict": 6,
                                   "temperature": 0}, headers=KEY).json()
    assert again["content"] == r.json()["content"]


def test_load_unload_and_errors(router):
    s = router
    assert s.post("/models/load", {"model": "qwen"}, headers=KEY).json() == {"success": True}
    _wait(s, "qwen", "loaded")
    assert s.post("/models/unload", {"model": "qwen"}, headers=KEY).json() == {"success": True}
    assert _status(s)["qwen"] == "unloaded"
    for body, code, text in (({"prompt": "x"}, 400, "model name is missing from the request"),
                             ({"model": "nope", "prompt": "x"}, 400, "model 'nope' not found")):
        r = s.post("/completion", body, headers=KEY)
        assert r.status_code == code and r.json()["error"]["message"] == text
    assert s.post("/models/load", {"model": "nope"}, headers=KEY).status_code == 404
    assert s.post("/completion", {"model": "stories", "prompt": "x"}).status_code == 401   # the router's key
    assert requests.get(s.url + "/health", timeout=10).status_code == 200


def test_preset_autoload_off_and_reload(tmp_path):
    from server_util import Server
    preset = tmp_path / "models.ini"
    preset.write_text(f"version = 1\n[*]\nc = 256\n\n[tiny]\nmodel = {os.path.join(DATA, 'stories260K.gguf')}\n"
                      f"temp = 0\n")
    s = Server(["--models-preset", str(preset), "--no-models-autoload"])
    try:
        r = s.post("/completion", {"model": "tiny", "prompt": "Once", "n_predict": 2})
        assert r.status_code == 400 and r.json()["error"]["message"] == "model is not loaded"
        assert s.post("/models/load", {"model": "tiny"}).json() == {"success": True}
        _wait(s, "tiny", "loaded")
        r = s.post("/completion", {"model": "tiny", "prompt": "Once", "n_predict": 2}).json()
        assert r["generation_settings"]["temperature"] == 0   # the preset's options reach the model's server
        assert s.get("/props?model=tiny").json()["default_generation_settings"]["n_ctx"] == 256
        preset.write_text(f"[tiny]\nmodel = {os.path.join(DATA, 'stories260K.gguf')}\n[other]\n"
                          f"model = {os.path.join(DATA, 'qwen2-tiny.gguf')}\n")
        ids = {m["id"] for m in s.get("/models?reload=1").json()["data"]}
        assert ids == {"tiny", "other"}
    finally:
        s.stop()
