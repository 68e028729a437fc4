"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, served as
llama-server serves it. The request becomes a chat completion request
(server_chat_convert_anthropic_to_oai), runs as one, and is answered in Anthropic's shapes:
content blocks (thinking, text, tool_use), stop_reason, and a stream of named events
(message_start, content_block_start/delta/stop, message_delta, message_stop).
"""
from __future__ import annotations

import json
from contextlib import closing

from flask import Blueprint, Response

from ..engine.slots import ErrorEvent, FinalEvent, ProgressEvent

from .chat_completions import count_input_tokens, run_streaming, run_to_end, start_chat
from .completions import engine_error
from .errors import APIError, json_response
from .http import request_json, sse_event as event

bp = Blueprint("anthropic", __name__)

DEFAULT_MAX_TOKENS = 4096   # Anthropic requires max_tokens; llama-server is permissive
PASSED_THROUGH = ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs")
BILLING_HEADER = "x-anthropic-billing-header:"
BILLING_STAMP_LEN = 5


def _normalized_system(text: str) -> str:
    """Claude Code's system prompt starts with a billing header whose cch=XXXXX stamp changes on
    every request, so no prompt cache could get past it; llama-server overwrites the stamp."""
    if not text.startswith(BILLING_HEADER):
        return text
    at = text.find("cch=", len(BILLING_HEADER))
    if at < 0:
        return text
    at += 4
    if at + BILLING_STAMP_LEN < len(text) and text[at + BILLING_STAMP_LEN] == ";":
        return text[:at] + "f" * BILLING_STAMP_LEN + text[at + BILLING_STAMP_LEN:]
    return text


def _image_part(source) -> dict | None:
    source = source if isinstance(source, dict) else {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = source.get("url", "")
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict) -> dict:
    """A tool_result block becomes a "tool" message: text joined, or parts when it has images."""
    content = block.get("content")
    if isinstance(content, str):
        out = content
    elif isinstance(content, list):
        parts = []
        for c in content:
            c = c if isinstance(c, dict) else {}
            if c.get("type") == "text":
                parts.append({"type": "text", "text": _str(c.get("text"))})
            elif c.get("type") == "image" and (img := _image_part(c.get("source"))) is not None:
                parts.append(img)
        has_images = any(p["type"] != "text" for p in parts)
        out = parts if has_images else "".join(p["text"] for p in parts)
    else:
        out = ""
    return {"role": "tool", "tool_call_id": _str(block.get("tool_use_id")), "content": out}


def _str(value) -> str:
    return value if isinstance(value, str) else ""


def _message(msg) -> list[dict]:
    """One Anthropic message as chat messages: its text and images, thinking blocks as
    reasoning_content, tool_use blocks as tool_calls; then each tool_result as a tool message."""
    if not isinstance(msg, dict):
        raise APIError("Each message must be an object")
    role = msg.get("role")
    if "content" not in msg:
        return [] if role == "assistant" else [msg]
    content = msg["content"]
    if not isinstance(content, list):
        return [msg]
    parts, calls, results, reasoning = [], [], [], ""
    for block in content:
        block = block if isinstance(block, dict) else {}
        kind = block.get("type")
        if kind == "text":
            parts.append(block)
        elif kind == "thinking":
            reasoning += _str(block.get("thinking"))
        elif kind == "image":
            if (img := _image_part(block.get("source"))) is not None:
                parts.append(img)
        elif kind == "tool_use":
            args = block.get("input", {})
            calls.append({"id": _str(block.get("id")), "type": "function",
                          "function": {"name": _str(block.get("name")),
                                       "arguments": json.dumps(args if args is not None else {},
                                                               ensure_ascii=False, separators=(",", ":"))}})
        elif kind == "tool_result":
            results.append(_tool_result(block))
    out = []
    if parts or calls or reasoning:
        new = {"role": role, "content": parts if parts else ""}
        if calls:
            new["tool_calls"] = calls
        if reasoning:
            new["reasoning_content"] = reasoning
        out.append(new)
    return out + results


def to_chat_request(body: dict) -> dict:
    """An Anthropic Messages request as the chat completion request llama-server makes of it."""
    messages = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": _normalized_system(system)})
    elif isinstance(system, list):
        text = "".join(_normalized_system(_str(b.get("text"))) for b in system
                       if isinstance(b, dict) and b.get("type") == "text")
        messages.append({"role": "system", "content": text})
    elif system is not None:
        messages.append({"role": "system", "content": ""})
    if "messages" not in body:
        raise APIError("'messages' is required")
    if not isinstance(body["messages"], list):   # (llama-server reads it as no messages)
        raise APIError("Expected 'messages' to be an array")
    for msg in body["messages"]:
        messages.extend(_message(msg))
    out: dict = {"messages": messages}
    tools = body.get("tools")
    if isinstance(tools, list):
        out["tools"] = [{"type": "function", "function": {
            "name": _str(t.get("name")), "description": _str(t.get("description")),
            "parameters": t.get("input_schema", {})}} for t in tools if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "auto":
            out["tool_choice"] = "auto"
        elif choice.get("type") in ("any", "tool"):
            out["tool_choice"] = "required"
    if "stop_sequences" in body:
        out["stop"] = body["stop_sequences"]
    out["max_tokens"] = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    out.update({k: body[k] for k in PASSED_THROUGH if k in body})
    # `thinking` (its budget_tokens) and `metadata` are read by llama-server but steer nothing
    # in its generation; numllama reads neither
    return out


def _stop_reason(fin: FinalEvent, message: dict) -> str:
    if fin.stop_type in ("eos", "word"):
        return "tool_use" if message.get("tool_calls") else "end_turn"
    return "max_tokens"


def _usage(fin: FinalEvent) -> dict:
    return {"cache_read_input_tokens": fin.n_cached, "input_tokens": fin.n_prompt - fin.n_cached,
            "output_tokens": fin.n_decoded}


def _tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _content_blocks(message: dict) -> list[dict]:
    """The thinking block first (an empty signature: a local model signs nothing), the text,
    then one tool_use block per call."""
    blocks = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message["content"]:
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls", []):
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": _tool_input(call["function"]["arguments"])})
    return blocks


@bp.post("/v1/messages")
def messages():
    run = start_chat(to_chat_request(request_json()))
    if run.completion.stream:
        return _stream(run)
    c = run.completion
    a = run_to_end(run)[0]
    return json_response({
        "id": c.id, "type": "message", "role": "assistant", "content": _content_blocks(a.message),
        "model": c.model_name, "stop_reason": _stop_reason(a.final, a.message),
        "stop_sequence": a.final.stopping_word or None, "usage": _usage(a.final)})


class _Blocks:
    """Which content blocks a streamed message has opened, and their indices: thinking (0), then
    text, then one per tool call, as llama-server numbers them."""

    def __init__(self):
        self.thinking = False
        self.text = False
        self.calls: list[int] = []   # the block index of each call

    def text_index(self, has_reasoning: bool) -> int:
        return 1 if has_reasoning else 0

    def events(self, deltas: list[dict], has_reasoning: bool) -> list[str]:
        out = []
        for d in deltas:
            if d.get("reasoning_content"):
                if not self.thinking:
                    self.thinking = True
                    out.append(_block_start(0, {"type": "thinking", "thinking": ""}))
                out.append(_block_delta(0, {"type": "thinking_delta", "thinking": d["reasoning_content"]}))
            if d.get("content"):
                i = self.text_index(has_reasoning)
                if not self.text:
                    self.text = True
                    out.append(_block_start(i, {"type": "text", "text": ""}))
                out.append(_block_delta(i, {"type": "text_delta", "text": d["content"]}))
            for call in d.get("tool_calls", []):
                k = call["index"]
                if k >= len(self.calls):   # a new call: its block opens with its id and name
                    self.calls.append((1 if has_reasoning else 0) + (1 if self.text else 0) + k)
                    out.append(_block_start(self.calls[k], {"type": "tool_use", "id": call["id"],
                                                            "name": call["function"]["name"]}))
                args = call.get("function", {}).get("arguments")
                if args:
                    out.append(_block_delta(self.calls[k], {"type": "input_json_delta", "partial_json": args}))
        return out

    def stops(self, has_reasoning: bool) -> list[str]:
        """Close the blocks in order; a thinking block gets its (empty) signature first."""
        out = []
        if self.thinking:
            out.append(_block_delta(0, {"type": "signature_delta", "signature": ""}))
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if self.text:
            i = self.text_index(has_reasoning)
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": i}))
        for i in self.calls:
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": i}))
        return out


def _block_start(index: int, block: dict) -> str:
    return event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def _block_delta(index: int, delta: dict) -> str:
    return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _stream(run) -> Response:
    """llama-server sends message_start with the first generated token; here it opens the
    stream whatever comes first (a first token held back by a stop word, or none at all, would
    otherwise leave the stream without it). Blocks are numbered and opened once per stream
    (llama-server's last event re-opens the blocks its final reading touches)."""
    c = run.completion
    _, choice_events = run_streaming(run)

    def events():
        blocks, started = _Blocks(), False
        with closing(choice_events):
            for _, ev, ms, deltas in choice_events:
                if isinstance(ev, ErrorEvent):
                    yield event("error", engine_error(ev).body()["error"])
                    return
                if isinstance(ev, ProgressEvent):
                    continue
                if not started:
                    started = True
                    yield event("message_start", {"type": "message_start", "message": {
                        "id": c.id, "type": "message", "role": "assistant", "content": [],
                        "model": c.model_name, "stop_reason": None, "stop_sequence": None,
                        "usage": {"cache_read_input_tokens": ev.n_cached,
                                  "input_tokens": ev.n_prompt - ev.n_cached, "output_tokens": 0}}})
                has_reasoning = bool(ms.reasoning)
                yield from blocks.events(deltas, has_reasoning)
                if isinstance(ev, FinalEvent):
                    message = ms.message()
                    yield from blocks.stops(has_reasoning)
                    yield event("message_delta", {"type": "message_delta", "delta": {
                        "stop_reason": _stop_reason(ev, message),
                        "stop_sequence": ev.stopping_word or None},
                        "usage": {"output_tokens": ev.n_decoded}})
                    yield event("message_stop", {"type": "message_stop"})

    return Response(events(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@bp.post("/v1/messages/count_tokens")
def count_tokens():
    return json_response({"input_tokens": count_input_tokens(to_chat_request(request_json()))})
