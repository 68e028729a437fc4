"""Function calling on /v1/chat/completions, against llama-server's recorded answers.

tests/data/tool-calls-SmolLM2.json was written by bench/compare_tool_calls.py --record with an
AVX2 llama-server (--jinja) on SmolLM2-135M and six templates (Qwen 2.5, Hermes 2 Pro, Llama 3.3,
Mistral Nemo; Qwen 3 and SmolLM 3, which have a reasoning block): the grammar it built for each
request, the tokens it generated, the message it answered (content, reasoning_content,
tool_calls with the length of their random ids), the finish reason and the streamed deltas.
"""
from __future__ import annotations

import json
import re
import os
import sys

import pytest
from openai import OpenAI

from numllama.engine.chat_format import analyze_template
from numllama.engine.chat_template import ChatTemplate
from numllama.engine.grammar import Grammar, GrammarState
from numllama.engine.reasoning_budget import ReasoningBudget
from numllama.engine.reasoning import analyze_reasoning, read_answer, response_format_grammar
from numllama.engine.mistral_tool_calls import MistralToolFormat
from numllama.engine.mistral_tool_calls import response_format_grammar as mistral_response_format_grammar
from numllama.engine.xml_tool_calls import XmlToolFormat
from numllama.engine.xml_tool_calls import response_format_grammar as xml_response_format_grammar
from numllama.engine.tool_calls import (ToolFormat, analyze_tool_format, diff_split,
                                        parse_answer, tool_call_grammar)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from compare_tool_calls import canonical_grammar  # noqa: E402

GOLDEN = json.load(open(os.path.join(HERE, "data", "tool-calls-SmolLM2.json")))
TEMPLATES = os.path.join(HERE, "data", "templates")


def template(name: str) -> ChatTemplate:
    return ChatTemplate(open(os.path.join(TEMPLATES, name + ".jinja")).read(), "<|im_start|>", "<|im_end|>")


def cases():
    for name, runs in GOLDEN["templates"].items():
        for i, run in enumerate(runs):
            yield pytest.param(name, run, id=f"{name}-{i}")


def test_diff_split_finds_the_changed_part():
    d = diff_split("<a>hello<b>", "<a>[CALL]{x}<b>")
    assert (d.prefix, d.left, d.right, d.suffix) == ("<a>", "hello", "[CALL]{x}", "<b>")


def test_formats_read_off_the_templates():
    qwen = analyze_tool_format(template("Qwen-Qwen2.5-7B-Instruct"))
    assert (qwen.per_call_start, qwen.per_call_end, qwen.name_field, qwen.args_field) == \
        ("<tool_call>\n", "</tool_call>", "name", "arguments")
    llama = analyze_tool_format(template("meta-llama-Llama-3.3-70B-Instruct"))
    assert (llama.trigger, llama.args_field, llama.openai_wrapper, llama.supports_parallel) == \
        ("", "parameters", True, False)
    nemo = analyze_tool_format(template("mistralai-Mistral-Nemo-Instruct-2407"))
    assert (nemo.section_start, nemo.tools_array_wrapped, nemo.id_field, nemo.parameter_order) == \
        ("[TOOL_CALLS]", True, "id", ("name", "arguments", "id"))
    assert analyze_tool_format(template("microsoft-Phi-3.5-mini-instruct")) is None   # writes no calls
    qwen3 = template("Qwen-Qwen3-0.6B")
    think = analyze_reasoning(qwen3)
    assert (think.start, think.end) == ("<think>\n", "\n</think>\n\n")
    assert analyze_tool_format(qwen3, think).per_call_start == "<tool_call>\n"
    smol3 = analyze_reasoning(template("HuggingFaceTB-SmolLM3-3B"))
    assert (smol3.start, smol3.end) == ("<think>", "</think>")
    assert analyze_reasoning(template("Qwen-Qwen2.5-7B-Instruct")) is None
    # the name in a tag, the arguments JSON: read as llama.cpp's analysis reads it (checked
    # with its autoparser on the same template), no section or call markers, no close
    tagged = ChatTemplate("{% for m in messages %}{% for c in m.tool_calls or [] %}<call name=\"{{ c.function.name }}\">"
                          "{{ c.function.arguments | tojson }}</call>{% endfor %}{{ m.content }}{% endfor %}")
    fmt = analyze_tool_format(tagged)
    assert (fmt.json_args, fmt.name_prefix, fmt.name_suffix, fmt.trigger, fmt.close) == (True, '<call name="', '">', "", "")
    keyed = ChatTemplate("{% for m in messages %}{% for c in m.tool_calls or [] %}{\"{{ c.function.name }}\": "
                         "{{ c.function.arguments | tojson }}}{% endfor %}{{ m.content }}{% endfor %}")
    assert analyze_tool_format(keyed).fun_name_is_key   # the function's name as the key (Apertus' form)


