"""Constrained generation of numllama-server and llama-server side by side: JSON schemas
(`json_schema` on /completion, `response_format` on /v1/chat/completions) and GBNF grammars,
each greedy and seeded, on the same model. Counts the requests whose tokens are identical.

    python3 bench/compare_constrained.py MODEL.gguf --llama-server /path/to/llama-server [-v]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import requests

from compare_tokens import add_server_args, running   # beside this file

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "tags": {
        "type": "array", "items": {"type": "string"}, "maxItems": 3}}, "required": ["name"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}, "minItems": 2, "maxItems": 5},
    {"enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"},
                                      "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
     "required": ["date", "id"], "additionalProperties": False},
    {"type": "object", "additionalProperties": {"type": "number"}},
    {"oneOf": [{"type": "boolean"}, {"type": "null"}, {"type": "object", "properties": {"ok": {"const": True}}}]},
    {},
]
GRAMMARS = ['root ::= ("yes" | "no") "." ', 'root ::= [a-z]+ (" " [a-z]+){2,4} "."']
PROMPTS = ["Describe a person as JSON:", "Once upon a time"]
SAMPLING = [{"temperature": 0}, {"temperature": 0.8, "seed": 42}, {"temperature": 1.0, "seed": 7}]


def requests_to_make(chat_only: bool = False) -> list[tuple[str, dict]]:
    out = []
    for prompt in PROMPTS:
        for sampling in SAMPLING:
            for schema in SCHEMAS:
                out.append(("/completion", {"prompt": prompt, "json_schema": schema, **sampling}))
            for grammar in GRAMMARS:
                out.append(("/completion", {"prompt": prompt, "grammar": grammar, **sampling}))
            out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **sampling,
                                                 "response_format": {"type": "json_schema",
                                                                     "json_schema": {"schema": PERSON}}}))
            out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **sampling,
                                                 "response_format": {"type": "json_object"}}))
    return [r for r in out if r[0] != "/completion"] if chat_only else out


def with_limits(body: dict, n_predict: int) -> dict:
    return {**body, "n_predict": n_predict, "max_tokens": n_predict, "cache_prompt": False, "return_tokens": True}


def answers(binary: str, model: str, n_predict: int, chat_only: bool = False) -> list:
    with running(binary, model) as url:
        out = []
        for route, body in requests_to_make(chat_only):
            body = with_limits(body, n_predict)
            r = requests.post(url + route, json=body, timeout=600)
            b = r.json()
            if r.status_code != 200:
                out.append(("error", r.status_code))
            elif route == "/completion":
                out.append((b["content"], b["tokens"], b["stop_type"]))
            else:
                out.append((b["choices"][0]["message"]["content"], b["choices"][0]["finish_reason"]))
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    add_server_args(ap)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--chat-only", action="store_true", help="only the chat response_format requests")
    ap.add_argument("--record", metavar="JSON", help="also write llama-server's answers there (a golden file)")
    args = ap.parse_args()
    if not args.llama_server:
        ap.error("give --llama-server (or set LLAMA_SERVER_BIN)")
    theirs = answers(args.llama_server, args.model, args.n_predict, args.chat_only)
    ours = answers(args.numllama_server, args.model, args.n_predict, args.chat_only)
    made = requests_to_make(args.chat_only)
    if args.record:
        with open(args.record, "w") as f:
            json.dump({"model": os.path.basename(args.model), "producer": "bench/compare_constrained.py --record, "
                       "llama-server built for AVX2 from the llama-cpp-python 0.3.36 sdist",
                       "requests": [[route, with_limits(body, args.n_predict)] for route, body in made],
                       "answers": theirs}, f, indent=1)
    same = 0
    for (route, body), a, b in zip(made, theirs, ours):
        same += a == b
        if a != b and args.verbose:
            what = body.get("json_schema", body.get("grammar", body.get("response_format")))
            print(f"{route} {what} {({k: body[k] for k in ('temperature', 'seed') if k in body})}\n"
                  f"  llama-server: {a[0]!r}\n  numllama:     {b[0]!r}")
    print(f"identical: {same}/{len(theirs)}")
    return 0 if same == len(theirs) else 1


if __name__ == "__main__":
    sys.exit(main())
