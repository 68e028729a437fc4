"""The Flask application factory. Routes live in one blueprint per API family."""
from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .errors import APIError, error_response, json_response
from .lifecycle import MODEL_FREE, InFlight
from .params import ServerDefaults


@dataclass
class ServerContext:
    """Everything the routes need, built once the model is loaded."""
    engine: object                 # engine.engine.Engine
    scheduler: object              # engine.slots.Scheduler
    defaults: ServerDefaults
    n_ctx_slot: int
    model_alias: str
    model_path: str
    aliases: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    enable_slots: bool = True
    enable_metrics: bool = False
    api_keys: tuple = ()           # --api-key (comma-separated) and --api-key-file: any one is accepted
    chat_template: object = None   # engine.chat_template.ChatTemplate
    jinja: bool = True             # --jinja: llama-server's chat parser (off: its legacy chat path)
    legacy_format: str | None = None   # --no-jinja: the template's engine.legacy_chat format (None: none fits)
    prefill_assistant: bool = True     # a final assistant message is continued (--no-prefill-assistant: not)
    spm_infill: bool = False       # --spm-infill: /infill puts the suffix before the prefix
    embedding: bool = False        # --embeddings (--reranking): the embedding and rerank routes answer
    embd_normalize: int = 2        # --embd-normalize: how pooled embeddings are normalized (engine.pooling)
    speculative: str = "none"      # "draft-simple" with --model-draft (engine.speculative)
    loras: list = field(default_factory=list)        # engine.lora.LoraAdapter, by id
    lora_scales: list = field(default_factory=list)  # their current scales (POST /lora-adapters)
    tool_format: object = None     # engine.tool_calls.ToolFormat of the template (None: it writes no calls)
    tool_format_error: str = ""    # why the template's tool calls cannot be read, if so
    template_stops: tuple = ()     # stop strings the template adds to every chat request
    reasoning_budget: int = -1     # --reasoning-budget: tokens a reasoning block may take (-1: no limit)
    reasoning_budget_message: str = ""   # --reasoning-budget-message: written before the forced end tag
    reasoning_format: object = None   # engine.reasoning.ReasoningFormat of the template, if it has one
    reasoning_format_default: str = "deepseek"   # --reasoning-format: split reasoning out, or "none"
    template_kwargs: dict = field(default_factory=dict)   # --chat-template-kwargs, --reasoning: every render's
    verbose: bool = False
    special: bool = False          # -sp: control tokens are written as their text (output, probabilities)
    cors_origins: str = "*"        # "*", "localhost", or a comma-separated list of origins
    cors_methods: str = "GET, POST, DELETE, OPTIONS"   # what a preflight is told
    cors_headers: str = "*"
    cors_credentials: bool = True  # allowed: the origin is echoed (with "*", any origin)
    ui: bool = True
    slot_save_path: str | None = None
    device: str = "cpu"            # where the offloaded layers run
    enable_props: bool = False     # POST /props
    tools: list = field(default_factory=list)   # webapp.agent_tools.Tool, enabled by --tools
    ui_mcp_proxy: bool = False     # /cors-proxy
    allowed_hosts: tuple = ()      # Host names accepted, besides loopback, while tools or the proxy are on
    cors_proxy_allow_private: bool = False   # /cors-proxy may reach loopback and private addresses
    build_fingerprint: str = "b1-numllama"
    started: float = field(default_factory=time.time)


# answered without an API key: health probes, and the web pages and their scripts (webapp/ui.py:
# they hold no data; what they ask for carries the key the user types)
PUBLIC_PATHS = ("/health", "/v1/health", "/", "/live", "/sampling", "/operator")
PUBLIC_PREFIXES = ("/static/",)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("numllama.http")


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8080" -> "::1")."""
    try:
        return (urlsplit("//" + host_header).hostname or "").rstrip(".")
    except ValueError:
        return ""


