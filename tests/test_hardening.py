"""Abuse: no request may hurt the machine, the server, or another request's tokens.

One test (or a few) per finding of the hardening review, each failing on the server as it was:
cross-site tool calls, the proxy as a door to local services, one request's failure ending the
others, grammars that break or leak, prompts that cost memory before any check, starved
/health, and the odd values that ended in a 500. Loopback only, bounded in time.
"""
from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from server_util import REPO, TINYLLAMA2, Server, free_port


def quick(server, path="/health", **kw) -> tuple[int, float]:
    """Status and seconds of one GET on a fresh connection."""
    t0 = time.perf_counter()
    r = requests.get(server.url + path, timeout=5, **kw)
    return r.status_code, time.perf_counter() - t0


# ---------------------------------------------------------------------------------- 1. tools
def test_tools_refuse_to_start_without_api_key(stories_path):
    for flags in (["--tools", "all"], ["--ui-mcp-proxy"], ["--agent"]):
        p = subprocess.run([sys.executable, "-m", "numllama.webapp.server", "-m", stories_path, "--port",
                            str(free_port()), *flags], cwd=REPO, capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin"})
        assert p.returncode != 0 and "--api-key" in p.stderr, (flags, p.stderr[-300:])


@pytest.fixture(scope="module")
def tools_server(stories_path):
    s = Server(TINYLLAMA2 + ["--tools", "all", "--unsafe-no-api-key"], model=stories_path)
    yield s
    s.stop()


def test_cross_site_simple_post_runs_no_command(tools_server, tmp_path):
    marker = tmp_path / "pwned"
    body = json.dumps({"tool": "exec_shell_command", "params": {"command": f"touch {marker}"}})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = requests.post(tools_server.url + "/tools", data=body, timeout=10,
                          headers={"Content-Type": ctype, "Origin": "https://evil.example"})
        assert r.status_code == 415, r.text
    time.sleep(0.2)
    assert not marker.exists()
    # what a real client sends still works
    r = requests.post(tools_server.url + "/tools", json=json.loads(body), timeout=10)
    assert r.status_code == 200 and marker.exists()


def test_dns_rebinding_host_refused(tools_server):
    port = tools_server.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        r = requests.get(tools_server.url + "/tools", headers={"Host": host}, timeout=10)
        assert r.status_code == 403 and "Host" in r.json()["error"]["message"], host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert requests.get(tools_server.url + "/tools", headers={"Host": host}, timeout=10).status_code == 200
    # a load balancer's health check may use any name
    assert requests.get(tools_server.url + "/health", headers={"Host": "lb.internal"}, timeout=10).status_code == 200


def test_cors_default_is_localhost_with_the_proxy_alone(stories_path):
    s = Server(TINYLLAMA2 + ["--ui-mcp-proxy", "--api-key", "k"], model=stories_path)
    try:
        r = s.get("/props", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        assert "Access-Control-Allow-Origin" not in r.headers
        r = s.get("/props", headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"})
        assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    finally:
        s.stop()


# ---------------------------------------------------------------------------------- 2. the proxy
class Upstream:
    """A loopback HTTP server standing for a local service the proxy must not reach."""

    def __init__(self, stall: bool = False):
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                if stall:
                    time.sleep(8)
                body = b"<script>alert(1)</script>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Set-Cookie", "session=stolen")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_proxy_refuses_local_and_private_targets(stories_path):
    up = Upstream()
    s = Server(TINYLLAMA2 + ["--ui-mcp-proxy", "--unsafe-no-api-key"], model=stories_path)
    try:
        for target in (f"http://127.0.0.1:{up.port}/", f"http://0:{up.port}/", f"http://2130706433:{up.port}/",
                       f"http://localhost:{up.port}/", f"http://[::ffff:127.0.0.1]:{up.port}/",
                       "http://10.0.0.1/", "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/",
                       "http://[::1]/", "http://224.0.0.1/"):
            r = s.get("/cors-proxy", params={"url": target})
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (target, r.text)
        assert up.hits == 0
    finally:
        s.stop()
        up.close()


def test_proxied_answers_are_sandboxed_and_bounded(stories_path):
    up, stalled = Upstream(), Upstream(stall=True)
    s = Server(TINYLLAMA2 + ["--ui-mcp-proxy", "--unsafe-no-api-key", "--cors-proxy-allow-private"],
               model=stories_path)
    try:
        r = s.get("/cors-proxy", params={"url": f"http://127.0.0.1:{up.port}/"})
        assert r.status_code == 200 and up.hits == 1
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Content-Security-Policy"] == "sandbox"
        assert "Set-Cookie" not in r.headers
        # upstreams that never answer take a few threads at most, and never /health
        statuses = []

        def call():
            try:
                statuses.append(requests.get(s.url + "/cors-proxy", params={"url": f"http://127.0.0.1:{stalled.port}/"},
                                             timeout=3).status_code)
            except requests.RequestException:
                statuses.append("timeout")
        callers = [threading.Thread(target=call) for _ in range(12)]
        for t in callers:
            t.start()
        time.sleep(1.0)
        code, dt = quick(s)
        assert code == 200 and dt < 0.1, dt
        for t in callers:
            t.join()
        assert statuses.count(503) >= 12 - 4, statuses   # at most 4 proxied at once
    finally:
        s.stop()
        up.close()
        stalled.close()


# ---------------------------------------------------------------------------------- 3. isolation
@pytest.fixture(scope="module")
def server4(stories_path, tmp_path_factory):
    s = Server(["--ctx-size", "8192", "--parallel", "4", "--slots", "--seed", "42", "--temp", "0.8",
                "--slot-save-path", str(tmp_path_factory.mktemp("slots"))], model=stories_path)
    yield s
    s.stop()


def _tokens(server, body) -> list[int]:
    r = server.post("/completion", {**body, "return_tokens": True})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


GREEDY = {"prompt": "Once upon a time", "n_predict": 48, "temperature": 0, "cache_prompt": False}
SEEDED = {"prompt": "The little dog", "n_predict": 48, "temperature": 1.0, "seed": 7, "cache_prompt": False}


def test_a_failing_request_changes_no_other_token(server4):
    alone = [_tokens(server4, GREEDY), _tokens(server4, SEEDED)]
    hostile = [{"prompt": "Once", "n_predict": 40, "dynatemp_range": 1, "dynatemp_exponent": -1e4},
               {"prompt": "Once", "n_predict": 40, "grammar": 'root ::= root "a" | "a"'},
               {"prompt": "Once", "n_predict": 40, "dynatemp_range": 1, "dynatemp_exponent": 1e5,
                "temperature": 1}]
    results, statuses = [None, None], []

    def run(i, body):
        results[i] = _tokens(server4, body)

    def hurt(body):
        statuses.append(server4.post("/completion", body).status_code)
    threads = [threading.Thread(target=run, args=(0, GREEDY)), threading.Thread(target=run, args=(1, SEEDED))]
    threads += [threading.Thread(target=hurt, args=(b,)) for b in hostile]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    assert all(c < 500 for c in statuses), statuses
    assert sorted(statuses) == [200, 200, 400]   # the left-recursive grammar is refused up front


def test_scheduler_contains_a_sampling_failure(stories):
    """An exception while sampling one slot ends that task with an error; the other slots of
    the same batch go on with bit-identical tokens (greedy and seeded)."""
    from numllama.engine.grammar import Grammar
    from numllama.engine.sampling import SamplingParams
    from numllama.engine.slots import ErrorEvent, Scheduler, Task

    class BreaksAfterFive(Grammar):
        calls = 0

        def advance(self, stacks, text):
            BreaksAfterFive.calls += 1
            if BreaksAfterFive.calls > 5:
                raise RuntimeError("grammar engine bug")
            return super().advance(stacks, text)

    tok = stories.tokenizer
    prompts = [tok.encode("Once upon a time"), tok.encode("The little dog")]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7)]

    def run(with_failure: bool) -> list:
        sched = Scheduler(stories, 3, 256)
        tasks = [Task(prompt_tokens=p, n_predict=40, params=prm) for p, prm in zip(prompts, params)]
        if with_failure:
            tasks.insert(1, Task(prompt_tokens=prompts[0], n_predict=40,
                                 params=SamplingParams(grammar=BreaksAfterFive("root ::= [a-z ]*"))))
        sched.submit_all(tasks)
        return [t.outcome(timeout=60) for t in tasks]

    clean = run(False)
    mixed = run(True)
    assert isinstance(mixed[1], ErrorEvent) and "grammar engine bug" in mixed[1].message
    assert [f.tokens for f in (mixed[0], mixed[2])] == [f.tokens for f in clean]


