"""What each chat template can take (GET /props chat_template_caps), numllama against
llama-server, over llama.cpp's vendored templates (models/templates of the llama-cpp-python
0.3.36 sdist): llama-server is started with each template on stories260K and asked; numllama's
caps come from engine.chat_template. Prints every difference and the count of templates that
agree.

    python3 bench/compare_template_caps.py TEMPLATE_DIR --llama-server /path/to/llama-server \\
        [--record tests/data/template-caps.json]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import requests

from compare_tokens import add_server_args, running, write_golden   # beside this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "tests", "data", "stories260K.gguf")


def llama_server_caps(binary: str, template: str) -> dict | None:
    try:
        with running(binary, MODEL, ("-c", "256", "-np", "1", "--jinja", "--chat-template-file", template)) as url:
            return requests.get(url + "/props", timeout=30).json().get("chat_template_caps")
    except SystemExit:   # it refused the template
        return None


def numllama_caps(template: str) -> dict | str:
    from numllama.engine.chat_template import ChatTemplate, ChatTemplateError
    try:
        with open(template, encoding="utf-8") as f:
            return ChatTemplate(f.read(), "<s>", "</s>").caps.as_dict()
    except ChatTemplateError as e:
        return str(e)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("templates", help="a folder of .jinja files")
    add_server_args(ap)
    ap.add_argument("--record", metavar="JSON", help="write llama-server's caps there")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.templates, "*.jinja")))
    record, same = {}, 0
    for path in files:
        name = os.path.basename(path)[:-len(".jinja")]
        theirs, ours = llama_server_caps(args.llama_server, path), numllama_caps(path)
        record[name] = theirs
        if theirs == ours:
            same += 1
        elif isinstance(theirs, dict) and isinstance(ours, dict):
            print(name, {k: {"llama-server": v, "numllama": ours.get(k)} for k, v in theirs.items() if ours.get(k) != v})
        else:
            print(name, {"llama-server": theirs, "numllama": ours})
    if args.record:
        write_golden(args.record, "compare_template_caps.py", caps=record)
    print(f"identical: {same}/{len(files)}")
    return 0 if same == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