@pytest.mark.parametrize("name,run", list(cases()))
def test_grammar_is_llama_servers(name, run):
    """Same rules as llama-server's, its numbered `until` rules renamed (bench/compare_tool_calls.py)."""
    if "grammar" not in run["answer"]:   # llama-server failed the request (its answer replays elsewhere)
        assert list(run["answer"]) == ["status"]
        return
    req, want = run["request"], run["answer"]["grammar"]
    tmpl = template(name)
    chat_format = analyze_template(tmpl)
    reasoning, fmt = chat_format.reasoning, chat_format.tool_format
    choice = req.get("tool_choice", "auto")
    if "response_format" in req and (reasoning is not None or isinstance(fmt, XmlToolFormat)):
        rf = req["response_format"]
        schema = rf["json_schema"]["schema"] if rf["type"] == "json_schema" else {"type": "object"}
        if isinstance(fmt, XmlToolFormat):
            got = xml_response_format_grammar(fmt, schema, True)
        elif isinstance(fmt, MistralToolFormat):
            got = mistral_response_format_grammar(fmt, schema, True)
        else:
            got = response_format_grammar(schema, want["generation_prompt"], reasoning, True)
        assert canonical_grammar(got) == want["gbnf"]
        return
    if "grammar" in req or "tools" not in req or fmt is None:
        return   # the request's own grammar, or no tool calls to constrain
    if choice == "none":
        assert want["gbnf"] == "" and not want["lazy"]
        return
    parallel = req.get("parallel_tool_calls", tmpl.caps.supports_parallel_tool_calls)
    got = tool_call_grammar(fmt, req["tools"], choice == "required", parallel, want["generation_prompt"], reasoning,
                            req.get("reasoning_format") != "none")
    assert (canonical_grammar(got.grammar) if got.grammar else "") == want["gbnf"]
    assert (got.lazy, list(got.triggers)) == (want["lazy"], want["triggers"])
    Grammar(got.grammar or 'root ::= ""')   # and numllama's grammar engine takes it


def test_lazy_grammar_waits_for_its_word_then_replays_from_it():
    pieces = {0: b"Sure. ", 1: b"x<to", 2: b"ol>{", 3: b"}", 4: b"!"}
    state = GrammarState(Grammar('root ::= "<tool>" "{" "}"'), lambda t: pieces[t].decode(), frozenset(),
                         triggers=("<tool>",), token_piece=pieces.get)
    assert state.allows(4)                       # nothing is constrained before the word
    for t in (0, 1):
        state.accept(t)
    assert state.awaiting and state.allows(4)
    state.accept(2)                               # "<tool>" complete: the grammar has read "<tool>{"
    assert not state.awaiting
    assert state.allows(3) and not state.allows(4)


def test_lazy_grammar_sleeps_inside_a_reasoning_block():
    """llama.cpp's reasoning-budget sampler: a trigger word inside <think> does not wake it."""
    pieces = {0: b"<think>", 1: b"<tool>", 2: b"</think>", 3: b"{", 4: b"}", 5: b"!"}
    gate = ReasoningBudget((0,), ((2,),))
    state = GrammarState(Grammar('root ::= "<tool>" "{" "}"'), lambda t: pieces[t].decode(), frozenset(),
                         triggers=("<tool>",), token_piece=pieces.get, gate=gate)
    for t in (0, 1, 2):
        state.accept(t)
    assert state.awaiting                  # the <tool> was thought, not written
    state.accept(1)
    assert not state.awaiting and state.allows(3) and not state.allows(5)


