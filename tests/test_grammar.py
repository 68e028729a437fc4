"""GBNF grammars and JSON schemas constraining generation."""
import json

import pytest

from numllama.engine.grammar import Grammar, GrammarError, GrammarState, decode_utf8
from numllama.engine.json_schema import json_schema_to_grammar


def matches(grammar: Grammar, text: str) -> bool:
    stacks = grammar.advance(grammar.start, text)
    return bool(stacks) and grammar.accepts_end(stacks)


def test_gbnf_elements():
    g = Grammar('''
root ::= greet ws name ("!" | "?")+   # comment
greet ::= "hi" | "hello"
name ::= [A-Z] [a-z]{1,5}
ws ::= [ \\t]*
''')
    for ok in ("hi Bob!", "hello  Alice?!", "hiZed!"):
        assert matches(g, ok), ok
    for bad in ("hi bob!", "hey Bob!", "hi Bobbbbbb!", "hi Bob", "hi Bob!x"):
        assert not matches(g, bad), bad
    assert Grammar('root ::= [^"]* "."').advance(Grammar('root ::= [^"]* "."').start, '"') == frozenset()


@pytest.mark.parametrize("text", ['root ::= this is (not valid GBNF', 'rooot ::= "a"', 'root ::= [a-',
                                  'root ::= "a" undefined', 'root ::= "x"{2'])
def test_invalid_gbnf(text):
    with pytest.raises(GrammarError):
        Grammar(text)


def test_json_schema_to_grammar():
    g = Grammar(json_schema_to_grammar({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
        "required": ["name"]}))
    for ok in ({"name": "Jo"}, {"name": "Jo", "age": -3}, {"name": 'J"o', "age": 1, "tags": ["a", "b"]}):
        assert matches(g, json.dumps(ok)), ok
    for bad in ('{"age": 3}', '{"name": 3}', '{"name": "x", "tags": ["c"]}', '{"name": "x"'):
        assert not matches(g, bad), bad
    assert matches(Grammar(json_schema_to_grammar({"const": "42"})), '"42"')
    for bad in (123, {"type": 123}, {"type": "hiccup"}, {"enum": []}):
        with pytest.raises(GrammarError):
            json_schema_to_grammar(bad)


def test_grammar_forces_output(server):
    b = server.post("/completion", {"prompt": "Once upon a time", "n_predict": 6, "grammar": 'root ::= "a"{5,5}'}).json()
    assert b["content"] == "aaaaa" and b["stop_type"] == "eos"
    assert b["generation_settings"]["grammar"] == 'root ::= "a"{5,5}'


def test_json_output_is_valid_json(server):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}   # (as in JSON Schema, properties are optional unless required)
    b = server.post("/chat/completions", {"max_tokens": 60, "response_format": {
        "type": "json_schema", "json_schema": {"schema": schema}},
        "messages": [{"role": "user", "content": "Write a person"}]}).json()
    content = b["choices"][0]["message"]["content"]
    if b["choices"][0]["finish_reason"] == "stop":   # finished inside the token budget
        value = json.loads(content)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert content.startswith('{') and '"name"' in content


@pytest.mark.parametrize("body", [{"grammar": "root ::= (oops"}, {"grammar": 5}, {"json_schema": {"type": "hiccup"}},
                                  {"response_format": {"type": "json_object", "schema": 123}}])
def test_bad_grammars_are_400(server, body):
    r = server.post("/completion", {"prompt": "x", "n_predict": 2, **body})
    assert r.status_code == 400 and "error" in r.json()


def test_trigger_patterns_mean_what_std_regex_means():
    """llama.cpp searches triggers with std::regex (ECMAScript) over the output's bytes: '.' stops
    at '\\r' too, '$' is only the end, "[^]" is any character; the grammar starts at the first
    capturing group that matched text."""
    from numllama.engine.grammar_triggers import (TRIGGER_PATTERN, TRIGGER_PATTERN_FULL, TRIGGER_TOKEN,
                                                  TRIGGER_WORD, Trigger, TriggerWatch, ecmascript_regex)
    assert ecmascript_regex(r"a.b$[.$]\.[^]") == r"a[^\n\r]b\Z[.$]\.[\s\S]"

    def fire(trigger, pieces):
        w = TriggerWatch([trigger])
        for i, p in enumerate(pieces):
            got = w.fire(i, p)
            if got is not None:
                return i, got
        return None
    assert fire(Trigger(TRIGGER_PATTERN, "a.b"), [b"a\r", b"b a", b"xb"]) == (2, [(1, b"a"), (2, b"xb")])
    assert fire(Trigger(TRIGGER_PATTERN, "end$"), [b"end\n"]) is None            # Python's $ would match
    assert fire(Trigger(TRIGGER_PATTERN, "(?:to) (\\w+)"), [b"go to", b" bed"]) == (1, [(1, b"bed")])
    assert fire(Trigger(TRIGGER_PATTERN_FULL, "x.*"), [b"ax", b"x"]) is None    # the whole output must match
    assert fire(Trigger(TRIGGER_PATTERN_FULL, "a.*"), [b"ab", b"c"]) == (0, [(0, b"ab")])
    assert fire(Trigger(TRIGGER_WORD, "a.c"), [b"abc", b"a.c"]) == (1, [(1, b"a.c")])   # a word is literal
    assert fire(Trigger(TRIGGER_TOKEN, "<t>", 7), [b"<t>"]) is None                     # its id, not its text
    w = TriggerWatch([Trigger(TRIGGER_TOKEN, "<t>", 7)])
    assert w.fire(7, b"<t>") == [(7, b"<t>")]


def test_a_token_may_end_inside_a_character():
    """llama.cpp's grammar takes a token whose last bytes begin a character if some character
    they may become is allowed there (llama_grammar_match_partial_char), and reads it whole
    with the next token: "｜" is three bytes, EF BD 9C."""
    bar = "｜".encode()
    pieces = {0: bar[:2], 1: bar[2:], 2: b"<", 3: b"a"}

    def state(rule):
        return GrammarState(Grammar(rule), lambda t: _text(pieces[t]), frozenset(), token_piece=lambda t: pieces[t])
    anything_but_lt = state("root ::= [^<]*")
    assert anything_but_lt.allows(0) and not anything_but_lt.allows(2)
    anything_but_lt.accept(0)
    assert anything_but_lt.allows(1) and not anything_but_lt.allows(3)   # the character must be finished
    assert not state("root ::= [^\\uFF00-\\uFFFF]*").allows(0)   # every character it may become is excluded
    assert not state('root ::= "a"').allows(0)
    assert decode_utf8(bar[:2], (0, 0)) == ("", (0xFF5C >> 6, 1))


def _text(piece: bytes) -> str | None:
    try:
        return piece.decode()
    except UnicodeDecodeError:
        return None
