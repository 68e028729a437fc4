"""A small MCP server (JSON-RPC 2.0 over stdio, one message per line) for tests/test_mcp_servers.py:
tools echo, fail (an isError result), sleep (replies after `seconds`) and crash (exits); it
sends a notification before every reply, as servers may."""
import json
import sys
import time

TOOLS = [{"name": n, "description": d, "inputSchema": {"type": "object", "properties": p}}
         for n, d, p in (("echo", "Echo a message", {"message": {"type": "string"}}),
                         ("fail", "Always fails", {}),
                         ("sleep", "Sleep a while", {"seconds": {"type": "number"}}),
                         ("crash", "Exit at once", {}))]


def reply(req_id, **body):
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/progress"}) + "\n")
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": req_id, **body}) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    req = json.loads(line)
    method, rid, params = req.get("method"), req.get("id"), req.get("params") or {}
    if rid is None:
        continue   # a notification
    if method == "initialize":
        reply(rid, result={"protocolVersion": "2024-11-05", "capabilities": {"tools": {}},
                           "serverInfo": {"name": "fixture", "version": "1"}})
    elif method == "tools/list":
        reply(rid, result={"tools": TOOLS})
    elif method == "tools/call":
        name, args = params.get("name"), params.get("arguments") or {}
        if name == "echo":
            reply(rid, result={"content": [{"type": "text", "text": "echo: " + args.get("message", "")}]})
        elif name == "fail":
            reply(rid, result={"content": [{"type": "text", "text": "it failed"}], "isError": True})
        elif name == "sleep":
            time.sleep(args.get("seconds", 1))
            reply(rid, result={"content": [{"type": "text", "text": "slept"}]})
        elif name == "crash":
            sys.exit(3)
        else:
            reply(rid, error={"code": -32602, "message": f"unknown tool {name}"})
    else:
        reply(rid, error={"code": -32601, "message": "Method not found"})
