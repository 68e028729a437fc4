"""llama.cpp's source tree, as vendored in the llama-cpp-python 0.3.36 sdist: the reference
the conformance suite (tools/server/tests) and the tokenizer tests (models/ggml-vocab-*) read.

    python tests/llama_tree.py [PREFIX ...]    # fetch once (tox does, before the tests)

Only the paths under vendor/llama.cpp/ that start with a given prefix are extracted, into
$NUMLLAMA_LLAMA_TREE (default .tox/llama-tree/llama.cpp). Fetching needs the package index;
the tests themselves only read what is here.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDIST = "llama-cpp-python==0.3.36"
WORK = os.environ.get("NUMLLAMA_LLAMA_TREE_DIR", os.path.join(REPO, ".tox", "llama-tree"))
VOCAB_TESTS = "models/ggml-vocab-"   # the tokenizer test files: <name>.gguf, .gguf.inp, .gguf.out


def tree_root(work: str = WORK) -> str:
    return os.path.join(work, "llama.cpp")


def fetch(prefixes: tuple[str, ...], work: str = WORK) -> str:
    """Extract the files under vendor/llama.cpp/ whose relative path starts with one of the
    prefixes (if not done before) and return the tree's root."""
    root = tree_root(work)
    done = os.path.join(work, "extracted.txt")
    have = set(open(done).read().split("\n")) if os.path.exists(done) else set()
    missing = [p for p in prefixes if p not in have]
    if not missing:
        return root
    dl = os.path.join(work, "sdist")
    os.makedirs(dl, exist_ok=True)
    if not glob.glob(os.path.join(dl, "*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", dl, SDIST], check=True)
    with tarfile.open(glob.glob(os.path.join(dl, "*.tar.gz"))[0]) as tar:
        for m in tar.getmembers():
            top, sep, rel = m.name.partition("/vendor/llama.cpp/")
            if sep and any(rel.startswith(p) for p in missing) and (m.isfile() or m.isdir()):
                m.name = rel
                tar.extract(m, root, filter="data")
    with open(done, "a") as f:
        f.write("".join(p + "\n" for p in missing))
    return root


VOCAB_SEPARATOR = "\n__ggml_vocab_test__\n"


def read_vocab_cases(vocab_path: str) -> list[tuple[str, list[int]]]:
    """(text, expected token ids) pairs of a vocabulary's .inp/.out files, read as llama.cpp's
    tests/test-tokenizer-0.cpp reads them."""
    raw = open(vocab_path + ".inp", encoding="utf-8", newline="").read()
    texts = raw.split(VOCAB_SEPARATOR)
    if raw.endswith(VOCAB_SEPARATOR):   # the C++ reader stops at the end: no empty case after the last
        texts.pop()
    outs = open(vocab_path + ".out", encoding="utf-8", newline="").read().split("\n")
    if outs and outs[-1] == "":
        outs.pop()
    if len(texts) != len(outs):
        raise ValueError(f"{vocab_path}: {len(texts)} inputs, {len(outs)} outputs")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


if __name__ == "__main__":
    print(fetch(tuple(sys.argv[1:]) or (VOCAB_TESTS,)))
