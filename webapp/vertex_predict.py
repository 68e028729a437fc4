"""Google Cloud Vertex AI's custom-container contract, as llama-server follows it.

With AIP_MODE=PREDICTION in the environment the server listens on $AIP_HTTP_PORT, answers
health checks at $AIP_HEALTH_ROUTE too, and serves $AIP_PREDICT_ROUTE (default /predict):
{"instances": [...]}, where each instance is a request body naming the route it is meant for in
"@requestFormat" (the camelCase of the route's path, "chatCompletions" for
/v1/chat/completions, or the path itself). Each instance gets that route's answer, errors
included, in "predictions"; streaming is not part of the contract.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from flask import Flask, request

from .errors import APIError, json_response
from .http import request_json

log = logging.getLogger("numllama.http")
MAX_INSTANCES = 128
MAX_PARALLEL = 16   # instances dispatched at once (the others wait; the slots bound the work anyway)
FORWARDED_HEADERS = ("Authorization", "X-Api-Key")


@dataclass(frozen=True)
class VertexSettings:
    predict_route: str
    health_route: str   # "" : only the usual /health
    port: int

    @staticmethod
    def from_env(env=os.environ) -> "VertexSettings | None":
        """The settings when AIP_MODE is PREDICTION (routes get a leading slash if they lack one)."""
        if env.get("AIP_MODE", "") != "PREDICTION":
            return None

        def route(name: str, default: str) -> str:
            value = env.get(name) or default
            return value if not value or value.startswith("/") else "/" + value
        return VertexSettings(route("AIP_PREDICT_ROUTE", "/predict"), route("AIP_HEALTH_ROUTE", ""),
                              int(env.get("AIP_HTTP_PORT") or 8080))


def request_format(path: str) -> str:
    """A route's camelCase name: "/v1/chat/completions" -> "chatCompletions",
    "/apply-template" -> "applyTemplate" (path parameters cut off)."""
    s = path[3:] if path.startswith("/v1") and len(path) > 3 else path
    s = s.lstrip("/").split("<")[0]
    out, cap = [], False
    for ch in s:
        if ch in "/-_":
            cap = True
        else:
            out.append(ch.upper() if cap else ch)
            cap = False
    return "".join(out)


def _error(message: str, code: int = 400) -> dict:
    return APIError(message, code).body()


def register(app: Flask, settings: VertexSettings) -> None:
    """Add the predict route (and the health alias) to an app whose routes are all registered."""
    if settings.predict_route in {r.rule for r in app.url_map.iter_rules()}:
        raise SystemExit(f"AIP_PREDICT_ROUTE={settings.predict_route} conflicts with an existing route")
    routes: dict[str, str] = {}
    for rule in app.url_map.iter_rules():
        if "POST" in (rule.methods or ()) and "<" not in rule.rule:
            routes.setdefault(request_format(rule.rule), rule.rule)   # the first one wins
            routes.setdefault(rule.rule, rule.rule)
    if settings.health_route:
        app.add_url_rule(settings.health_route, "vertex_health", app.view_functions["info.health"])
        app.config["PUBLIC_PATHS"] = app.config["PUBLIC_PATHS"] + (settings.health_route,)

    def run_instance(instance, headers: dict) -> dict:
        if not isinstance(instance, dict):
            return _error("each instance must be a JSON object")
        fmt = instance.get("@requestFormat")
        if not isinstance(fmt, str):
            return _error("each instance must include a string @requestFormat")
        path = routes.get(fmt)
        if path is None:
            return _error(f"no handler registered for @requestFormat: {fmt}")
        payload = {k: v for k, v in instance.items() if k != "@requestFormat"}
        if "stream" in payload:
            log.warning("ignoring an instance's stream field: the predict route does not stream")
            payload["stream"] = False
        with app.test_client() as client:   # the route runs as if it had been called directly
            # (marked internal: a drain that begins now refuses new calls, not this accepted one's parts)
            resp = client.post(path, data=json.dumps(payload), headers=headers, content_type="application/json",
                               environ_overrides={"numllama.internal": True})
            body = resp.get_data(as_text=True)
        try:
            return json.loads(body) if body else None
        except ValueError:
            return body

    def predict():
        data = request_json()
        instances = data.get("instances")
        if not isinstance(instances, list):
            raise APIError("request body must include an array field named instances")
        if len(instances) > MAX_INSTANCES:
            raise APIError(f"instances array exceeds maximum size of {MAX_INSTANCES}")
        headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
        if not instances:
            return json_response({"predictions": []})
        with ThreadPoolExecutor(max_workers=min(len(instances), MAX_PARALLEL)) as pool:
            predictions = list(pool.map(lambda i: run_instance(i, headers), instances))
        return json_response({"predictions": predictions})

    app.add_url_rule(settings.predict_route, "vertex_predict", predict, methods=["POST"])
