"""The samplers beyond the default chain, numllama-server against llama-server on one model:
mirostat (v1 and v2), DRY (with its sequence breakers), adaptive-p, sampler names and letters,
the same set as server options, preserved tokens, lazy grammars' triggers, a reasoning budget
given by the request, and the refusals of
bad values. Compares, per request, the
status, the text, the token ids, the probabilities asked for (before or after the chain) and
what `generation_settings` echoes of these samplers.

    python3 bench/compare_samplers.py MODEL.gguf --llama-server /path/to/llama-server \\
        [--record tests/data/samplers-stories260K.json] [-v]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import requests

from compare_tokens import add_server_args, running, write_golden   # beside this file

REPEATING = "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the"
PROMPTS = ["Once upon a time", REPEATING]
# a ChatML turn: SmolLM2 answers it and ends with <|im_end|>, a control token
CHAT = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
ECHOED = ("grammar_lazy", "grammar_triggers", "preserved_tokens", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers",
          "mirostat", "mirostat_tau", "mirostat_eta", "adaptive_target", "adaptive_decay", "samplers")


def _seeded(fields: dict, seeds=(1, 2, 3)) -> list[dict]:
    return [{**fields, "seed": s} for s in seeds]


def request_bodies() -> list[dict]:
    """The sampling fields of each request (each runs on every prompt)."""
    out = []
    # mirostat: v1 and v2, their targets and rates, greedy and hot
    for version in (1, 2):
        out += _seeded({"mirostat": version})
        out += _seeded({"mirostat": version, "mirostat_tau": 3.0, "mirostat_eta": 0.3, "temperature": 0.7}, (4,))
        out += [{"mirostat": version, "temperature": 0, "seed": 5},
                {"mirostat": version, "mirostat_tau": 8.0, "temperature": 1.5, "seed": 6},
                {"mirostat": version, "seed": 7, "n_probs": 3, "post_sampling_probs": True},
                {"mirostat": version, "seed": 8, "top_k": 1, "repeat_penalty": 1.5}]   # (ignored by mirostat)
    # DRY: its defaults, its knobs, its breakers, greedy (where it decides alone), its place in the chain
    out += _seeded({"dry_multiplier": 0.8})
    out += [{"dry_multiplier": 0.8, "temperature": 0},
            {"dry_multiplier": 2.0, "dry_base": 2.0, "dry_allowed_length": 1, "temperature": 0},
            {"dry_multiplier": 1.0, "dry_allowed_length": 4, "dry_penalty_last_n": 16, "seed": 4},
            {"dry_multiplier": 1.0, "dry_penalty_last_n": 0, "seed": 4},
            {"dry_multiplier": 0.8, "dry_base": 0.5, "temperature": 0},               # base < 1: the default
            {"dry_multiplier": 0.8, "dry_sequence_breakers": [".", " the"], "temperature": 0},
            {"dry_multiplier": 0.8, "dry_sequence_breakers": ["sat on", "\n"], "temperature": 0},
            {"dry_multiplier": 0.8, "dry_sequence_breakers": ["at"], "seed": 9},
            {"dry_multiplier": 0.8, "samplers": ["top_k", "dry", "temperature"], "seed": 10},
            {"dry_multiplier": 0.8, "samplers": "kdt", "seed": 10},
            {"dry_multiplier": 0.8, "mirostat": 2, "seed": 11},                      # mirostat wins
            {"dry_multiplier": 0.8, "seed": 12, "n_probs": 3, "post_sampling_probs": True}]
    # adaptive-p: named in the chain it replaces the draw; a negative target is a plain draw
    out += _seeded({"samplers": ["top_k", "min_p", "adaptive_p"], "adaptive_target": 0.3})
    out += [{"samplers": ["top_k", "adaptive_p"], "adaptive_target": 0.6, "adaptive_decay": 0.5, "seed": 4},
            {"samplers": ["top_k", "temperature", "adaptive_p"], "seed": 5},
            {"samplers": "kma", "adaptive_target": 0.1, "seed": 6},
            {"samplers": ["top_k", "adaptive_p"], "adaptive_target": 2.0, "seed": 7}]   # clamped to 1
    # names llama.cpp reads: kebab-case, no dash, upper case, its aliases
    out += [{"samplers": ["Top-K", "minp", "typ", "nucleus", "temp"], "seed": 1},
            {"samplers": ["topk", "TOPNSIGMA", "top_n_sigma", "temperature"], "top_n_sigma": 1.0, "seed": 2}]
    # control tokens kept in the output (preserved_tokens): the ones that are single tokens
    out += [{"prompt": CHAT, "temperature": 0, "n_probs": 3},
            {"prompt": CHAT, "temperature": 0, "n_probs": 3,
             "preserved_tokens": ["<|im_end|>", "<|im_start|>", "not one token", "<s>"]},
            {"prompt": CHAT, "preserved_tokens": [5]},
            {"prompt": CHAT, "preserved_tokens": "<|im_end|>", "temperature": 0}]
    # refused, clamped
    out += [{"dry_multiplier": 0.8, "dry_sequence_breakers": []},
            {"dry_multiplier": 0.8, "dry_sequence_breakers": "\n"},
            {"dry_penalty_last_n": -1}, {"dry_allowed_length": -2}, {"adaptive_decay": 1.5},
            {"mirostat": 7, "seed": 3}, {"mirostat": -1, "seed": 3}]
    return out


def lazy_grammar_bodies() -> list[dict]:
    """Lazy grammars: free text until a trigger (a word, a token, a pattern, a whole-output
    pattern), then the grammar, read from the trigger (or its first capturing group) on."""
    def lazy(grammar: str, *triggers, **extra) -> dict:
        return {"grammar": grammar, "grammar_lazy": True, "grammar_triggers": list(triggers), **extra}
    caps = 'root ::= [^A-Z]* [A-Z] [A-Z ]{2,12} "!"'
    out = []
    for sampling in ({"temperature": 0}, {"seed": 42}):
        out += [lazy('root ::= "little" [a-z ]{1,16} "!"', {"type": 1, "value": "little girl"}, **sampling),
                lazy(caps, {"type": 2, "value": "(?:girl|box|cat) (\\w+)"}, **sampling),
                lazy('root ::= "there" [a-z ]{1,20} "!"', {"type": 3, "value": ".*(there)"}, **sampling),
                lazy(caps, {"type": 2, "value": "gi(rl)$"}, **sampling),
                lazy(caps, {"type": 2, "value": "[.]|(,)"}, **sampling),
                lazy(caps, {"type": 2, "value": ".{3}(was)"}, {"type": 1, "value": "little girl"}, **sampling),
                lazy(caps, {"type": 0, "value": "\n", "token": 13}, **sampling),
                lazy(caps, {"type": 1, "value": "was"}, preserved_tokens=["was", " the"], **sampling),
                lazy(caps, {"type": 3, "value": ""}, **sampling)]
    out += [lazy(caps, {"type": 2, "value": "(["}), lazy(caps, {"type": 0, "value": "x"}),
            lazy(caps, {"type": 1, "value": "the"}), lazy(caps), lazy(caps, "the"),
            {"grammar": "%llguidance {}\nstart: \"a\""}]
    return out


def reasoning_budget_bodies() -> list[dict]:
    """A reasoning budget given by the request (the chat route takes its tags from the template):
    once the start tag is written, so many tokens, then the message and the first end tag are
    forced; without a message nothing is; tags spelled every way the schema reads them. (The
    tags are tokenized as llama.cpp does, a leading space added: "a" is the token " a".)"""
    tags = {"reasoning_budget_start_tag": "a", "reasoning_budget_end_tags": ["END", "big"]}
    out = []
    for sampling in ({"temperature": 0}, {"seed": 3}):
        out += [{"reasoning_budget_tokens": 3, **tags, **sampling},
                {"reasoning_budget_tokens": 3, **tags, "reasoning_budget_message": "Enough.", **sampling},
                {"reasoning_budget_tokens": 0, **tags, "reasoning_budget_message": "", **sampling}]
    out += [{"reasoning_budget_tokens": 2, "reasoning_budget_start_tag": "a", "reasoning_budget_end_tag": "END",
             "reasoning_budget_message": "Enough.", "temperature": 0},
            {"reasoning_budget_tokens": 4, "reasoning_budget_start_tag": "there", "reasoning_budget_end_tags": "big",
             "reasoning_budget_message": "Enough.", "temperature": 0},
            {"reasoning_budget_tokens": -1, **tags, "reasoning_budget_message": "Enough.", "temperature": 0},
            {"reasoning_budget_tokens": 2, "reasoning_budget_start_tag": "a", "reasoning_budget_message": "Enough.",
             "temperature": 0},
            {"reasoning_budget_tokens": -2, **tags}, {"reasoning_budget_tokens": 1, **tags, "reasoning_budget_start_tag": 5}]
    return out


CONFIGS = {   # server options -> the requests run there
    "defaults": ([], request_bodies()),
    "lazy grammars": ([], lazy_grammar_bodies()),
    "reasoning budget": ([], reasoning_budget_bodies()),
    "server options": (["--mirostat", "2", "--mirostat-ent", "4", "--mirostat-lr", "0.2"],
                       [{"seed": 1}, {"seed": 2, "mirostat": 0}]),
    "server DRY": (["--dry-multiplier", "0.9", "--dry-allowed-length", "3", "--dry-sequence-breaker", ".",
                    "--dry-sequence-breaker", "cat"],
                   [{"temperature": 0}, {"seed": 3}, {"temperature": 0, "dry_sequence_breakers": ["\n"]}]),
    "server -sp": (["-sp"], [{"prompt": CHAT, "temperature": 0, "n_probs": 3},
                             {"prompt": CHAT, "seed": 4, "n_probs": 2, "post_sampling_probs": True}]),
    "server adaptive-p": (["--samplers", "top_k;adaptive_p", "--adaptive-target", "0.4", "--adaptive-decay", "0.7"],
                          [{"seed": 1}, {"seed": 2, "adaptive_target": -1}]),
}
FLAGS = ("-c", "2048", "-np", "1", "-t", "2")
N_PREDICT = 32


def answer(url: str, body: dict) -> dict:
    r = requests.post(url + "/completion", json={**body, "n_predict": N_PREDICT, "cache_prompt": False,
                                                 "return_tokens": True}, timeout=600)
    if r.status_code != 200:
        return {"status": r.status_code}
    b = r.json()
    settings = b["generation_settings"]
    return {"status": 200, "content": b["content"], "tokens": b["tokens"], "stop_type": b["stop_type"],
            "probs": b.get("completion_probabilities"), "settings": {k: settings.get(k) for k in ECHOED}}


def runs(config: str) -> list[dict]:
    """Every request of a configuration: its body (prompt included)."""
    return [{"prompt": p, **fields} if "prompt" not in fields else fields
            for fields in CONFIGS[config][1] for p in (PROMPTS if "prompt" not in fields else [None])]


def answers(binary: str, model: str, config: str) -> list[dict]:
    with running(binary, model, FLAGS + tuple(CONFIGS[config][0])) as url:
        return [answer(url, body) for body in runs(config)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    add_server_args(ap)
    ap.add_argument("--record", metavar="JSON")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if not args.llama_server or not args.numllama_server:
        sys.exit("give --llama-server (or LLAMA_SERVER_BIN) and have numllama-server on PATH")
    recorded, same, total = {}, 0, 0
    for config in CONFIGS:
        ours = answers(args.numllama_server, args.model, config)
        theirs = answers(args.llama_server, args.model, config)
        recorded[config] = {"flags": CONFIGS[config][0],
                            "runs": [{"request": b, "answer": a} for b, a in zip(runs(config), theirs)]}
        for body, a, b in zip(runs(config), ours, theirs):
            total += 1
            same += a == b
            if a != b and args.verbose:
                print(f"[{config}] {json.dumps(body)[:160]}\n  numllama:     {json.dumps(a)[:400]}\n"
                      f"  llama-server: {json.dumps(b)[:400]}")
        print(f"{config}: {sum(a == b for a, b in zip(ours, theirs))}/{len(ours)} identical")
    print(f"{os.path.basename(args.model)}: {same}/{total} requests identical "
          "(status, text, token ids, probabilities, echoed settings)")
    if args.record:
        write_golden(args.record, "compare_samplers.py", model=os.path.basename(args.model), configs=recorded)
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
