"""POST /infill: fill in the middle (editor completion: llama.vscode, llama.vim), as llama-server
does it (format_prompt_infill).

The prompt is laid out with the model's FIM tokens, in the repository-level pattern:

    [FIM_REP]myproject\\n [FIM_SEP]file\\n chunk ... [FIM_SEP]filename\\n
    [FIM_PRE] prefix [FIM_SUF] suffix [FIM_MID] prompt

(the extra chunks, `input_extra`, fill what the context leaves; the prefix and suffix are cut to
a batch, 3:1; with --spm-infill the suffix comes before the prefix), then generated as
/completion generates, with its fields and its answer.
"""
from __future__ import annotations

from flask import Blueprint, current_app

from .completions import Completion, run_blocking, run_stream
from .errors import APIError
from .http import request_json

bp = Blueprint("infill", __name__)
FIM_NEEDED = (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle"))
# llama-server's separator of extra chunks for models without a file-separator token
CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"


def _tokens(tok, value) -> list[int]:
    """A prefix or suffix as llama-server's tokenize_mixed reads it: text (no special tokens,
    none parsed), or a list of texts and token ids."""
    if isinstance(value, str):
        return tok.encode(value, add_special=False, parse_special=False)
    if isinstance(value, list):
        out: list[int] = []
        for part in value:
            if isinstance(part, str):
                out += tok.encode(part, add_special=False, parse_special=False)
            elif isinstance(part, int) and not isinstance(part, bool) and 0 <= part < tok.n_vocab:
                out.append(part)
            else:
                raise APIError("\"input_prefix\" and \"input_suffix\" hold text or token ids")
        return out
    raise APIError("\"input_prefix\" and \"input_suffix\" must be strings")


def _extra_chunks(body: dict) -> list[dict]:
    extra = body.get("input_extra", [])
    if not isinstance(extra, list):
        raise APIError("\"input_extra\" must be an array of {\"filename\": string, \"text\": string}")
    for chunk in extra:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise APIError("extra_context chunk must contain a \"text\" field with a string value")
        if "filename" in chunk and not isinstance(chunk["filename"], str):
            raise APIError("extra_context chunk's \"filename\" field must be a string")
    return extra


def infill_prompt(tok, prefix, suffix, extra: list[dict], prompt: list[int], n_batch: int, n_predict: int,
                  n_ctx: int, spm_infill: bool) -> list[int]:
    """llama-server's format_prompt_infill, step for step."""
    fim = tok.vocab.fim

    def plain(text: str) -> list[int]:
        return tok.encode(text, add_special=False, parse_special=False)
    # the extra chunks fill what the context leaves, from their end: only their last n_room
    # tokens are kept, so chunks further back than that are never tokenized
    n_room = max(0, n_ctx - n_batch - 2 * n_predict)
    pieces: list[list[int]] = []       # from the last piece back
    if "sep" in fim:
        pieces.append([fim["sep"], *plain("filename\n")])
    for chunk in reversed(extra):
        if sum(map(len, pieces)) >= n_room:
            break
        pieces.append(plain(chunk["text"]))
        pieces.append([fim["sep"], *plain(chunk.get("filename", "tmp") + "\n")] if "sep" in fim
                      else plain(CHUNK_SEPARATOR))
    else:
        if "rep" in fim:
            pieces.append([fim["rep"], *plain("myproject\n")])
    extra_tokens = [t for piece in reversed(pieces) for t in piece]
    pre, suf = _tokens(tok, prefix), _tokens(tok, suffix)
    # the prefix and suffix fit a batch, 3:1; the extra chunks fill the rest of the context
    n_prefix = min(len(pre), 3 * (n_batch // 4))
    n_suffix = min(len(suf), max(0, n_batch // 4 - (2 + len(prompt))))
    n_extra = min(n_room, len(extra_tokens))
    pre = [fim["pre"], *pre[len(pre) - n_prefix:], *prompt]
    suf = [fim["suf"], *suf[:n_suffix]]
    first, second = (suf, pre) if spm_infill else (pre, suf)
    if tok.vocab.add_bos and tok.bos_id >= 0:
        first = [tok.bos_id, *first]
    return [*extra_tokens[len(extra_tokens) - n_extra:], *first, *second, fim["mid"]]


@bp.post("/infill")
def infill():
    ctx = current_app.config["NUMLLAMA"]
    tok = ctx.engine.tokenizer
    missing = "".join(f"{what} token is missing. " for key, what in FIM_NEEDED if key not in tok.vocab.fim)
    if missing:
        raise APIError(f"Infill is not supported by this model: {missing}", 501)
    body = request_json()
    if "prompt" in body and not isinstance(body["prompt"], str):
        raise APIError("\"prompt\" must be a string")
    for key in ("input_prefix", "input_suffix"):
        if key not in body:
            raise APIError(f"\"{key}\" is required")
    extra = _extra_chunks(body)
    prompt = tok.encode(body.get("prompt", ""), add_special=False, parse_special=True)
    tokens = infill_prompt(tok, body["input_prefix"], body["input_suffix"], extra, prompt,
                           ctx.scheduler.n_batch, ctx.defaults.n_predict, ctx.n_ctx_slot, ctx.spm_infill)
    c = Completion({**body, "prompt": tokens}, oai=False)
    return run_stream(c) if c.stream else run_blocking(c)