def test_reasoning_read_out_as_llama_server_reads_it():
    think = analyze_reasoning(template("Qwen-Qwen3-0.6B"))
    gp = "<|im_start|>assistant\n"
    got = read_answer("<think>\nhmm\n</think>\n\nHello", False, gp, think)
    assert (got.reasoning, got.content) == ("hmm\n", "Hello")
    assert read_answer("<think>\nhm", True, gp, think).reasoning == "hm"          # still thinking
    assert read_answer("<thi", True, gp, think).ok is False                     # nothing to send yet
    assert read_answer("<think>\n", False, gp, think).content == "<think>\n"    # nothing read: the raw text
    off = gp + "<think>\n\n</think>\n\n"   # enable_thinking false: the prompt closes an empty block
    assert (read_answer("\nHi", False, off, think).content, read_answer("\nHi", False, off, think).reasoning) == \
        ("\nHi", "")
    assert read_answer("<think>\nhmm\n</think>\n\nHello", False, gp, think, extract=False).content == \
        "<think>\nhmm\n</think>\n\nHello"


def test_cut_answers_read_as_llama_server_reads_them():
    fmt = ToolFormat(per_call_start="<tool_call>\n", per_call_end="</tool_call>", name_field="name",
                     args_field="arguments", parameter_order=("name", "arguments"))
    tools = [{"type": "function", "function": {"name": "f"}}]
    head = '<tool_call>\n{"name": "f", "arguments": '
    assert parse_answer(fmt, tools, head + '{"a": 1}}\n</tool_call>', False).tool_calls == \
        [{"name": "f", "arguments": '{"a": 1}', "id": ""}]
    assert parse_answer(fmt, tools, head + '{"a": 1', False).tool_calls[0]["arguments"] == '{"a": 1'
    assert parse_answer(fmt, tools, head + " {\n  ", False).tool_calls[0]["arguments"] == "{"
    short = '<tool_call>\n{"name": "f'   # the name unfinished: no call, nothing before it
    assert parse_answer(fmt, tools, short, False).content == ""
    assert parse_answer(fmt, tools, "Hi " + short, False).content == "Hi "
    assert parse_answer(fmt, tools, head + '{}}\n</tool_call>\nmore', False).ok is False   # text after the calls
    assert parse_answer(fmt, tools, "hi <tool_", True).content == "hi "    # a marker may be coming


def test_functionary_answers_read_as_llama_server_reads_them():
    """Functionary v3.2's recipients (engine/functionary_tool_calls.py); every case here was
    also answered by llama-server (the functionary-v3.2-forced requests in the golden file)."""
    from numllama.engine.functionary_tool_calls import FunctionaryToolFormat, parse_answer as read
    fmt, tools = FunctionaryToolFormat(), [WEATHER[0]]
    call = 'get_current_weather\n{"location": "Paris"}'
    assert read(fmt, [], "all\nHi", False).content == "Hi"
    assert read(fmt, [], "al", False).content == ""                  # nothing read yet
    assert read(fmt, [], "x", False).error and not read(fmt, [], "x", True).error   # (a final answer: a 500)
    assert read(fmt, tools, "all\nHi>>>" + call, False).content == "Hi>>>" + call   # a call after content is text
    assert read(fmt, tools, "all\nHi>>>" + call, False, required=True).error
    assert read(fmt, tools, call, False).tool_calls == [{"name": "get_current_weather",
                                                         "arguments": '{"location": "Paris"}', "id": ""}]
    assert read(fmt, tools, call + ">>>" + call, False).error        # the template's own second call
    assert len(read(fmt, tools, call + call, False, parallel=True).tool_calls) == 2
    assert read(fmt, tools, call + call, False, parallel=False).error
    assert read(fmt, tools, 'get_current_weather\n{"location": "Par', False).tool_calls[0]["arguments"] == \
        '{"location": "Par'
    assert read(fmt, tools, "get_current_weather", False).tool_calls == []   # the name's newline not yet written
    assert read(fmt, tools, 'get_current_weather\n{"location": NaN}', False).error   # not JSON


