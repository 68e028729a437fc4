"""/v1/chat/completions, /apply-template and templates, over real HTTP with stories260K."""
import pytest
from openai import OpenAI

from server_util import TINYLLAMA2, Server

BOOK = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]


def test_chat_completion_matches_llama_server(server):
    """Real llama-server: 77 prompt tokens (ChatML fallback) and "Suddenly" at seed 42."""
    b = server.post("/chat/completions", {"max_tokens": 8, "messages": BOOK}).json()
    assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
    assert b["system_fingerprint"].startswith("b")
    assert b["usage"]["prompt_tokens"] == 77 and b["usage"]["completion_tokens"] == 8
    ch = b["choices"][0]
    assert ch["message"]["role"] == "assistant" and "Suddenly" in ch["message"]["content"]
    assert ch["finish_reason"] == "length"


def test_text_parts(server):
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}]
    b = server.post("/chat/completions", {"max_tokens": 8, "messages": [BOOK[0], {"role": "user", "content": parts}]}).json()
    assert b["usage"]["prompt_tokens"] == 79


def test_apply_template_chatml(server):
    b = server.post("/apply-template", {"messages": [{"role": "system", "content": "Book"},
                                                     {"role": "user", "content": "Hi"}]}).json()
    assert b["prompt"] == "<|im_start|>system\nBook<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_prefill_continues_assistant(server, stories_path):
    """With Jinja a final assistant message is continued: the template's generation prompt,
    then its text. (The `server` fixture runs --no-jinja, where llama-server's legacy path
    writes the message whole, end marker and all: tests/test_legacy_chat.py.)"""
    msgs = BOOK + [{"role": "assistant", "content": "Whill"}]
    b = server.post("/chat/completions", {"max_tokens": 4, "verbose": True, "messages": msgs}).json()
    assert b["__verbose"]["prompt"].endswith("<|im_start|>assistant\nWhill<|im_end|>\n")
    s = Server(["-c", "256", "--jinja"], model=stories_path)
    try:
        b = s.post("/chat/completions", {"max_tokens": 4, "verbose": True, "messages": msgs}).json()
        assert b["__verbose"]["prompt"].endswith("<|im_start|>assistant\nWhill")
    finally:
        s.stop()


def test_openai_client_plain_and_stream(server):
    client = OpenAI(api_key="dummy", base_url=server.url + "/v1")
    res = client.chat.completions.create(model="x", messages=BOOK, max_tokens=8, seed=42, temperature=0.8)
    assert res.choices[0].finish_reason == "length" and "Suddenly" in res.choices[0].message.content
    text, roles, finish = "", [], None
    for chunk in client.chat.completions.create(model="x", messages=BOOK, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True}):
        if not chunk.choices:
            assert chunk.usage.completion_tokens == 8
            continue
        d = chunk.choices[0].delta
        roles.append(d.role)
        text += d.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles[0] == "assistant" and finish == "length" and text == res.choices[0].message.content


def test_logprobs(server):
    client = OpenAI(api_key="dummy", base_url=server.url + "/v1")
    res = client.chat.completions.create(model="x", messages=BOOK, max_tokens=5, temperature=0.0,
                                         logprobs=True, top_logprobs=3)
    content = res.choices[0].logprobs.content
    assert "".join(t.token for t in content) == res.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)


def test_n_choices_and_input_tokens(server):
    b = server.post("/chat/completions", {"max_tokens": 4, "n": 2, "messages": BOOK}).json()
    assert [c["index"] for c in b["choices"]] == [0, 1]
    n = server.post("/chat/completions/input_tokens", {"messages": BOOK}).json()["input_tokens"]
    assert n == 77


