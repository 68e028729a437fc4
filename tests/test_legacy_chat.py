"""The legacy chat formats (--no-jinja) against llama.cpp's own cases: tests/test-chat-template.cpp
in the llama-cpp-python sdist (fetched by tests/llama_tree.py) formats one conversation with
each of its templates through llama_chat_apply_template, and asserts the text it expects. Each
must come out the same here, character for character."""
import os
import re

import pytest

from numllama.engine.legacy_chat import NAMES, detect, format_chat, trim

CASES_FILE = "tests/test-chat-template.cpp"
_STRING = r'"((?:[^"\\]|\\.)*)"'
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}


def _c_string(body: str) -> str:
    """A C string literal's text (the escapes this file uses)."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def _field(case: str, name: str):
    m = re.search(r"/\* \." + name + r"=? \*/\s*(?:U8C\()?" + _STRING, case, re.S)   # (U8C: a u8 literal)
    return _c_string(m.group(1)) if m else None


def llama_cpp_cases() -> tuple[list, list]:
    """(the conversation, [(name, template, expected, extra messages), ...]) as main_automated_tests
    reads them."""
    from llama_tree import tree_root
    path = os.path.join(tree_root(), CASES_FILE)
    if not os.path.exists(path):
        pytest.fail(f"{path} not found: run `python tests/llama_tree.py` first (tox does)")
    src = open(path, encoding="utf-8").read()
    main = src[src.index("int main_automated_tests"):]
    conv_src = main[main.index("conversation {"):main.index("};")]
    conversation = [(_c_string(a), _c_string(b)) for a, b in re.findall(r"\{" + _STRING + r",\s*" + _STRING + r"\}",
                                                                        conv_src)]
    body = main[main.index("std::vector<TestCase> test_cases {"):]
    body = body[:body.index("\n    };")]
    cases = []
    for case in re.split(r"\n        \{\n", body)[1:]:
        extra_src = case[case.index("extra_conversation= */"):] if "extra_conversation= */" in case else ""
        extra = [(_c_string(a), _c_string(b)) for a, b in re.findall(r"\{" + _STRING + r",\s*" + _STRING + r"\}",
                                                                     extra_src)]
        cases.append((_field(case, "name"), _field(case, "template_str"), _field(case, "expected_output"), extra))
    return conversation, cases


def test_llama_cpp_cases():
    conversation, cases = llama_cpp_cases()
    assert len(conversation) == 6 and len(cases) == 36   # the reader must not silently miss some
    wrong = []
    for name, template, expected, extra in cases:
        fmt = detect(template)
        got = format_chat(fmt, conversation + extra, True) if fmt else None
        if got != expected:
            wrong.append((name, fmt, got, expected))
    assert not wrong, f"{len(wrong)} cases differ, the first: {wrong[0]}"


def test_names_and_unknown_templates():
    """A built-in name is its own format; a text with no known marker has none (llama.cpp's
    test: "INVALID TEMPLATE")."""
    assert all(detect(n) == n for n in NAMES)
    assert detect("INVALID TEMPLATE") is None
    assert detect("{{ messages[0]['content'] }}") is None


def test_every_format_writes_the_roles_it_knows():
    """Each format names the user's text in its output and opens the assistant's turn where it
    has one; a format that is not llama.cpp's is an error, not a guess."""
    chat = [("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V")]
    for fmt in NAMES + ("dots1",):
        out = format_chat(fmt, chat, True)
        assert "U" in out and "V" in out, fmt
    with pytest.raises(ValueError):
        format_chat("jinja", chat, True)


def test_trim_is_c_isspace():
    assert trim("\v\f \t\n x y \r\n") == "x y"
    assert trim("\u00a0x\u00a0") == "\u00a0x\u00a0"   # (not C whitespace)


def test_llama_servers_renderings():
    """llama-server's /apply-template under --no-jinja, recorded by bench/compare_templates.py
    --no-jinja for llama.cpp's 71 vendored templates and this repository's test templates
    (tests/data/legacy-chat-templates.json): the same format is detected (or none: llama-server
    refused to start), and each conversation is written the same, continued turns and text parts
    included."""
    import json
    from llama_tree import tree_root
    from numllama.engine.legacy_chat import conversation
    here = os.path.dirname(__file__)
    golden = json.load(open(os.path.join(here, "data", "legacy-chat-templates.json")))
    assert golden["no_jinja"] and len(golden["renderings"]) >= 70
    for name, renderings in golden["renderings"].items():
        path = os.path.join(here, "data", "templates", name)
        if not os.path.exists(path):
            path = os.path.join(tree_root(), "models", "templates", name)
        fmt = detect(open(path, encoding="utf-8").read())
        if renderings[0] is None:   # llama-server refused the template at start
            assert fmt is None, name
            continue
        for conv, want in zip(golden["conversations"], renderings):
            msgs = conv["messages"]
            add = conv.get("add_generation_prompt", True) and msgs[-1]["role"] != "assistant"   # (a prefill)
            assert format_chat(fmt, conversation(msgs), add) == want, (name, conv)
