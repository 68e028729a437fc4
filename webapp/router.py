"""Router mode: one address for several models, each served by a numllama-server of its own,
as llama-server's router serves them (--models-dir, --models-preset, --models-max,
--no-models-autoload).

The models are those of the Hugging Face cache ($LLAMA_CACHE; "org/name:TAG", as `-hf` names
them), the GGUF files of --models-dir (a file, or a folder holding one model's files) and the
sections of --models-preset (an INI file whose keys are server options without their dashes;
"[*]" holds options for all); a later source wins a name. `numllama-server` with no model option
is a router over the cache alone, as llama-server is.

A request names its model in "model" (a JSON body) or ?model= (GET); the router starts that
model's server if it is not running (unless autoload is off), at most --models-max at once (the
least recently used one stops for a new one), and passes the request on, streaming the answer
back. GET /models lists every model with its status (unloaded, loading, loaded, failed,
downloading); POST /models/load and /models/unload start and stop one; POST /models downloads a
model into the cache (webapp/model_downloads.py) and DELETE /models?model= removes a cached one;
GET /models/sse streams what happens to them. Each child listens on loopback with a key of its
own that only the router knows.
"""
from __future__ import annotations

import configparser
import json
import logging
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import requests
from flask import Flask, Response, current_app, request

from ..engine.model_files import ModelNotFound, cached_models, remove_cached, resolve_hf, split_name, valid_repo_id
from .errors import APIError, json_response
from .llama_options import option_keys
from .http import disconnect_probe

log = logging.getLogger("numllama.router")
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 10
PROXIED_HEADERS = ("Content-Type", "Accept")
PRESET_ONLY = ("load-on-startup", "stop-timeout", "dedup-cache-models")   # not server options
PRESET_HF_KEYS = (("hf-repo", "hf-file"), ("spec-draft-hf", "spec-draft-model"))   # what dedup-cache-models reads
TRUTHY = ("on", "enabled", "true", "1")   # llama.cpp's common_arg_utils::is_truthy
MAX_EVENT_LISTENERS = 8      # each GET /models/sse holds one of the server's threads
EVENT_QUEUE = 256            # events a slow listener may fall behind before it is dropped
KEEPALIVE_S = 15             # a comment line this often finds a listener that has gone
QUEUE_POLL_S = 0.25          # how often a request waiting for a model's place looks at its client


@dataclass(frozen=True)
class ModelSpec:
    name: str
    args: tuple            # the child's own options: -m PATH or the preset's
    source: str            # "cache", "models_dir" or "preset"
    load_on_startup: bool = False
    # a preset's dedup-cache-models: the cache files its hf-repo and spec-draft-hf name
    # ((repo, file) pairs), whose own cache entries GET /models then leaves out
    dedup: tuple = ()


@dataclass(eq=False)
class Instance:
    spec: ModelSpec
    status: str = "unloaded"   # unloaded | loading | loaded | failed | downloading
    proc: subprocess.Popen | None = None
    port: int = 0
    key: str = ""
    last_used: float = 0.0
    active: int = 0            # requests being answered through it (it is not stopped meanwhile)
    exit_code: int | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)   # (a download)


def _models_dir(path: str) -> list[ModelSpec]:
    out = []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if entry.endswith(".gguf") and os.path.isfile(full):
            out.append(ModelSpec(entry[:-len(".gguf")], ("-m", full), "models_dir"))
        elif os.path.isdir(full):   # one model's files: its first shard, or its one file
            ggufs = sorted(f for f in os.listdir(full) if f.endswith(".gguf") and not f.startswith("mmproj"))
            if ggufs:
                out.append(ModelSpec(entry, ("-m", os.path.join(full, ggufs[0])), "models_dir"))
    return out


def _option_args(key: str, value: str) -> list[str]:
    flag = ("-" if len(key) <= 3 else "--") + key
    if value.lower() in ("true", "on"):
        return [flag]
    if value.lower() in ("false", "off"):   # (a negation set false is the switch itself)
        if key.startswith("no-"):
            return ["--" + key[len("no-"):]]
        return [flag[:2] + "no-" + flag[2:] if flag.startswith("--") else flag]
    return [flag, value]


