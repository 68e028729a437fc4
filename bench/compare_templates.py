"""Chat templates as numllama-server and llama-server render them (POST /apply-template).

Each template file is given to both servers with --chat-template-file (on stories260K: only the
text matters here), and the same conversations are rendered: plain, with a system message, a
few turns, with tools, and with a tool call and its result. Prints every difference.

    python3 bench/compare_templates.py TEMPLATE.jinja ... --llama-server /path/to/llama-server \\
        [--record tests/data/chat-templates.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import requests

from compare_tokens import add_server_args, running   # beside this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hello"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi  there\n"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": "c1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": TOOLS},
]


def render_all(binary: str, model: str, template: str) -> list:
    """Per conversation: the prompt, or the HTTP status of a refusal."""
    with running(binary, model, ("-c", "512", "-np", "1", "--chat-template-file", template)) as url:
        out = []
        for conv in CONVERSATIONS:
            r = requests.post(url + "/apply-template", json=conv, timeout=60)
            out.append(r.json()["prompt"] if r.status_code == 200 else r.status_code)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("templates", nargs="+")
    add_server_args(ap)
    ap.add_argument("--model", default=os.path.join(REPO, "tests", "data", "stories260K.gguf"))
    ap.add_argument("--record", metavar="JSON", help="write llama-server's renderings there")
    args = ap.parse_args()
    if not args.llama_server:
        ap.error("give --llama-server (or set LLAMA_SERVER_BIN)")
    golden, same, total = {}, 0, 0
    for template in args.templates:
        theirs = render_all(args.llama_server, args.model, template)
        ours = render_all(args.numllama_server, args.model, template)
        golden[os.path.basename(template)] = theirs
        for i, (a, b) in enumerate(zip(theirs, ours)):
            total += 1
            same += a == b
            if a != b:
                print(f"{os.path.basename(template)}, conversation {i}:\n  llama-server: {a!r}\n  numllama:     {b!r}")
    print(f"identical renderings: {same}/{total}")
    if args.record:
        with open(args.record, "w") as f:
            json.dump({"producer": "bench/compare_templates.py --record, llama-server from the llama-cpp-python "
                       "0.3.36 sdist, on stories260K (BOS <s>, added by the tokenizer)",
                       "conversations": CONVERSATIONS, "renderings": golden}, f, indent=1)
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
