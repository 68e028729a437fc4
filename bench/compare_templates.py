"""Chat templates as numllama-server and llama-server render them (POST /apply-template).

Each template file is given to both servers with --chat-template-file (on stories260K: only the
text matters here), and the same conversations are rendered: plain, with a system message, a
few turns, with tools, and with a tool call and its result. Prints every difference.

    python3 bench/compare_templates.py TEMPLATE.jinja ... --llama-server /path/to/llama-server \\
        [--record tests/data/chat-templates.json]

With --no-jinja both servers take llama.cpp's legacy path (hand-written formats picked by the
template's markers, engine/legacy_chat.py), and the conversations are LEGACY_CONVERSATIONS
(no tools there: both refuse them): the prompts, or the status where a template fits no format.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import requests

from compare_tokens import add_server_args, start   # beside this file

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


# --no-jinja: roles and contents only, and what the legacy path does with them: a system turn,
# several turns with whitespace to trim, a continued (prefilled) assistant turn, text parts (an
# empty first one), roles of other names, no generation prompt
LEGACY_CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hello"}]},
    {"messages": [{"role": "system", "content": " You are terse.\n"}, {"role": "user", "content": "Hi  there\n"},
                  {"role": "assistant", "content": "  Hello!  "}, {"role": "user", "content": "and 3+3?"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "a"},
                                               {"type": "text", "text": "b"}]}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "sunny"},
                  {"role": "developer", "content": "d"}]},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
     "add_generation_prompt": False},
]


def render_all(binary: str, model: str, template: str, no_jinja: bool = False) -> list:
    """Per conversation: the prompt, or the HTTP status of a refusal (or None: the server
    refused the template at start)."""
    flags = ("-c", "512", "-np", "1", "--chat-template-file", template) + (("--no-jinja",) if no_jinja else ())
    conversations = LEGACY_CONVERSATIONS if no_jinja else CONVERSATIONS
    try:
        proc, url = start(binary, model, flags)
    except SystemExit:   # (start gives up when the server exits: it refused the template)
        return [None] * len(conversations)
    try:
        out = []
        for conv in conversations:
            r = requests.post(url + "/apply-template", json=conv, timeout=60)
            out.append(r.json()["prompt"] if r.status_code == 200 else r.status_code)
        return out
    finally:
        proc.terminate()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("templates", nargs="+")
    add_server_args(ap)
    ap.add_argument("--model", default=os.path.join(REPO, "tests", "data", "stories260K.gguf"))
    ap.add_argument("--record", metavar="JSON", help="write llama-server's renderings there")
    ap.add_argument("--no-jinja", action="store_true", help="both servers on llama.cpp's legacy path")
    args = ap.parse_args()
    if not args.llama_server:
        ap.error("give --llama-server (or set LLAMA_SERVER_BIN)")
    golden, same, total = {}, 0, 0
    for template in args.templates:
        theirs = render_all(args.llama_server, args.model, template, args.no_jinja)
        ours = render_all(args.numllama_server, args.model, template, args.no_jinja)
        golden[os.path.basename(template)] = theirs
        for i, (a, b) in enumerate(zip(theirs, ours)):
            total += 1
            same += a == b
            if a != b:
                print(f"{os.path.basename(template)}, conversation {i}:\n  llama-server: {a!r}\n  numllama:     {b!r}")
    print(f"identical renderings: {same}/{total}")
    if args.record:
        with open(args.record, "w") as f:
            json.dump({"producer": f"bench/compare_templates.py{' --no-jinja' if args.no_jinja else ''} --record, "
                       "llama-server from the llama-cpp-python 0.3.36 sdist, on stories260K (BOS <s>, added by "
                       "the tokenizer)",
                       "no_jinja": args.no_jinja,
                       "conversations": LEGACY_CONVERSATIONS if args.no_jinja else CONVERSATIONS,
                       "renderings": golden}, f, indent=1)
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
