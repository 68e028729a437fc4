"""POST /v1/responses (/responses) and /v1/responses/input_tokens: OpenAI's Responses API, served
as llama-server serves it. The request becomes a chat completion request
(server_chat_convert_responses_to_chatcmpl: `input` items become messages, `instructions` the
system message, function tools chat tools), runs as one, and is answered as a Response: output
items (reasoning, message, function_call), or a stream of named events (response.created, ...
output_text.delta ..., response.completed). llama-server keeps no responses, so
previous_response_id is refused.
"""
from __future__ import annotations

import copy
import logging
import time
from contextlib import closing

from flask import Blueprint, Response

from ..engine.slots import ErrorEvent, FinalEvent, ProgressEvent, TokenEvent

from .chat_completions import count_input_tokens, run_streaming, run_to_end, start_chat, token_timings
from .completions import engine_error
from .errors import APIError, json_response
from .http import random_id, request_json, sse, sse_event as event

bp = Blueprint("responses", __name__)
log = logging.getLogger("numllama.http")
INPUT_ROLES = ("user", "system", "developer")


def _is(item: dict, key: str, kind: type) -> bool:
    return isinstance(item.get(key), kind)


def _input_message(item: dict) -> dict:
    """An input message (user, system, developer): input_text and input_image parts."""
    content = []
    for part in item["content"]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text":
            if "text" not in part:
                raise APIError("'Input text' requires 'text'")
            content.append({"text": part["text"], "type": "text"})
        elif kind == "input_image":
            if "image_url" not in part:
                raise APIError("'image_url' is required")
            content.append({"image_url": {"url": part["image_url"]}, "type": "image_url"})
        elif kind == "input_file":
            raise APIError("'input_file' is not supported by llamacpp at this moment")
        else:
            raise APIError("'type' must be one of 'input_text', 'input_image', or 'input_file'")
    msg = {k: v for k, v in item.items() if k not in ("type", "status")}
    msg["content"] = content
    return msg


def _output_message_content(item: dict) -> list:
    """An earlier answer's output_text (or refusal) parts as chat text parts."""
    if isinstance(item.get("content"), str):
        return [{"text": item["content"], "type": "text"}]
    content = []
    for part in item.get("content") if isinstance(item.get("content"), list) else []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("output_text", "input_text"):
            if not _is(part, "text", str):
                raise APIError("'Output text' requires 'text'")
            content.append({"text": part["text"], "type": "text"})
        elif kind == "refusal":
            if not _is(part, "refusal", str):
                raise APIError("'Refusal' requires 'refusal'")
            content.append({"refusal": part["refusal"], "type": "refusal"})
        else:
            raise APIError("'type' must be one of 'output_text' or 'refusal'")
    return content


def _tool_output(item: dict) -> dict:
    output = item["output"]
    if isinstance(output, list):
        output = copy.deepcopy(output)
        for part in output:
            if not isinstance(part, dict) or "type" not in part:
                raise APIError("Output of tool call missing 'type' field")
            if part["type"] == "input_text":
                part["type"] = "text"
            elif part["type"] == "input_image":
                if "image_url" not in part:
                    raise APIError("'image_url' is required")
                part.update(type="image_url", image_url={"url": part["image_url"]})
            else:
                raise APIError("Output of tool call should be 'Input text' or 'Input image'")
    return {"content": output, "role": "tool", "tool_call_id": item["call_id"]}


def _input_items(items: list) -> list[dict]:
    """The input item list as chat messages; an assistant's message, calls and reasoning that
    follow one another merge into one assistant message."""
    messages: list[dict] = []
    for item in items:
        if not isinstance(item, dict):
            raise APIError("Cannot determine type of 'item'")
        merge = bool(messages) and messages[-1].get("role") == "assistant"
        prev = messages[-1] if merge else None
        item = dict(item)
        if _is(item, "content", str):   # a plain input message reads as one input_text part
            item["content"] = [{"text": item["content"], "type": "input_text"}]
        kind = item.get("type")
        if _is(item, "content", list) and item.get("role") in INPUT_ROLES:
            messages.append(_input_message(item))
        elif item.get("role") == "assistant" and kind == "message":
            content = _output_message_content(item)
            if prev is not None:
                prev["content"] = (prev["content"] if isinstance(prev.get("content"), list) else []) + content
            else:
                messages.append({**{k: v for k, v in item.items() if k not in ("status", "type")},
                                 "content": content})
        elif kind == "function_call" and all(_is(item, k, str) for k in ("arguments", "call_id", "name")):
            call = {"function": {"arguments": item["arguments"], "name": item["name"]},
                    "id": item["call_id"], "type": "function"}
            if prev is not None:
                prev.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "tool_calls": [call]})
        elif (kind == "function_call_output" and _is(item, "call_id", str)
              and isinstance(item.get("output"), (str, list))):
            messages.append(_tool_output(item))
        elif kind == "reasoning" and _is(item, "summary", list):
            content = item.get("content")
            if not isinstance(content, list):
                raise APIError("item['content'] is not an array")
            if not content:
                raise APIError("item['content'] is empty")
            if not isinstance(content[0], dict) or not _is(content[0], "text", str):
                raise APIError("item['content']['text'] is not a string")
            if prev is not None:
                prev["reasoning_content"] = content[0]["text"]
            else:
                messages.append({"role": "assistant", "content": [], "reasoning_content": content[0]["text"]})
        else:
            raise APIError("Cannot determine type of 'item'")
    return messages