def api_key_matches(given: str | None, key: str) -> bool:
    """Compared in constant time, so response timing tells nothing about the key."""
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def check_api_key(keys: tuple) -> None:
    """The request's key (`Authorization: Bearer KEY` or `X-Api-Key`) must be one of `keys`
    (none set: no key needed); otherwise llama-server's 401."""
    if not keys:
        return
    auth = request.headers.get("Authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("X-Api-Key")
    if not any(api_key_matches(given, key) for key in keys):
        raise APIError("Invalid API Key", 401)


def allowed_origin(origin: str, policy: str) -> bool:
    """llama-server's --cors-origins: "*" reflects any origin, "localhost" only loopback ones
    (any scheme and port), otherwise an explicit comma-separated list."""
    if policy in ("*", ""):
        return True
    allowed = [o.strip() for o in policy.split(",") if o.strip()]
    if "localhost" in allowed:
        try:
            host = urlsplit(origin).hostname
        except ValueError:
            host = None
        if host in LOOPBACK_HOSTS:
            return True
    return origin in allowed


class PrefixMount:
    """--api-prefix: the routes answer under the prefix only (llama-server's mount point);
    anything else is its 404."""

    def __init__(self, wsgi_app, prefix: str):
        self.wsgi_app = wsgi_app
        self.prefix = prefix.rstrip("/")

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == self.prefix or path.startswith(self.prefix + "/"):
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + self.prefix
            environ["PATH_INFO"] = path[len(self.prefix):] or "/"
            return self.wsgi_app(environ, start_response)
        return error_response(APIError("File Not Found", 404))(environ, start_response)


def create_app(context: ServerContext | None = None, max_body_bytes: int = 64 << 20, vertex=None,
               api_prefix: str = "", model_routes: bool = True) -> Flask:
    """Build the app. Until `app.config["NUMLLAMA"]` holds a ServerContext, every route answers
    503 "Loading model" (so clients can poll /health while the model loads). vertex: the
    vertex_predict.VertexSettings when serving as a Vertex AI container. Without model_routes,
    only the routes that need no model (the web pages, the agent tools, /cors-proxy) are there,
    with the same gate (key, Host check, CORS): the router adds its own (webapp/router.py)."""
    app = Flask(__name__)
    app.config["NUMLLAMA"] = context
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes   # larger bodies: 413 in the JSON shape
    app.config["PUBLIC_PATHS"] = PUBLIC_PATHS
    inflight = app.extensions["numllama_inflight"] = InFlight()

    from . import (anthropic_messages, chat_completions, completions, cors_proxy, embeddings, infill, info,
                   lora_adapters, metrics, openai_responses, tokens, tools, ui)
    model_modules = (info, completions, chat_completions, anthropic_messages, openai_responses, infill, embeddings,
                     lora_adapters, tokens, metrics)
    for module in (model_modules if model_routes else ()) + (ui, tools, cors_proxy):
        app.register_blueprint(module.bp)
    if vertex is not None:
        from . import vertex_predict
        vertex_predict.register(app, vertex)
    if api_prefix.rstrip("/"):
        app.wsgi_app = PrefixMount(app.wsgi_app, api_prefix)

    @app.before_request
    def gate():
        ctx = app.config["NUMLLAMA"]
        if request.method == "OPTIONS":  # CORS preflight: answered for any path, no key needed
            resp = Response(status=200)
            resp.headers["Access-Control-Allow-Methods"] = ctx.cors_methods if ctx else ServerContext.cors_methods
            resp.headers["Access-Control-Allow-Headers"] = ctx.cors_headers if ctx else ServerContext.cors_headers
            return resp
        drain = app.extensions.get("numllama_drain")
        if drain is not None and not request.environ.get("numllama.internal"):
            drain.check(request.path)   # SIGTERM: everything but /live is refused from now on
        public = request.path in app.config["PUBLIC_PATHS"] or request.path.startswith(PUBLIC_PREFIXES)
        if ctx is None:
            if public and request.path not in ("/health", "/v1/health"):
                return None
            raise APIError("Loading model", 503)
        if public:
            return None
        if (ctx.tools or ctx.ui_mcp_proxy) and host_name(request.host) not in LOOPBACK_HOSTS + ctx.allowed_hosts:
            # DNS rebinding: a page whose name now points at 127.0.0.1 must not reach the tools
            raise APIError(f"Host '{request.host[:100]}' is not allowed while tools or the MCP proxy are on "
                           f"(see --allowed-hosts)", 403, "permission_error")
        check_api_key(ctx.api_keys)
        if (request.method, request.path) in MODEL_FREE:
            return None
        inflight.enter()
        request.environ["numllama.in_flight"] = True
        sleeper = app.extensions.get("numllama_sleep")
        if sleeper is not None:   # --sleep-idle-seconds: a request that needs the model wakes it
            sleeper.wake_if_asleep()

    @app.teardown_request
    def leave(_exc):
        if request.environ.pop("numllama.in_flight", False):
            inflight.leave()

    def leave_after_stream(resp: Response) -> Response:
        """A stream is still in flight when its view has returned: it leaves once its body closes."""
        if resp.is_streamed and request.environ.pop("numllama.in_flight", False):
            resp.call_on_close(inflight.leave)
        return resp

    app.after_request(leave_after_stream)

    @app.get("/live")
    def live():
        """Liveness, distinct from /health's readiness: the process serves HTTP (while the model
        loads, sleeps or the server drains too)."""
        return json_response({"status": "alive"})

    @app.after_request
    def headers(resp):
        resp.headers["Server"] = "llama.cpp"
        origin = request.headers.get("Origin")
        ctx = app.config["NUMLLAMA"]
        policy, credentials = (ctx.cors_origins, ctx.cors_credentials) if ctx else ("*", True)
        if origin and allowed_origin(origin, policy):
            # without credentials "*" is said as "*" (a browser then sends no cookies or keys)
            resp.headers["Access-Control-Allow-Origin"] = "*" if policy == "*" and not credentials else origin
            resp.headers["Access-Control-Allow-Credentials"] = "true" if credentials else "false"
        return resp

    answer_errors_as_json(app)
    return app


def answer_errors_as_json(app: Flask) -> None:
    """Every error the app raises, Flask's own included, as llama-server's JSON error body."""
    @app.errorhandler(APIError)
    def api_error(e: APIError):
        # one line per refused request, never a traceback: the client's mistake is not ours
        log.warning("%s %s -> %d %s", request.method, request.path[:200], e.code, e.message[:300])
        return error_response(e)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if e.code in (404, 405):  # llama-server answers a wrong method like an unknown path
            return error_response(APIError("File Not Found", 404))
        if e.code == 413:
            return error_response(APIError("Request body too large", 413, "invalid_request_error"))
        return error_response(APIError(e.description or e.name, e.code or 500))

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        log.exception("unexpected error")
        return error_response(APIError(f"{type(e).__name__}: {e}", 500))
