"""Run llama.cpp's own server tests, unchanged, against numllama-server.

1. Fetch the llama-cpp-python 0.3.36 sdist (it vendors llama.cpp) and take
   vendor/llama.cpp/tools/server/tests (tests/llama_tree.py).
2. Replace only conftest.py: the original starts every preset (bert, gemma3, router...) to
   pre-download models, which an offline machine cannot do. Ours keeps the per-test server stop.
3. Seed $LLAMA_CACHE with stories260K in the Hugging Face cache layout, as the harness expects
   for `--hf-repo ggml-org/test-model-stories260K`.
4. Run pytest on unit/test_completion.py and unit/test_tool_call.py (or the files given; `all`:
   every file of the suite) with LLAMA_SERVER_BIN_PATH set, and print per file how many tests
   passed, failed and were skipped.

    python tests/conformance/run_llama_suite.py [all | unit/test_x.py ...] [--server BINARY]

--server runs the same harness against another binary (llama-server, for its own offline
figures); by default it is numllama-server.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

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


def per_file(report: str) -> dict[str, dict[str, int]]:
    """pytest's JUnit XML report as {file: {passed, failed, skipped}} (errors count as failed)."""
    counts: dict[str, dict[str, int]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("classname", "").split(".")[-1] + ".py"
        c = counts.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0})
        kinds = {child.tag for child in case}
        c["failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"] += 1
    return counts


def print_table(counts: dict[str, dict[str, int]]) -> None:
    print(f"{'file':36} {'passed':>7} {'failed':>7} {'skipped':>8}")
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for name in sorted(counts):
        c = counts[name]
        print(f"{name:36} {c['passed']:7} {c['failed']:7} {c['skipped']:8}")
        for k in total:
            total[k] += c[k]
    print(f"{'total':36} {total['passed']:7} {total['failed']:7} {total['skipped']:8}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="test files under tools/server/tests, or `all`")
    ap.add_argument("--server", help="the server binary (default: numllama-server on PATH)")
    args = ap.parse_args(argv)
    tests = fetch_tests()
    cache = seed_cache(tests)
    server = args.server or shutil.which("numllama-server")
    if not server:
        sys.exit("numllama-server is not on PATH: install numllama first")
    files = args.files or ["unit/test_completion.py", "unit/test_tool_call.py"]
    if files == ["all"]:
        files = sorted(os.path.relpath(f, tests) for f in glob.glob(os.path.join(tests, "unit", "test_*.py")))
    # llama.cpp's tests start --tools without a key and point /cors-proxy at 127.0.0.1, both of
    # which numllama refuses by default (docs/10-security.md); the suite opts in as a user on a
    # trusted machine would, so that its tests run unchanged
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": os.path.abspath(server), "LLAMA_CACHE": cache,
           "NUMLLAMA_UNSAFE_NO_API_KEY": "1", "NUMLLAMA_CORS_PROXY_ALLOW_PRIVATE": "1",
           "LD_LIBRARY_PATH": os.path.dirname(os.path.abspath(server))}   # (a llama-server build's own libraries)
    report = os.path.join(WORK, "report.xml")
    rc = subprocess.call([sys.executable, "-m", "pytest", "-v", "-m", "not slow", f"--junitxml={report}", *files],
                         cwd=tests, env=env)
    if os.path.exists(report):
        print_table(per_file(report))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