def test_a_request_that_cannot_start_ends_alone(stories):
    """A sampler refused at a slot's start (here a grammar that rejects its prefill) fails that
    request only: the worker goes on and the next request is served."""
    from numllama.engine.grammar import Grammar
    from numllama.engine.sampling import SamplingParams
    from numllama.engine.slots import ErrorEvent, FinalEvent, Scheduler, Task
    tok = stories.tokenizer
    sched = Scheduler(stories, 1, 256)
    bad = Task(prompt_tokens=tok.encode("Once"), n_predict=4,
               params=SamplingParams(grammar=Grammar('root ::= "a"'), grammar_prefill="zzz"))
    good = Task(prompt_tokens=tok.encode("Once"), n_predict=4, params=SamplingParams(temperature=0))
    sched.submit_all([bad, good])
    outcome = [t.outcome(timeout=60) for t in (bad, good)]
    assert isinstance(outcome[0], ErrorEvent) and "generation prompt" in outcome[0].message
    assert isinstance(outcome[1], FinalEvent) and outcome[1].n_decoded == 4


def test_a_tasks_events_say_when_it_has_ended(stories):
    """A request that does not stream waits for its task's `events.ended` rather than for each
    token (webapp.completions.collect_finals): it is set by the last event, a result or an
    error, with every event before it already in the queue, and never before."""
    from numllama.engine.grammar import Grammar
    from numllama.engine.sampling import SamplingParams
    from numllama.engine.slots import ErrorEvent, FinalEvent, Scheduler, Task, TokenEvent
    tok = stories.tokenizer
    sched = Scheduler(stories, 2, 256)
    good = Task(prompt_tokens=tok.encode("Once"), n_predict=12, params=SamplingParams(temperature=0))
    bad = Task(prompt_tokens=tok.encode("Once"), n_predict=4,
               params=SamplingParams(grammar=Grammar('root ::= "a"'), grammar_prefill="zzz"))
    assert not good.events.ended.is_set()
    sched.submit_all([good, bad])
    assert good.events.ended.wait(60) and bad.events.ended.wait(60)
    events = [good.events.get_nowait() for _ in range(good.events.qsize())]
    assert [type(e) for e in events] == [TokenEvent] * 12 + [FinalEvent]
    assert isinstance(bad.events.get_nowait(), ErrorEvent) and bad.events.empty()


