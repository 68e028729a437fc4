"""Anthropic's Messages API (/v1/messages) and OpenAI's Responses API (/v1/responses), against
llama-server's recorded answers and with the vendors' own client libraries.

tests/data/api-routes-SmolLM2.json was written by bench/compare_api_routes.py --record with an
AVX2 llama-server (--jinja) on SmolLM2-135M, with the model's own template, Qwen 2.5's and Qwen
3's: every answer and every streamed event, with random ids and clocks blanked.
"""
from __future__ import annotations

import json
import os
import sys

import anthropic
import pytest
import requests
from openai import OpenAI

from numllama.webapp.anthropic_messages import to_chat_request as anthropic_to_chat
from numllama.webapp.openai_responses import to_chat_request as responses_to_chat

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from compare_api_routes import answer  # noqa: E402

GOLDEN = json.load(open(os.path.join(HERE, "data", "api-routes-SmolLM2.json")))
TEMPLATES = os.path.join(HERE, "data", "templates")
OWN = "own template"


@pytest.fixture(scope="module", params=list(GOLDEN["templates"]))
def route_server(request, smollm_path):
    from server_util import Server
    flags = ["-c", "4096", "-np", "1", "--alias", "smollm2"]
    if request.param != OWN:
        flags += ["--chat-template-file", os.path.join(TEMPLATES, request.param + ".jinja")]
    s = Server(flags, model=smollm_path)
    yield request.param, s
    s.stop()


def test_answers_and_streams_match_llama_server(route_server):
    """Status, body and every streamed event (name and data), field by field."""
    name, s = route_server
    for run in GOLDEN["templates"][name]:
        assert answer(s.url, run["route"], run["request"]) == run["answer"], \
            f"{run['route']} {json.dumps(run['request'])[:200]}"


def _run(name: str, route: str, pred):
    return next(r for r in GOLDEN["templates"][name] if r["route"] == route and pred(r))


