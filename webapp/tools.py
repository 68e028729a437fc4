"""GET/POST /tools: the built-in agent tools (--tools), as llama-server serves them to its web UI.
Without --tools both answer 403 "this feature is disabled".

POST must say `Content-Type: application/json`. A web page can send a cross-site POST without
asking first (no CORS preflight) only with a "simple" content type such as text/plain; the
browser hides the answer from the page but the request still runs. Requiring JSON makes the
browser ask first, and CORS (localhost pages only, by default with tools on) then says no."""
from __future__ import annotations

import json
import queue
import threading

from flask import Blueprint, Response, current_app, request

from .agent_tools import ToolError, runtime_refusal
from .errors import APIError, json_response
from .http import request_json, require_agent_feature

bp = Blueprint("tools", __name__)


def _enabled_tools() -> dict:
    tools = current_app.config["NUMLLAMA"].tools
    require_agent_feature(bool(tools))
    return {t.name: t for t in tools}


@bp.get("/tools")
def list_tools():
    return json_response([t.to_json() for t in _enabled_tools().values()])


@bp.post("/tools")
def call_tool():
    tools = _enabled_tools()
    if request.mimetype != "application/json":
        raise APIError("POST /tools needs Content-Type: application/json", 415, "invalid_request_error")
    body = request_json()
    if not isinstance(body.get("tool"), str):
        raise APIError('the body must be a JSON object with a "tool" name', 400)
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise APIError('"params" must be a JSON object', 400)
    # the working folder comes from the runtime (the UI), never from the model's arguments
    params = {k: v for k, v in params.items() if k != "cwd"}
    if request.headers.get("X-Tool-Cwd"):
        params["cwd"] = request.headers["X-Tool-Cwd"]
    if request.headers.get("X-Tool-Runtime"):   # (an isolate numllama cannot provide: refused, 500 as llama-server)
        raise APIError(runtime_refusal(request.headers["X-Tool-Runtime"]), 500)
    tool = tools.get(body["tool"])
    if tool is None:
        raise APIError(f'unknown tool "{body["tool"]}"', 404, "invalid_request_error")
    stream = bool(body.get("stream", False))
    if stream and not tool.streams:
        raise APIError(f'tool "{tool.name}" does not support stream = true', 404, "invalid_request_error")
    try:
        if not stream:
            return json_response(tool.invoke(params))
        return _stream(tool, params)
    except ToolError as e:
        raise APIError(str(e), 400) from None


def _stream(tool, params) -> Response:
    """SSE: {"chunk": text} as the tool writes, then {"done": true} (with "error" if it failed).
    A client that goes away stops the tool (emit returns False once the reader is gone)."""
    chunks: queue.Queue = queue.Queue()
    alive = threading.Event()
    alive.set()

    def emit(text: str) -> bool:
        chunks.put({"chunk": text})
        return alive.is_set()

    def work():
        done = {"done": True}
        try:
            result = tool.invoke(params, emit)
            if result.get("error"):   # a failure the tool reports as its result
                done["error"] = result["error"]
        except Exception as e:  # reported in the stream: the status line has already gone out
            done["error"] = str(e)
        chunks.put(done)

    threading.Thread(target=work, name=f"tool-{tool.name}", daemon=True).start()

    def events():
        try:
            while True:
                event = chunks.get()
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                if event.get("done"):
                    return
        finally:
            alive.clear()

    return Response(events(), content_type="text/event-stream")