# ---------------------------------------------------------------------------------- 4. grammars
def test_long_repetitions_match_in_constant_depth():
    from numllama.engine.grammar import Grammar
    from numllama.engine.json_schema import json_schema_to_grammar
    g = Grammar("root ::= [a-z ,.]*")
    stacks = g.start
    for i in range(10_000):
        stacks = g.advance(stacks, "abc d"[i % 5])
        assert stacks and max(len(s) for s in stacks) <= 2
    assert g.accepts_end(stacks)
    g = Grammar(json_schema_to_grammar({"type": "object", "properties": {"name": {"type": "string"}}}))
    stacks = g.advance(g.start, '{"name": "')
    for i in range(8_000):   # far more than 2,000 tokens' worth of characters
        stacks = g.advance(stacks, "xy z"[i % 4])
        assert stacks
    assert g.accepts_end(g.advance(stacks, '"}'))


def test_long_grammar_output_over_http(server4):
    r = server4.post("/completion", {"prompt": "Once", "n_predict": 1500, "grammar": "root ::= [a-z ,.]*",
                                     "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens_predicted"] == 1500 and set(body["content"]) <= set("abcdefghijklmnopqrstuvwxyz ,.")


@pytest.mark.parametrize("grammar, words", [
    ('root ::= root "a" | "a"', ["left recursion", "root"]),
    ('root ::= x "b"\nx ::= y\ny ::= "" | x "c"', ["left recursion"]),
    ('root ::= "a"{100000000}', ["repetitions", "root"]),
    ('root ::= ' + "(" * 3000 + '"a"' + ")" * 3000, ["nested", "root"]),
])
def test_bad_grammars_are_refused_at_parse_time(server4, grammar, words):
    t0 = time.perf_counter()
    r = server4.post("/completion", {"prompt": "Once", "n_predict": 4, "grammar": grammar})
    assert r.status_code == 400 and time.perf_counter() - t0 < 2
    assert all(w in r.json()["error"]["message"] for w in words), r.text


def test_grammar_memory_returns_to_baseline(server4):
    def burst(first: int):
        for i in range(first, first + 50):
            r = server4.post("/completion", {"prompt": "Once", "n_predict": 8, "temperature": 0,
                                             "grammar": f'root ::= "a"{{{i % 40 + 1}}} [a-z ]{{0,{i}}}'})
            assert r.status_code == 200, r.text
    burst(0)
    base = server4.rss_mb()
    burst(50)
    burst(100)
    assert server4.rss_mb() <= base * 1.10, (base, server4.rss_mb())


# ---------------------------------------------------------------------------------- 5. cost before work
def test_huge_prompts_are_refused_before_tokenizing(server4):
    base = server4.rss_mb()
    text = "Once upon a time " * 300_000           # 5 MB
    t0 = time.perf_counter()
    for route, body in (("/completion", {"prompt": text}), ("/completion", {"prompt": [text, "hi"]}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
                        ("/tokenize", {"content": text}), ("/chat/completions/input_tokens",
                                                           {"messages": [{"role": "user", "content": text}]})):
        r = server4.post(route, body)
        assert r.status_code == 400, (route, r.text[:200])
    assert time.perf_counter() - t0 < 10
    r = server4.post("/completion", {"prompt": text})
    assert r.json()["error"]["type"] == "exceed_context_size_error"
    assert server4.rss_mb() < base + 150, (base, server4.rss_mb())


def test_too_many_prompts_in_one_request(server4):
    r = server4.post("/completion", {"prompt": ["Once"] * 1000, "n_predict": 1})
    assert r.status_code == 400 and "too many prompts" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------- 6. connections
def test_health_answers_under_idle_sockets_and_a_full_queue(stories_path):
    s = Server(["--ctx-size", "4096", "--parallel", "2", "--max-queue", "2"], model=stories_path)
    socks = []
    try:
        for _ in range(200):   # slowloris: connections that never send a request
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"GET /health HTTP/1.1\r\n")
            socks.append(c)
        time.sleep(0.3)
        code, dt = quick(s)
        assert code == 200 and dt < 0.1, dt
        statuses = []

        def long_one():
            r = requests.post(s.url + "/completion", json={"prompt": "Once", "n_predict": 3000, "ignore_eos": True},
                              timeout=120)
            statuses.append((r.status_code, r.headers.get("Retry-After")))
        workers = [threading.Thread(target=long_one) for _ in range(12)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        worst = max(quick(s)[1] for _ in range(10))
        assert worst < 0.1, worst
        for w in workers:
            w.join()
        refused = [st for st in statuses if st[0] == 503]
        assert len(refused) >= 12 - 4 and all(ra == "1" for _, ra in refused), statuses
        assert statuses.count((200, None)) >= 2
    finally:
        for c in socks:
            c.close()
        s.stop()


# ---------------------------------------------------------------------------------- 7. odd values
ODD_BODIES = [
    ("/completion", '{"prompt": "\\ud800", "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "stop": ["\\udc00"], "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "grammar": "root ::= \\"\\ud800\\"", "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "logit_bias": {"\\ud800": 1}, "n_predict": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
    ("/apply-template", '{"messages": [{"role": "user", "content": "x\\udfff"}]}'),
    ("/completion", '{"prompt": "Once", "temperature": 1e308, "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "repeat_penalty": 1e308, "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "dynatemp_range": 1e308, "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "logit_bias": [[5, NaN]], "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "temperature": Infinity, "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "temperature": 1e999, "n_predict": 2}'),
    ("/completion", '{"prompt": "Once", "json_schema": {"type": "string", "minLength": -1}}'),
    ("/completion", '{"prompt": "Once", "json_schema": {"type": "object", "properties": 5}}'),
    ("/completion", '{"prompt": "Once", "json_schema": {"type": "array", "items": 5}}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "response_format": '
                             '{"type": "json_object", "schema": {"type": "string", "pattern": "^(a$"}}}'),
    ("/completion", '{"prompt": "Once", "' + "a" * 10 + '": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("/completion", '{"prompt": "Once", "grammar": "root ::= ' + "(" * 3000 + '\\"a\\"' + ")" * 3000 + '"}'),
]


@pytest.mark.parametrize("route, body", ODD_BODIES, ids=range(len(ODD_BODIES)))
def test_odd_values_are_400s(server4, route, body):
    r = requests.post(server4.url + route, data=body.encode(), timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["code"] == 400


def test_odd_values_that_are_not_errors(server4):
    # llama-server accepts these; they must not be 500s
    bodies = [{"prompt": "Once", "n_predict": 2, "logit_bias": {"9" * 5000: 1}},
              {"prompt": "Once", "n_predict": 2, "logit_bias": {"²": 1}},
              {"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"messages": 5},
               "max_tokens": 2},
              {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
               "chat_template_kwargs": {"add_generation_prompt": "x", "bos_token": [1]}}]
    for body in bodies:
        route = "/v1/chat/completions" if "messages" in body else "/completion"
        r = server4.post(route, body)
        assert r.status_code == 200, (body, r.text[:300])
    r = server4.post("/completion", {"prompt": "Once", "n_predict": 3, "n_probs": 1_000_000})
    assert r.status_code == 200
    probs = r.json()["completion_probabilities"]
    assert all(len(p["top_logprobs"]) == 100 for p in probs)
    assert server4.get("/props").json()["n_probs_max"] == 100
    assert server4.post("/slots/\u00b2?action=save", {"filename": "x"}).status_code == 400


def test_client_errors_log_one_line_and_no_traceback(server4):
    before = server4.output()
    for body in ('{"prompt": "\\ud800"}', "{", '{"prompt": "x", "temperature": "hot"}'):
        requests.post(server4.url + "/completion", data=body, timeout=10)
    time.sleep(0.2)
    new = server4.output()[len(before):]
    assert "Traceback" not in new
    assert new.count("POST /completion -> 400") == 3, new


# ---------------------------------------------------------------------------------- 8. low
def test_api_key_guards_slots_and_save_paths_stay_private(stories_path, tmp_path):
    s = Server(TINYLLAMA2 + ["--slots", "--api-key", "secret", "--slot-save-path", str(tmp_path)],
               model=stories_path)
    try:
        assert s.get("/slots").status_code == 401
        assert s.get("/slots", headers={"Authorization": "Bearer secre"}).status_code == 401
        assert s.get("/slots", headers={"Authorization": "Bearer secret"}).status_code == 200
        r = s.post("/slots/0?action=save", {"filename": "x" * 300}, headers={"Authorization": "Bearer secret"})
        assert r.status_code == 400 and str(tmp_path) not in r.text
    finally:
        s.stop()


def test_reserved_paths_have_threads_of_their_own():
    """/health still runs when every general thread is busy (here: the general pool has one
    thread, blocked until the health check has been served)."""
    from types import SimpleNamespace

    from numllama.webapp.serving import ReservedPathDispatcher
    d = ReservedPathDispatcher(1)
    served, release = [], threading.Event()

    def channel(command, path, block=False):
        def service():
            if block:
                release.wait(10)
            served.append(path)
        return SimpleNamespace(requests=[SimpleNamespace(command=command, path=path)], service=service)
    try:
        d.add_task(channel("POST", "/completion", block=True))
        d.add_task(channel("GET", "/health"))
        deadline = time.time() + 5
        while "/health" not in served and time.time() < deadline:
            time.sleep(0.01)
        assert served == ["/health"]
    finally:
        release.set()
        d.shutdown(timeout=5)