def to_chat_request(body: dict) -> dict:
    """A Responses request as the chat completion request llama-server makes of it: every other
    field (temperature, stream, ...) passes through."""
    if "input" not in body:
        raise APIError("'input' is required")
    if body.get("previous_response_id"):
        raise APIError("llama.cpp does not support 'previous_response_id'.")
    out = {k: v for k, v in body.items() if k not in ("input", "instructions", "tools", "max_output_tokens",
                                                       "reasoning", "n")}
    messages = []
    if "instructions" in body:
        messages.append({"role": "system", "content": body["instructions"] if isinstance(body["instructions"], str) else ""})
    if isinstance(body["input"], str):
        messages.append({"role": "user", "content": body["input"]})
    elif isinstance(body["input"], list):
        messages += _input_items(body["input"])
    else:
        raise APIError("'input' must be a string or array of objects")
    out["messages"] = messages
    if "tools" in body:
        if not isinstance(body["tools"], list):
            raise APIError("'tools' must be an array of objects")
        tools = []
        for t in body["tools"]:
            if not isinstance(t, dict) or t.get("type") != "function":
                # (web search, file search ... have no chat equivalent)
                log.warning("unsupported Responses tool type %r skipped", t.get("type") if isinstance(t, dict) else t)
                continue
            fn = {"strict": True, **{k: v for k, v in t.items() if k != "type"}}
            tools.append({"type": "function", "function": fn})
        if tools:
            out["tools"] = tools
    if "max_output_tokens" in body:
        out["max_tokens"] = body["max_output_tokens"]
    if isinstance(body.get("reasoning"), dict) and "effort" in body["reasoning"]:
        out["reasoning_effort"] = body["reasoning"]["effort"]
    return out


def _usage(fin: FinalEvent) -> dict:
    return {"input_tokens": fin.n_prompt, "output_tokens": fin.n_decoded,
            "total_tokens": fin.n_prompt + fin.n_decoded,
            "input_tokens_details": {"cached_tokens": fin.n_cached}}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"id": item_id, "summary": [], "type": "reasoning",
            "content": [{"text": text, "type": "reasoning_text"}], "encrypted_content": ""}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _call_item(call: dict, status: str) -> dict:
    return {"id": "fc_" + call["id"], "type": "function_call", "status": status,
            "arguments": call["function"]["arguments"], "call_id": "call_" + call["id"],
            "name": call["function"]["name"]}


@bp.post("/responses")
@bp.post("/v1/responses")
def responses():
    run = start_chat(to_chat_request(request_json()))
    if run.completion.stream:
        return _stream(run)
    c = run.completion
    a = run_to_end(run)[0]
    output = []
    if a.message.get("reasoning_content"):
        output.append({**_reasoning_item(random_id("rs_"), a.message["reasoning_content"]), "status": "completed"})
    if a.message["content"]:
        output.append({"content": [_text_part(a.message["content"])], "id": random_id("msg_"),
                       "role": "assistant", "status": "completed", "type": "message"})
    output += [_call_item(call, "completed") for call in a.message.get("tool_calls", [])]
    t = int(time.time())
    return json_response({"completed_at": t, "created_at": t, "id": random_id("resp_"), "model": c.model_name,
                          "object": "response", "output": output, "status": "completed", "usage": _usage(a.final)})


