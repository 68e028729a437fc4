"""Embeddings and reranking, as llama-server serves them with --embeddings and --reranking.

    POST /embedding, /embeddings   llama-server's own shape: [{"embedding": [[...]], "index": i}]
    POST /v1/embeddings            OpenAI's: {"data": [{"embedding": [...], "index", "object"}], ...}
    POST /rerank, /v1/rerank, /reranking, /v1/reranking
                                   a query against documents: Jina's shape, or TEI's ("texts")

Each input is one task; the scheduler evaluates its prompt for the hidden states and pools them
(engine.pooling, with the server's --pooling or the file's pooling_type), so the numbers come
from the model exactly as llama.cpp computes them. Rerank scores are the rank pooling's first
value (a reranker's classifier head, where the file has one).
"""
from __future__ import annotations

import base64

import numpy as np
from flask import Blueprint, current_app

from ..engine.slots import Task
from .completions import collect_finals, exceeds_context, submit_tasks
from .errors import APIError, json_response
from .http import request_json, require_flag
from .lora_adapters import task_lora
from .params import check_task_count, get_number, tokenize_prompt_element

bp = Blueprint("embeddings", __name__)


def _text_of_content(parts) -> str:
    """An OpenAI content array ([{"type": "text", "text": ...}, ...]): its texts, joined."""
    if not isinstance(parts, list):
        raise APIError("\"content\" must be an array")
    text = ""
    for part in parts:
        if not isinstance(part, dict):
            raise APIError("\"content\" items must be objects")
        if part.get("type", "text") != "text":
            raise APIError("Multimodal data provided, but model does not support multimodal requests.")
        if not isinstance(part.get("text", ""), str):
            raise APIError("\"text\" must be a string")
        text += part.get("text", "")
    return text


def _tokenize_inputs(ctx, value) -> list[list[int]]:
    """llama-server's inputs: one prompt (a string, token ids, mixed), a list of them, or
    objects holding an OpenAI "content" array. Every special token is added and parsed."""
    tok = ctx.engine.tokenizer
    limit = ctx.scheduler.capacity()
    items = value if isinstance(value, list) and not any(
        isinstance(e, int) and not isinstance(e, bool) for e in value) else [value]
    if not items:
        raise APIError("\"input\" must not be empty")
    check_task_count(len(items), limit, "inputs")
    prompts = []
    for item in items:
        if isinstance(item, dict) and "content" in item:
            prompts.append(tok.encode(_text_of_content(item["content"]), add_special=True, parse_special=True))
        else:
            prompts.append(tokenize_prompt_element(item, tok, max_tokens=ctx.n_ctx_slot,
                                                   on_too_long=lambda n: exceeds_context(n, ctx.n_ctx_slot, True)))
    return prompts


def _check_fits(ctx, prompts: list[list[int]]) -> None:
    """What llama-server checks when a slot takes such a task: a prompt pooled over all its
    tokens must fit one batch and the slot's context; one that may span batches, the context."""
    scheduler = ctx.scheduler
    for p in prompts:
        if not p:
            raise APIError("Input content cannot be empty")
        if scheduler.can_split_hidden:
            if len(p) >= ctx.n_ctx_slot:
                exceeds_context(len(p), ctx.n_ctx_slot)
        elif len(p) > scheduler.n_batch:
            raise APIError(f"input ({len(p)} tokens) is too large to process. increase the physical batch size "
                           f"(current batch size: {scheduler.n_batch})", 500)
        elif len(p) > ctx.n_ctx_slot:
            raise APIError(f"input ({len(p)} tokens) is larger than the max context size ({ctx.n_ctx_slot} tokens). "
                           "skipping", 400, "exceed_context_size_error", n_prompt_tokens=len(p), n_ctx=ctx.n_ctx_slot)


def _run(ctx, prompts: list[list[int]], kind: str, embd_normalize: int = 2) -> list:
    """Submit one task per prompt and wait for their EmbeddingEvents, in input order."""
    _check_fits(ctx, prompts)
    lora, _ = task_lora(ctx, {})   # the server's scales (llama-server's embeddings take no "lora")
    tasks = [Task(prompt_tokens=p, kind=kind, embd_normalize=embd_normalize, index=i, lora=lora)
             for i, p in enumerate(prompts)]
    return collect_finals(ctx, submit_tasks(ctx, tasks))


def _floats(v: np.ndarray) -> list[float]:
    return np.asarray(v, np.float32).tolist()


