"""Chat templates of the model families render as llama-server renders them: its answers to
POST /apply-template for the same conversations (tests/data/chat-templates.json, recorded by
bench/compare_templates.py). The templates are in tests/data/templates: Qwen 2.5 and Qwen 3
(Apache-2.0, with tools), Phi-3.5 (MIT), and one of ours without a system role."""
import json
import os

import pytest

from numllama.engine.chat_template import ChatTemplate, ChatTemplateError, TemplateCaps

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = json.load(open(os.path.join(DATA, "chat-templates.json")))


def template(name: str) -> ChatTemplate:
    source = open(os.path.join(DATA, "templates", name), encoding="utf-8").read()
    # stories260K's special tokens, BOS added by its tokenizer (the file the golden was made on)
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>", add_bos=True)


@pytest.mark.parametrize("name", sorted(GOLDEN["renderings"]))
def test_renders_as_llama_server(name):
    t = template(name)
    for conv, want in zip(GOLDEN["conversations"], GOLDEN["renderings"][name]):
        if isinstance(want, int):   # llama-server refused it (HTTP status)
            with pytest.raises(ChatTemplateError):
                t.render(conv["messages"], tools=conv.get("tools"))
        else:
            assert t.render(conv["messages"], tools=conv.get("tools")) == want, conv


def test_capabilities_are_probed():
    assert template("Qwen-Qwen2.5-7B-Instruct.jinja").caps == TemplateCaps(True, True, True, True, True)
    # Llama 3.3 raises on a second call in one turn; Mistral Nemo raises when a tool result has
    # no call before it, and is still seen to print calls
    assert template("meta-llama-Llama-3.3-70B-Instruct.jinja").caps.supports_parallel_tool_calls is False
    assert template("mistralai-Mistral-Nemo-Instruct-2407.jinja").caps.supports_tool_calls
    assert template("microsoft-Phi-3.5-mini-instruct.jinja").caps == TemplateCaps(True, False, False, False)
    no_system = template("no-system-role.jinja")
    assert not no_system.caps.supports_system_role
    # so a system message joins the first user message, as llama.cpp's workaround does
    assert no_system.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "<turn>user\nBe brief.\nHi</turn>\n<turn>model\n"


def test_a_template_may_append_to_its_own_copies_only():
    """llama.cpp's Jinja lets a template append to a list (Kimi K2's count their tool calls so);
    what it changes is a copy: the caller's messages, tools and arguments stay as they were."""
    t = ChatTemplate("{% set ns = namespace(ids=[]) %}{% for m in messages %}{% set _ = ns.ids.append(m.role) %}"
                     "{% endfor %}{% set _ = messages.append(1) %}{% set _ = tools.append(1) %}"
                     "{% set _ = extra.append(2) %}{{ ns.ids | join(',') }}")
    messages, tools, extra = [{"role": "user", "content": "a"}], [{"type": "function"}], {"extra": []}
    assert t.render(messages, add_generation_prompt=False, tools=tools, extra=extra) == "user"
    assert messages == [{"role": "user", "content": "a"}] and tools == [{"type": "function"}] and extra == {"extra": []}
    endless = ChatTemplate("{% set l = [1] %}{% for x in l %}{% set _ = l.append(x) %}{% endfor %}{{ l | length }}")
    with pytest.raises(ChatTemplateError, match="at most 100000 items"):   # a loop that feeds itself ends
        endless.render(messages)
    for unsafe in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% set d = {} %}{{ d.update(a=1) }}"):
        with pytest.raises(ChatTemplateError):   # Python's internals and other mutations stay closed
            ChatTemplate(unsafe).render(messages)


def test_tojson_keeps_key_order_and_does_not_escape_html():
    t = ChatTemplate("{{ messages[0] | tojson }}")
    assert t.render([{"role": "user", "content": "<b>&</b>"}], add_generation_prompt=False) == \
        '{"role": "user", "content": "<b>&</b>"}'


GOLDEN_CAPS = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "template-caps.json")))["caps"]
# where numllama's probes read a template otherwise than llama.cpp's value statistics do:
# llama.cpp counts a use of `tools`/`tool_calls` these make under conditions our renders do not
# reach; it does not count a for-loop over content parts as typed content, which our render (the
# part's text reaches the output) does
CAPS_DIFFER = {"LFM2.5-8B-A1B",
               "mistralai-Ministral-3-14B-Reasoning-2512"}


@pytest.mark.parametrize("name", sorted(GOLDEN_CAPS))
def test_template_caps_match_llama_server(name):
    """GET /props chat_template_caps, against llama-server's over llama.cpp's vendored templates
    (tests/data/template-caps.json, written by bench/compare_template_caps.py --record)."""
    from llama_tree import tree_root
    path = os.path.join(tree_root(), "models", "templates", name + ".jinja")
    if not os.path.exists(path):
        pytest.fail(f"{path} not found: run `python tests/llama_tree.py models/templates/` first (tox does)")
    ours = ChatTemplate(open(path, encoding="utf-8").read(), "<s>", "</s>").caps.as_dict()
    if name in CAPS_DIFFER:
        assert ours != GOLDEN_CAPS[name]   # (a known difference: if it goes, drop the name)
    else:
        assert ours == GOLDEN_CAPS[name]


def test_stepfun_messages_are_trimmed_as_llama_cpp_trims_them():
    """llama.cpp trims every message's text before rendering StepFun 3.5 Flash's template (its
    workaround for issue #24181); /apply-template on llama-server gives the same prompt."""
    import os
    from numllama.engine.chat_template import ChatTemplate
    here = os.path.dirname(os.path.abspath(__file__))
    t = ChatTemplate(open(os.path.join(here, "data", "templates", "StepFun3.5-Flash.jinja")).read())
    got = t.render([{"role": "system", "content": " sys \n"}, {"role": "user", "content": "  hi there \n"},
                    {"role": "assistant", "content": "\n ok ", "reasoning_content": " hmm "},
                    {"role": "user", "content": [{"type": "text", "text": " a "}]}])
    assert got.endswith("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>"
                        "assistant\nok<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_safe_marks_nothing():
    """llama.cpp's Jinja has no markup strings: `"a"|safe + text` is plain concatenation."""
    assert ChatTemplate('{{ "x: "|safe + messages[0].content }}').render(
        [{"role": "user", "content": '{"a": "<b>"}'}], add_generation_prompt=False) == 'x: {"a": "<b>"}'


def test_the_date_a_template_writes_can_be_fixed(monkeypatch):
    """Templates write today's date (strftime_now, date_string) as llama-server's do; with
    $NUMLLAMA_NOW they write that day, so recorded answers replay on any day."""
    t = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}|{{ date_string }}|{{ messages[0].content }}")
    monkeypatch.setenv("NUMLLAMA_NOW", "2026-12-01")
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "2026-12-01|01 Dec 2026|hi"
    monkeypatch.delenv("NUMLLAMA_NOW")
    import datetime
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=False).startswith(
        datetime.date.today().isoformat())
