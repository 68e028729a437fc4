"""JSON schema -> grammar: llama.cpp's own cases (tests/test-json-schema-to-grammar.cpp in the
llama-cpp-python sdist, fetched by tests/llama_tree.py): each schema must give llama.cpp's
grammar text exactly, or fail where llama.cpp fails. Also: every grammar produced parses."""
import json
import os
import re

import pytest
import requests

from numllama.engine.grammar import Grammar, GrammarError
from numllama.engine.json_schema import json_schema_to_grammar

CASES_FILE = "tests/test-json-schema-to-grammar.cpp"
_STRING = r'(?:R"""\((.*?)\)"""|"((?:[^"\\]|\\.)*)")'   # a raw string or a plain one
_CASE = re.compile(r'test\(\{\s*(SUCCESS|FAILURE),\s*"((?:[^"\\]|\\.)*)",\s*' + _STRING + r',\s*' + _STRING +
                   r'\s*\}\);', re.S)


def _trim(s: str) -> str:
    """The test's own trim: outer whitespace, and each line's indentation."""
    return re.sub(r"(^|\n)[ \t]+", r"\1", s.strip(" \n\r\t"))


def llama_cpp_cases() -> list:
    from llama_tree import tree_root
    path = os.path.join(tree_root(), CASES_FILE)
    if not os.path.exists(path):
        pytest.fail(f"{path} not found: run `python tests/llama_tree.py` first (tox does)")
    src = open(path, encoding="utf-8").read()
    def text(raw, plain):
        return raw if raw is not None else json.loads(f'"{plain}"')

    return [(m.group(1), m.group(2), text(m.group(3), m.group(4)), text(m.group(5), m.group(6)))
            for m in _CASE.finditer(src)]


def src_count_cases() -> int:
    from llama_tree import tree_root
    return open(os.path.join(tree_root(), CASES_FILE), encoding="utf-8").read().count("test({")


def test_llama_cpp_cases():
    cases = llama_cpp_cases()
    assert len(cases) == src_count_cases()   # the reader must not silently miss some
    wrong = []
    for status, name, schema, want in cases:
        try:
            got, ok = json_schema_to_grammar(json.loads(schema)), "SUCCESS"
        except GrammarError as e:
            got, ok = str(e), "FAILURE"
        if ok != status or (ok == "SUCCESS" and _trim(got) != _trim(want)):
            wrong.append((name, ok, got))
        elif ok == "SUCCESS":
            Grammar(got)   # what llama.cpp writes, our parser reads
    assert not wrong, f"{len(wrong)} cases differ, the first: {wrong[0]}"


def test_required_and_optional_properties():
    g = json_schema_to_grammar({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                                "required": ["a"]})
    assert 'root ::= "{" space a-kv ( "," space ( b-kv ) )? space "}"' in g
    assert 'a-kv ::= "\\"a\\"" space ":" space integer' in g


def test_errors_name_the_place():
    with pytest.raises(GrammarError, match="at #/properties/x: unrecognized type widget"):
        json_schema_to_grammar({"type": "object", "properties": {"x": {"type": "widget"}}})
    with pytest.raises(GrammarError, match="only references into the same document"):
        json_schema_to_grammar({"$ref": "https://example.com/schema.json"})


def test_chat_response_format_grammar_allows_fence_and_whitespace():
    """llama-server's chat route wraps a response_format's schema: optional whitespace, then the
    JSON bare or in a ```json fence (its chat parser's grammar; same language here)."""
    from numllama.engine.json_schema import chat_response_format_grammar
    g = Grammar(chat_response_format_grammar({"type": "object", "properties": {"a": {"type": "integer"}},
                                              "required": ["a"]}))

    def accepts(text):
        stacks = g.advance(g.start, text)
        return bool(stacks) and g.accepts_end(stacks)
    assert accepts('{"a": 1}') and accepts('\n{"a": 1}\n') and accepts('```json\n{"a": 1}\n```')
    assert not accepts('{"a": 1} and more') and not accepts('```json {"a": 1}')


def test_chat_response_format_content_is_the_json():
    from numllama.webapp.chat_completions import _response_format_content
    assert _response_format_content('\n```json\n{"a": 1}\n```') == '{"a": 1}'
    assert _response_format_content('\n{"a": 1}\n\n') == '{"a": 1}'
    assert _response_format_content('{"a": 1,\n ') == '{"a": 1,\n '   # cut short: inside the value
    assert _response_format_content('\n``') == ""                      # a fence may be coming


def test_chat_response_format_equals_llama_server(smollm_path):
    """Chat requests with response_format on SmolLM2 Q4_1 (greedy and seeded), over HTTP:
    llama-server's very contents (tests/data/...-response-format.json, recorded by
    bench/compare_constrained.py --chat-only --record); and streamed, the deltas add up to the
    same content (the fence and the outer whitespace are never sent)."""
    from server_util import Server
    gold = json.load(open(os.path.join(os.path.dirname(__file__), "data",
                                       "SmolLM2-135M-Instruct.Q4_1-response-format.json")))
    s = Server(["-np", "1", "-c", "2048", "-t", "2"], model=smollm_path)
    try:
        for (route, body), want in zip(gold["requests"], gold["answers"]):
            r = s.post(route, body).json()
            assert [r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]] == want, body
        route, body = gold["requests"][0]
        streamed = requests.post(s.url + route, json={**body, "stream": True}, stream=True, timeout=120)
        deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                  for line in streamed.iter_lines() if line.startswith(b"data: {")
                  and json.loads(line[6:]).get("choices")]
        assert "".join(deltas) == gold["answers"][0][0] and "```" not in "".join(deltas)
    finally:
        s.stop()
