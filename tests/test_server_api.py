"""The rest of the served surface: tokens, info endpoints, errors, model lookup, CLI flags."""
import os
import shutil
import subprocess
import sys

import pytest
import requests

from server_util import REPO, TINYLLAMA2, Server


def test_tokenize_detokenize_round_trip(server):
    text = "What is the capital of France ?"
    toks = server.post("/tokenize", {"content": text}).json()["tokens"]
    assert toks and toks[0] != 1
    assert server.post("/tokenize", {"content": text, "add_special": True}).json()["tokens"][0] == 1
    assert server.post("/detokenize", {"tokens": toks}).json()["content"].strip() == text


def test_tokenize_with_pieces(server):
    r = server.post("/tokenize", {"content": "á Hi 日本 🎉", "with_pieces": True}).json()
    for t in r["tokens"]:
        assert t["id"] > 0 and t["piece"]
        assert isinstance(t["piece"], (str, list))
    assert any(isinstance(t["piece"], list) for t in r["tokens"])  # a lone UTF-8 byte comes as bytes


def test_tokenize_missing_content(server):
    assert server.post("/tokenize", {}).json() == {"tokens": []}


def test_health_props_models(server):
    assert server.get("/health").json() == {"status": "ok"}
    p = server.get("/props").json()
    assert p["total_slots"] == 2 and p["default_generation_settings"]["n_ctx"] == 256
    assert p["default_generation_settings"]["params"]["seed"] == 42
    assert ".gguf" in p["model_path"] and p["bos_token"] == "<s>" and p["eos_token"] == "</s>"
    for path in ("/models", "/v1/models"):
        m = server.get(path).json()
        assert m["object"] == "list" and m["data"][0]["id"] == "tinyllama-2"
        meta = m["data"][0]["meta"]
        assert (meta["n_vocab"], meta["n_ctx_train"], meta["n_embd"], meta["n_params"]) == (512, 2048, 64, 292800)
        assert meta["n_ctx"] == 256 and meta["vocab_type"] == 1


def test_slots_disabled(server):
    r = server.get("/slots")
    assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"


def _expect_error(r, code, text=None):
    assert r.status_code == code, r.text
    e = r.json()["error"]
    assert e["code"] == code and isinstance(e["message"], str) and isinstance(e["type"], str)
    if text:
        assert text in e["message"]
    return e


@pytest.mark.parametrize("body,text", [
    ({"n_predict": 4}, "prompt"),
    ({"prompt": "x", "n_predict": "abc"}, "n_predict"),
    ({"prompt": "x", "n_predict": -5}, "Value must be between -1"),
    ({"prompt": 3.5}, "\"prompt\" elements must be"),
    ({"prompt": []}, "must not be empty"),
    ({"prompt": [1, 2, 99999]}, "invalid tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "logit_bias": 5}, "logit_bias"),
    ({"prompt": "x", "logit_bias": [[1, "a"]]}, "logit_bias"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "response_fields": "content"}, "response_fields"),
    ({"prompt": "x", "id_slot": 7}, "id_slot"),
    ({"prompt": "x", "n_probs": -1}, "n_probs"),
    ({"prompt": "x", "samplers": 3}, "samplers"),
])
def test_bad_completion_requests_are_400(server, body, text):
    _expect_error(server.post("/completion", body), 400, text)
    _expect_error(server.post("/v1/completions", body), 400)


def test_bad_json_and_non_object_bodies(server):
    r = requests.post(server.url + "/completion", data="{not json", timeout=30)
    _expect_error(r, 400, "JSON")
    _expect_error(server.post("/completion", [1, 2]), 400)
    _expect_error(server.post("/tokenize", {"content": 5}), 400)
    _expect_error(server.post("/detokenize", {"tokens": [1, 100000]}), 400)
    _expect_error(server.post("/detokenize", {"tokens": "abc"}), 400)


def test_unknown_route_and_wrong_method_are_404(server):
    _expect_error(server.get("/nope"), 404, "File Not Found")
    _expect_error(server.get("/completion"), 404, "File Not Found")


def test_server_keeps_serving_after_errors(server):
    for _ in range(3):
        server.post("/completion", {"prompt": 3.5})
        requests.post(server.url + "/completion", data="\xff\xfe", timeout=30)
    r = server.post("/completion", {"prompt": "Once upon a time", "n_predict": 4})
    assert r.status_code == 200 and r.json()["timings"]["predicted_n"] == 4


def test_nulls_mean_defaults(server):
    r = server.post("/completion", {"prompt": "Hi", "n_predict": 2, "temperature": None, "top_k": None})
    assert r.status_code == 200 and r.json()["generation_settings"]["top_k"] == 40


def test_hf_repo_from_llama_cache(tmp_path, stories_path):
    """--hf-repo resolves in the Hugging Face cache layout under $LLAMA_CACHE, offline."""
    commit = "0" * 39 + "1"
    base = tmp_path / "models--ggml-org--test-model-stories260K"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    shutil.copy(stories_path, snap / "stories260K.gguf")
    s = Server(["--offline", "--hf-repo", "ggml-org/test-model-stories260K"] + TINYLLAMA2,
               env={"LLAMA_CACHE": str(tmp_path)})
    try:
        assert s.get("/props").json()["model_path"].endswith("stories260K.gguf")
    finally:
        s.stop()