def test_anthropic_client_reads_messages_and_streams(route_server):
    name, s = route_server
    if name != "Qwen-Qwen3-0.6B":
        return
    run = _run(name, "/v1/messages", lambda r: r["request"].get("tools") and r["request"]["max_tokens"] == 40)
    req = run["request"]
    client = anthropic.Anthropic(api_key="dummy", base_url=s.url)
    msg = client.messages.create(model="x", max_tokens=req["max_tokens"], messages=req["messages"],
                                 tools=req["tools"], extra_body={"temperature": 0})
    # (how many calls fit in 40 tokens depends on what the slot had cached: the prompt pass then
    # runs in other batch shapes, which round differently; the golden test above holds them equal)
    assert msg.content[0].type == "text" and msg.stop_reason in ("max_tokens", "tool_use")
    calls = msg.content[1:]
    assert calls and all(b.type == "tool_use" and b.name == "get_weather" and b.input == {"location": "Paris"}
                         and len(b.id) == 32 for b in calls)
    with client.messages.stream(model="x", max_tokens=req["max_tokens"], messages=req["messages"],
                                tools=req["tools"], extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()   # the SDK rebuilds the message from the events
    assert final.content[0].type == "text" and final.content[0].text == msg.content[0].text
    assert len(final.content) > 1 and all(b.type == "tool_use" and b.input == {"location": "Paris"}
                                          for b in final.content[1:])
    n = client.messages.count_tokens(model="x", messages=req["messages"], tools=req["tools"])
    assert n.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens


def test_openai_client_reads_responses_and_streams(route_server):
    name, s = route_server
    if name != "Qwen-Qwen3-0.6B":
        return
    client = OpenAI(api_key="dummy", base_url=s.url + "/v1")
    run = _run(name, "/v1/responses", lambda r: "grammar" in r["request"])   # a reasoning item, then text
    req = run["request"]
    res = client.responses.create(model="x", input=req["input"], max_output_tokens=req["max_output_tokens"],
                                  temperature=0, extra_body={"grammar": req["grammar"]})
    want = run["answer"]["body"]["output"]
    assert [o.type for o in res.output] == ["reasoning", "message"]
    assert res.output[0].content[0].text == want[0]["content"][0]["text"]
    assert res.output_text == want[1]["content"][0]["text"]
    text, reasoning = "", ""
    for ev in client.responses.create(model="x", input=req["input"], max_output_tokens=req["max_output_tokens"],
                                      temperature=0, stream=True, extra_body={"grammar": req["grammar"]}):
        if ev.type == "response.output_text.delta":
            text += ev.delta
        elif ev.type == "response.reasoning_text.delta":
            reasoning += ev.delta
        elif ev.type == "response.completed":
            assert ev.response.output_text == text
    assert (reasoning, text) == (want[0]["content"][0]["text"], want[1]["content"][0]["text"])
    run = _run(name, "/v1/responses", lambda r: r["request"].get("tools"))   # function calls
    req = run["request"]
    res = client.responses.create(model="x", input=req["input"], tools=req["tools"],
                                  max_output_tokens=req["max_output_tokens"], temperature=0,
                                  extra_body={"logit_bias": req["logit_bias"]})
    calls = [o for o in res.output if o.type == "function_call"]
    assert calls and all(c.call_id.startswith("call_") and c.id == "fc_" + c.call_id[5:] for c in calls)
    assert [(c.name, c.arguments) for c in calls] == [
        (o["name"], o["arguments"]) for o in run["answer"]["body"]["output"] if o["type"] == "function_call"]


def test_anthropic_request_becomes_a_chat_request():
    body = {"system": [{"type": "text", "text": "x-anthropic-billing-header: cc=1; cch=ab12c;"},
                       {"type": "text", "text": "Be kind."}],
            "max_tokens": 9, "stop_sequences": ["END"], "top_k": 3, "metadata": {"user_id": "u"},
            "tool_choice": {"type": "tool", "name": "f"},
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"},
                                                           {"type": "tool_use", "id": "1", "name": "f",
                                                            "input": {"a": "é"}}]},
                         {"role": "user", "content": [
                             {"type": "tool_result", "tool_use_id": "1", "content": [{"type": "text", "text": "r"}]},
                             {"type": "text", "text": "and?"}]}]}
    assert anthropic_to_chat(body) == {
        "messages": [{"role": "system", "content": "x-anthropic-billing-header: cc=1; cch=fffff;Be kind."},
                     {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "", "reasoning_content": "hm",
                      "tool_calls": [{"id": "1", "type": "function",
                                      "function": {"name": "f", "arguments": '{"a":"é"}'}}]},
                     {"role": "user", "content": [{"type": "text", "text": "and?"}]},
                     {"role": "tool", "tool_call_id": "1", "content": "r"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required", "stop": ["END"], "max_tokens": 9, "top_k": 3}


def test_responses_request_becomes_a_chat_request():
    body = {"instructions": "Be kind.", "max_output_tokens": 5, "temperature": 0.5, "reasoning": {"effort": "low"},
            "tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"}],
            "input": [{"role": "user", "content": "q"},
                      {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
                      {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "r"}]}
    assert responses_to_chat(body) == {
        "temperature": 0.5, "max_tokens": 5, "reasoning_effort": "low",
        "tools": [{"type": "function", "function": {"strict": True, "name": "f", "parameters": {}}}],
        "messages": [{"role": "system", "content": "Be kind."},
                     {"role": "user", "content": [{"text": "q", "type": "text"}]},
                     {"role": "assistant", "content": [], "reasoning_content": "hm",
                      "tool_calls": [{"function": {"arguments": "{}", "name": "f"}, "id": "c1",
                                      "type": "function"}]},
                     {"content": "r", "role": "tool", "tool_call_id": "c1"}]}


@pytest.mark.parametrize("route,body,code,text", [
    ("/v1/messages", {"max_tokens": 4}, 400, "'messages' is required"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBO"}}]}]}, 500, "image input is not supported"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "document"}]}]}, 200, ""),
    ("/v1/messages", {"messages": [{"role": "user"}]}, 400, "must contain 'content'"),
    ("/v1/messages", {"messages": "hi"}, 400, "Expected 'messages' to be an array"),
    ("/v1/messages/count_tokens", {}, 400, "'messages' is required"),
    ("/v1/responses", {}, 400, "'input' is required"),
    ("/v1/responses", {"input": 3}, 400, "'input' must be a string or array of objects"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, 400,
     "'input_file' is not supported"),
    ("/v1/responses", {"input": "hi", "tools": {}}, 400, "'tools' must be an array of objects"),
    ("/responses/input_tokens", {"input": [{"type": "reasoning", "summary": [], "content": []}]}, 400,
     "item['content'] is empty"),
])
def test_bad_requests(route_server, route, body, code, text):
    """A clear error, and the server goes on. Two differ from llama-server on purpose: a missing
    `messages` on /v1/messages is its 500 (numllama's 400 says whose mistake it is), and
    `messages` that is not an array it reads as no messages. A block type the converter does
    not know is dropped, as llama-server drops it."""
    name, s = route_server
    if name != OWN:
        return
    r = s.post(route, {"max_tokens": 2, **body} if route == "/v1/messages" else body)
    assert r.status_code == code, r.text
    if code != 200:
        assert text in r.json()["error"]["message"]
    assert requests.get(s.url + "/health", timeout=10).status_code == 200


def test_vertex_request_formats():
    from numllama.webapp.vertex_predict import request_format
    assert [request_format(p) for p in ("/v1/chat/completions", "/apply-template", "/completion",
                                        "/slots/<id_slot>", "/v1")] == [
        "chatCompletions", "applyTemplate", "completion", "slots", "v1"]


def test_vertex_predict_route(stories_path):
    """As a Vertex AI container (AIP_MODE=PREDICTION): the port and health route from the
    environment, each instance answered by the route it names, errors in place (compared with
    llama-server by hand on SmolLM2: the same predictions but for which slot served which)."""
    from server_util import Server, free_port
    port = free_port()
    s = Server(["-np", "2", "-c", "1024", "--api-key", "k"], model=stories_path,
               env={"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": "healthz",
                    "AIP_PREDICT_ROUTE": "/v1/predict"})
    try:
        url = s.url   # AIP_HTTP_PORT's, not the --port the harness gave
        assert s.port == port and "instead of" in s.output()
        assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
        key = {"Authorization": "Bearer k"}
        body = {"instances": [
            {"@requestFormat": "chatCompletions", "max_tokens": 4, "temperature": 0,
             "messages": [{"role": "user", "content": "hi"}]},
            {"@requestFormat": "/completion", "n_predict": 4, "temperature": 0, "prompt": "Once", "stream": True},
            {"@requestFormat": "nothing"}, 5]}
        assert requests.post(url + "/v1/predict", json=body, timeout=60).status_code == 401
        r = requests.post(url + "/v1/predict", json=body, headers=key, timeout=60)
        assert r.status_code == 200
        chat, completion, unknown, bad = r.json()["predictions"]
        direct = requests.post(url + "/completion", json=body["instances"][1] | {"stream": False},
                               headers=key, timeout=60).json()
        assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 4
        assert completion["content"] == direct["content"] and completion["tokens_predicted"] == 4
        assert unknown["error"]["message"] == "no handler registered for @requestFormat: nothing"
        assert bad["error"]["message"] == "each instance must be a JSON object"
        r = requests.post(url + "/v1/predict", json={"instances": [{}] * 129}, headers=key, timeout=60)
        assert r.status_code == 400 and "maximum size of 128" in r.json()["error"]["message"]
    finally:
        s.stop()
