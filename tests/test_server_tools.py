"""/tools, /cors-proxy and the CORS default they bring, over HTTP (llama.cpp's test_security.py
checks the same two behaviours)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from server_util import TINYLLAMA2, Server

KEY = "sk-tools-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(stories_path):
    # the proxy test below runs its target on 127.0.0.1, which needs --cors-proxy-allow-private
    s = Server(TINYLLAMA2 + ["--tools", "all", "--ui-mcp-proxy", "--api-key", KEY, "--cors-proxy-allow-private"],
               model=stories_path)
    yield s
    s.stop()


def test_tools_listed_with_permissions(server):
    assert server.get("/tools").status_code == 401          # behind the API key like the rest
    tools = server.get("/tools", headers=AUTH).json()
    assert [t["tool"] for t in tools] == ["read_file", "file_glob_search", "grep_search",
                                          "exec_shell_command", "write_file", "edit_file", "get_info"]
    shell = tools[3]
    assert shell["permissions"] == {"write": True} and shell["type"] == "server"
    assert shell["definition"]["function"]["parameters"]["required"] == ["command"]


def test_tool_calls_use_the_cwd_header(server, tmp_path):
    hdr = {**AUTH, "X-Tool-Cwd": str(tmp_path)}
    r = server.post("/tools", {"tool": "write_file", "params": {"path": "notes.txt", "content": "hello\n"}}, headers=hdr)
    assert r.status_code == 200 and r.json()["bytes"] == 6
    assert (tmp_path / "notes.txt").read_text() == "hello\n"
    r = server.post("/tools", {"tool": "read_file", "params": {"path": "notes.txt", "cwd": "/"}}, headers=hdr)
    assert r.json() == {"plain_text_response": "hello\n"}   # "cwd" in params is the model's: ignored
    r = server.post("/tools", {"tool": "read_file", "params": {"path": "missing"}}, headers=hdr)
    assert r.status_code == 200 and r.json() == {"error": "cannot stat file: missing"}
    r = server.post("/tools", {"tool": "exec_shell_command", "params": {"command": "pwd"}},
                    headers={**AUTH, "X-Tool-Cwd": str(tmp_path / "no-such-folder")})
    assert r.status_code == 200 and r.json()["error"].startswith("cannot run the command")


def test_tool_errors(server):
    r = server.post("/tools", {"tool": "nope"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["message"] == 'unknown tool "nope"'
    r = server.post("/tools", {"tool": "read_file", "stream": True, "params": {"path": "x"}}, headers=AUTH)
    assert r.status_code == 404 and "does not support stream" in r.json()["error"]["message"]
    r = server.post("/tools", {"tool": "read_file", "params": {}}, headers=AUTH)
    assert r.status_code == 400 and "missing parameter 'path'" in r.json()["error"]["message"]
    r = requests.post(server.url + "/tools", data="{not json", timeout=10,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(server.url + "/tools", data='{"tool": "get_info"}', headers=AUTH, timeout=10)
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    assert server.get("/health").status_code == 200


def test_shell_streams(server):
    r = requests.post(server.url + "/tools", json={"tool": "exec_shell_command", "stream": True,
                                                   "params": {"command": "echo one; sleep 0.2; echo two"}},
                      headers=AUTH, stream=True, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == {"done": True}
    assert "".join(e["chunk"] for e in events[:-1]) == "one\ntwo\n\n[exit code: 0]"
    r = requests.post(server.url + "/tools", json={"tool": "exec_shell_command", "stream": True,
                                                   "params": {"command": "pwd"}},
                      headers={**AUTH, "X-Tool-Cwd": "/no/such/folder"}, stream=True, timeout=30)
    events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1]["done"] and events[-1]["error"].startswith("cannot run the command")


def test_cors_defaults_to_localhost_with_tools(server):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"}
    r = requests.options(server.url + "/completions", headers={"Origin": "http://localhost:5173", **pre}, timeout=10)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    r = requests.options(server.url + "/completions", headers={"Origin": "http://evil.com", **pre}, timeout=10)
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_cors_proxy_forwards_only_named_headers(server):
    class Capture(BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.seen = dict(self.headers)
            self.send_response(201)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"upstream body")

        def log_message(self, *a):
            pass

    target = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=target.serve_forever, daemon=True).start()
    try:
        r = server.get(f"/cors-proxy?url=http://127.0.0.1:{target.server_port}/x", headers={
            **AUTH, "Cookie": "s=secret", "X-Api-Key": KEY,
            "x-llama-server-proxy-header-authorization": "Bearer upstream-token"})
        assert r.status_code == 201 and r.text == "upstream body"
        seen = {k.lower(): v for k, v in target.seen.items()}
        assert seen["authorization"] == "Bearer upstream-token"
        assert "cookie" not in seen and "x-api-key" not in seen
    finally:
        target.shutdown()
        target.server_close()
    r = server.get("/cors-proxy?url=file:///etc/passwd", headers=AUTH)
    assert r.status_code == 400 and "unsupported URL scheme" in r.json()["error"]["message"]
    for bad in ("http://[::1/", "http://example.com:port/"):   # malformed: the client's fault
        r = server.get("/cors-proxy", params={"url": bad}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("invalid target URL")
    r = server.get("/cors-proxy?url=http://127.0.0.1:1/", headers=AUTH)
    assert r.status_code == 502
    assert server.get("/health").status_code == 200


def test_a_tool_runtime_is_refused_not_ignored(server, stories_path):
    r = requests.post(server.url + "/tools", json={"tool": "exec_shell_command", "params": {"command": "echo hi"}},
                      headers={**AUTH, "X-Tool-Runtime": "ssh:-oProxyCommand=x"}, timeout=10)
    assert r.status_code == 500 and r.json()["error"]["message"] == "invalid ssh target: -oProxyCommand=x"
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "numllama.webapp.server", "-m", stories_path, "--tools", "all",
                        "--api-key", KEY, "--tools-runtime", "docker:ubuntu"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--tools-runtime: numllama runs tools on this machine only" in p.stderr


def test_features_off_by_default(stories_path):
    s = Server(TINYLLAMA2, model=stories_path)
    try:
        for method, path in (("GET", "/tools"), ("POST", "/tools"), ("GET", "/cors-proxy?url=http://x/")):
            r = requests.request(method, s.url + path, json={}, timeout=10)
            assert r.status_code == 403 and r.json()["error"]["type"] == "feature_disabled"
        r = requests.options(s.url + "/completions", headers={"Origin": "http://evil.com"}, timeout=10)
        assert r.headers["Access-Control-Allow-Origin"] == "http://evil.com"   # "*" without tools
    finally:
        s.stop()
