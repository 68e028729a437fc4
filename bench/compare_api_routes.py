"""Anthropic's /v1/messages and OpenAI's /v1/responses against numllama-server and llama-server,
side by side, on one model: every answer and every streamed event, field by field, after
blanking what is random or a clock (ids keep their prefix, times and timings their presence).
Requests run greedy, with the model's own chat template, Qwen 2.5's (tool calls) and
Qwen 3's (a reasoning block, and tool calls after it). Counts the requests where both servers agree.

    python3 bench/compare_api_routes.py SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama-server /path/to/llama-server [--record tests/data/api-routes-SmolLM2.json] [-v]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import requests

from compare_tokens import add_server_args, running, write_golden   # beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "..", "tests", "data", "templates")
RANDOM_ID = re.compile(r"^(resp_|msg_|rs_|fc_|call_|chatcmpl-|)[A-Za-z0-9]{32}$")
CLOCKS = ("created", "created_at", "completed_at")

WEATHER_A = {"name": "get_weather", "description": "Get the weather", "input_schema": {
    "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}
WEATHER_R = {"type": "function", "name": "get_weather", "description": "Get the weather",
             "parameters": WEATHER_A["input_schema"]}
GREEDY = {"temperature": 0}
HISTORY_A = [   # an Anthropic conversation with a tool call and its result
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                      {"type": "tool_use", "id": "t1", "name": "get_weather",
                                       "input": {"location": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny, 25 C"},
                                 {"type": "text", "text": "So?"}]}]
HISTORY_R = [   # the same as Responses input items
    {"role": "user", "content": "What's the weather in Paris?"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
    {"type": "function_call", "call_id": "t1", "name": "get_weather", "arguments": '{"location":"Paris"}'},
    {"type": "function_call_output", "call_id": "t1", "output": "Sunny, 25 C"},
    {"role": "user", "content": [{"type": "input_text", "text": "So?"}]}]
PREFILL_A = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nLet me"}]
# a call that a small model would not start, begun for it (a continued assistant turn: with a
# reasoning template llama-server reads the continued text with the answer)
CALL_PREFILL_A = [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": '<think>\nA call.\n</think>\n\n<tool_call>\n'
                                                   '{"name": "get_weather", "arguments": {"location": "'}]
PREFILL_R = [{"role": "user", "content": "hi"},
             {"type": "message", "role": "assistant", "content": "<think>\nLet me"}]

# (route, body); each one runs unstreamed and, where it can, streamed. Not here, because
# numllama answers it differently on purpose: /v1/messages without `messages` is a 400 (the
# client's mistake), where llama-server answers 500
CASES = {
    "own template": [
        ("/v1/messages", {"max_tokens": 24, "messages": [{"role": "user", "content": "Say hello"}], **GREEDY}),
        ("/v1/messages", {"max_tokens": 40, "system": [{"type": "text", "text": "Be brief."}],
                          "stop_sequences": [".", "\n"], "messages": [{"role": "user", "content": "Count to ten"}],
                          **GREEDY}),
        ("/v1/messages", {"max_tokens": 24, "messages": HISTORY_A, **GREEDY}),
        ("/v1/messages", {"max_tokens": 8, "messages": [], **GREEDY}),
        ("/v1/messages/count_tokens", {"system": "x-anthropic-billing-header: cc_version=2; cch=a5145;Hi",
                                       "messages": HISTORY_A}),
        ("/v1/responses", {"input": "Say hello", "instructions": "Be brief.", "max_output_tokens": 24, **GREEDY}),
        ("/v1/responses", {"input": HISTORY_R, "max_output_tokens": 24, **GREEDY}),
        ("/v1/responses", {"input": "Say hello", "previous_response_id": "resp_1"}),
        ("/v1/responses", {"input": [{"type": "mystery"}]}),
        ("/v1/responses/input_tokens", {"input": HISTORY_R}),
    ],
    "Qwen-Qwen2.5-7B-Instruct": [   # tool calls ("any" and "required" force one here)
        ("/v1/messages", {"max_tokens": 80, "tools": [WEATHER_A], "tool_choice": {"type": "any"},
                          "messages": [{"role": "user", "content": "Weather in Paris?"}], **GREEDY}),
        ("/v1/messages", {"max_tokens": 14, "tools": [WEATHER_A], "tool_choice": {"type": "any"},
                          "messages": [{"role": "user", "content": "Weather in Paris?"}], **GREEDY}),
        ("/v1/messages", {"max_tokens": 40, "tools": [WEATHER_A], "messages": HISTORY_A, **GREEDY}),
        ("/v1/responses", {"input": "Weather in Paris?", "tools": [WEATHER_R], "tool_choice": "required",
                           "max_output_tokens": 80, **GREEDY}),
    ],
    "Qwen-Qwen3-0.6B": [   # a reasoning block
        ("/v1/messages", {"max_tokens": 30, "messages": PREFILL_A, **GREEDY}),
        ("/v1/messages", {"max_tokens": 30, "messages": [PREFILL_A[0], {
            "role": "assistant", "content": "<think>\nGreet back.\n</think>\n\n"}], **GREEDY}),
        ("/v1/messages", {"max_tokens": 30, "messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": [
                                                             {"type": "thinking", "thinking": "Greet back."},
                                                             {"type": "text", "text": "Hello!"}]},
                                                         {"role": "user", "content": "Again"}], **GREEDY}),
        ("/v1/messages", {"max_tokens": 40, "tools": [WEATHER_A], "messages": CALL_PREFILL_A, **GREEDY}),
        ("/v1/messages", {"max_tokens": 4, "tools": [WEATHER_A], "messages": CALL_PREFILL_A, **GREEDY}),
        ("/v1/responses", {"input": PREFILL_R, "max_output_tokens": 30, **GREEDY}),
        ("/v1/responses", {"input": "hi", "max_output_tokens": 40, **GREEDY,
                           "grammar": 'root ::= "<think>\\n" [a-z ]+ "\\n</think>\\n\\n" [A-Za-z ]+'}),
        ("/v1/responses", {"input": "Weather in Paris?", "tools": [WEATHER_R], "max_output_tokens": 60, **GREEDY,
                           "logit_bias": [["<tool_call>", 6]]}),
    ],
}


def blank(value):
    """Random ids keep their prefix, clocks become 0, timings their key set."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in CLOCKS:
                out[k] = 0
            elif k == "timings":
                out[k] = sorted(v)
            else:
                out[k] = blank(v)
        return out
    if isinstance(value, list):
        return [blank(v) for v in value]
    if isinstance(value, str) and RANDOM_ID.match(value):
        return RANDOM_ID.match(value).group(1) + "<id>"
    return value


