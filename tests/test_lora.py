"""LoRA adapters: llama-server's recorded answers replayed (tests/data/lora.json, written by
bench/compare_lora.py --record), the arithmetic against a NumPy twin, a slot's cache dropped when
its adapters change, and adapter files refused with llama.cpp's reasons."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from compare_lora import STEPS, answer, flags, write_adapters  # noqa: E402
from random_gguf import write_lora  # noqa: E402

GOLDEN = json.load(open(os.path.join(HERE, "data", "lora.json")))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return write_adapters(str(tmp_path_factory.mktemp("lora")))


def test_lora_routes_match_llama_server(stories_path, adapters):
    from server_util import Server
    s = Server(list(flags(*adapters)), model=stories_path)
    try:
        assert [(st["method"], st["path"], st["request"]) for st in GOLDEN["steps"]] == \
            [(m, p, json.loads(json.dumps(b))) for m, p, b in STEPS]
        for st in GOLDEN["steps"]:
            assert answer(s.url, st["method"], st["path"], st["request"]) == st["answer"], st["request"]
    finally:
        s.stop()


def test_delta_is_scale_b_a_x(stories, adapters):
    """y = W x + scale * B (A x), scale = adapter_scale * alpha / rank, checked against float64
    NumPy on one matrix (the kernels' order is what the golden replay checks)."""
    from numllama.engine.lora import LoraAdapter
    from numllama.engine.quants import KernelOrder
    adapter = LoraAdapter(adapters[0], stories.model)
    name = "blk.0.attn_q.weight"
    from numllama.engine.gguf_file import read_gguf_tensors
    _, t, _ = read_gguf_tensors(adapters[0])
    A, B = np.asarray(t[name + ".lora_a"].data, np.float64), np.asarray(t[name + ".lora_b"].data, np.float64)
    x = np.random.default_rng(0).standard_normal((3, A.shape[1])).astype(np.float32)
    got = adapter.delta(name, x, 0.5, KernelOrder.of(3))
    want = (x.astype(np.float64) @ A.T @ B.T) * (0.5 * 8.0 / 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert adapter.delta("blk.0.attn_k.weight", x, 1.0, KernelOrder.of(3)) is None   # not adapted


def test_adapters_change_the_answer_and_the_cache_follows(stories, adapters):
    """Scale 0 is the model itself; other scales change the tokens; a slot whose cached tokens
    were computed with other adapters starts over, so an answer never depends on the request
    before it."""
    from numllama.engine.lora import LoraAdapter
    from numllama.engine.sampling import SamplingParams
    from numllama.engine.slots import Scheduler, Task
    loras = [LoraAdapter(p, stories.model) for p in adapters]
    prompt = stories.tokenizer.encode("Once upon a time")
    sched = Scheduler(stories, 1, 256, loras=loras, cache_ram_mib=0)
    plain = Scheduler(stories, 1, 256)
    try:
        def ask(s, lora=()):
            return s.submit(Task(prompt, n_predict=24, params=SamplingParams(temperature=0), lora=lora)) \
                .outcome(timeout=60).tokens
        base = ask(plain)
        assert ask(sched) == base
        with_a = ask(sched, ((0, 1.0),))
        assert with_a != base
        ask(sched, ((1, 2.0),))                        # another request, other adapters, same slot
        assert ask(sched, ((0, 1.0),)) == with_a       # recomputed, not reused
        assert ask(sched) == base
    finally:
        sched.close()
        plain.close()


def test_adapter_files_are_checked(stories, stories_path, tmp_path):
    from numllama.engine.gguf_file import ModelLoadError
    from numllama.engine.lora import LoraAdapter
    with pytest.raises(ModelLoadError, match="expect general.type to be 'adapter'"):
        LoraAdapter(stories_path, stories.model)
    other = str(tmp_path / "other.gguf")
    sys.path.insert(0, os.path.join(HERE, "..", "bench"))
    from random_gguf import write
    write(other, stories_path, 32, 1, 4, 4, 64, "Q8_0")      # same arch, other shapes
    bad = write_lora(str(tmp_path / "bad.gguf"), other)
    with pytest.raises(ModelLoadError, match="incorrect shape"):
        LoraAdapter(bad, stories.model)


def test_server_lora_options(stories_path, adapters, tmp_path):
    """--lora-init-without-apply loads with scale 0; FNAME:SCALE in --lora; a bad file stops the
    server with the reason."""
    from server_util import Server
    a, b = adapters
    s = Server(["-c", "256", "--lora", f"{a},{b}:0.25", "--lora-init-without-apply"], model=stories_path)
    try:
        listed = s.get("/lora-adapters").json()
        assert [(e["id"], e["scale"]) for e in listed] == [(0, 0.0), (1, 0.0)]
    finally:
        s.stop()
    s = Server(["-c", "256", "--lora", f"{a},{b}:0.25"], model=stories_path)
    try:
        assert [e["scale"] for e in s.get("/lora-adapters").json()] == [1.0, 0.25]
        r = s.post("/lora-adapters", {"id": 0})
        assert r.status_code == 400 and r.json()["error"]["message"] == "Request body must be an array"
        # a scale beyond f32 would make every output inf or NaN (and the answer not JSON): 400
        for bad in (s.post("/lora-adapters", [{"id": 0, "scale": 1e300}]),
                    s.post("/completion", {"prompt": "a", "n_predict": 2, "lora": [{"id": 1, "scale": -1e39}]})):
            assert bad.status_code == 400 and "out of range" in bad.json()["error"]["message"]
        assert [e["scale"] for e in s.get("/lora-adapters").json()] == [1.0, 0.25]   # unchanged
    finally:
        s.stop()
    with pytest.raises(RuntimeError, match="expect general.type to be 'adapter'"):
        Server(["-c", "256", "--lora", stories_path], model=stories_path)
