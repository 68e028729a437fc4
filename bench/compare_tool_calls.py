"""Chat requests with `tools` against numllama-server and llama-server (--jinja), side by side,
on one model and several tool-calling templates: the grammar each server built (as
llama-server's verbose answer shows it, rules compared after renaming its numbered `until`
rules), the tokens generated, the message (content, tool_calls without their random ids) and
the finish reason. Counts the requests where all of them agree.

    python3 bench/compare_tool_calls.py SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama-server /path/to/llama-server [--record tests/data/tool-calls.json] [-v]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

import requests

from compare_tokens import add_server_args, running, write_golden   # beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "..", "tests", "data", "templates")
WEATHER = {"type": "function", "function": {"name": "get_current_weather", "description": "Get the weather",
                                            "parameters": {"type": "object", "properties": {
                                                "location": {"type": "string"}}, "required": ["location"]}}}
PYTHON = {"type": "function", "function": {"name": "python", "description": "Run code", "parameters": {
    "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}
HERMES_CALL = ('Call get_current_weather for Paris in a <tool_call> tag', [["<tool_call>", 6]])
# a grammar that makes a small model think first, to see the reasoning block read out
THINK = {"tools": None, "grammar": 'root ::= "<think>\\n" [a-z ]+ "\\n</think>\\n\\n" [A-Za-z ]+'}
PREFILL = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nLet me"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
FORECAST = {"type": "function", "function": {"name": "get_forecast", "description": "Get the forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "units": {"type": ["string", "null"]}}, "required": ["city", "days"]}}}
XML_PREFILL = [{"role": "user", "content": "forecast for Paris, 3 days"},
               {"role": "assistant", "content": "<tool_call>\n<function=get_forecast>\n<parameter=city>\nParis\n"
                                                "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=units>\n"}]
XML_CALLS = [   # Qwen3-Coder's XML calls: auto, required, cut short at several points, JSON-typed values
    ("weather in Paris?", {}),
    (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1]}),
    (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1], "max_tokens": 30}),
    (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1], "max_tokens": 24}),
    (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1], "max_tokens": 16}),
    ("weather in Paris?", {"tool_choice": "required", "logit_bias": HERMES_CALL[1]}),
    ("forecast for Paris, 3 days", {"tool_choice": "required", "logit_bias": HERMES_CALL[1],
                                    "tools": [WEATHER, FORECAST], "max_tokens": 90}),
    ("forecast for Paris, 3 days", {"tool_choice": "required", "logit_bias": HERMES_CALL[1],
                                    "tools": [FORECAST], "parallel_tool_calls": False, "max_tokens": 90}),
    ("weather in Paris?", {"tool_choice": "none"}),
    ("hi", {"tools": None}),
    # a call begun for the model (a continued assistant turn), to see values of every kind read
    ("forecast for Paris, 3 days", {"tools": [WEATHER, FORECAST], "messages": XML_PREFILL}),
    ("forecast for Paris, 3 days", {"tools": [WEATHER, FORECAST], "messages": XML_PREFILL,
                                    "tool_choice": "required"}),
    ("forecast for Paris, 3 days", {"tools": [WEATHER, FORECAST], "messages": XML_PREFILL, "max_tokens": 8}),
    # without tools the same parser reads the answer: a continued turn, response_format
    ("hi", {"tools": None, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! I"}]}),
    ("Describe a person as JSON", {"tools": None, "response_format": {"type": "json_schema", "json_schema": {
        "schema": PERSON}}}),
    ("Describe a person as JSON", {"tools": None, "response_format": {"type": "json_object"}, "max_tokens": 30}),
]
MISTRAL_CALL = ("Call get_current_weather for Paris", [["[TOOL_CALLS]", 6]])
MISTRAL_PREFILL = [{"role": "user", "content": "forecast for Paris, 3 days"},
                   {"role": "assistant", "content": '[TOOL_CALLS]get_forecast[ARGS]{"city": "Paris", "days": 3'}]
FUNCTIONARY_ALL = [["all", 8]]   # the recipient of plain content
FUNCTIONARY_CALL = [["get", 8]]
# answers written into the generation prompt (a test template's `forced` argument), the model
# made to end its turn at once: how the parser reads each, in each mode
FUNCTIONARY_JSON = 'get_current_weather\n{"location": "Paris"}'
FUNCTIONARY_ANSWERS = ["all\nHi", "all\nHi>>>" + FUNCTIONARY_JSON, "all\nHi>", "al", "x", FUNCTIONARY_JSON,
                       FUNCTIONARY_JSON + "\n", FUNCTIONARY_JSON + ">>>" + FUNCTIONARY_JSON,
                       FUNCTIONARY_JSON + FUNCTIONARY_JSON, FUNCTIONARY_JSON + "get_cur",
                       'get_current_weather\n{"location": "Par', "get_current_weather", "get_current_weather\n[1]",
                       'get_current_weather\n{"days": 3']
FUNCTIONARY_FORCED = [("hi", {"chat_template_kwargs": {"forced": text}, "max_tokens": 1, "logit_bias": [[2, 100]], **mode})
                      for text in FUNCTIONARY_ANSWERS
                      for mode in ({}, {"parallel_tool_calls": True}, {"tool_choice": "required"}, {"tools": None})]
MISTRAL_THINK = {"tools": None, "grammar": 'root ::= "[THINK]" [a-z ]+ "[/THINK]" [A-Za-z ]+'}


def tagged_calls(trigger: str, forecast: dict = FORECAST) -> list:
    """The tagged formats' requests (engine/tagged_tool_calls.py): auto with the calls' first
    marker favoured, required (one tool, two, no parallel calls), cut short, none, no tools."""
    bias = [[trigger, 6]]
    return [
        ("weather in Paris?", {}),
        ("Call get_current_weather for Paris", {"logit_bias": bias}),
        ("weather in Paris?", {"tool_choice": "required"}),
        ("weather in Paris?", {"tool_choice": "required", "max_tokens": 14}),
        ("weather in Paris?", {"tool_choice": "required", "max_tokens": 22}),
        ("forecast for Paris, 3 days", {"tool_choice": "required", "tools": [WEATHER, forecast], "max_tokens": 90}),
        ("forecast for Paris, 3 days", {"tool_choice": "required", "tools": [forecast], "parallel_tool_calls": False,
                                        "max_tokens": 90}),
        ("weather in Paris?", {"tool_choice": "none"}),
        ("hi", {"tools": None}),
    ]


# llama-server 0.3.36 cannot render Seed-OSS's template with a parameter of several types (its
# Jinja has no `in` between an array and a tuple: a 400); numllama can, and is compared without
FORECAST_ONE_TYPE = {"type": "function", "function": {**FORECAST["function"], "parameters": {
    **FORECAST["function"]["parameters"], "properties": {**FORECAST["function"]["parameters"]["properties"],
                                                         "units": {"type": "string"}}}}}


# (template, user message, extra fields); the logit bias makes a small model open a call
CASES = {
    "Qwen-Qwen2.5-7B-Instruct": [
        ("weather in Paris?", {}),
        ("weather in Paris?", {"tool_choice": "none"}),
        ("weather in Paris?", {"tool_choice": "required", "max_tokens": 120}),
        (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1]}),
        (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1], "max_tokens": 30}),
        (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1], "max_tokens": 20, "parallel_tool_calls": False}),
        (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1], "max_tokens": 14}),
        (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1], "tools": [WEATHER, PYTHON]}),
    ],
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": [
        (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1]}),
        ("weather in Paris?", {"tool_choice": "required"}),
    ],
    "meta-llama-Llama-3.3-70B-Instruct": [
        ('Repeat exactly: {"name": "get_current_weather", "parameters": {"location": "Paris"}}',
         {"tool_choice": "required"}),
        ("weather in Paris?", {}),
        ("weather in Paris?", {"tool_choice": "required"}),
    ],
    "mistralai-Mistral-Nemo-Instruct-2407": [
        ("weather in Paris?", {}),
        ("weather in Paris?", {"tool_choice": "required", "tools": [WEATHER, PYTHON]}),
    ],
    "Qwen-Qwen3-0.6B": [   # tool calls after a reasoning block
        ("weather in Paris?", {}),
        (HERMES_CALL[0], {"logit_bias": HERMES_CALL[1]}),
        ("weather in Paris?", {"tool_choice": "required", "logit_bias": HERMES_CALL[1]}),
        ("hi", {"tools": None}),
        ("hi", THINK),
        ("hi", {**THINK, "max_tokens": 6}),
        ("hi", {**THINK, "max_tokens": 12}),
        ("hi", {**THINK, "reasoning_format": "none"}),
        ("hi", {"tools": None, "chat_template_kwargs": {"enable_thinking": False}}),
        ("hi", {"tools": None, "messages": PREFILL}),

        ("Describe a person as JSON", {"tools": None, "response_format": {
            "type": "json_schema", "json_schema": {"schema": PERSON}}}),
        ("Describe a person as JSON", {"tools": None, "response_format": {"type": "json_object"},
                                       "chat_template_kwargs": {"enable_thinking": False}}),
    ],
    "Qwen3-Coder": XML_CALLS,
    "Qwen3.5-4B": XML_CALLS + [   # with a <think> block, which "<tool_call>" may end
        ("hi", THINK),
        ("hi", {**THINK, "max_tokens": 6}),
        ("hi", {**THINK, "reasoning_format": "none"}),
        ("hi", {"tools": None, "chat_template_kwargs": {"enable_thinking": False}}),
        ("weather in Paris?", {"logit_bias": HERMES_CALL[1], "chat_template_kwargs": {"enable_thinking": False}}),
        # a reasoning budget (the generation prompt opens the block): closed for the model after
        # so many tokens, with a message, at once; with tools, the lazy grammar waits for the end
        ("hi", {"tools": None, "reasoning_budget_tokens": 5, "max_tokens": 25}),
        ("hi", {"tools": None, "reasoning_budget_tokens": 3, "reasoning_budget_message": " Enough.", "max_tokens": 25}),
        ("hi", {"tools": None, "thinking_budget_tokens": 0, "max_tokens": 25}),
        ("weather in Paris?", {"reasoning_budget_tokens": 4, "max_tokens": 40}),
    ],
    "mistralai-Ministral-3-14B-Reasoning-2512": [   # [THINK] blocks, [TOOL_CALLS]name[ARGS]{...}
        ("weather in Paris?", {}),
        (MISTRAL_CALL[0], {"logit_bias": MISTRAL_CALL[1]}),
        (MISTRAL_CALL[0], {"logit_bias": MISTRAL_CALL[1], "max_tokens": 12}),
        ("weather in Paris?", {"tool_choice": "required", "logit_bias": MISTRAL_CALL[1]}),
        ("weather in Paris?", {"tool_choice": "required", "tools": [WEATHER, FORECAST], "max_tokens": 80}),
        ("forecast for Paris, 3 days", {"tools": [WEATHER, FORECAST], "messages": MISTRAL_PREFILL}),
        ("forecast for Paris, 3 days", {"tools": [WEATHER, FORECAST], "messages": MISTRAL_PREFILL,
                                        "parallel_tool_calls": False, "max_tokens": 20}),
        ("weather in Paris?", {"tool_choice": "none"}),
        ("hi", {"tools": None}),
        ("hi", MISTRAL_THINK),
        ("hi", {**MISTRAL_THINK, "max_tokens": 5}),
        ("hi", {**MISTRAL_THINK, "reasoning_format": "none"}),
        ("hi", {"tools": None, "messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "Hello", "reasoning_content": "greet"}]}),
        ("Describe a person as JSON", {"tools": None, "response_format": {"type": "json_schema", "json_schema": {
            "schema": PERSON}}}),
    ],
    # calls written with the template's tags (chat-diff-analyzer.cpp's TAG_WITH_TAGGED / _JSON)
    "GLM-4.7-Flash": tagged_calls("<tool_call>"),
    "GLM-4.6": tagged_calls("<tool_call>"),
    "ByteDance-Seed-OSS": tagged_calls("<seed:tool_call>", FORECAST_ONE_TYPE),
    "MiniMax-M2": tagged_calls("<minimax:tool_call>"),
    "tencent-Hy3": tagged_calls("<tool_calls:opensource>"),
    "poolside-Laguna-XS.2": tagged_calls("<tool_call>"),
    "Spark2.5": tagged_calls("<tool_call>"),
    "deepseek-ai-DeepSeek-V3.1": tagged_calls("<｜tool▁calls▁begin｜>"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": tagged_calls("<｜tool▁calls▁begin｜>"),
    "llama-cpp-deepseek-r1": tagged_calls("<｜tool▁calls▁begin｜>"),   # (llama.cpp's own template for the R1 distills)
    "Mistral-Small-3.2-24B-Instruct-2506": tagged_calls("[TOOL_CALLS]"),
    "Apertus-8B-Instruct": tagged_calls("<|tools_prefix|>"),   # JSON calls keyed by the function's name
    "meetkai-functionary-medium-v3.1": tagged_calls("<function="),
    # ">>>recipient\n": "all" then the content, or a function's name then its JSON arguments
    "meetkai-functionary-medium-v3.2": [
        ("weather in Paris?", {}),
        ("weather in Paris?", {"logit_bias": FUNCTIONARY_ALL}),
        ("Call get_current_weather for Paris", {"logit_bias": FUNCTIONARY_CALL}),
        ("weather in Paris?", {"tool_choice": "required"}),
        ("weather in Paris?", {"tool_choice": "required", "max_tokens": 9}),
        ("forecast for Paris, 3 days", {"tool_choice": "required", "tools": [WEATHER, FORECAST], "max_tokens": 90}),
        ("forecast for Paris, 3 days", {"tool_choice": "required", "tools": [FORECAST], "parallel_tool_calls": False,
                                        "max_tokens": 90}),
        ("weather in Paris?", {"tool_choice": "none", "logit_bias": FUNCTIONARY_ALL}),
        ("hi", {"tools": None}),
        ("hi", {"tools": None, "logit_bias": FUNCTIONARY_ALL}),
        ("hi", {"tools": None, "logit_bias": FUNCTIONARY_ALL, "max_tokens": 1}),
        ("hi", {"tools": None, "messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "Hello! I"}]}),
        ("Describe a person as JSON", {"tools": None, "response_format": {"type": "json_schema", "json_schema": {
            "schema": PERSON}}}),
    ],
    "functionary-v3.2-forced": FUNCTIONARY_FORCED,
    "HuggingFaceTB-SmolLM3-3B": [   # a reasoning block, no tool calls
        ("hi", {"tools": None}),
        ("hi", THINK),
        ("weather in Paris?", {}),
    ],
}


def requests_for(template: str) -> list[dict]:
    out = []
    for user, extra in CASES[template]:
        body = {"messages": [{"role": "user", "content": user}], "tools": [WEATHER], "max_tokens": 60,
                "temperature": 0, "seed": 1, "logprobs": True, "top_logprobs": 1, "cache_prompt": False}
        body = {**body, **extra}
        if body["tools"] is None:
            del body["tools"]
        out.append(body)
    return out


def canonical_grammar(text: str) -> str:
    """The rules reachable from root, numbered `until-N` and `ac-N` rules renamed in the order
    they are reached (llama.cpp numbers them by parser id, which says nothing of the language)."""
    token = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[a-zA-Z0-9-]+|.', re.S)
    rules = dict(line.split(" ::= ", 1) for line in text.strip().splitlines())
    order, queue = [], ["root"]
    while queue:
        name = queue.pop(0)
        if name in order:
            continue
        order.append(name)
        queue += [t for t in token.findall(rules[name]) if t in rules and t not in order]
    rename = {}
    for name in order:
        m = re.fullmatch(r"(until|ac)-\d+", name)
        if m:
            rename[name] = f"{m.group(1)}-{sum(k.startswith(m.group(1) + '-') for k in rename) + 1}"

    def ren(tok: str) -> str:
        m = re.fullmatch(r"((?:until|ac)-\d+)(-\d+)?", tok)
        return rename[m.group(1)] + (m.group(2) or "") if m and m.group(1) in rename else tok
    return "\n".join(sorted(f"{ren(n)} ::= " + "".join(ren(t) for t in token.findall(rules[n])) for n in order))


def answer(url: str, body: dict) -> dict:
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
    b = r.json()
    if r.status_code != 200:
        return {"status": r.status_code}
    choice = b["choices"][0]
    message = dict(choice["message"])
    message["tool_calls"] = [{**c, "id": len(c.get("id", ""))} for c in message.get("tool_calls", [])]
    out = {"finish_reason": choice["finish_reason"], "message": message,
           "tokens": [t["token"] for t in choice["logprobs"]["content"]]}
    out["stream"] = streamed(url, body)
    settings = b.get("__verbose", {}).get("generation_settings")
    if settings is not None:   # llama-server --verbose: the grammar it built (lazy: and its trigger)
        out["grammar"] = {"gbnf": canonical_grammar(settings["grammar"]) if settings["grammar"] else "",
                          "lazy": settings["grammar_lazy"],
                          "triggers": [t["value"] for t in settings["grammar_triggers"]],
                          "generation_prompt": settings["generation_prompt"]}
    return out


def streamed(url: str, body: dict) -> list[dict]:
    """The deltas of the same request streamed (tool call ids as their length)."""
    body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
    out = []
    with requests.post(url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = choice["delta"]
                for c in delta.get("tool_calls", []):
                    if "id" in c:
                        c["id"] = len(c["id"])
                out.append([delta, choice["finish_reason"]])
    return out


def answers(binary: str, model: str, template: str, extra_flags: tuple = ()) -> list[dict]:
    flags = ("-c", "4096", "-np", "1", "-t", "2", "--chat-template-file",
             os.path.join(TEMPLATES, template + ".jinja"), *extra_flags)
    with running(binary, model, flags) as url:
        return [answer(url, body) for body in requests_for(template)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    add_server_args(ap)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--record", metavar="JSON", help="also write llama-server's answers there (a golden file; "
                                                      "with --only, that template's answers in it)")
    ap.add_argument("--only", metavar="TEMPLATE", help="one template's requests only")
    args = ap.parse_args()
    if not args.llama_server:
        ap.error("give --llama-server (or set LLAMA_SERVER_BIN)")
    record, same, total = {}, 0, 0
    if args.record and args.only:   # one template's answers replace its own in the golden file
        record = json.load(open(args.record, encoding="utf-8"))["templates"]
    for template in [args.only] if args.only else CASES:
        theirs = answers(args.llama_server, args.model, template, ("--jinja", "--verbose"))
        ours = answers(args.numllama_server, args.model, template)
        # (the day: templates write the date into the prompt; the tests render with it, $NUMLLAMA_NOW)
        today = datetime.date.today().isoformat()
        record[template] = [{"request": b, "answer": a, "date": today} for b, a in zip(requests_for(template), theirs)]
        for body, a, b in zip(requests_for(template), theirs, ours):
            total += 1
            ok = {k: v for k, v in a.items() if k != "grammar"} == b
            same += ok
            if not ok and args.verbose:
                print(f"{template} {json.dumps(body)[:120]}\n  llama-server: {json.dumps(a)[:800]}\n"
                      f"  numllama:     {json.dumps(b)[:800]}")
    if args.record:
        write_golden(args.record, "compare_tool_calls.py", model=os.path.basename(args.model), templates=record)
    print(f"identical: {same}/{total}")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
