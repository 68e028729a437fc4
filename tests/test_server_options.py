"""numllama-server takes every option `llama-server --help` lists: the ones it implements, and
the rest accepted and named at start-up as without effect."""
from __future__ import annotations

import argparse

import pytest
import requests

from numllama.webapp.llama_options import IGNORED_PREFIX, read_options
from numllama.webapp.server import build_parser

OPTIONS = read_options()
EXITS = {"-h", "--version"}   # print and exit, as llama-server's do


def test_the_option_list_is_llama_servers_help():
    names = {n for o in OPTIONS for n in o.names}
    assert len(OPTIONS) == 255 and {"-t", "--threads", "-ngl", "--sleep-idle-seconds", "-ot"} <= names
    arity = {o.names[-1]: o.n_values for o in OPTIONS}
    assert (arity["--control-vector-layer-range"], arity["--override-tensor"], arity["--flash-attn"],
            arity["--no-warmup"], arity["--hf-repo"]) == (2, 1, 1, 0, 1)


def _value(action: argparse.Action) -> str:
    return str(action.choices[0]) if action.choices else "1"


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.names[-1])
def test_every_llama_server_option_parses(opt):
    """Each spelling of each option, with as many values as it takes."""
    ap = build_parser()
    for name in opt.names:
        if name in EXITS or name in ("--help", "--usage"):
            continue
        action = ap._option_string_actions[name]
        values = [] if action.nargs == 0 else [_value(action)] * (action.nargs if isinstance(action.nargs, int) else 1)
        args = ap.parse_args(["-m", "model.gguf", name, *values])
        ignored = [k for k, v in vars(args).items() if k.startswith(IGNORED_PREFIX) and v not in (None, False)]
        assert ignored == ([IGNORED_PREFIX + "/".join(opt.names)] if action.dest.startswith(IGNORED_PREFIX) else [])


def test_options_llama_server_lacks_are_still_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--mlock"])   # (gone from llama-server: --load-mode replaced it)


def test_a_llama_server_command_line_starts_the_server(stories_path, tmp_path):
    """Options that steer nothing here are named; implemented ones work: sampling defaults,
    keys from a file, the UI switch under its other name."""
    from server_util import Server
    keys = tmp_path / "keys"
    keys.write_text("first\nsecond\n")
    s = Server(["-c", "256", "--top-k", "5", "--samplers", "top_k;temperature", "--temperature", "0.5",
                "-C", "ff", "--control-vector-layer-range", "1", "2", "--no-warmup", "-lm", "mmap",
                "--no-webui", "--api-key-file", str(keys), "-ctk", "q8_0", "--mmproj-auto"], model=stories_path)
    try:
        out = s.output()
        for name in ("--control-vector-layer-range", "-C/--cpu-mask", "--warmup/--no-warmup",
                     "-lm/--load-mode", "-ctk/--cache-type-k", "--mmproj-auto/--no-mmproj/--no-mmproj-auto"):
            assert f"numllama-server: {name} has no effect in numllama" in out
        assert s.get("/props").status_code == 401
        props = s.get("/props", headers={"Authorization": "Bearer second"}).json()
        params = props["default_generation_settings"]["params"]
        assert (params["top_k"], params["temperature"], params["samplers"]) == (5, 0.5, ["top_k", "temperature"])
        assert requests.get(s.url + "/", timeout=10).status_code == 404
        r = s.post("/completion", {"prompt": "Once", "n_predict": 4}, headers={"X-Api-Key": "first"})
        assert r.json()["generation_settings"]["top_k"] == 5
    finally:
        s.stop()
