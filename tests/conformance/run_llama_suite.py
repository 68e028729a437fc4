"""Run llama.cpp's own server tests, unchanged, against numllama-server.

1. Fetch the llama-cpp-python 0.3.36 sdist (it vendors llama.cpp) and take
   vendor/llama.cpp/tools/server/tests (tests/llama_tree.py).
2. Replace only conftest.py: the original starts every preset (bert, gemma3, router...) to
   pre-download models, which an offline machine cannot do. Ours keeps the per-test server stop.
3. Seed $LLAMA_CACHE with stories260K in the Hugging Face cache layout, as the harness expects
   for `--hf-repo ggml-org/test-model-stories260K`.
4. Run pytest on unit/test_completion.py and unit/test_tool_call.py (or the files given) with LLAMA_SERVER_BIN_PATH set.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))   # tests/, for llama_tree
import llama_tree  # noqa: E402

WORK = os.environ.get("NUMLLAMA_CONFORMANCE_DIR", os.path.join(REPO, ".tox", "conformance-work"))

CONFTEST = '''import pytest
from utils import *


@pytest.fixture(autouse=True)
def stop_server_after_each_test():
    yield
    for server in set(server_instances):
        server.stop()
'''


def fetch_tests() -> str:
    """tools/server/tests inside a copy of llama.cpp's tree (the chat tests read templates at
    ../../../models/templates relative to it)."""
    root = llama_tree.fetch(("tools/server/tests/", "models/templates/"), WORK)
    tests = os.path.join(root, "tools", "server", "tests")
    with open(os.path.join(tests, "conftest.py"), "w") as f:
        f.write(CONFTEST)
    return tests


def seed_cache(tests: str) -> str:
    model = os.path.join(REPO, "tests", "data", "stories260K.gguf")
    if not os.path.isfile(model):
        sys.exit(f"stories260K not found: looked for {model}")
    cache = os.path.join(tests, "tmp")
    commit = "0" * 40
    base = os.path.join(cache, "models--ggml-org--test-model-stories260K")
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    snap = os.path.join(base, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    if not os.path.exists(os.path.join(snap, "stories260K.gguf")):
        shutil.copy(model, os.path.join(snap, "stories260K.gguf"))
    return cache


def main(argv: list[str]) -> int:
    tests = fetch_tests()
    cache = seed_cache(tests)
    server = shutil.which("numllama-server")
    if not server:
        sys.exit("numllama-server is not on PATH: install numllama first")
    files = argv or ["unit/test_completion.py", "unit/test_tool_call.py"]
    if argv == ["all"]:   # every file named by the API-surface issue
        files = [f"unit/test_{n}.py" for n in ("completion", "tokenize", "ignore_eos", "ctx_shift",
                                                "kv_keep_only_active", "chat_completion", "security",
                                                "metrics", "basic", "tool_call")]
    # llama.cpp's tests start --tools without a key and point /cors-proxy at 127.0.0.1, both of
    # which numllama refuses by default (docs/10-security.md); the suite opts in as a user on a
    # trusted machine would, so that its tests run unchanged
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": server, "LLAMA_CACHE": cache,
           "NUMLLAMA_UNSAFE_NO_API_KEY": "1", "NUMLLAMA_CORS_PROXY_ALLOW_PRIVATE": "1"}
    return subprocess.call([sys.executable, "-m", "pytest", "-v", "-m", "not slow", *files],
                           cwd=tests, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
