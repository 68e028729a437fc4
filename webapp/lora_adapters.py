"""LoRA adapters over HTTP, as llama-server serves them: GET /lora-adapters lists the adapters
loaded with --lora/--lora-scaled and their current scales, POST /lora-adapters sets every scale
at once (an adapter not listed goes to 0), and a request's own "lora" field applies its scales to
that request alone. The arithmetic is engine/lora.py's."""
from __future__ import annotations

import numpy as np
from flask import Blueprint, current_app, request

from .errors import APIError, json_response
from .http import parse_json

bp = Blueprint("lora_adapters", __name__)
LORA_FIELD_ERROR = "Field 'lora': Error: 'lora' must be an array of objects with 'id' and 'scale' fields"


def _scales_by_id(entries) -> dict[int, float]:
    """llama-server's parse_lora_request: [{"id", "scale"}, ...] -> {id: scale} (a missing id
    is -1, which no adapter has; a missing scale 0)."""
    out = {}
    for e in entries:
        e = e if isinstance(e, dict) else {}
        i, scale = e.get("id", -1), e.get("scale", 0.0)
        if isinstance(i, bool) or not isinstance(i, int) or isinstance(scale, bool) or \
                not isinstance(scale, (int, float)):
            raise APIError(LORA_FIELD_ERROR)
        with np.errstate(over="ignore"):
            scale = np.float32(scale)   # (llama-server keeps scales as f32)
        if not np.isfinite(scale):   # (beyond f32: every output would be inf or NaN)
            raise APIError(f"LoRA scale {e.get('scale')!r} is out of range (at most {float(np.finfo(np.float32).max):.4g})")
        out[i] = float(scale)
    return out


def task_lora(ctx, body: dict) -> tuple[tuple, list]:
    """The adapters a request applies: its "lora" field's scales (adapters it does not list: 0),
    or the server's current ones. Returns (Task.lora, the field as llama-server echoes it)."""
    scales = list(ctx.lora_scales)
    echoed = []
    if body.get("lora") is not None:
        if not isinstance(body["lora"], list):
            raise APIError(LORA_FIELD_ERROR)
        asked = _scales_by_id(body["lora"])
        echoed = [{"id": i, "scale": s} for i, s in sorted(asked.items())]
        if asked:
            scales = [asked.get(i, 0.0) for i in range(len(scales))]
    return tuple((i, s) for i, s in enumerate(scales) if s != 0.0), echoed


@bp.get("/lora-adapters")
def list_adapters():
    ctx = current_app.config["NUMLLAMA"]
    return json_response([{"id": i, "path": a.path, "scale": ctx.lora_scales[i], "task_name": a.task_name,
                           "prompt_prefix": a.prompt_prefix} for i, a in enumerate(ctx.loras)])


@bp.post("/lora-adapters")
def set_scales():
    ctx = current_app.config["NUMLLAMA"]
    body = parse_json(request.get_data(as_text=False).decode("utf-8", "replace") or "null")
    if not isinstance(body, list):
        raise APIError("Request body must be an array")
    asked = _scales_by_id(body)
    ctx.lora_scales[:] = [asked.get(i, 0.0) for i in range(len(ctx.loras))]
    return json_response({"success": True})
