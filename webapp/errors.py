"""llama-server's error shape: {"error": {"code", "message", "type"}}, HTTP status == code."""
from __future__ import annotations

import json

from flask import Response

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 500: "server_error", 501: "not_supported_error",
               503: "unavailable_error"}


class APIError(Exception):
    def __init__(self, message: str, code: int = 400, type: str | None = None, headers: dict | None = None,
                 **extra):
        super().__init__(message)
        self.message = message
        self.code = code
        self.type = type or ERROR_TYPES.get(code, "server_error")
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "type": self.type, **self.extra}}


def json_response(obj, status: int = 200) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False, allow_nan=False, default=_json_default),
                    status=status, content_type="application/json; charset=utf-8")


def error_response(err: APIError) -> Response:
    resp = json_response(err.body(), err.code)
    resp.headers.update(err.headers)
    return resp


def _json_default(o):
    import numpy as np
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(type(o).__name__)
