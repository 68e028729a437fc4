"""Router mode: one address for several models, each served by a numllama-server of its own,
as llama-server's router serves them (--models-dir, --models-preset, --models-max,
--no-models-autoload).

The models are the GGUF files of --models-dir (a file, or a folder holding one model's files)
and the sections of --models-preset (an INI file whose keys are server options without their
dashes; "[*]" holds options for all). A request names its model in "model" (a JSON body) or
?model= (GET); the router starts that model's server if it is not running (unless autoload is
off), at most --models-max at once (the least recently used one stops for a new one), and
passes the request on, streaming the answer back. GET /models lists every model with its status
(unloaded, loading, loaded, failed); POST /models/load and /models/unload start and stop one.
Each child listens on loopback with a key of its own that only the router knows.
"""
from __future__ import annotations

import configparser
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import requests
from flask import Flask, Response, request

from .app import check_api_key
from .errors import APIError, error_response, json_response

log = logging.getLogger("numllama.router")
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 10
PROXIED_HEADERS = ("Content-Type", "Accept")
PRESET_ONLY = ("load-on-startup", "stop-timeout", "dedup-cache-models")   # not server options


@dataclass(frozen=True)
class ModelSpec:
    name: str
    args: tuple            # the child's own options: -m PATH or the preset's
    source: str            # "models_dir" or "preset"
    load_on_startup: bool = False


@dataclass(eq=False)
class Instance:
    spec: ModelSpec
    status: str = "unloaded"   # unloaded | loading | loaded | failed
    proc: subprocess.Popen | None = None
    port: int = 0
    key: str = ""
    last_used: float = 0.0
    exit_code: int | None = None
    ready: threading.Event = field(default_factory=threading.Event)


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
    if value.lower() in ("false", "off"):
        return [flag[:2] + "no-" + flag[2:] if flag.startswith("--") else flag]
    return [flag, value]


def _preset(path: str) -> list[ModelSpec]:
    """The INI's sections as models ("[*]": options for all of them)."""
    ini = configparser.ConfigParser(interpolation=None, default_section="*")
    ini.optionxform = str
    with open(path, encoding="utf-8") as f:
        ini.read_string("[__top__]\n" + f.read())   # (keys before the first section, e.g. version)
    out = []
    for name in ini.sections():
        if name == "__top__":
            continue
        args: list[str] = []
        options = dict(ini[name])
        for key, value in options.items():
            if key not in PRESET_ONLY and key != "version":
                args += _option_args(key, value)
        out.append(ModelSpec(name, tuple(args), "preset",
                             load_on_startup=options.get("load-on-startup", "").lower() == "true"))
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Router:
    def __init__(self, child_args: list[str], models_dir: str | None, preset: str | None,
                 models_max: int, autoload: bool):
        self.child_args = child_args
        self.models_dir, self.preset = models_dir, preset
        self.models_max = models_max
        self.autoload = autoload
        self.lock = threading.RLock()
        self.instances: dict[str, Instance] = {}
        self.reload()

    def reload(self) -> None:
        """Read the sources again: new models appear, gone ones (unless running) disappear."""
        specs = (_models_dir(self.models_dir) if self.models_dir else []) + (_preset(self.preset) if self.preset else [])
        with self.lock:
            names = {s.name for s in specs}
            for name in list(self.instances):
                if name not in names and self.instances[name].status in ("unloaded", "failed"):
                    del self.instances[name]
            for spec in specs:
                inst = self.instances.get(spec.name)
                if inst is None or inst.status in ("unloaded", "failed"):
                    self.instances[spec.name] = Instance(spec)

    def start_up(self) -> None:
        for inst in list(self.instances.values()):
            if inst.spec.load_on_startup:
                self.load(inst.spec.name)

    # ------------------------------------------------------------ children
    def load(self, name: str) -> Instance:
        """Start a model's server (stopping the least recently used one over --models-max)."""
        with self.lock:
            inst = self.instances[name]
            if inst.status in ("loading", "loaded"):
                return inst
            running = [i for i in self.instances.values() if i.status in ("loading", "loaded")]
            if self.models_max > 0 and len(running) >= self.models_max:
                self.unload(min(running, key=lambda i: i.last_used).spec.name)
            inst.port, inst.key = _free_port(), secrets.token_hex(16)
            inst.status, inst.exit_code, inst.last_used = "loading", None, time.monotonic()
            inst.ready = threading.Event()
            cmd = [sys.executable, "-m", "numllama.webapp.server", *self.child_args, *inst.spec.args,
                   "--alias", name, "--host", "127.0.0.1", "--port", str(inst.port), "--api-key", inst.key]
            inst.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._watch, args=(inst, inst.proc), daemon=True).start()
        return inst

    def _watch(self, inst: Instance, proc: subprocess.Popen) -> None:
        """Wait for the child's /health, then for its end."""
        url = f"http://127.0.0.1:{inst.port}/health"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not inst.ready.is_set():
            try:
                if requests.get(url, timeout=1).status_code == 200:
                    with self.lock:
                        if inst.proc is proc:
                            inst.status = "loaded"
                    inst.ready.set()
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        code = proc.wait()
        with self.lock:
            if inst.proc is proc:   # (not a newer start of the same model)
                failed = inst.status == "loading" or (inst.status == "loaded" and code != 0)
                inst.status, inst.exit_code, inst.proc = ("failed" if failed else "unloaded"), code, None
        inst.ready.set()

    def unload(self, name: str) -> None:
        with self.lock:
            inst = self.instances[name]
            proc, inst.proc, inst.status = inst.proc, None, "unloaded"
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()

    def ensure_ready(self, name: str) -> Instance:
        inst = self.load(name)   # (a model loading or loaded is left as it is)
        inst.ready.wait(READY_TIMEOUT_S)
        if inst.status != "loaded":
            raise APIError(f"model '{name}' failed to load (exit code {inst.exit_code})", 500)
        inst.last_used = time.monotonic()
        return inst

    def stop_all(self) -> None:
        for name in list(self.instances):
            self.unload(name)

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
        inst = self.ensure_ready(name)
        headers = {h: request.headers[h] for h in PROXIED_HEADERS if h in request.headers}
        headers["Authorization"] = f"Bearer {inst.key}"
        url = f"http://127.0.0.1:{inst.port}{path}"
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        upstream = requests.request(request.method, url, data=body, headers=headers, stream=True, timeout=None)

        def chunks():
            try:
                yield from upstream.iter_content(chunk_size=None)
            finally:
                upstream.close()
        return Response(chunks(), status=upstream.status_code,
                        content_type=upstream.headers.get("Content-Type", "application/json"))

    def models_json(self) -> dict:
        data = []
        with self.lock:
            for name, inst in self.instances.items():
                status = {"value": inst.status, "args": list(inst.spec.args)}
                if inst.status == "failed":
                    status.update(exit_code=inst.exit_code, failed=True)
                data.append({"id": name, "aliases": [], "tags": [], "object": "model", "owned_by": "llamacpp",
                             "created": int(time.time()), "status": status,
                             "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                             "source": inst.spec.source, "can_remove": False})
        return {"data": data, "object": "list"}


def create_router_app(router: Router, api_keys: tuple, build_info: str, max_body_bytes: int) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes

    @app.before_request
    def gate():
        if request.path in ("/health", "/v1/health") or request.method == "OPTIONS":
            return None
        check_api_key(api_keys)

    @app.errorhandler(APIError)
    def api_error(e: APIError):
        return error_response(e)

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
                              "ui_settings": {}, "build_info": build_info, "cors_proxy_enabled": False})

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

    return app
