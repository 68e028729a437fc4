"""Tool calls written with the template's tags (engine/tagged_tool_calls.py): the analysis
against llama.cpp's own over its vendored templates, the reader on answers whole, cut short and
out of format, and the grammars. The requests themselves are replayed against llama-server's
answers in tests/test_tool_calls.py."""
from __future__ import annotations

import json
import os

import pytest

from numllama.engine.chat_template import ChatTemplate
from numllama.engine.grammar import Grammar
from numllama.engine.reasoning import analyze_reasoning
from numllama.engine.tagged_tool_calls import TaggedToolFormat, parse_answer, tool_call_grammar
from numllama.engine.tool_calls import analyze_tool_format

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = json.load(open(os.path.join(HERE, "data", "autoparser-analysis.json"), encoding="utf-8"))["templates"]
# templates numllama's Jinja renders differently from llama.cpp's on the analysis' probes (so
# the analysis cannot be compared): a dict added to a string (Functionary v3.2's probe
# arguments), a template read by a parser llama.cpp writes for it
RENDER_DIFFERS = {"meetkai-functionary-medium-v3.2"}
FIELDS = ("section_start", "section_end", "per_call_start", "per_call_end", "name_prefix", "name_suffix",
          "args_separator", "close", "arg_name_prefix", "arg_name_suffix", "arg_value_prefix", "arg_value_suffix",
          "arg_separator")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_analysis_reads_what_llama_cpp_reads(name):
    """Every marker llama.cpp's differential analysis reads off the template (its output is
    tests/data/autoparser-analysis.json, from bench/autoparser_dump.cpp)."""
    from llama_tree import tree_root
    path = os.path.join(tree_root(), "models", "templates", name + ".jinja")
    if not os.path.exists(path):
        pytest.fail(f"{path} not found: run `python tests/llama_tree.py models/templates/` first (tox does)")
    template = ChatTemplate(open(path, encoding="utf-8").read(), "", "")
    want = GOLDEN[name]
    try:
        fmt = analyze_tool_format(template, analyze_reasoning(template))
    except Exception:
        assert name in RENDER_DIFFERS
        return
    if name in RENDER_DIFFERS:
        assert not isinstance(fmt, TaggedToolFormat)   # (a known difference: if it goes, drop the name)
        return
    assert isinstance(fmt, TaggedToolFormat) and fmt.json_args == (want["tool_mode"] == "TAG_WITH_JSON")
    assert {f: getattr(fmt, f) for f in FIELDS} == {f: want[f] for f in FIELDS}
    assert fmt.tolerate_ws == want["tolerate_ws"]
    if want["call_id_pos"] == "BETWEEN_FUNC_AND_ARGS":   # (the one place its parser reads an id)
        assert (fmt.call_id_prefix, fmt.call_id_suffix) == (want["call_id_prefix"], want["call_id_suffix"])


GLM = TaggedToolFormat(json_args=False, per_call_start="<tool_call>", per_call_end="</tool_call>",
                       arg_name_prefix="<arg_key>", arg_name_suffix="</arg_key>", arg_value_prefix="<arg_value>",
                       arg_value_suffix="</arg_value>")
DEEPSEEK = TaggedToolFormat(json_args=True, section_start="<｜tool▁calls▁begin｜>", section_end="<｜tool▁calls▁end｜>",
                            per_call_start="<｜tool▁call▁begin｜>", per_call_end="<｜tool▁call▁end｜>",
                            name_suffix="<｜tool▁sep｜>")
MISTRAL = TaggedToolFormat(json_args=True, per_call_start="[TOOL_CALLS]", call_id_prefix="[CALL_ID]",
                           call_id_suffix="[ARGS]", call_id_between=True)
