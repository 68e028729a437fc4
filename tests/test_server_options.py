"""numllama-server takes every option `llama-server --help` lists: the ones it implements, and
the rest accepted and named at start-up as without effect."""
from __future__ import annotations

import argparse
import os

import pytest
import requests

from numllama.webapp.llama_options import IGNORED_PREFIX, read_options
from numllama.webapp.server import build_parser

OPTIONS = read_options()
EXITS = {"-h", "--version"}   # print and exit, as llama-server's do


def test_the_option_list_is_llama_servers_help():
    names = {n for o in OPTIONS for n in o.names}
    assert len(OPTIONS) == 255 and {"-t", "--threads", "-ngl", "--sleep-idle-seconds", "-ot"} <= names
    arity = {o.names[-1]: o.n_values for o in OPTIONS}
    assert (arity["--control-vector-layer-range"], arity["--override-tensor"], arity["--flash-attn"],
            arity["--no-warmup"], arity["--hf-repo"]) == (2, 1, 1, 0, 1)


def _value(action: argparse.Action) -> str:
    return str(action.choices[0]) if action.choices else "1"


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.names[-1])
def test_every_llama_server_option_parses(opt):
    """Each spelling of each option, with as many values as it takes."""
    ap = build_parser()
    for name in opt.names:
        if name in EXITS or name in ("--help", "--usage"):
            continue
        action = ap._option_string_actions[name]
        values = [] if action.nargs == 0 else [_value(action)] * (action.nargs if isinstance(action.nargs, int) else 1)
        args = ap.parse_args(["-m", "model.gguf", name, *values])
        ignored = [k for k, v in vars(args).items() if k.startswith(IGNORED_PREFIX) and v not in (None, False)]
        assert ignored == ([IGNORED_PREFIX + "/".join(opt.names)] if action.dest.startswith(IGNORED_PREFIX) else [])


def test_options_llama_server_lacks_are_still_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--mlock"])   # (gone from llama-server: --load-mode replaced it)


@pytest.mark.parametrize("flags, said", [
    (["--control-vector", "a.gguf"], "--control-vector: it would change the model's answers"),
    (["--rope-freq-base", "10000"], "--rope-freq-base: it would change the model's answers"),
    (["--ssl-key-file", "k.pem"], "--ssl-key-file: numllama serves plain HTTP"),
])
def test_options_that_would_change_answers_or_safety_stop_the_server(flags, said):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "numllama.webapp.server", "-m", "x.gguf", *flags],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and said in p.stderr


def test_a_llama_server_command_line_starts_the_server(stories_path, tmp_path):
    """Options that steer nothing here are named; implemented ones work: sampling defaults,
    keys from a file, the UI switch under its other name."""
    from server_util import Server
    keys = tmp_path / "keys"
    keys.write_text("first\nsecond\n")
    s = Server(["-c", "256", "--top-k", "5", "--samplers", "top_k;temperature", "--temperature", "0.5",
                "-C", "ff", "--spec-ngram-mod-n-max", "4", "--no-warmup", "-lm", "mmap",
                "--no-webui", "--api-key-file", str(keys), "-ctk", "q8_0", "--mmproj-auto"], model=stories_path)
    try:
        out = s.output()
        for name in ("--spec-ngram-mod-n-max", "-C/--cpu-mask", "--warmup/--no-warmup",
                     "-lm/--load-mode", "-ctk/--cache-type-k", "--mmproj-auto/--no-mmproj/--no-mmproj-auto"):
            assert f"numllama-server: {name} has no effect in numllama" in out
        assert s.get("/props").status_code == 401
        props = s.get("/props", headers={"Authorization": "Bearer second"}).json()
        params = props["default_generation_settings"]["params"]
        assert (params["top_k"], params["temperature"], params["samplers"]) == (5, 0.5, ["top_k", "temperature"])
        assert requests.get(s.url + "/", timeout=10).status_code == 404
        r = s.post("/completion", {"prompt": "Once", "n_predict": 4}, headers={"X-Api-Key": "first"})
        assert r.json()["generation_settings"]["top_k"] == 5
    finally:
        s.stop()