@pytest.fixture(scope="module", params=list(GOLDEN["templates"]))
def tool_server(request, smollm_path):
    from server_util import Server
    # rendered on the day llama-server's answers were recorded (templates write the date)
    s = Server(["-c", "4096", "-np", "1", "--chat-template-file", os.path.join(TEMPLATES, request.param + ".jinja")],
               model=smollm_path, env={"NUMLLAMA_NOW": GOLDEN["templates"][request.param][0]["date"]})
    yield request.param, s
    s.stop()


def _streamed(s, body) -> list:
    body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
    out = []
    with s.post("/v1/chat/completions", {**body, "stream": True}, stream=True) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    for c in choice["delta"].get("tool_calls", []):
                        if "id" in c:
                            c["id"] = len(c["id"])
                    out.append([choice["delta"], choice["finish_reason"]])
    return out


def _answer(s, body) -> dict:
    r = s.post("/v1/chat/completions", body)
    if r.status_code != 200:   # (bench/compare_tool_calls.py records a failed request by its status)
        return {"status": r.status_code}
    choice = r.json()["choices"][0]
    message = dict(choice["message"])
    message["tool_calls"] = [{**c, "id": len(c.get("id", ""))} for c in message.get("tool_calls", [])]
    return {"finish_reason": choice["finish_reason"], "message": message,
            "tokens": [t["token"] for t in choice["logprobs"]["content"]], "stream": _streamed(s, body)}


def test_answers_match_llama_server(tool_server):
    """Tokens, message, finish reason, and the streamed deltas one by one."""
    name, s = tool_server
    for run in GOLDEN["templates"][name]:
        want = {k: v for k, v in run["answer"].items() if k != "grammar"}
        assert _answer(s, run["request"]) == want, json.dumps(run["request"])


def test_streamed_calls_add_up_to_the_answer(tool_server):
    name, s = tool_server
    for run in GOLDEN["templates"][name]:
        if not run["answer"].get("message", {}).get("tool_calls"):
            continue   # (no calls, or a request llama-server failed: replayed in test_answers_match_llama_server)
        client = OpenAI(api_key="dummy", base_url=s.url + "/v1")
        body = {k: v for k, v in run["request"].items() if k not in ("messages", "logprobs", "top_logprobs")}
        content, calls, finish = "", {}, None
        for chunk in client.chat.completions.create(model="x", messages=run["request"]["messages"], stream=True,
                                                    extra_body=body):
            d = chunk.choices[0].delta
            content += d.content or ""
            for tc in d.tool_calls or []:   # a call opens with its id and name; its arguments follow
                if tc.index not in calls:
                    assert tc.type == "function" and len(tc.id) == 32 and tc.function.name
                    calls[tc.index] = {"name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        want = run["answer"]["message"]
        assert content == want["content"] and finish == run["answer"]["finish_reason"]
        assert [calls[i] for i in sorted(calls)] == [c["function"] for c in want["tool_calls"]]


def test_openai_client_gets_tool_calls(tool_server):
    name, s = tool_server
    run = next((r for r in GOLDEN["templates"][name] if r["answer"].get("message", {}).get("tool_calls")), None)
    if run is None:
        return
    client = OpenAI(api_key="dummy", base_url=s.url + "/v1")
    body = {k: v for k, v in run["request"].items() if k not in ("messages", "tools")}
    res = client.chat.completions.create(model="x", messages=run["request"]["messages"],
                                         tools=run["request"]["tools"], extra_body=body)
    call = res.choices[0].message.tool_calls[0]
    assert call.function.name == run["answer"]["message"]["tool_calls"][0]["function"]["name"]
    assert res.choices[0].finish_reason == run["answer"]["finish_reason"]


WEATHER = GOLDEN["templates"]["Qwen-Qwen2.5-7B-Instruct"][0]["request"]["tools"]


@pytest.mark.parametrize("body,text", [
    ({"tools": WEATHER, "tool_choice": "sometimes"}, "Invalid tool_choice: sometimes"),
    ({"tools": WEATHER, "grammar": 'root ::= "a"'}, "Cannot use custom grammar constraints with tools."),
    ({"tools": {"name": "f"}}, "'tools' must be an array"),
    ({"tools": [{"type": "function"}]}, "Each tool must be"),
    ({"tools": WEATHER, "parallel_tool_calls": "yes"}, "'parallel_tool_calls' must be a boolean"),
])
def test_bad_tool_requests_are_400(tool_server, body, text):
    name, s = tool_server
    if name != "Qwen-Qwen2.5-7B-Instruct":
        return
    r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert r.status_code == 400 and text in r.json()["error"]["message"]
    assert s.get("/health").status_code == 200


def test_named_function_choice_reads_as_auto(tool_server):
    """llama-server reads tool_choice as a string; an object (a named function) is "auto"."""
    name, s = tool_server
    run = GOLDEN["templates"][name][0]
    if run["request"].get("tool_choice", "auto") != "auto":
        return
    named = {**run["request"], "tool_choice": {"type": "function", "function": {"name": "get_current_weather"}}}
    assert _answer(s, named) == {k: v for k, v in run["answer"].items() if k != "grammar"}


def test_template_without_tool_calls_still_answers(stories_path):
    """stories260K's template writes no tool calls: the tools reach it, the answer is content.
    (With --jinja, the default: without it llama-server refuses tools.)"""
    from server_util import Server
    s = Server(["-c", "512"], model=stories_path)
    try:
        r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                            "tools": WEATHER, "tool_choice": "required"})
        assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]
    finally:
        s.stop()


