"""POST /tokenize and POST /detokenize."""
from __future__ import annotations

from flask import Blueprint, current_app

from .errors import APIError, json_response
from .http import request_json
from .params import get_bool

bp = Blueprint("tokens", __name__)


def check_tokenizable(texts, ctx) -> None:
    """Refuse, before tokenizing, text that must make more tokens than any context of this
    server could hold (tokenizing costs memory and time in proportion to the text)."""
    limit = max(ctx.n_ctx_slot * ctx.scheduler.n_slots, ctx.engine.gguf.hparams.n_ctx_train)
    at_least = sum(ctx.engine.tokenizer.min_tokens(t) for t in texts if isinstance(t, str))
    if at_least > limit:
        raise APIError(f"content too long: at least {at_least} tokens, more than this server's "
                       f"largest context ({limit} tokens)")


@bp.post("/tokenize")
def tokenize():
    body = request_json()
    tok = current_app.config["NUMLLAMA"].engine.tokenizer
    content = body.get("content")
    add_special = get_bool(body, "add_special", False)
    parse_special = get_bool(body, "parse_special", True)
    with_pieces = get_bool(body, "with_pieces", False)
    if content is None:
        return json_response({"tokens": []})
    if not isinstance(content, (str, list)):
        raise APIError("Field 'content': must be a string or an array of strings and token ids")
    parts = content if isinstance(content, list) else [content]
    check_tokenizable(parts, current_app.config["NUMLLAMA"])
    ids: list[int] = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            ids += tok.encode(part, add_special=add_special and i == 0, parse_special=parse_special)
        elif isinstance(part, int) and not isinstance(part, bool):
            if not 0 <= part < tok.n_vocab:
                raise APIError(f"token id {part} is out of range [0, {tok.n_vocab})")
            ids.append(part)
        else:
            raise APIError("Field 'content': must be a string or an array of strings and token ids")
    if not with_pieces:
        return json_response({"tokens": ids})
    out = []
    for t in ids:
        raw = tok.token_bytes(t)
        try:
            piece = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)  # not valid UTF-8 on its own: the raw bytes
        out.append({"id": t, "piece": piece})
    return json_response({"tokens": out})


@bp.post("/detokenize")
def detokenize():
    body = request_json()
    tok = current_app.config["NUMLLAMA"].engine.tokenizer
    tokens = body.get("tokens", [])
    if tokens is None:
        tokens = []
    if not isinstance(tokens, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise APIError("Field 'tokens': must be an array of token ids")
    bad = [t for t in tokens if not 0 <= t < tok.n_vocab]
    if bad:
        raise APIError(f"token id {bad[0]} is out of range [0, {tok.n_vocab})")
    return json_response({"content": tok.decode(tokens, special=True)})