def test_reasoning_and_template_kwargs_options(stories_path):
    """--reasoning off and --chat-template-kwargs reach every render; a request's own kwargs
    and reasoning_effort "none" go over them, as llama-server merges them."""
    from server_util import Server
    tmpl = os.path.join(os.path.dirname(__file__), "data", "templates", "Qwen-Qwen3-0.6B.jinja")
    s = Server(["-c", "256", "--chat-template-file", tmpl, "-rea", "off",
                "--chat-template-kwargs", '{"custom": 1}'], model=stories_path)
    try:
        msgs = {"messages": [{"role": "user", "content": "hi"}]}
        off = s.post("/apply-template", msgs).json()["prompt"]
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        on = s.post("/apply-template", {**msgs, "chat_template_kwargs": {"enable_thinking": True}}).json()["prompt"]
        assert on.endswith("<|im_start|>assistant\n")
        none = s.post("/apply-template", {**msgs, "chat_template_kwargs": {"enable_thinking": True},
                                          "reasoning_effort": "none"}).json()["prompt"]
        assert none == off
        r = s.post("/apply-template", {**msgs, "chat_template_kwargs": {"enable_thinking": "no"}})
        assert r.status_code == 400 and "expected boolean, got string" in r.json()["error"]["message"]
        import json
        golden = json.load(open(os.path.join(os.path.dirname(__file__), "data", "template-caps.json")))["caps"]
        assert s.get("/props").json()["chat_template_caps"] == golden["Qwen-Qwen3-0.6B"]
    finally:
        s.stop()