def test_unported_tool_format_is_a_clear_400(stories_path, tmp_path):
    from server_util import Server
    path = tmp_path / "channels.jinja"   # (GPT-OSS's channels, which llama.cpp reads with its own parser)
    path.write_text("{% for m in messages %}<|start|>{{ m.role }}<|channel|>final<|message|>{{ m.content }}<|end|>"
                    "{% endfor %}")
    s = Server(["-c", "512", "--chat-template-file", str(path)], model=stories_path)
    try:
        r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                            "tools": WEATHER})
        assert r.status_code == 400 and "not supported by numllama yet" in r.json()["error"]["message"]
        r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                            "tools": WEATHER, "tool_choice": "none"})
        assert r.status_code == 200
    finally:
        s.stop()


def test_lazy_grammar_on_completion(server):
    """/completion takes llama-server's grammar_lazy + triggers: free text until the trigger,
    then the grammar; bad trigger settings are 400s; the chat route's own prefill field is not
    a request field. (bench/compare_samplers.py compares every trigger type with llama-server.)"""
    lazy = {"prompt": "Once upon a time", "n_predict": 40, "temperature": 0,
            "grammar": 'root ::= "little girl" [a-z ]{3,5} "."',
            "grammar_lazy": True, "grammar_triggers": [{"type": 1, "value": "little girl"}]}
    free = server.post("/completion", {k: v for k, v in lazy.items() if not k.startswith("gram")}).json()["content"]
    got = server.post("/completion", lazy).json()
    i = free.find("little girl")
    assert i >= 0 and got["content"].startswith(free[:i]) and got["content"] != free
    assert got["content"][i:].startswith("little girl") and got["content"].endswith(".")
    assert got["generation_settings"]["grammar_lazy"] is True
    for bad, text in [({"grammar_lazy": True, "grammar_triggers": []}, "no triggers"),
                      ({"grammar_triggers": [{"type": 7, "value": "x"}]}, "each trigger is"),
                      ({"grammar_triggers": [{"type": 2, "value": "(["}]}, "bad trigger pattern"),
                      ({"grammar_triggers": [{"type": 1, "value": "the"}]}, "preserved token: the"),
                      ({"grammar_lazy": "yes"}, "grammar_lazy")]:
        r = server.post("/completion", {**lazy, **bad})
        assert r.status_code == 400 and text in r.json()["error"]["message"]
    r = server.post("/completion", {"prompt": "Once", "n_predict": 4, "grammar": 'root ::= "a"', "_grammar_prefill": "z"})
    assert r.status_code == 200 and r.json()["content"] == "a"
    assert server.get("/health").status_code == 200


