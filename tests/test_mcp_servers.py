"""--mcp-servers-json / --mcp-servers-config: MCP servers' tools at /tools, as llama-server
offers them (tests/data/mcp_fixture_server.py is the MCP server)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from numllama.webapp.mcp_servers import load_configs, parse_config, result_text

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mcp_fixture_server.py")
KEY = {"Authorization": "Bearer k"}


def _config(**servers) -> str:
    return json.dumps({"mcpServers": servers})


@pytest.fixture(scope="module")
def mcp_server(stories_path):
    from server_util import Server
    cfg = _config(fx={"command": sys.executable, "args": [FIXTURE], "timeout_ms": 1500},
                  gone={"command": "no-such-command-12345"})
    s = Server(["-c", "256", "--api-key", "k", "--tools", "read_file", "--mcp-servers-json", cfg],
               model=stories_path)
    yield s
    s.stop()


def _call(s, tool, params=None):
    r = s.post("/tools", {"tool": tool, "params": params or {}}, headers=KEY)
    assert r.status_code == 200, r.text
    return r.json()


def test_tools_are_listed_with_the_server_name(mcp_server):
    tools = {t["tool"]: t for t in mcp_server.get("/tools", headers=KEY).json()}
    assert set(tools) == {"read_file", "fx_echo", "fx_fail", "fx_sleep", "fx_crash"}   # "gone" never started
    echo = tools["fx_echo"]
    assert echo["type"] == "mcp" and not echo["uses_cwd"] and not echo["permissions"]["write"]
    assert echo["definition"] == {"type": "function", "function": {
        "name": "fx_echo", "description": "Echo a message",
        "parameters": {"type": "object", "properties": {"message": {"type": "string"}}}}}


def test_calls_and_their_failures(mcp_server):
    s = mcp_server
    assert _call(s, "fx_echo", {"message": "hi"}) == {"plain_text_response": "echo: hi"}
    assert _call(s, "fx_fail") == {"error": "it failed"}
    assert _call(s, "fx_sleep", {"seconds": 2}) == {"error": "request timed out"}   # timeout_ms 1500
    assert _call(s, "fx_echo", {"message": "again"}) == {"plain_text_response": "echo: again"}  # the late reply is skipped
    assert _call(s, "fx_crash") == {"error": "transport closed"}
    assert _call(s, "fx_echo", {"message": "back"}) == {"plain_text_response": "echo: back"}   # started again
    r = s.post("/tools", {"tool": "fx_echo", "params": {}})
    assert r.status_code == 401


def test_configuration_errors_stop_the_server_at_once(tmp_path):
    for flags, text in ((["--mcp-servers-json", "not json"], "failed to parse MCP config JSON"),
                        (["--mcp-servers-config", str(tmp_path / "none.json")], "failed to open MCP config file"),
                        (["--mcp-servers-json", _config(x={"command": "true"})], "give an --api-key")):
        p = subprocess.run([sys.executable, "-m", "numllama.webapp.server", "-m", "x.gguf", *flags],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and text in p.stderr


def test_config_format():
    cfgs = parse_config(_config(a={"command": "c", "args": ["1"], "env": {"K": "v"}, "timeout_ms": 5},
                                b={"args": []}))   # (no command: skipped)
    assert [(c.name, c.command, c.args, c.env, c.timeout_ms) for c in cfgs] == [("a", "c", ("1",), {"K": "v"}, 5)]
    assert parse_config("{}") == []
    with pytest.raises(ValueError):
        parse_config(_config(a={"command": "c", "args": "x"}))
    assert [c.name for c in load_configs(None, _config(a={"command": "c"}, b={"command": "d"}))] == ["a", "b"]
    assert result_text({"content": [{"type": "text", "text": "x"}, {"type": "image"}, {"type": "text", "text": "y"}]}) \
        == {"plain_text_response": "x\ny"}
