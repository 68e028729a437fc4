"""Every option `llama-server --help` lists, so that a llama-server command line starts
numllama-server unchanged.

numllama implements the options that mean something for it (webapp/server.py defines those);
every other one is accepted, with the values it takes, and named at start-up as having no
effect here (GPU splits, CPU masks, NUMA, RPC, speculative decoding, multimodal projectors...),
except those in REFUSED, which would change the answers or the safety the user asked for: with
one of them the server does not start.
The list is llama-server's own help, kept verbatim in data/llama-server-options.txt.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

# options that would change what the model computes, or how safely it is served: numllama
# cannot honour them yet, and going on without them would give other answers, or less safety,
# than the user asked for, so the server refuses to start instead (keyed by their last spelling)
OUTPUTS_DIFFER = "it would change the model's answers, and numllama does not implement it yet"
REFUSED = {
    "--ssl-key-file": "numllama serves plain HTTP; put a TLS-terminating proxy (deploy/) in front of it",
    "--ssl-cert-file": "numllama serves plain HTTP; put a TLS-terminating proxy (deploy/) in front of it",
    "--control-vector": OUTPUTS_DIFFER,
    "--control-vector-scaled": OUTPUTS_DIFFER, "--control-vector-layer-range": OUTPUTS_DIFFER,
    "--override-kv": OUTPUTS_DIFFER, "--rope-scaling": OUTPUTS_DIFFER, "--rope-scale": OUTPUTS_DIFFER,
    "--rope-freq-base": OUTPUTS_DIFFER, "--rope-freq-scale": OUTPUTS_DIFFER, "--yarn-orig-ctx": OUTPUTS_DIFFER,
    "--yarn-ext-factor": OUTPUTS_DIFFER, "--yarn-attn-factor": OUTPUTS_DIFFER, "--yarn-beta-slow": OUTPUTS_DIFFER,
    "--yarn-beta-fast": OUTPUTS_DIFFER,
}
OPTIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "llama-server-options.txt")
ENV_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "llama-server-env.txt")
IGNORED_PREFIX = "llama_ignored:"   # the dest of an accepted option without effect


@dataclass(frozen=True)
class LlamaOption:
    names: tuple[str, ...]   # every spelling ("-t", "--threads")
    n_values: int            # values it takes: 0 (a switch), 1 or 2


def read_options(path: str = OPTIONS_FILE) -> list[LlamaOption]:
    """The options of llama-server's help: "-t,    --threads N" -> (("-t", "--threads"), 1).
    A value hint is one value however it is spelled ("<tensor name pattern>=<buffer type>,..."),
    except two hints side by side ("START END")."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.startswith("-"):
                continue
            names, hint = [], ""
            for piece in re.split(r",\s+", line.strip()):
                word, _, rest = piece.partition(" ")
                names.append(word)
                hint = rest.strip() or hint
            hint = re.sub(r"<[^>]*>", "X", hint)   # (a hint's own spaces, inside <...>, are not a second value)
            out.append(LlamaOption(tuple(names), len(hint.split()) if hint else 0))
    return out


def option_keys(options: list[LlamaOption] | None = None, env_path: str = ENV_FILE) -> dict[str, str]:
    """Every name a --models-preset key may give an option by (llama.cpp's get_map_key_opt): any
    spelling without its dashes ("c", "ctx-size") or its environment variable
    ("LLAMA_ARG_CTX_SIZE"), mapped to its first long spelling without dashes ("ctx-size"). A
    switch's negations ("nkvo", "no-kv-offload": every spelling starting with n of an option that
    has a --no- one) map to its first --no- spelling, so that a value keeps its meaning."""
    keys: dict[str, str] = {}
    for opt in options if options is not None else read_options():
        bare = [n.lstrip("-") for n in opt.names]
        negated = next((n.lstrip("-") for n in opt.names if n.startswith("--no-")), None)
        positive = [n for n, b in zip(opt.names, bare) if not (negated and b.startswith("n"))]
        long = next((n for n in positive if n.startswith("--")), (positive or opt.names)[0]).lstrip("-")
        for b in bare:
            keys[b] = negated if negated and b.startswith("n") else long
    with open(env_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("LLAMA_"):
                env, *names = line.split()
                keys[env] = keys.get(names[0].lstrip("-"), names[-1].lstrip("-"))
    return keys


def add_ignored_options(ap: argparse.ArgumentParser, options: list[LlamaOption] | None = None) -> list[LlamaOption]:
    """Add every llama-server option that `ap` lacks altogether as one without effect; return
    the options `ap` knows only some spellings of (they need a decision, not silence)."""
    known = set(ap._option_string_actions)
    partial = []
    for opt in options if options is not None else read_options():
        have = [n for n in opt.names if n in known]
        if have:
            if len(have) < len(opt.names):
                partial.append(opt)
            continue
        dest = IGNORED_PREFIX + "/".join(opt.names)
        if opt.n_values == 0:
            ap.add_argument(*opt.names, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            ap.add_argument(*opt.names, dest=dest, nargs=None if opt.n_values == 1 else opt.n_values,
                            help=argparse.SUPPRESS)
    return partial


def _given(args: argparse.Namespace) -> list[str]:
    return sorted(k[len(IGNORED_PREFIX):] for k, v in vars(args).items()
                  if k.startswith(IGNORED_PREFIX) and v not in (None, False))


def ignored_given(args: argparse.Namespace) -> list[str]:
    """The options without effect that this command line gave."""
    return [name for name in _given(args) if name.split("/")[-1] not in REFUSED]


def refused_given(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The options of REFUSED that this command line gave, with the reason."""
    return [(name, REFUSED[name.split("/")[-1]]) for name in _given(args) if name.split("/")[-1] in REFUSED]