FORECAST = [{"type": "function", "function": {"name": "get_forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}]


def test_tagged_arguments_become_compact_json():
    call = "<tool_call>get_forecast<arg_key>city</arg_key><arg_value>Paris \"FR\"</arg_value>" \
           "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
    got = parse_answer(GLM, FORECAST, "Sure. " + call, False)
    assert got.content == "Sure. " and got.ok
    assert got.tool_calls == [{"name": "get_forecast", "arguments": '{"city":"Paris \\"FR\\"","days":3}', "id": ""}]
    two = parse_answer(GLM, FORECAST, call + "\n" + call, False)
    assert len(two.tool_calls) == 2


def test_cut_answers_give_what_was_written():
    head = "<tool_call>get_forecast<arg_key>city</arg_key><arg_value>Par"
    assert parse_answer(GLM, FORECAST, head, True).tool_calls[0]["arguments"] == '{"city":"Par'
    assert parse_answer(GLM, FORECAST, head + "is</arg_v", True).tool_calls[0]["arguments"] == '{"city":"Paris'
    assert parse_answer(GLM, FORECAST, "<tool_call>get_fore", True).tool_calls == []   # the name unfinished
    assert parse_answer(GLM, FORECAST, "Hello <tool_", True).content == "Hello "        # a marker may be coming
    assert parse_answer(GLM, FORECAST, "Hello <tool_", False).content == "Hello "       # (final answers too)


def test_answers_out_of_format_are_the_raw_text():
    wrong = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
    got = parse_answer(GLM, FORECAST, wrong, False)   # not one of the request's tools
    assert not got.ok and got.content == wrong and got.tool_calls == []
    done = "<tool_call>get_forecast<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
    assert not parse_answer(GLM, FORECAST, done + " and more", False).ok   # text after the calls
    assert parse_answer(GLM, FORECAST, done + wrong, True).tool_calls[0]["name"] == "get_forecast"


def test_json_arguments_and_call_ids_are_kept_as_written():
    text = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_forecast<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>' \
           '<｜tool▁calls▁end｜>'
    assert parse_answer(DEEPSEEK, FORECAST, text, False).tool_calls == \
        [{"name": "get_forecast", "arguments": '{"city": "Paris"}', "id": ""}]
    cut = parse_answer(DEEPSEEK, FORECAST, text[:text.index('"Paris"') + 4], True)
    assert cut.tool_calls[0]["arguments"] == '{"city": "Par'
    got = parse_answer(MISTRAL, FORECAST, '[TOOL_CALLS]get_forecast[CALL_ID]abc123[ARGS]{"city": "Oslo"}', False)
    assert got.tool_calls == [{"name": "get_forecast", "arguments": '{"city": "Oslo"}', "id": "abc123"}]


def test_grammars_take_the_markers_literally():
    required = tool_call_grammar(GLM, FORECAST, True, False).grammar
    assert '"<tool_call>"' in required and '"<arg_key>" "city" "</arg_key>"' in required
    Grammar(required)   # and numllama's grammar engine reads it
    lazy = tool_call_grammar(DEEPSEEK, FORECAST, False, True)
    assert lazy.lazy and lazy.triggers == ("<｜tool▁calls▁begin｜>",)
    Grammar(lazy.grammar)


def test_template_stop_strings_keep_the_requests_own_checked(stories_path):
    """Laguna's template adds llama.cpp's stop string "</assistant>" to every chat request,
    after the request's own, which are checked as ever."""
    from server_util import Server
    s = Server(["-c", "512", "--chat-template-file", os.path.join(HERE, "data", "templates", "poolside-Laguna-XS.2.jinja")],
               model=stories_path)
    try:
        msgs = [{"role": "user", "content": "hi"}]
        r = s.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "stop": 5})
        assert r.status_code == 400 and "stop" in r.json()["error"]["message"]
        r = s.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "stop": ["zz"]})
        assert r.status_code == 200
    finally:
        s.stop()


def test_an_argument_that_reads_as_nothing_ends_the_reading():
    """With no argument markers, a property named "" would be read again and again at the same
    place: the reader stops there instead of looping (the request's tools are the request's)."""
    bare = TaggedToolFormat(json_args=False, per_call_start="<c>", per_call_end="</c>")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"": {"type": "string"}}}}}]
    got = parse_answer(bare, tools, "<c>f</c>", False)
    assert not got.ok and got.content == "<c>f</c>"