class _StreamState:
    """The ids and opened items of one streamed response."""

    def __init__(self):
        self.resp_id = random_id("resp_")
        self.reasoning_id = random_id("rs_")
        self.message_id = random_id("msg_")
        self.created = False
        self.thinking = False
        self.text = False
        self.call_ids: list[str] = []

    def status(self, name: str) -> tuple[str, dict]:
        return name, {"type": name, "response": {"id": self.resp_id, "object": "response", "status": "in_progress"}}

    def deltas(self, deltas: list[dict]) -> list[tuple[str, dict]]:
        out = []
        for d in deltas:
            if d.get("reasoning_content"):
                if not self.thinking:
                    self.thinking = True
                    out.append(_added({**_reasoning_item(self.reasoning_id, ""), "content": [],
                                       "status": "in_progress"}))
                out.append(("response.reasoning_text.delta", {"type": "response.reasoning_text.delta",
                            "delta": d["reasoning_content"], "item_id": self.reasoning_id}))
            if d.get("content"):
                if not self.text:
                    self.text = True
                    out.append(_added({"content": [], "id": self.message_id, "role": "assistant",
                                       "status": "in_progress", "type": "message"}))
                    out.append(("response.content_part.added", {"type": "response.content_part.added",
                                "item_id": self.message_id, "part": {"type": "output_text", "text": ""}}))
                out.append(("response.output_text.delta", {"type": "response.output_text.delta",
                            "item_id": self.message_id, "delta": d["content"]}))
            for call in d.get("tool_calls", []):
                fn = call.get("function", {})
                if call["index"] >= len(self.call_ids):
                    self.call_ids.append(call["id"])
                    out.append(_added({"id": "fc_" + call["id"], "arguments": "", "call_id": "call_" + call["id"],
                                       "name": fn.get("name", ""), "type": "function_call",
                                       "status": "in_progress"}))
                if fn.get("arguments"):
                    out.append(("response.function_call_arguments.delta", {
                        "type": "response.function_call_arguments.delta", "delta": fn["arguments"],
                        "item_id": "fc_" + self.call_ids[call["index"]]}))
        return out

    def done(self, message: dict) -> tuple[list[tuple[str, dict]], list]:
        """The closing events of every item, and the output they make."""
        out, output = [], []
        if message.get("reasoning_content"):
            item = _reasoning_item(self.reasoning_id, message["reasoning_content"])
            out.append(_done(item))
            output.append(item)
        if message["content"]:
            part = _text_part(message["content"])
            item = {"type": "message", "status": "completed", "id": self.message_id, "content": [part],
                    "role": "assistant"}
            out.append(("response.output_text.done", {"type": "response.output_text.done",
                        "item_id": self.message_id, "text": message["content"]}))
            out.append(("response.content_part.done", {"type": "response.content_part.done",
                        "item_id": self.message_id, "part": part}))
            out.append(_done(item))
            output.append(item)
        for call in message.get("tool_calls", []):
            item = _call_item(call, "completed")
            out.append(_done(item))
            output.append(item)
        return out, output


def _added(item: dict) -> tuple[str, dict]:
    return "response.output_item.added", {"type": "response.output_item.added", "item": item}


def _done(item: dict) -> tuple[str, dict]:
    return "response.output_item.done", {"type": "response.output_item.done", "item": item}


def _stream(run) -> Response:
    """As llama-server streams a response: response.created and response.in_progress first
    (again, with prompt_progress, for each progress report), each item added then its deltas,
    each item done, then response.completed. A token's timings (timings_per_token) and a
    progress report ride on its last event. The last reading's deltas are sent too (llama-server
    puts them only in the done events)."""
    c = run.completion
    _, choice_events = run_streaming(run)

    def events():
        st = _StreamState()
        with closing(choice_events):
            for _, ev, ms, deltas in choice_events:
                if isinstance(ev, ErrorEvent):
                    yield sse({"error": engine_error(ev).body()["error"]})
                    return
                out = []
                if not st.created:
                    st.created = True
                    out += [st.status("response.created"), st.status("response.in_progress")]
                elif isinstance(ev, ProgressEvent):
                    out.append(st.status("response.in_progress"))
                out += st.deltas(deltas)
                if isinstance(ev, FinalEvent):
                    done, output = st.done(ms.message())
                    out += done
                    out.append(("response.completed", {"type": "response.completed", "response": {
                        "id": st.resp_id, "object": "response", "created_at": int(time.time()),
                        "status": "completed", "model": c.model_name, "output": output,
                        "usage": _usage(ev)}, "timings": c.timings(ev)}))
                elif out and isinstance(ev, ProgressEvent):
                    out[-1][1]["prompt_progress"] = ev.as_dict()
                    if c.timings_per_token:
                        out[-1][1]["timings"] = ev.timings()
                elif out and isinstance(ev, TokenEvent) and c.timings_per_token:
                    out[-1][1]["timings"] = token_timings(ev)
                for name, data in out:
                    yield event(name, data)

    return Response(events(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@bp.post("/responses/input_tokens")
@bp.post("/v1/responses/input_tokens")
def input_tokens():
    return json_response({"input_tokens": count_input_tokens(to_chat_request(request_json())),
                          "object": "response.input_tokens"})