def test_a_backtracking_trigger_pattern_ends_its_request_alone(server):
    """A trigger pattern is the request's regex, searched at every token: one that backtracks
    without end fails that request (the search has a time limit), and the server goes on."""
    evil = {"prompt": "Once upon a time", "n_predict": 30, "temperature": 0, "grammar": 'root ::= "a"',
            "grammar_lazy": True, "grammar_triggers": [{"type": 2, "value": r"(.*)(.*)(.*)(.*)\1\2\3\4\d"}]}
    r = server.post("/completion", evil, timeout=60)
    assert r.status_code >= 400 and "trigger pattern" in r.json()["error"]["message"]
    ok = server.post("/completion", {"prompt": "Once", "n_predict": 4, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["content"]


def test_unknown_reasoning_format_is_400(server):
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                             "reasoning_format": "loud"})
    assert r.status_code == 400 and "Unknown reasoning format: loud" in r.json()["error"]["message"]


def test_qwen3_coder_xml_calls_read_as_llama_cpp_reads_them():
    """The parser written for Qwen3-Coder's family (engine/xml_tool_calls.py): arguments rebuilt
    as compact JSON, strings quoted, other types as written, a string-or-number value typed when
    it reads as a number; a call cut short counts once named; a call gone wrong is dropped, and
    with calls required and none readable the request fails (llama-server's 500). Recorded
    answers of both templates replay in test_answers_match_llama_server."""
    from numllama.engine.tool_calls import PARSE_ERROR
    from numllama.engine.xml_tool_calls import detect, parse_xml_answer
    fmt = detect(open(os.path.join(TEMPLATES, "Qwen3-Coder.jinja")).read())
    assert fmt is not None and not fmt.thinking
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string"}, "n": {"type": "integer"}, "m": {"type": ["string", "number"]}}}}}

    def call(*params):
        return "<tool_call>\n<function=f>\n" + "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params) + \
            "</function>\n</tool_call>"
    got = parse_xml_answer(fmt, [tool], "Sure. " + call(("s", 'a "b"\nc'), ("n", "3"), ("m", "2.5")), False)
    assert got.content == "Sure. " and got.tool_calls == [{"name": "f", "arguments": '{"s":"a \\"b\\"\\nc","n":3,"m":2.5}',
                                                           "id": ""}]
    assert parse_xml_answer(fmt, [tool], call(("m", "2.5 apples")), False).tool_calls[0]["arguments"] == \
        '{"m":"2.5 apples"}'
    cut = call(("s", "Paris"), ("n", "3"))[:-30]   # inside the second parameter's closing
    assert parse_xml_answer(fmt, [tool], cut, True).tool_calls[0]["arguments"] == '{"s":"Paris","n":3'
    assert parse_xml_answer(fmt, [tool], "<function=f>\n</function>\n</tool_call>", False).tool_calls[0]["name"] == "f"
    assert parse_xml_answer(fmt, [tool], call() + "\n" + call(("s", "x")), False).tool_calls[1]["arguments"] == \
        '{"s":"x"}'   # parallel calls
    wrong = "Hi <tool_call>\n<function=g>\n</function>\n</tool_call>"
    assert (parse_xml_answer(fmt, [tool], wrong, False).content, parse_xml_answer(fmt, [tool], wrong, False).tool_calls) \
        == ("Hi ", [])
    assert parse_xml_answer(fmt, [tool], wrong, False, required=True).error == PARSE_ERROR
    assert parse_xml_answer(fmt, [tool], wrong, True, required=True).error == ""   # (streaming: nothing yet)


