"""GET /health, /props, /slots, /models (/v1/models)."""
from __future__ import annotations

import os
import time

from flask import Blueprint, current_app, request

from ..engine.slots import SlotBusy

from .errors import APIError, json_response
from .http import request_json, require_flag
from .params import N_PROBS_MAX, generation_settings
from .sleep import read_only

bp = Blueprint("info", __name__)


@bp.get("/health")
@bp.get("/v1/health")
def health():
    return json_response({"status": "ok"})


def _default_params(ctx, full: bool) -> dict:
    p = ctx.defaults.sampling
    return generation_settings(p, ctx.defaults.n_predict, (), False, 0, False, False, False, full=full,
                               speculative=ctx.speculative)


@bp.get("/props")
def props():
    return read_only(current_app, lambda sleeper: json_response(sleeper.props), _props)


def _props(ctx):
    tok = ctx.engine.tokenizer
    return json_response({
        "default_generation_settings": {"params": _default_params(ctx, full=False), "n_ctx": ctx.n_ctx_slot},
        "total_slots": ctx.scheduler.n_slots,
        "model_alias": ctx.model_alias,
        "model_ftype": ctx.engine.gguf.ftype_name,
        "model_path": ctx.model_path,
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": "<__media__>",
        "endpoint_slots": ctx.enable_slots,
        "endpoint_props": ctx.enable_props,
        "endpoint_metrics": ctx.enable_metrics,
        "ui": ctx.ui,
        "ui_settings": {},
        "chat_template": ctx.chat_template.source if ctx.chat_template else "",
        "chat_template_caps": ctx.chat_template.caps.as_dict() if ctx.chat_template else {},
        "bos_token": tok.token_str(tok.bos_id) if tok.bos_id >= 0 else "",
        "eos_token": tok.token_str(tok.eos_id) if tok.eos_id >= 0 else "",
        "build_info": ctx.build_fingerprint,
        "device": ctx.device,
        "is_sleeping": False,
        "n_probs_max": N_PROBS_MAX,   # numllama: a larger n_probs is capped to this
        "cors_proxy_enabled": False,
    })


@bp.post("/props")
def set_props():
    ctx = current_app.config["NUMLLAMA"]
    require_flag(ctx.enable_props, "changing global properties", "--props")
    # llama-server accepts the body and changes nothing it does not know; numllama has no
    # runtime-changeable property yet, so the same holds
    return json_response({"success": True})


@bp.get("/slots")
def slots():
    ctx = current_app.config["NUMLLAMA"]
    require_flag(ctx.enable_slots, "slots endpoint", "--slots")
    view = ctx.scheduler.view()
    if request.args.get("fail_on_no_slot") in ("1", "true") and all(s.busy for s in view.slots):
        raise APIError("no slot available", 503)
    tok = ctx.engine.tokenizer
    out = []
    for s in view.slots:
        d = {"id": s.id, "n_ctx": s.n_ctx, "speculative": False, "is_processing": s.busy}
        if s.last_task_id is not None:
            d.update({
                "id_task": s.last_task_id,
                "n_prompt_tokens": len(s.last_prompt),
                "n_prompt_tokens_processed": len(s.last_prompt) - s.n_cached,
                "n_prompt_tokens_cache": s.n_cached,
                "params": generation_settings(s.params, -1, (), False, 0, False, False, False, full=False,
                                              speculative=ctx.speculative),
                "next_token": [{"has_next_token": s.busy,
                                "has_new_line": s.has_new_line,
                                "n_remain": -1,
                                "n_decoded": s.n_decoded}],
                "prompt": tok.decode(list(s.last_prompt)),
                "generated": s.last_generated,
            })
        out.append(d)
    return json_response(out)


@bp.get("/models")
@bp.get("/v1/models")
def models():
    return read_only(current_app, lambda sleeper: json_response(sleeper.models), _models)


def _models(ctx):
    g = ctx.engine.gguf
    hp = g.hparams
    aliases = sorted(ctx.aliases) if ctx.aliases else [ctx.model_alias]
    return json_response({
        "models": [{"name": aliases[0], "model": aliases[0], "modified_at": "", "size": "", "digest": "",
                    "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                    "parameters": "", "details": {"parent_model": "", "format": "gguf", "family": "",
                                                  "families": [""], "parameter_size": "",
                                                  "quantization_level": ""}}],
        "object": "list",
        "data": [{"id": aliases[0], "aliases": aliases, "tags": ctx.tags, "object": "model",
                  "created": int(ctx.started), "owned_by": "llamacpp",
                  "meta": {"vocab_type": 1 if g.vocab.model == "llama" else 2, "n_vocab": hp.n_vocab,
                           "n_ctx": ctx.n_ctx_slot, "n_ctx_train": hp.n_ctx_train, "n_embd": hp.n_embd,
                           "n_params": g.n_params, "size": sum(int(t.n_bytes) for t in g.tensors.values()),
                           "ftype": g.ftype_name}}],
    })


@bp.post("/slots/<id_slot>")
def slot_action(id_slot):
    """?action=save|restore|erase on one slot; files live in --slot-save-path only."""
    ctx = current_app.config["NUMLLAMA"]
    require_flag(bool(ctx.slot_save_path), "slots action", "--slot-save-path")
    sched = ctx.scheduler
    if not (id_slot.isascii() and id_slot.isdigit()) or int(id_slot) >= sched.n_slots:
        raise APIError(f"Invalid slot id: {id_slot[:20]}")
    slot_id = int(id_slot)
    action = request.args.get("action")
    filename = None
    try:
        if action == "erase":
            return json_response({"id_slot": slot_id, "n_erased": sched.erase_slot(slot_id)})
        if action not in ("save", "restore"):
            raise APIError(f"Invalid action: {action!r} (save, restore or erase)")
        filename = request_json().get("filename")
        if (not isinstance(filename, str) or not filename or filename in (".", "..")
                or "/" in filename or "\\" in filename or "\0" in filename):
            raise APIError("Invalid filename: a plain file name inside --slot-save-path is required")
        path = os.path.join(ctx.slot_save_path, filename)
        t0 = time.perf_counter()
        if action == "save":
            n, size = sched.save_slot(slot_id, path)
            return json_response({"id_slot": slot_id, "filename": filename, "n_saved": n, "n_written": size,
                                  "timings": {"save_ms": (time.perf_counter() - t0) * 1000}})
        if not os.path.isfile(path):
            raise APIError(f"No saved state named {filename!r}", 404)
        n, size = sched.restore_slot(slot_id, path)
        return json_response({"id_slot": slot_id, "filename": filename, "n_restored": n, "n_read": size,
                              "timings": {"restore_ms": (time.perf_counter() - t0) * 1000}})
    except SlotBusy as e:
        raise APIError(str(e), 503)
    except OSError as e:   # its message names the path: the client gave only the file name
        raise APIError(f"Cannot {action} slot {slot_id}: {e.strerror or type(e).__name__} ({filename[:100]!r})")
    except (ValueError, KeyError) as e:
        raise APIError(f"Cannot {action} slot {slot_id}: {e}")
