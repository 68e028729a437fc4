"""What every route shares: reading a request's JSON body safely, SSE framing, and asking
waitress whether the client is still there.

A body is checked once, here, before any route looks at it: it must be valid JSON (no NaN or
Infinity, which strict JSON does not have), an object, nested at most MAX_JSON_DEPTH deep, and
every string in it must be encodable (a lone surrogate such as "\\ud800" is valid JSON but not
text). Anything else is a 400 naming the problem, so no route meets such a value later, half
way through a generation.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import string

from flask import request

from .errors import APIError

# Deeper than any real request (JSON schemas nest a few dozen levels at most); it also keeps
# the recursive code that reads schemas and templates far from Python's recursion limit.
MAX_JSON_DEPTH = 100
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def parse_json(data: str):
    """Strict JSON: no NaN/Infinity, numbers in range, bounded depth, encodable strings."""
    try:
        body = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise APIError(f"Invalid JSON in request body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise APIError(f"Invalid JSON in request body: {e}") from None
    check_json_tree(body)
    return body


def check_json_tree(root) -> None:
    """Depth and string checks, iteratively (a recursive walk would fail on what it checks)."""
    stack = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise APIError("Invalid JSON in request body: a string holds a lone UTF-16 surrogate")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(f"Invalid JSON in request body: nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise APIError("Invalid JSON in request body: a key holds a lone UTF-16 surrogate")
                stack.append((item, depth + 1))
        else:
            stack.extend((item, depth + 1) for item in value)


def request_json() -> dict:
    """The request's body as a checked JSON object (an empty body is an error too)."""
    try:
        text = request.get_data(as_text=False).decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"Invalid JSON in request body: {e}") from None
    body = parse_json(text or "null")
    if not isinstance(body, dict):
        raise APIError("Request body must be a JSON object")
    return body


def sse(obj) -> str:
    """One server-sent event carrying a JSON object."""
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


RANDOM_ID_CHARS = string.ascii_letters + string.digits


def random_id(prefix: str = "") -> str:
    """llama-server's random_string(), after a prefix: 32 letters and digits (completion, tool
    call, response and item ids)."""
    return prefix + "".join(secrets.choice(RANDOM_ID_CHARS) for _ in range(32))


def sse_event(name: str, data: dict) -> str:
    """One named server-sent event (the framing of Anthropic's stream and the Responses API's)."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def disconnect_probe():
    """A function telling whether the client has gone (waitress's; never, elsewhere)."""
    probe = request.environ.get("waitress.client_disconnected")
    return probe if probe is not None else (lambda: False)


def require_flag(enabled: bool, what: str, flag: str) -> None:
    """llama-server's 501 for an endpoint whose command-line flag is off."""
    if not enabled:
        raise APIError(f"This server does not support {what}. Start it with `{flag}`", 501)


def require_agent_feature(enabled: bool) -> None:
    """llama-server's 403 for the agent features (--tools, --ui-mcp-proxy) when they are off."""
    if not enabled:
        raise APIError("this feature is disabled", 403, "feature_disabled")
