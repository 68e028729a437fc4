"""--mcp-servers-config / --mcp-servers-json: the server as a client of MCP servers, whose tools
join the agent tools at /tools, as llama-server does it.

The configuration is Cursor's: {"mcpServers": {"name": {"command", "args", "env", "cwd",
"timeout_ms"}}}. Each server is a child process speaking JSON-RPC 2.0 over stdio, one JSON
message per line (MCP's stdio transport). At start-up every server is started once to list its
tools (at most WARMUP_S each), then stopped; a tool "t" of server "s" is offered as "s_t". A
call starts the server again if it is not running (a server that cannot start is not retried
for COOLDOWN_S), sends tools/call and waits at most timeout_ms for the reply with its id
(notifications and stale replies are skipped). Calls to one server go one at a time.

Like --tools, this runs commands on this machine, so it needs an API key (or
--unsafe-no-api-key).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("numllama.mcp")
PROTOCOL_VERSION = "2024-11-05"
WARMUP_S = 10.0
COOLDOWN_S = 5.0
DEFAULT_TIMEOUT_MS = 30000
STDERR_TAIL = 4096    # bytes of a server's stderr kept to explain its death
POLL_S = 0.05


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str
    args: tuple = ()
    env: dict = field(default_factory=dict)   # over the server's own environment
    cwd: str = ""
    timeout_ms: int = DEFAULT_TIMEOUT_MS      # per call


def parse_config(text: str) -> list[McpServerConfig]:
    """Cursor's format; without "mcpServers" there are none, an entry without a command is
    skipped. Raises ValueError for what is not JSON or has the wrong types."""
    data = json.loads(text)
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        return []
    out = []
    for name, cfg in servers.items():
        if not isinstance(cfg, dict):
            raise ValueError(f"MCP server {name!r}: must be an object")
        args, env = cfg.get("args", []), cfg.get("env", {})
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError(f"MCP server {name!r}: 'args' must be an array of strings")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ValueError(f"MCP server {name!r}: 'env' must be an object of strings")
        timeout = cfg.get("timeout_ms", DEFAULT_TIMEOUT_MS)
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"MCP server {name!r}: 'timeout_ms' must be a positive integer")
        if not isinstance(cfg.get("command", ""), str) or not cfg.get("command"):
            log.warning("MCP server %r has no command, skipping", name)
            continue
        out.append(McpServerConfig(name, cfg["command"], tuple(args), dict(env), str(cfg.get("cwd", "")), timeout))
    return out


def load_configs(config_file: str | None, inline_json: str | None) -> list[McpServerConfig]:
    """Both sources, the file's first; a name given twice keeps its first definition.
    Raises ValueError naming what is wrong."""
    texts = []
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                texts.append(f.read())
        except OSError as e:
            raise ValueError(f"failed to open MCP config file: {config_file}: {e.strerror}") from None
    if inline_json:
        texts.append(inline_json)
    out: list[McpServerConfig] = []
    for text in texts:
        try:
            parsed = parse_config(text)
        except ValueError as e:
            raise ValueError(f"failed to parse MCP config JSON: {e}") from None
        for cfg in parsed:
            if any(c.name == cfg.name for c in out):
                log.warning("MCP config: duplicate server name %r, skipping", cfg.name)
            else:
                out.append(cfg)
    return out


@dataclass(frozen=True)
class McpTool:
    server: str
    name: str            # as the server names it
    description: str
    input_schema: dict


def result_text(result) -> dict:
    """A tools/call result as /tools answers: its text parts joined, or its error."""
    parts = result.get("content") if isinstance(result, dict) else None
    text = "\n".join(p.get("text", "") for p in parts or [] if isinstance(p, dict) and p.get("type") == "text")
    if isinstance(result, dict) and result.get("isError"):
        return {"error": text or "MCP tool returned an error"}
    return {"plain_text_response": text}


class McpSession:
    """One running MCP server: its process, a thread reading its replies line by line, another
    draining its stderr (an undrained pipe would block it)."""

    def __init__(self, cfg: McpServerConfig):
        self.cfg = cfg
        self.replies: queue.Queue = queue.Queue()
        self.lock = threading.Lock()   # one call at a time: replies are matched by id
        self.next_id = 1
        self.initialized = False
        self.err_tail = b""
        self.closed = False   # its stdout has ended
        self.proc = subprocess.Popen(
            [cfg.command, *cfg.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=cfg.cwd or None, env={**os.environ, **cfg.env},
            start_new_session=True)   # its own process group: closing it stops what it started too
        threading.Thread(target=self._read, name=f"mcp-{cfg.name}-out", daemon=True).start()
        threading.Thread(target=self._drain, name=f"mcp-{cfg.name}-err", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                self.replies.put(line)
        self.closed = True
        self.replies.put(None)   # EOF: the server is gone

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.err_tail = (self.err_tail + line)[-STDERR_TAIL:]

    def alive(self) -> bool:
        return not self.closed and self.proc.poll() is None

    def close(self) -> None:
        """Stop the server and whatever it started (its process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass

    def _send(self, message: dict) -> bool:
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def rpc(self, method: str, params: dict | None, deadline: float, stopping) -> dict:
        """Send a request and wait for the reply with its id (until the deadline, or `stopping`)."""
        req = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            req["params"] = params
        self.next_id += 1
        if not self._send(req):
            return {"error": {"message": "transport closed"}}
        while True:
            if stopping():
                return {"error": {"message": "cancelled"}}
            left = deadline - time.monotonic()
            if left <= 0:
                return {"error": {"message": "request timed out"}}
            try:
                line = self.replies.get(timeout=min(left, POLL_S))
            except queue.Empty:
                continue
            if line is None:
                self.replies.put(None)   # (stays closed for whoever asks next)
                return {"error": {"message": "transport closed"}}
            try:
                reply = json.loads(line)
            except ValueError:
                continue   # a malformed line
            if isinstance(reply, dict) and reply.get("id") == req["id"]:
                return reply
            # otherwise a notification, or the late reply of a request that timed out

    def _ensure_init(self, deadline: float, stopping) -> str | None:
        """The initialize handshake, once; an error message if it failed."""
        if self.initialized:
            return None
        reply = self.rpc("initialize", {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                                        "clientInfo": {"name": "numllama", "version": "1.0"}}, deadline, stopping)
        if "result" not in reply:
            return f"initialize failed: {_message(reply)}"
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.initialized = True
        return None

    def list_tools(self, deadline: float, stopping) -> list[McpTool]:
        with self.lock:
            if (err := self._ensure_init(deadline, stopping)) is not None:
                log.warning("MCP %r: %s", self.cfg.name, err)
                return []
            reply = self.rpc("tools/list", None, deadline, stopping)
        tools = (reply.get("result") or {}).get("tools") if isinstance(reply.get("result"), dict) else None
        if not isinstance(tools, list):
            log.warning("MCP %r: tools/list failed: %s", self.cfg.name, _message(reply))
            return []
        return [McpTool(self.cfg.name, str(t.get("name", "")), str(t.get("description", "")),
                        t["inputSchema"] if isinstance(t.get("inputSchema"), dict) else {})
                for t in tools if isinstance(t, dict)]

    def call(self, tool: str, arguments: dict, stopping) -> dict:
        deadline = time.monotonic() + self.cfg.timeout_ms / 1000
        with self.lock:
            if (err := self._ensure_init(deadline, stopping)) is not None:
                return {"error": err}
            reply = self.rpc("tools/call", {"name": tool, "arguments": arguments}, deadline, stopping)
        if "error" in reply:
            return {"error": _message(reply)}
        if "result" in reply:
            return result_text(reply["result"])
        return {"error": "invalid response from MCP server"}


def _message(reply: dict) -> str:
    e = reply.get("error")
    if isinstance(e, dict):
        return str(e.get("message", "unknown error"))
    return e if isinstance(e, str) else "unknown error"


class McpServers:
    """The configured servers: the tools found at start-up, and a running session per server
    for calls."""

    def __init__(self, configs: list[McpServerConfig]):
        self.configs = {c.name: c for c in configs}
        self.tools: list[McpTool] = []
        self.sessions: dict[str, McpSession] = {}
        self.dead_until: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def warm_up(self) -> None:
        """Start every server once to list its tools, then stop it."""
        found = []
        for cfg in self.configs.values():
            try:
                session = McpSession(cfg)
            except OSError as e:
                log.warning("MCP warmup: failed to spawn %r: %s", cfg.name, e)
                continue
            try:
                tools = session.list_tools(time.monotonic() + WARMUP_S, self.stopping.is_set)
                log.info("MCP warmup: %r has %d tools", cfg.name, len(tools))
                found += tools
            finally:
                session.close()
        self.tools = found

    def _session(self, name: str) -> McpSession | None:
        """The server's running session, started if need be (None: it cannot start now)."""
        with self.lock:
            if self.stopping.is_set() or name not in self.configs:
                return None
            if time.monotonic() < self.dead_until.get(name, 0.0):
                return None
            session = self.sessions.get(name)
            if session is not None and session.alive():
                return session
            if session is not None:
                log.warning("MCP %r is no longer running: %s", name, session.err_tail.decode("utf-8", "replace")[-300:])
                session.close()
            try:
                session = self.sessions[name] = McpSession(self.configs[name])
                return session
            except OSError as e:
                log.warning("MCP %r: failed to start: %s", name, e)
                self.sessions.pop(name, None)
                self.dead_until[name] = time.monotonic() + COOLDOWN_S
                return None

    def call(self, server: str, tool: str, arguments: dict) -> dict:
        session = self._session(server)
        if session is None:
            return {"error": f"MCP server unavailable: {server}"}
        return session.call(tool, arguments, self.stopping.is_set)

    def shutdown(self) -> None:
        """Cancel the calls in flight and stop every server."""
        self.stopping.set()
        with self.lock:
            for session in self.sessions.values():
                session.close()
            self.sessions.clear()