def test_ministral_calls_read_as_llama_cpp_reads_them():
    """Ministral 3's parser (engine/mistral_tool_calls.py): `[TOOL_CALLS]name[ARGS]{...}`, the
    arguments as written; JSON the end cuts short is read so far, JSON that goes wrong before the
    end drops the call; a marker the end may be cutting is not content yet. The messages reach
    the template as content blocks (reasoning as a "thinking" block)."""
    from numllama.engine.mistral_tool_calls import adjust_messages, detect, parse_answer
    fmt = detect(open(os.path.join(TEMPLATES, "mistralai-Ministral-3-14B-Reasoning-2512.jinja")).read())
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    got = parse_answer(fmt, [tool], 'Hi [TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]f[ARGS]{"b": [2', True)
    assert got.content == "Hi " and [c["arguments"] for c in got.tool_calls] == ['{"a": 1}', '{"b": [2']
    assert parse_answer(fmt, [tool], '[TOOL_CALLS]f[ARGS]{"a" 1} more', False).tool_calls == []
    assert parse_answer(fmt, [tool], "Hello [TOOL_C", False).content == "Hello "
    assert parse_answer(fmt, [tool], "[TOOL_CALLS]g[ARGS]{}", False, required=True).error
    assert adjust_messages([{"role": "assistant", "content": "yo", "reasoning_content": "hm"}]) == \
        [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "yo"}]}]


def test_malformed_tool_schemas_are_the_requests_mistake():
    """What llama.cpp's schema reader refuses (it answers 500) is a GrammarError here, which the
    chat route answers with a 400 naming the place in the schema."""
    from numllama.engine.grammar import GrammarError
    from numllama.engine.xml_tool_calls import XmlToolFormat, xml_tool_call_grammar
    for params, where in [({"type": "object", "properties": [1]}, "#: properties must be an object"),
                          ({"type": "object", "properties": {"p": 5}}, "#/properties/p: schema must be an object"),
                          ({"type": "object", "properties": {"p": {"$ref": "#/nowhere"}}}, "cannot resolve $ref")]:
        with pytest.raises(GrammarError, match=re.escape(where)):
            xml_tool_call_grammar(XmlToolFormat(thinking=False), [{"type": "function", "function": {
                "name": "f", "parameters": params}}], required=True, parallel=False)


def test_malformed_tool_schemas_get_a_400_over_http(tool_server):
    """The chat route answers a malformed schema with a 400 naming the place (both parsers
    written for templates check it), and goes on serving."""
    name, s = tool_server
    if name not in ("Qwen3-Coder", "mistralai-Ministral-3-14B-Reasoning-2512"):
        return
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"p": 5}}}}]
    for choice in ("auto", "required"):
        r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": bad,
                                            "tool_choice": choice, "max_tokens": 2})
        assert r.status_code == 400
        assert "JSON schema error at #/properties/p: schema must be an object" in r.json()["error"]["message"]
    assert s.get("/health").status_code == 200
    ok = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_reasoning_budget_closes_the_block_for_the_model():
    """llama.cpp's reasoning-budget sampler: after `budget` tokens inside the block, the
    message and the end tag are forced token by token; a token that ends inside a character
    is let finish first; a new start tag opens a new budget."""
    budget = ReasoningBudget((0,), ((9,),), budget=2, forced=(7, 9), whole_characters=lambda t: t != 5)
    assert not budget.inside and budget.forced_token() is None
    budget.accept(0)                                   # <think>
    budget.accept(1)
    assert budget.inside and budget.forced_token() is None
    budget.accept(5)                                   # the budget is spent inside a character...
    assert budget.forced_token() is None
    budget.accept(2)                                   # ...which this token finishes
    assert budget.forced_token() == 7
    budget.accept(7)
    assert budget.forced_token() == 9
    assert budget.accept(9) == (9,) and not budget.inside   # closed: the end tag (replayed to a lazy grammar)
    budget.accept(0)
    assert budget.inside and budget.accept(9) == (9,)        # a new block, closed by the model itself
    at_once = ReasoningBudget((0,), ((9,),), prefill=(0,), budget=0, forced=(9,))
    assert at_once.forced_token() == 9                  # budget 0, the prompt opened the block


def test_reasoning_budget_fields_are_checked(server):
    """As llama-server's request schema checks them: a number in [-1, 2^31 - 1] (a fraction cut),
    and a message of another type is the default."""
    for body in ({"reasoning_budget_tokens": -2}, {"reasoning_budget_tokens": "5"}):
        r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                                 **body})
        assert r.status_code == 400 and "reasoning_budget_tokens" in r.json()["error"]["message"]
    for body in ({"reasoning_budget_tokens": 2.5}, {"reasoning_budget_message": 3, "reasoning_budget_tokens": 1}):
        r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                                 **body})
        assert r.status_code == 200