def _preset(path: str) -> list[ModelSpec]:
    """The INI's sections as models ("[*]": options for all of them)."""
    ini = configparser.ConfigParser(interpolation=None, default_section="*")
    ini.optionxform = str
    with open(path, encoding="utf-8") as f:
        ini.read_string("[__top__]\n" + f.read())   # (keys before the first section, e.g. version)
    out = []
    keys = option_keys()
    for name in ini.sections():
        if name == "__top__":
            continue
        args: list[str] = []
        # (a key may be any spelling of an option, or its environment variable: one name each)
        unknown = [k for k in ini[name] if k not in keys and k not in PRESET_ONLY and k != "version"]
        if unknown:   # (llama.cpp's common_preset refuses the file, at start or reload)
            raise ValueError(f"option '{unknown[0]}' not recognized in preset '{name}'")
        options = {keys.get(k, k): v for k, v in ini[name].items()}
        for key, value in options.items():
            if key not in PRESET_ONLY and key != "version":
                args += _option_args(key, value)
        dedup = ()
        if options.get("dedup-cache-models", "") in TRUTHY:
            dedup = tuple((options[repo], options.get(file, "")) for repo, file in PRESET_HF_KEYS if options.get(repo))
        out.append(ModelSpec(name, tuple(args), "preset",
                             load_on_startup=options.get("load-on-startup", "").lower() == "true", dedup=dedup))
    return out


def _hidden_cache_models(specs: list[ModelSpec]) -> set[str]:
    """The cache entries whose file a dedup-cache-models preset already names (llama-server's
    server_models::load_models): listed once, under the preset's name; still usable."""
    paths = set()
    for spec in specs:
        for repo, file in spec.dedup:
            try:
                paths.add(resolve_hf(repo, file or None))
            except ModelNotFound:
                pass
    hidden = set()
    for spec in specs:
        if spec.source == "cache" and paths:
            try:
                if resolve_hf(spec.name) in paths:
                    hidden.add(spec.name)
            except ModelNotFound:
                pass
    return hidden


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Events:
    """GET /models/sse's listeners, each a queue of events ({"model", "event"[, "data"]})."""
    def __init__(self):
        self.lock = threading.Lock()
        self.listeners: list[queue.Queue] = []

    def listen(self) -> queue.Queue:
        with self.lock:
            if len(self.listeners) >= MAX_EVENT_LISTENERS:
                raise APIError(f"too many event listeners (at most {MAX_EVENT_LISTENERS})", 503)
            q: queue.Queue = queue.Queue(EVENT_QUEUE)
            self.listeners.append(q)
            return q

    def leave(self, q: queue.Queue) -> None:
        with self.lock:
            if q in self.listeners:
                self.listeners.remove(q)

    def send(self, event: str, model: str, data: dict | None = None) -> None:
        item = {"model": model, "event": event, **({"data": data} if data is not None else {})}
        with self.lock:
            for q in list(self.listeners):
                try:
                    q.put_nowait(item)
                except queue.Full:   # a listener that stopped reading loses its place
                    self.listeners.remove(q)


