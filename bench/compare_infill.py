"""POST /infill against numllama-server and llama-server on the same file: stories260K with
FIM tokens added (tests/fim_model.py), greedy. Compares the prompt laid out (the tokens
evaluated, the prompt text), the tokens generated and the content, for prefix/suffix cuts,
extra chunks, --spm-infill, token-list prefixes and refused inputs. Not compared: a prompt
that is not a string, or a missing input_prefix/input_suffix, which numllama refuses (400) and
llama-server means to refuse but goes on with (its handler sets the error and does not return).

    python3 bench/compare_infill.py --llama-server /path/to/llama-server [--record tests/data/infill.json] [-v]
"""
from __future__ import annotations

import json
import os
import sys

import requests

from compare_tokens import recording_args, running, write_golden   # beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from fim_model import write_fim_model  # noqa: E402

SRC = os.path.join(HERE, "..", "tests", "data", "stories260K.gguf")
EXTRA = [{"filename": "llama.h", "text": "LLAMA_API int32_t llama_n_threads();\n"},
         {"filename": "util.h", "text": "int helper(int x);\n"}]
BASE = {"input_prefix": "#include <cstdio>\n#include \"llama.h\"\n\nint main() {\n",
        "prompt": "    int n_threads = llama_", "input_suffix": "}\n", "temperature": 0, "n_predict": 12,
        "return_tokens": True}
CASES = {
    "plain": [
        BASE,
        {**BASE, "input_extra": EXTRA},
        {**BASE, "input_extra": [{"text": "no file name\n"}]},
        {**BASE, "input_prefix": "Once upon a time " * 30, "input_suffix": "the end. " * 30},
        {**BASE, "input_prefix": ["Once", 300, " upon"], "prompt": ""},
        {**BASE, "stream": True},
        {"input_prefix": "a", "input_suffix": "b", "input_extra": [{"filename": 1, "text": "x"}]},
        {"input_prefix": "a", "input_suffix": "b", "input_extra": {"text": "x"}},
    ],
    "spm": [BASE, {**BASE, "input_extra": EXTRA}],
}
FLAGS = {"plain": ("-c", "512", "-b", "128", "-np", "1", "-t", "2"),
         "spm": ("-c", "512", "-b", "128", "-np", "1", "-t", "2", "--spm-infill")}


def answer(url: str, body: dict) -> dict:
    r = requests.post(url + "/infill", json=body, timeout=120, stream=bool(body.get("stream")))
    if r.status_code != 200:
        return {"status": r.status_code}
    if body.get("stream"):
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: ")]
        return {"status": 200, "content": "".join(c["content"] for c in chunks),
                "tokens": [t for c in chunks for t in c.get("tokens", [])], "n_events": len(chunks)}
    b = r.json()
    return {"status": 200, "content": b["content"], "tokens": b["tokens"], "prompt": b["prompt"],
            "tokens_evaluated": b["tokens_evaluated"], "stop_type": b["stop_type"]}


def main() -> int:
    args = recording_args(__doc__)
    model = write_fim_model(SRC, os.path.join("/tmp", "stories260K-fim.gguf"))
    record, same, total = {}, 0, 0
    for name, cases in CASES.items():
        with running(args.llama_server, model, FLAGS[name]) as url:
            theirs = [answer(url, b) for b in cases]
        with running(args.numllama_server, model, FLAGS[name]) as url:
            ours = [answer(url, b) for b in cases]
        record[name] = [{"request": b, "answer": a} for b, a in zip(cases, theirs)]
        for b, x, y in zip(cases, theirs, ours):
            total += 1
            same += x == y
            if x != y and args.verbose:
                print(f"{name} {json.dumps(b)[:100]}\n  llama-server: {json.dumps(x)[:600]}\n  numllama:     {json.dumps(y)[:600]}")
    if args.record:
        write_golden(args.record, "compare_infill.py", flags=FLAGS, cases=record)
    print(f"identical: {same}/{total}")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