def events(r: requests.Response) -> list:
    """A stream's events: [name, data] (name None for an unnamed event)."""
    out, name = [], None
    for line in r.iter_lines():
        if line.startswith(b"event: "):
            name = line[7:].decode()
        elif line.startswith(b"data: "):
            data = line[6:].decode()
            out.append([name, blank(json.loads(data)) if data.startswith("{") else data])
            name = None
    return out


def answer(url: str, route: str, body: dict) -> dict:
    r = requests.post(url + route, json=body, timeout=600)
    out = {"status": r.status_code, "body": blank(r.json())}
    if r.status_code == 200 and "input_tokens" not in route:
        with requests.post(url + route, json={**body, "stream": True}, stream=True, timeout=600) as s:
            out["stream"] = events(s)
    return out


def answers(binary: str, model: str, template: str) -> list[dict]:
    flags = ("-c", "4096", "-np", "1", "-t", "2", "--jinja", "--alias", "smollm2")
    if template != "own template":
        flags += ("--chat-template-file", os.path.join(TEMPLATES, template + ".jinja"))
    with running(binary, model, flags) as url:
        return [answer(url, route, body) for route, body in CASES[template]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    add_server_args(ap)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--record", metavar="JSON", help="also write llama-server's answers there (a golden file)")
    args = ap.parse_args()
    if not args.llama_server:
        ap.error("give --llama-server (or set LLAMA_SERVER_BIN)")
    record, same, total = {}, 0, 0
    for template, cases in CASES.items():
        theirs = answers(args.llama_server, args.model, template)
        ours = answers(args.numllama_server, args.model, template)
        record[template] = [{"route": route, "request": body, "answer": a}
                            for (route, body), a in zip(cases, theirs)]
        for (route, body), a, b in zip(cases, theirs, ours):
            total += 1
            same += a == b
            if a != b and args.verbose:
                print(f"{template} {route} {json.dumps(body)[:100]}")
                for part in ("status", "body", "stream"):
                    if a.get(part) != b.get(part):
                        print(f"  {part}\n    llama-server: {json.dumps(a.get(part))[:1500]}\n"
                              f"    numllama:     {json.dumps(b.get(part))[:1500]}")
    if args.record:
        write_golden(args.record, "compare_api_routes.py", model=os.path.basename(args.model), templates=record)
    print(f"identical: {same}/{total}")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