def handle_embeddings(oai: bool):
    ctx = current_app.config["NUMLLAMA"]
    require_flag(ctx.embedding, "embeddings", "--embeddings")
    if oai and ctx.scheduler.pooling == "none":
        raise APIError("Pooling type 'none' is not OAI compatible. Please use a different pooling type")
    body = request_json()
    if "input" in body:
        value = body["input"]
    elif "content" in body:
        oai = False   # "content" is llama-server's own field: its own answer shape
        value = body["content"]
    else:
        raise APIError("\"input\" or \"content\" must be provided")
    use_base64 = False
    if "encoding_format" in body:
        fmt = body["encoding_format"]
        if fmt == "base64":
            use_base64 = True
        elif fmt != "float":
            raise APIError("The format to return the embeddings in. Can be either float or base64")
    prompts = _tokenize_inputs(ctx, value)
    embd_normalize = ctx.embd_normalize
    if body.get("embd_normalize") is not None:
        embd_normalize = get_number(body, "embd_normalize", ctx.embd_normalize, int)
    results = _run(ctx, prompts, "embedding", embd_normalize)
    if not oai:
        return json_response([{"embedding": [_floats(v) for v in r.vectors], "index": i}
                              for i, r in enumerate(results)])
    data = []
    for i, r in enumerate(results):
        vector = np.asarray(r.vectors[0], np.float32)
        if use_base64:
            data.append({"embedding": base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii"),
                         "encoding_format": "base64", "index": i, "object": "embedding"})
        else:
            data.append({"embedding": _floats(vector), "index": i, "object": "embedding"})
    n_tokens = sum(r.n_prompt for r in results)
    model = body.get("model", ctx.model_alias)
    return json_response({"data": data, "model": model, "object": "list",
                          "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


@bp.post("/embedding")
@bp.post("/embeddings")
def embeddings():
    return handle_embeddings(oai=False)


@bp.post("/v1/embeddings")
def v1_embeddings():
    return handle_embeddings(oai=True)


def rerank_prompt(ctx, query: str, document: str) -> list[int]:
    """llama-server's format_prompt_rerank: the file's rerank template ({query}, {document}) when it
    has one, else [BOS] query [EOS] [SEP] document [EOS] as the vocabulary adds them (EOS: SEP
    when it has none; BERT's: [CLS] query [SEP] document)."""
    tok = ctx.engine.tokenizer
    template = ctx.engine.gguf.metadata.get("tokenizer.chat_template.rerank")
    if isinstance(template, str):
        text = template.replace("{query}", query).replace("{document}", document)
        return tok.encode(text, add_special=False, parse_special=True)
    vocab = tok.vocab
    eos_id = tok.eos_id if tok.eos_id >= 0 else vocab.sep_id
    eos = [eos_id] if vocab.add_eos and eos_id >= 0 else []
    bos = [tok.bos_id] if vocab.add_bos and tok.bos_id >= 0 else []
    sep = [vocab.sep_id] if vocab.add_sep and vocab.sep_id >= 0 else []
    plain = lambda text: tok.encode(text, add_special=False, parse_special=False)  # noqa: E731
    return [*bos, *plain(query), *eos, *sep, *plain(document), *eos]


def _documents(body: dict) -> list[str]:
    """The documents (or TEI's "texts"): strings, or objects with a "text" string (Cohere's and
    Jina's clients send these)."""
    docs = body.get("documents", body.get("texts"))
    if not isinstance(docs, list) or not docs:
        raise APIError("\"documents\" must be a non-empty string array")
    out = []
    for d in docs:
        if isinstance(d, dict) and isinstance(d.get("text"), str):
            d = d["text"]
        if not isinstance(d, str):
            raise APIError("\"documents\" must be a non-empty string array")
        out.append(d)
    return out


@bp.post("/rerank")
@bp.post("/reranking")
@bp.post("/v1/rerank")
@bp.post("/v1/reranking")
def rerank():
    ctx = current_app.config["NUMLLAMA"]
    if not ctx.embedding or ctx.scheduler.pooling != "rank":
        raise APIError("This server does not support reranking. Start it with `--reranking`", 501)
    body = request_json()
    tei = "texts" in body   # Hugging Face TEI's request and answer; Jina's otherwise
    if "query" not in body:
        raise APIError("\"query\" must be provided")
    query = body["query"]
    if not isinstance(query, str):
        raise APIError("\"query\" must be a string")
    documents = _documents(body)
    top_n = get_number(body, "top_n", len(documents), int) if body.get("top_n") is not None else len(documents)
    check_task_count(len(documents), ctx.scheduler.capacity(), "documents")
    results = _run(ctx, [rerank_prompt(ctx, query, d) for d in documents], "rerank")
    label = "score" if tei else "relevance_score"
    return_text = tei and bool(body.get("return_text", False))
    ranked = []
    for i, r in enumerate(results):
        item = {"index": i, label: r.score}
        if return_text:
            item["text"] = documents[i]
        ranked.append(item)
    ranked.sort(key=lambda item: -item[label])
    ranked = ranked[:max(top_n, 0)]
    if tei:
        return json_response(ranked)
    n_tokens = sum(r.n_prompt for r in results)
    return json_response({"model": body.get("model", ctx.model_alias), "object": "list", "results": ranked,
                          "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