def test_no_jinja_takes_llama_servers_legacy_chat_path(server):
    """(The `server` fixture runs llama.cpp's tinyllama2 preset, --no-jinja.) response_format is
    the schema's own grammar and the answer is returned as generated; tools are refused."""
    msgs = [{"role": "user", "content": "Write an example"}]
    r = server.post("/chat/completions", {"messages": msgs, "max_tokens": 10, "temperature": 0,
                                          "response_format": {"type": "json_object"}}).json()
    assert r["choices"][0]["message"]["content"].startswith("{")   # no leading whitespace allowed
    r = server.post("/chat/completions", {"messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "tools param requires --jinja flag"
    r = server.post("/chat/completions", {"messages": msgs, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "tool_choice param requires --jinja flag"


def test_no_jinja_reads_no_reasoning_block(stories_path):
    """--no-jinja with a template that has a reasoning block: llama-server's legacy path returns
    the answer as written (seen on llama-server with Qwen 3's template: "<think>..." is content)."""
    from server_util import Server
    template = os.path.join(os.path.dirname(__file__), "data", "templates", "Qwen-Qwen3-0.6B.jinja")
    grammar = 'root ::= "<think>\\n" [a-z ]+ "\\n</think>\\n\\n" [A-Za-z ]+'
    for flags, thought in ((["--no-jinja"], False), ([], True)):
        s = Server(["-c", "256", "--chat-template-file", template] + flags, model=stories_path)
        try:
            m = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                                                "temperature": 0, "grammar": grammar}).json()["choices"][0]["message"]
            assert ("reasoning_content" in m) == thought and m["content"].startswith("<think>") != thought
        finally:
            s.stop()


def test_no_jinja_writes_llama_cpps_legacy_formats(stories_path, tmp_path):
    """--no-jinja: llama.cpp's hand-written format for the template (engine.legacy_chat, compared
    with llama-server in tests/test_legacy_chat.py). Llama 3.3's template is written as its
    "llama3" format (contents trimmed, a continued turn closed, no generation prompt); a template
    no format fits is refused at start with llama.cpp's words; a model whose own template fits
    none fails each chat request (500, as llama-server) and the server goes on."""
    import subprocess
    import sys
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    from server_util import Server, free_port
    templates = os.path.join(os.path.dirname(__file__), "data", "templates")
    llama3 = os.path.join(templates, "meta-llama-Llama-3.3-70B-Instruct.jinja")
    s = Server(["-c", "256", "--no-jinja", "--chat-template-file", llama3], model=stories_path)
    try:
        msgs = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "ok"}]
        assert s.post("/apply-template", {"messages": msgs}).json()["prompt"] == (
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>")
        r = s.post("/v1/chat/completions", {"messages": msgs[:1], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
    finally:
        s.stop()
    unknown = os.path.join(templates, "no-system-role.jinja")
    proc = subprocess.run([sys.executable, "-m", "numllama.webapp.server", "-m", stories_path, "--port",
                           str(free_port()), "--host", "127.0.0.1", "--no-jinja", "--chat-template-file", unknown],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "the supplied chat template is not supported" in proc.stderr
    # the same template as the model's own: accepted at start, each chat request refused
    model = str(tmp_path / "unknown-template.gguf")
    reader = gguf.GGUFReader(stories_path, "r")
    writer = gguf.GGUFWriter(model, arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents(),
                             endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, open(unknown).read())}, [])
    s = Server(["-c", "256", "--no-jinja"], model=model)
    try:
        r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "this custom template is not supported, try using --jinja"
        assert s.post("/completion", {"prompt": "Once", "n_predict": 2}).status_code == 200
    finally:
        s.stop()


def test_undefined_variables_concatenate_as_llama_cpp_does():
    from numllama.engine.chat_template import ChatTemplate
    t = ChatTemplate("{{ 'a' + functions }}|{{ functions + 'b' }}|{{ functions | default('z') }}")
    assert t.render([], add_generation_prompt=False) == "a|b|z"


def test_api_prefix_and_cors_options(stories_path):
    from server_util import Server
    s = Server(["-c", "256", "--api-prefix", "/api", "--cors-methods", "GET, POST", "--cors-headers",
                "Content-Type", "--no-cors-credentials"], model=stories_path, health_path="/api/health")
    try:
        assert requests.get(s.url + "/health", timeout=10).status_code == 404
        r = requests.post(s.url + "/api/completion", json={"prompt": "Once", "n_predict": 2},
                          headers={"Origin": "http://example.com"}, timeout=30)
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 2
        assert r.headers["Access-Control-Allow-Origin"] == "*"   # no credentials: not the echoed origin
        assert r.headers["Access-Control-Allow-Credentials"] == "false"
        pre = requests.options(s.url + "/api/completion", headers={"Origin": "http://example.com"}, timeout=10)
        assert (pre.headers["Access-Control-Allow-Methods"], pre.headers["Access-Control-Allow-Headers"]) == \
            ("GET, POST", "Content-Type")
    finally:
        s.stop()


def test_api_keys_from_the_option_and_the_file(tmp_path):
    from numllama.webapp.server import api_keys
    keys = tmp_path / "keys"
    keys.write_text("c\n\n d \n")
    args = build_parser().parse_args(["--api-key", "a,b", "--api-key-file", str(keys)])
    assert api_keys(args) == ("a", "b", "c", "d")


def test_template_variables_a_request_sets():
    """reasoning_effort reaches templates under both names llama.cpp gives it, preserve_reasoning
    as the variables that keep earlier turns' reasoning, and "none" turns thinking off."""
    from numllama.webapp.chat_completions import _template_kwargs
    got = _template_kwargs({"reasoning_effort": "low", "chat_template_kwargs": {"preserve_reasoning": True}},
                           {"enable_thinking": True})
    assert (got["reasoning_effort"], got["reasoning_strength"], got["preserve_thinking"], got["clear_thinking"],
            got["enable_thinking"]) == ("low", "low", True, False, True)
    off = _template_kwargs({"reasoning_effort": "none"}, {"reasoning_effort": "high"})
    assert off["enable_thinking"] is False and "reasoning_effort" not in off


def test_the_batcher_runs_its_kernels_with_the_servers_thread_count(stories):
    """-t / --threads: Numba's thread count belongs to the thread that sets it, so the batcher
    thread, which runs every kernel, sets it itself (it once stayed at all cores whatever -t said)."""
    import numba
    from numllama.engine.sampling import SamplingParams
    from numllama.engine.slots import FinalEvent, Scheduler, Task
    for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        sched = Scheduler(stories, 1, 256, n_threads=n)
        try:
            task = Task(prompt_tokens=stories.tokenizer.encode("Once"), n_predict=2,
                        params=SamplingParams(temperature=0))
            sched.submit_all([task])
            assert isinstance(task.outcome(timeout=60), FinalEvent)
            assert sched.compute_threads == n
        finally:
            sched.close()