@pytest.mark.parametrize("body,text", [
    ({}, "'messages' is required"),
    ({"messages": "hi"}, "array"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": 5, "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": BOOK, "top_logprobs": 3}, "logprobs"),
    ({"messages": BOOK, "n": 9}, "'n'"),
    ({"messages": BOOK, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": BOOK, "tools": [{"type": "function"}]}, "Each tool must be"),
    ({"messages": BOOK, "functions": [{"name": "f"}]}, "not supported"),
    ({"messages": BOOK + [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}, "assistant"),
    ({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True,
      "continue_final_message": True}, "continue_final_message to true"),
])
def test_bad_chat_requests_are_400(server, body, text):
    r = server.post("/chat/completions", body)
    assert r.status_code == 400 and text in r.json()["error"]["message"]


def test_context_exceeded(server):
    r = server.post("/chat/completions", {"messages": [{"role": "user", "content": "a b c d " * 200}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "exceed_context_size_error"


def test_named_template_and_sandbox(stories_path):
    s = Server(TINYLLAMA2 + ["--chat-template", "llama3"], model=stories_path)
    try:
        b = s.post("/apply-template", {"messages": BOOK}).json()
        assert b["prompt"] == ("<|start_header_id|>system<|end_header_id|>\n\nBook<|eot_id|><|start_header_id|>user"
                               "<|end_header_id|>\n\nWhat is the best book<|eot_id|><|start_header_id|>assistant"
                               "<|end_header_id|>\n\n")
    finally:
        s.stop()
    # a template cannot reach Python internals: the sandbox refuses, the request gets a 400
    # (with Jinja: without it, llama.cpp's legacy path refuses a template it does not know at start)
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    s = Server(TINYLLAMA2 + ["--jinja", "--chat-template", evil], model=stories_path)
    try:
        r = s.post("/apply-template", {"messages": BOOK})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        assert s.get("/health").status_code == 200
    finally:
        s.stop()


def test_progress_events(stories_path):
    s = Server(TINYLLAMA2 + ["--batch-size", "16"], model=stories_path)
    try:
        prog = [d["prompt_progress"] for d in s.stream("/completion", {"prompt": "This is a test " * 10,
                                                                          "n_predict": 2, "stream": True,
                                                                          "return_progress": True})
                if "prompt_progress" in d]
        assert prog[0]["processed"] == prog[0]["cache"] and prog[-1]["processed"] == prog[-1]["total"]
        assert all(b["processed"] > a["processed"] for a, b in zip(prog, prog[1:]))
    finally:
        s.stop()


def test_reasoning_control_ends_the_block_from_another_request(smollm_path):
    """llama-server's control route: a streamed chat armed with "reasoning_control": true has its
    <think> block closed by POST /v1/chat/completions/control {"id", "action": "reasoning_end"}
    while it generates: the budget message and the end tag are forced, then the answer goes on.
    Refusals in llama-server's words: a request not armed, an id no slot is serving (200 with
    success false), a missing id or an unknown action (400)."""
    import json
    import os
    import requests
    # (its generation prompt opens the block, and SmolLM2 does not close it by itself)
    template = os.path.join(os.path.dirname(__file__), "data", "templates", "Qwen3.5-4B.jinja")
    s = Server(["-c", "1024", "--chat-template-file", template], model=smollm_path)

    def run(armed: bool):
        body = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 200, "temperature": 0,
                "stream": True, "reasoning_control": armed, "reasoning_budget_message": " ok"}
        reasoning, content, answer = "", "", None
        with requests.post(s.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if answer is None:   # the request runs: ask for its block to end
                    answer = s.post("/v1/chat/completions/control", {"id": chunk["id"], "action": "reasoning_end"})
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                reasoning += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
        return answer, reasoning, content
    try:
        answer, reasoning, content = run(True)
        assert answer.status_code == 200 and answer.json() == {"success": True}
        # closed with the message (and the template's end tag, which starts with a newline), then the answer
        assert reasoning.rstrip().endswith("ok") and content, (reasoning, content)
        answer, reasoning, content = run(False)
        assert answer.json() == {"success": False, "message": "reasoning control not enabled for this completion"}
        assert not reasoning.rstrip().endswith("ok") and not content   # (200 tokens of reasoning, never closed)
        r = s.post("/v1/chat/completions/control", {"id": "chatcmpl-none", "action": "reasoning_end"})
        assert r.json() == {"success": False, "message": "no active completion for this id"}
        r = s.post("/v1/chat/completions/control", {"action": "reasoning_end"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "missing completion id"
        r = s.post("/v1/chat/completions/control", {"id": "x", "action": "pause"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "unknown control action"
    finally:
        s.stop()


CONTINUED = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel", "reasoning_content": "think"}]
THOUGHT_ONLY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "reasoning_content": "think"}]


@pytest.mark.parametrize("template,messages,fields,status,want", [
    # (llama-server's answers, AVX2 build, 2026-12-02)
    ("Qwen3.5-4B.jinja", CONTINUED, {"continue_final_message": "reasoning_content", "add_generation_prompt": False},
     200, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nthink"),
    ("Qwen3.5-4B.jinja", THOUGHT_ONLY, {}, 200, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nthink"),
    ("Qwen3.5-4B.jinja", THOUGHT_ONLY, {"continue_final_message": "content", "add_generation_prompt": False},
     200, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nthink\n</think>\n\n"),
    ("Qwen3.5-4B.jinja", CONTINUED, {"continue_final_message": True}, 400,
     "Cannot set both add_generation_prompt and continue_final_message to true."),
    ("Qwen3.5-4B.jinja", CONTINUED, {"continue_final_message": "bogus", "add_generation_prompt": False}, 200,
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nthink\n</think>\n\nHel"),
    # the history without a generation prompt, then what the generation prompt adds (the part
    # after the common prefix): Phi-3.5 ends a conversation without one with its end of text
    ("microsoft-Phi-3.5-mini-instruct.jinja", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
     {}, 200, "<|user|>\nHi<|end|>\n</s>|assistant|>\nHel"),
])
def test_continuations_as_llama_server(stories_path, template, messages, fields, status, want):
    """continue_final_message as llama-server reads it: true (the message decides), the modes
    "reasoning_content" (the block stays open, no content) and "content", anything else none;
    an explicit continuation needs add_generation_prompt false."""
    import os
    path = os.path.join(os.path.dirname(__file__), "data", "templates", template)
    s = Server(["-c", "256", "--chat-template-file", path], model=stories_path)
    try:
        r = s.post("/apply-template", {"messages": messages, **fields})
        assert r.status_code == status
        assert (r.json()["prompt"] if status == 200 else r.json()["error"]["message"]) == want
    finally:
        s.stop()


def test_no_prefill_assistant(stories_path):
    """--no-prefill-assistant: a final assistant message is a whole turn, and the generation
    prompt follows (two at the end are allowed then); an explicit continue_final_message still
    continues. llama-server's answers (AVX2 build, 2026-12-02), Qwen 3.5's template."""
    import os
    path = os.path.join(os.path.dirname(__file__), "data", "templates", "Qwen3.5-4B.jinja")
    s = Server(["-c", "256", "--chat-template-file", path, "--no-prefill-assistant"], model=stories_path)
    try:
        assert s.post("/apply-template", {"messages": CONTINUED}).json()["prompt"] == (
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nthink\n</think>\n\nHel<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n")
        two = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"},
               {"role": "assistant", "content": "b"}]
        assert s.post("/apply-template", {"messages": two}).status_code == 200
        r = s.post("/apply-template", {"messages": CONTINUED[:1] + [{"role": "assistant", "content": "Hel"}],
                                       "continue_final_message": True, "add_generation_prompt": False})
        assert r.json()["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHel"
    finally:
        s.stop()
