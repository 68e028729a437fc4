"""Slot state files (POST /slots/N?action=save|restore) of numllama-server and llama-server on
the same model: the same request in slot 1 of each, saved; the two files compared byte for
byte; then each server restores the other's file into slot 0 and goes on from it, and the two
continuations (text, and how many prompt tokens came from the restored cache) are compared.

    python3 bench/compare_slot_files.py MODEL [MODEL...] --llama-server BIN [--flags "-kvu"]
        [--record DIR]   # llama-server's files and continuations, for tests/test_slot_file.py
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile

import requests

from compare_tokens import add_server_args, running, write_golden   # beside this file

PROMPT = "Once upon a time there was a little girl named Lily. She loved to play"
N_FIRST, N_MORE = 8, 12


def session(binary: str, model: str, flags: list[str], folder: str, other_file: str | None = None) -> dict:
    """In one server: the request in slot 1 and its saved file; with other_file, that file
    restored into slot 0 and the continuation."""
    out: dict = {}
    with running(binary, model, ("-c", "512", "-np", "2", "-t", "2", "--slot-save-path", folder, *flags)) as url:
        first = requests.post(url + "/completion", json={"prompt": PROMPT, "n_predict": N_FIRST, "id_slot": 1,
                                                         "temperature": 0, "cache_prompt": True}).json()
        out["first"] = first["content"]
        out["saved"] = requests.post(url + "/slots/1?action=save", json={"filename": "slot.bin"}).json()["n_saved"]
        if other_file:
            shutil.copy(other_file, os.path.join(folder, "other.bin"))
            r = requests.post(url + "/slots/0?action=restore", json={"filename": "other.bin"})
            out["restore"] = (r.status_code, r.json().get("n_restored"))
            more = requests.post(url + "/completion", json={"prompt": PROMPT + first["content"], "n_predict": N_MORE,
                                                            "id_slot": 0, "temperature": 0, "cache_prompt": True}).json()
            out["more"], out["cache_n"] = more["content"], more["timings"]["cache_n"]
    return out


def compare(model: str, args) -> bool:
    flags = shlex.split(args.flags)
    with tempfile.TemporaryDirectory() as ls_dir, tempfile.TemporaryDirectory() as nl_dir:
        ls = session(args.llama_server, model, flags, ls_dir)
        nl = session(args.numllama_server, model, flags, nl_dir)
        a, b = (open(os.path.join(d, "slot.bin"), "rb").read() for d in (ls_dir, nl_dir))
        same_file = a == b
        where = "" if same_file else f" (first difference at byte {next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))})"
        # each restores the other's file (a fresh session, so the file is the only state)
        with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
            ls2 = session(args.llama_server, model, flags, d1, os.path.join(nl_dir, "slot.bin"))
            nl2 = session(args.numllama_server, model, flags, d2, os.path.join(ls_dir, "slot.bin"))
        same_more = (ls2["restore"], ls2["more"], ls2["cache_n"]) == (nl2["restore"], nl2["more"], nl2["cache_n"])
        print(f"{os.path.basename(model)} {args.flags}: files {len(a)} and {len(b)} bytes, "
              f"{'identical' if same_file else 'DIFFERENT' + where}; restored across: "
              f"{'same continuation' if same_more else 'DIFFERENT'} (llama-server {ls2['restore']} "
              f"{ls2['more']!r} cache_n {ls2['cache_n']}; numllama {nl2['restore']} {nl2['more']!r} "
              f"cache_n {nl2['cache_n']})")
        if args.record:
            name = os.path.basename(model).rsplit(".", 1)[0] + "".join(f.strip("-") for f in flags)
            shutil.copy(os.path.join(ls_dir, "slot.bin"), os.path.join(args.record, f"slot-{name}.bin"))
            write_golden(os.path.join(args.record, f"slot-{name}.json"), "compare_slot_files.py",
                         model=os.path.basename(model), flags=flags, prompt=PROMPT, n_first=N_FIRST, n_more=N_MORE,
                         first=ls["first"], saved=ls["saved"], more=ls2["more"], cache_n=ls2["cache_n"])
        return same_file and same_more


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--flags", default="", help="server options for both (e.g. -kvu)")
    ap.add_argument("--record", metavar="DIR")
    add_server_args(ap)
    args = ap.parse_args()
    if not args.llama_server or not args.numllama_server:
        sys.exit("give --llama-server (or LLAMA_SERVER_BIN) and have numllama-server on PATH")
    ok = [compare(m, args) for m in args.models]
    print(json.dumps({"identical": sum(ok), "of": len(ok)}))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
