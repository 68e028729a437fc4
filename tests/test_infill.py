"""POST /infill against llama-server's recorded answers (tests/data/infill.json, written by
bench/compare_infill.py --record on stories260K with FIM tokens added, tests/fim_model.py)."""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from compare_infill import answer  # noqa: E402
from fim_model import write_fim_model  # noqa: E402

GOLDEN = json.load(open(os.path.join(HERE, "data", "infill.json")))


@pytest.fixture(scope="module", params=list(GOLDEN["cases"]))
def fim_server(request, stories_path, tmp_path_factory):
    from server_util import Server
    model = write_fim_model(stories_path, str(tmp_path_factory.mktemp("fim") / "stories260K-fim.gguf"))
    s = Server(list(GOLDEN["flags"][request.param]), model=model)
    yield request.param, s
    s.stop()


def test_infill_matches_llama_server(fim_server):
    """The prompt laid out (tokens evaluated, its text), the tokens and content generated."""
    name, s = fim_server
    for case in GOLDEN["cases"][name]:
        assert answer(s.url, case["request"]) == case["answer"], json.dumps(case["request"])[:200]


def test_infill_refusals(fim_server, stories_path):
    name, s = fim_server
    if name != "plain":
        return
    for body, text in (({"input_suffix": "b"}, '"input_prefix" is required'),
                       ({"input_prefix": "a"}, '"input_suffix" is required'),
                       ({"input_prefix": "a", "input_suffix": "b", "prompt": 5}, '"prompt" must be a string')):
        r = s.post("/infill", body)
        assert r.status_code == 400 and r.json()["error"]["message"] == text
    from server_util import Server
    plain = Server(["-c", "256"], model=stories_path)   # no FIM tokens: llama-server's 501
    try:
        r = plain.post("/infill", {"input_prefix": "a", "input_suffix": "b"})
        assert r.status_code == 501 and r.json()["error"]["message"] == (
            "Infill is not supported by this model: prefix token is missing. suffix token is missing. "
            "middle token is missing. ")
    finally:
        plain.stop()


def test_fim_tokens_end_generation_as_in_llama_cpp():
    """llama.cpp finds FIM tokens by their text when a file does not name them, and ends
    generation at the padding, repository and file-separator ones (SmolLM2's <reponame>)."""
    from numllama.engine.gguf_file import VocabData
    from numllama.engine.tokenizer import Tokenizer
    import numpy as np
    from numllama.engine.gguf_file import _fim_tokens
    tokens = ["<unk>", "<s>", "</s>", "<reponame>", "<|fim_prefix|>", "<fim_middle>", "a"]
    types = np.array([2, 3, 3, 1, 1, 1, 1], np.int32)
    fim = _fim_tokens({}, {t: i for i, t in enumerate(tokens)}, types, lambda k, d: d)
    assert fim == {"pre": 4, "mid": 5, "rep": 3}
    assert list(types[3:6]) == [3, 3, 3]   # found by their text: control tokens now
    vocab = VocabData(model="llama", pre="default", tokens=tokens, scores=np.zeros(len(tokens), np.float32),
                      token_types=types, merges=[], bos_id=1, eos_id=2, unk_id=0, eot_id=-1, add_bos=True,
                      add_eos=False, add_space_prefix=True, chat_template=None, fim=fim)
    assert Tokenizer(vocab).eog_ids == {2, 3}


def test_extra_chunks_are_cut_from_their_end_without_tokenizing_the_rest(stories_path, tmp_path):
    """Only the last tokens of the extra chunks fit what the context leaves: the prompt equals
    format_prompt_infill's (every chunk tokenized, then cut), and chunks further back than the
    room are never tokenized."""
    from numllama.engine.engine import Engine
    from numllama.webapp.infill import infill_prompt
    engine = Engine.load(write_fim_model(stories_path, str(tmp_path / "fim.gguf")))
    tok = engine.tokenizer
    fim = tok.vocab.fim
    chunks = [{"filename": f"f{i}.c", "text": f"int f{i}(void) {{ return {i}; }}\n" * (i + 1)} for i in range(6)]

    def reference(n_ctx, n_batch, n_predict):   # llama-server's order: all of it, then the tail
        plain = lambda t: tok.encode(t, add_special=False, parse_special=False)  # noqa: E731
        extra = [fim["rep"], *plain("myproject\n")]
        for c in chunks:
            extra += [fim["sep"], *plain(c["filename"] + "\n"), *plain(c["text"])]
        extra += [fim["sep"], *plain("filename\n")]
        n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra))
        return extra[len(extra) - n_extra:]

    for n_ctx in (160, 200, 260, 400, 2000):
        got = infill_prompt(tok, "a", "b", chunks, [], 128, 8, n_ctx, False)
        want = reference(n_ctx, 128, 8)
        assert got[:len(want)] == want and got[len(want)] == tok.bos_id, n_ctx
    seen = []
    original = tok.encode
    tok.encode = lambda text, **kw: (seen.append(text), original(text, **kw))[1]
    infill_prompt(tok, "a", "b", chunks, [], 128, 8, 160, False)
    assert chunks[0]["text"] not in seen and chunks[-1]["text"] in seen
