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


def test_tojson_keeps_key_order_and_does_not_escape_html():
    t = ChatTemplate("{{ messages[0] | tojson }}")
    assert t.render([{"role": "user", "content": "<b>&</b>"}], add_generation_prompt=False) == \
        '{"role": "user", "content": "<b>&</b>"}'