class Router:
    def __init__(self, child_args: list[str], models_dir: str | None, preset: str | None,
                 models_max: int, autoload: bool, offline: bool = False, hf_token: str | None = None,
                 cache_writable: bool = False):
        self.child_args = child_args
        self.models_dir, self.preset = models_dir, preset
        self.models_max = models_max
        self.autoload = autoload
        self.offline, self.hf_token = offline, hf_token
        # POST /models fills the disk from the network and DELETE /models empties it: like the
        # agent tools, only with an API key (or --unsafe-no-api-key), see docs/10-security.md
        self.cache_writable = cache_writable
        self.events = Events()
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)   # a model went idle, stopped, changed status
        self.queue: list = []   # requests waiting for a model's place, first come first served
        self.instances: dict[str, Instance] = {}
        self.reload()

    def reload(self) -> None:
        """Read the sources again: new models appear, gone ones (unless running) disappear."""
        specs = [ModelSpec(name, ("-hf", name), "cache") for name in cached_models()]
        specs += (_models_dir(self.models_dir) if self.models_dir else []) + (_preset(self.preset) if self.preset else [])
        specs = list({s.name: s for s in specs}.values())   # (a later source wins a name)
        hidden = _hidden_cache_models(specs)
        with self.lock:
            self.hidden = hidden
            names = {s.name for s in specs}
            for name in list(self.instances):
                if name not in names and self.instances[name].status in ("unloaded", "failed"):
                    del self.instances[name]
            for spec in specs:
                inst = self.instances.get(spec.name)
                if inst is None or inst.status in ("unloaded", "failed"):
                    self.instances[spec.name] = Instance(spec)

    def _status(self, inst: Instance, status: str, **data) -> None:
        """Set a model's status (under the lock) and tell the listeners."""
        inst.status = status
        self.changed.notify_all()
        self.events.send("status_change", inst.spec.name, {"status": status, **data})

    def start_up(self) -> None:
        for inst in list(self.instances.values()):
            if inst.spec.load_on_startup:
                self.load(inst.spec.name)

    # ------------------------------------------------------------ children
    def load(self, name: str, hold: bool = False, gone=lambda: False) -> Instance:
        """Start a model's server, or find it started. At --models-max the least recently used
        model with no request in flight stops for it; while every running model is answering
        one, this waits, first come first served (a request for a model that another waiter is
        starting meanwhile just takes it). hold: count a request in flight on the model (from
        before the lock is let go, so that nothing stops it in between; see release). gone():
        the client that asked has left: stop waiting (nobody is owed a place any more)."""
        ticket = object()
        with self.lock:
            self.queue.append(ticket)
            try:
                while True:
                    inst = self.instances.get(name)
                    if inst is None:
                        raise APIError(f"model '{name}' not found")
                    if inst.status == "downloading":
                        raise APIError(f"model '{name}' is still downloading", 503)
                    if inst.status in ("loading", "loaded"):
                        inst.active += hold
                        return inst
                    if self.queue[0] is ticket and self._make_room():
                        break
                    if gone():
                        raise APIError("the client left while its request waited for a model", 499)
                    self.changed.wait(QUEUE_POLL_S)
            finally:
                self.queue.remove(ticket)
                self.changed.notify_all()
            inst.port, inst.key = _free_port(), secrets.token_hex(16)
            inst.exit_code, inst.last_used = None, time.monotonic()
            inst.status = "loading"
            inst.active += hold
            self.events.send("model_status", name, {"status": "loading"})
            inst.ready = threading.Event()
            cmd = [sys.executable, "-m", "numllama.webapp.server", *self.child_args, *inst.spec.args,
                   "--alias", name, "--host", "127.0.0.1", "--port", str(inst.port), "--api-key", inst.key]
            inst.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._watch, args=(inst, inst.proc), daemon=True).start()
        return inst

    def _make_room(self) -> bool:
        """Under the lock: whether one more model may run, stopping an idle one if need be."""
        running = [i for i in self.instances.values() if i.status in ("loading", "loaded")]
        if self.models_max <= 0 or len(running) < self.models_max:
            return True
        idle = [i for i in running if i.active == 0]
        if not idle:
            return False
        self.unload(min(idle, key=lambda i: i.last_used).spec.name)
        return True

    def release(self, inst: Instance) -> None:
        """A request through `inst` is over (see load's hold)."""
        with self.lock:
            inst.active -= 1
            inst.last_used = time.monotonic()
            self.changed.notify_all()

    def _watch(self, inst: Instance, proc: subprocess.Popen) -> None:
        """Wait for the child's /health, then for its end."""
        url = f"http://127.0.0.1:{inst.port}/health"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not inst.ready.is_set():
            try:
                if requests.get(url, timeout=1).status_code == 200:
                    with self.lock:
                        if inst.proc is proc:
                            self._status(inst, "loaded")
                    inst.ready.set()
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        code = proc.wait()
        with self.lock:
            if inst.proc is proc:   # (not a newer start of the same model)
                failed = inst.status == "loading" or (inst.status == "loaded" and code != 0)
                inst.exit_code, inst.proc = code, None
                self._status(inst, "failed" if failed else "unloaded", exit_code=code)
        inst.ready.set()

    def unload(self, name: str) -> None:
        with self.lock:
            inst = self.instances[name]
            proc, inst.proc = inst.proc, None
            if inst.status != "unloaded":
                self._status(inst, "unloaded")
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()

    def acquire(self, name: str, gone=lambda: False) -> Instance:
        """The model's server, ready, with this request counted on it (release() when done)."""
        inst = self.load(name, hold=True, gone=gone)
        inst.ready.wait(READY_TIMEOUT_S)
        if inst.status != "loaded":
            self.release(inst)
            raise APIError(f"model '{name}' failed to load (exit code {inst.exit_code})", 500)
        return inst

    def stop_all(self) -> None:
        for name in list(self.instances):
            inst = self.instances[name]
            inst.cancel.set()
            if inst.status != "downloading":
                self.unload(name)

    # ------------------------------------------------------------ the cache
    def download(self, name: str) -> None:
        """Start downloading `name` into the cache (POST /models): the hub is asked what to
        fetch before this returns; the files come in a thread, told as download_progress and
        then download_finished or download_failed."""
        from .model_downloads import DownloadError, download, plan
        self._check_cache_writable()
        if self.offline:
            raise APIError("this server runs with --offline: it downloads nothing", 400)
        repo, _tag = split_name(name)
        if not valid_repo_id(repo):
            raise APIError(f"'{name}' is not a model name of the form org/name[:tag]")
        with self.lock:
            if name in self.instances:
                raise APIError(f"model '{name}' already exists")
        try:
            what = plan(name, self.hf_token)
        except DownloadError as e:
            raise APIError(f"model validation failed, unable to download: {e}") from None
        with self.lock:
            if name in self.instances:
                raise APIError(f"model '{name}' already exists")
            inst = self.instances[name] = Instance(ModelSpec(name, ("-hf", name), "cache"), status="downloading")
        self.events.send("model_status", name, {"status": "downloading"})
        progress: dict = {}

        def report(url: str, done: int, total: int) -> None:
            progress[url] = {"done": done, "total": total}
            self.events.send("download_progress", name, {"progress": dict(progress)})

        def run() -> None:
            try:
                download(what, report, inst.cancel.is_set, self.hf_token)
                ok = True
            except (DownloadError, OSError) as e:
                log.warning("download of %s failed: %s", name, e)
                ok = False
            with self.lock:
                if self.instances.get(name) is inst:
                    del self.instances[name]   # (listed again from the cache, if it is there)
                self.reload()
            self.events.send("download_finished" if ok else "download_failed", name)
        threading.Thread(target=run, name=f"download {name}", daemon=True).start()

    def _check_cache_writable(self) -> None:
        if not self.cache_writable:
            raise APIError("downloading and deleting models change this machine's disk for whoever can reach "
                           "the server: start the router with --api-key (or --unsafe-no-api-key on a trusted "
                           "machine)", 403, "permission_error")

    def remove(self, name: str) -> None:
        """Delete a cached model (DELETE /models): its server stops, a download is cancelled."""
        self._check_cache_writable()
        with self.lock:
            inst = self.instances.get(name)
            if inst is None:
                raise APIError(f"model name={name} is not found", 404)
            if inst.spec.source != "cache":
                raise APIError(f"model name={name} is not removable (not from cache)")
            if inst.status == "downloading":
                inst.cancel.set()
        if inst.status != "downloading":
            self.unload(name)
        remove_cached(name)
        with self.lock:
            if self.instances.get(name) is inst:
                del self.instances[name]
            self.reload()
        self.events.send("model_remove", name)

    # ------------------------------------------------------------ requests
    def resolve(self, name, autoload: bool) -> str:
        if not isinstance(name, str) or not name:
            raise APIError("model name is missing from the request")
        with self.lock:
            inst = self.instances.get(name)
            if inst is None:
                raise APIError(f"model '{name}' not found")
            if not autoload and inst.status != "loaded":
                raise APIError("model is not loaded")
        return name

    def proxy(self, name: str, path: str, body: bytes | None) -> Response:
        inst = self.acquire(name, disconnect_probe())
        headers = {h: request.headers[h] for h in PROXIED_HEADERS if h in request.headers}
        headers["Authorization"] = f"Bearer {inst.key}"
        url = f"http://127.0.0.1:{inst.port}{path}"
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        try:
            upstream = requests.request(request.method, url, data=body, headers=headers, stream=True, timeout=None)
        except requests.RequestException:
            self.release(inst)
            raise APIError(f"model '{name}' did not answer", 502) from None

        def done():   # (the answer sent, or its client gone: called once either way)
            upstream.close()
            self.release(inst)
        resp = Response(upstream.iter_content(chunk_size=None), status=upstream.status_code,
                        content_type=upstream.headers.get("Content-Type", "application/json"))
        resp.call_on_close(done)
        return resp

    def models_json(self) -> dict:
        data = []
        with self.lock:
            for name, inst in self.instances.items():
                if name in self.hidden:
                    continue
                status = {"value": inst.status, "args": list(inst.spec.args)}
                if inst.status == "failed":
                    status.update(exit_code=inst.exit_code, failed=True)
                data.append({"id": name, "aliases": [], "tags": [], "object": "model", "owned_by": "llamacpp",
                             "created": int(time.time()), "status": status,
                             "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                             "source": inst.spec.source, "can_remove": inst.spec.source == "cache"})
        return {"data": data, "object": "list"}


def add_router_routes(app: Flask, router: Router, build_info: str) -> None:
    """The router's own routes, on an app made by create_app(model_routes=False), whose gate
    (API key, Host check, CORS) and agent-tool routes they share; the rest goes to a model."""
    @app.get("/health")
    @app.get("/v1/health")
    def health():
        return json_response({"status": "ok"})

    @app.get("/props")
    def props():
        if request.args.get("model"):
            return router.proxy(router.resolve(request.args["model"], router.autoload), "/props", None)
        return json_response({"role": "router", "max_instances": router.models_max,
                              "models_autoload": router.autoload, "model_alias": "numllama-server",
                              "model_path": "none", "default_generation_settings": {"params": {}, "n_ctx": 0},
                              "ui_settings": {}, "build_info": build_info,
                              "cors_proxy_enabled": current_app.config["NUMLLAMA"].ui_mcp_proxy})

    @app.get("/models")
    @app.get("/v1/models")
    def models():
        if request.args.get("reload"):
            router.reload()
        return json_response(router.models_json())

    def _model_of_body() -> str:
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            raise APIError("Invalid JSON in request body") from None
        return body.get("model") if isinstance(body, dict) else None

    @app.post("/models")
    def download():
        name = _model_of_body()
        if not isinstance(name, str) or not name:
            raise APIError("model must be a non-empty string")
        router.download(name)
        return json_response({"success": True})

    @app.delete("/models")
    def remove():
        name = request.args.get("model", "")
        if not name:
            raise APIError("model must be a non-empty string")
        router.remove(name)
        return json_response({"success": True})

    @app.get("/models/sse")
    def events():
        q = router.events.listen()

        def stream():
            yield ": listening\n\n"   # (sent at once: the listener knows it is subscribed)
            while True:
                try:
                    item = q.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    yield ": keep-alive\n\n"
                    continue
                yield "data: " + json.dumps(item, separators=(",", ":")) + "\n\n"
        resp = Response(stream(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        # (on close, not in the generator's finally: a generator closed before its first item
        # runs no finally, and the listener's place would be lost for good)
        resp.call_on_close(lambda: router.events.leave(q))
        return resp

    @app.post("/models/load")
    def load():
        name = _model_of_body()
        if name not in router.instances:
            raise APIError("model is not found", 404)
        if router.instances[name].status in ("loading", "loaded"):
            raise APIError("model is already running")
        router.load(name)
        return json_response({"success": True})

    @app.post("/models/unload")
    def unload():
        name = _model_of_body()
        if name not in router.instances:
            raise APIError("model is not found", 404)
        if router.instances[name].status not in ("loading", "loaded"):
            raise APIError("model is not running")
        router.unload(name)
        return json_response({"success": True})

    @app.route("/<path:path>", methods=["GET", "POST"])
    def forward(path):
        autoload = request.args.get("autoload")
        autoload = router.autoload if autoload is None else autoload in ("true", "1")
        if request.method == "GET":
            name = request.args.get("model")
            return router.proxy(router.resolve(name, autoload), "/" + path, None)
        name = _model_of_body()
        return router.proxy(router.resolve(name, autoload), "/" + path, request.get_data())
