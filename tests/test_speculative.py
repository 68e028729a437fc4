"""Speculative decoding: with a draft model, the text is token for token the text decoding
without one gives (greedy and seeded, one slot and several, past 512 cells where ggml splits a
decode step's attention, cut by stop strings and n_predict), and the draft's guesses are used."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from speculative import retyped_copy  # noqa: E402


@pytest.fixture(scope="module")
def draft_path(stories_path, tmp_path_factory):
    """stories260K requantized to Q8_0: the same network, guessing well but not perfectly."""
    return retyped_copy(stories_path, str(tmp_path_factory.mktemp("draft") / "stories260K-Q8_0.gguf"), "Q8_0")


@pytest.fixture(scope="module")
def draft(draft_path):
    from numllama.engine.engine import Engine
    return Engine.load(draft_path)


def run(engine, tasks, n_slots=1, n_ctx=512, drafter=None):
    from numllama.engine.slots import Scheduler
    sched = Scheduler(engine, n_slots, n_ctx, drafter=drafter)
    try:
        sched.submit_all(tasks)
        return [t.outcome(timeout=300) for t in tasks]
    finally:
        sched.close()


CASES = {   # name: (task fields per prompt, n_slots, n_ctx, draft n_max)
    "greedy": (dict(n_predict=80), 1, 512, 4),
    "seeded": (dict(n_predict=80, seed=11, temperature=0.8), 1, 512, 4),
    "past 512 cells": (dict(n_predict=620, ignore_eos=True), 1, 1024, 6),
    "three slots": (dict(n_predict=60, seed=5, temperature=0.9), 3, 512, 3),
    "stop string": (dict(n_predict=80, stop=("Lily",)), 1, 512, 8),
    "n_predict inside a draft": (dict(n_predict=7), 1, 512, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_draft_changes_no_token(stories, draft, case):
    from numllama.engine.sampling import SamplingParams
    from numllama.engine.slots import Task
    from numllama.engine.speculative import DraftParams, Drafter
    fields, n_slots, n_ctx, n_max = CASES[case]
    fields = dict(fields)
    params = SamplingParams(seed=fields.pop("seed", 0), temperature=fields.pop("temperature", 0.0))
    tok = stories.tokenizer
    prompts = [tok.encode(p) for p in ("Once upon a time", "The little dog", "Tom and Lily went")][:n_slots]

    def tasks():
        return [Task(p, params=params, **fields) for p in prompts]
    plain = run(stories, tasks(), n_slots, n_ctx)
    drafted = run(stories, tasks(), n_slots, n_ctx, Drafter(draft, n_slots, n_ctx, DraftParams(n_max=n_max)))
    for a, b in zip(plain, drafted):
        assert b.tokens == a.tokens and b.content == a.content and b.stop_type == a.stop_type
        assert b.n_draft > 0 and 0 < b.n_draft_accepted <= b.n_draft
        assert a.n_draft == 0


def test_draft_params(stories, draft):
    """n_max bounds each draft; a draft shorter than n_min is not used; p_min 1 drafts nothing
    (no token has probability above 1 among ten)."""
    from numllama.engine.speculative import DraftParams, Drafter
    tokens = stories.tokenizer.encode("Once upon a time")
    assert len(Drafter(draft, 1, 256, DraftParams(n_max=5)).draft(0, tokens, 99)) == 5
    assert len(Drafter(draft, 1, 256, DraftParams(n_max=5)).draft(0, tokens, 2)) == 2
    assert Drafter(draft, 1, 256, DraftParams(n_max=5, n_min=6)).draft(0, tokens, 99) == []
    assert Drafter(draft, 1, 256, DraftParams(n_max=5, p_min=1.01)).draft(0, tokens, 99) == []


def test_draft_vocabulary_must_match(stories, smollm):
    from numllama.engine.speculative import check_compatible
    with pytest.raises(ValueError, match="vocabulary differs"):
        check_compatible(stories, smollm)


def test_server_with_a_draft_model(stories_path, draft_path):
    """--model-draft: the same answers as without it, with llama-server's draft counts in
    timings and draft-simple in the settings."""
    from server_util import Server
    body = {"prompt": "Once upon a time", "n_predict": 48, "temperature": 0, "return_tokens": True}
    plain = Server(["-c", "512", "-np", "1"], model=stories_path)
    try:
        want = plain.post("/completion", body).json()
    finally:
        plain.stop()
    s = Server(["-c", "512", "-np", "1", "-md", draft_path, "--draft-max", "6"], model=stories_path)
    try:
        got = s.post("/completion", body).json()
        assert got["tokens"] == want["tokens"] and got["content"] == want["content"]
        t = got["timings"]
        assert t["draft_n"] > 0 and 0 < t["draft_n_accepted"] <= t["draft_n"]
        assert "draft_n" not in want["timings"]
        assert got["generation_settings"]["speculative.types"] == "draft-simple"
    finally:
        s.stop()