def _run_server(args, env=None):
    return subprocess.run([sys.executable, "-m", "numllama.webapp.server"] + args, cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_missing_hf_model_says_where_it_looked(tmp_path):
    r = _run_server(["--offline", "--hf-repo", "org/absent", "--port", "1"], {"LLAMA_CACHE": str(tmp_path)})
    assert r.returncode != 0 and str(tmp_path) in r.stderr


def test_unknown_flag_is_an_error():
    r = _run_server(["--no-such-flag"])
    assert r.returncode != 0 and "--no-such-flag" in r.stderr


def test_a_bad_fixed_date_stops_the_start():
    r = _run_server(["--smollm2-default", "--port", "1"], {"NUMLLAMA_NOW": "yesterday"})
    assert r.returncode != 0 and "$NUMLLAMA_NOW" in r.stderr and "yesterday" in r.stderr


def test_loading_answers_503():
    from numllama.webapp.app import create_app
    client = create_app(None).test_client()
    r = client.get("/health")
    assert r.status_code == 503
    assert r.get_json() == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


def test_api_key(stories_path):
    s = Server(TINYLLAMA2 + ["--api-key", "sekrit"], model=stories_path)
    try:
        assert s.get("/health").status_code == 200
        _expect_error(s.post("/completion", {"prompt": "x"}), 401, "Invalid API Key")
        ok = s.post("/completion", {"prompt": "x", "n_predict": 1}, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
        ok = s.post("/tokenize", {"content": "x"}, headers={"X-Api-Key": "sekrit"})
        assert ok.status_code == 200
    finally:
        s.stop()


def test_page_and_no_ui(stories_path):
    s = Server(TINYLLAMA2 + ["--api-key", "k"], model=stories_path)
    try:
        r = requests.get(s.url + "/", timeout=30)   # public, like llama-server's UI assets
        assert r.status_code == 200 and "<!doctype html>" in r.text
    finally:
        s.stop()
    s = Server(TINYLLAMA2 + ["--no-ui"], model=stories_path)
    try:
        assert requests.get(s.url + "/", timeout=30).status_code == 404
        assert s.get("/props").json()["ui"] is False
    finally:
        s.stop()


def test_several_listen_addresses(stories_path):
    import socket
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.fail("this test needs IPv6 loopback (::1)")
    s = Server(TINYLLAMA2 + ["--host", "127.0.0.1,::1"], model=stories_path)
    try:
        for host in ("127.0.0.1", "[::1]"):
            assert requests.get(f"http://{host}:{s.port}/health", timeout=30).status_code == 200
    finally:
        s.stop()


def test_n_cmpl_and_props(server, stories_path):
    b = server.post("/completion", {"prompt": "Once", "n_predict": 3, "n_cmpl": 2}).json()
    assert isinstance(b, list) and len(b) == 2
    _expect_error(server.post("/completion", {"prompt": "Once", "n_cmpl": 3}), 400, "n_cmpl")
    _expect_error(server.post("/props", {}), 501, "--props")
    s = Server(TINYLLAMA2 + ["--props"], model=stories_path)
    try:
        assert s.post("/props", {}).json() == {"success": True}
    finally:
        s.stop()


def test_slot_save_restore_erase(tmp_path, stories_path):
    s = Server(TINYLLAMA2 + ["--slot-save-path", str(tmp_path), "--temp", "0"], model=stories_path)
    try:
        first = s.post("/completion", {"prompt": "What is the capital of France?", "id_slot": 1, "n_predict": 8}).json()
        saved = s.post("/slots/1?action=save", {"filename": "one.bin"}).json()
        assert saved["n_saved"] == first["tokens_cached"] and saved["n_written"] > 0
        assert (tmp_path / "one.bin").exists()
        restored = s.post("/slots/0?action=restore", {"filename": "one.bin"}).json()
        assert restored["n_restored"] == saved["n_saved"]
        again = s.post("/completion", {"prompt": "What is the capital of France?", "id_slot": 0, "n_predict": 8}).json()
        assert again["timings"]["cache_n"] == first["tokens_evaluated"] - 1
        assert again["content"] == first["content"]  # the restored cache reproduces the text
        assert s.post("/slots/0?action=erase").json() == {"id_slot": 0, "n_erased": again["tokens_cached"]}
        for bad in ("../escape.bin", "/etc/passwd", "a/b.bin", "..", ""):
            _expect_error(s.post("/slots/0?action=save", {"filename": bad}), 400, "filename")
        assert not (tmp_path.parent / "escape.bin").exists()
        _expect_error(s.post("/slots/0?action=restore", {"filename": "none.bin"}), 404)
        _expect_error(s.post("/slots/0?action=explode", {"filename": "x"}), 400, "action")
        _expect_error(s.post("/slots/9?action=erase"), 400, "slot")
    finally:
        s.stop()


def test_slot_actions_need_a_save_path(server):
    _expect_error(server.post("/slots/0?action=erase"), 501, "--slot-save-path")


def test_request_body_limit(stories_path):
    s = Server(TINYLLAMA2 + ["--max-body-mb", "0.01"], model=stories_path)
    try:
        r = s.post("/completion", {"prompt": "x" * 20000})
        _expect_error(r, 413)
        assert s.post("/completion", {"prompt": "Hi", "n_predict": 1}).status_code == 200
    finally:
        s.stop()


def test_progress_bar_on_a_terminal(stories_path):
    """numllama generate shows no bar in a pipe; the engine's bar path itself works."""
    from numllama.engine.engine import Engine
    e = Engine.load(stories_path, progress=True)
    assert e.tokenizer.n_vocab == 512
