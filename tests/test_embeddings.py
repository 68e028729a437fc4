"""Embeddings and reranking: llama-server's recorded answers replayed bit for bit
(tests/data/embeddings.json, written by bench/compare_embeddings.py --record), the pooling and
normalization arithmetic against plain references, and embedding tasks sharing the scheduler
with completions without changing them."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from compare_embeddings import BERT_VOCAB, answer, write_bert_embedder, write_bert_reranker, write_reranker  # noqa: E402

GOLDEN = json.load(open(os.path.join(HERE, "data", "embeddings.json")))


@pytest.fixture(scope="module", params=list(GOLDEN["cases"]))
def embedding_server(request, stories_path, tmp_path_factory):
    from server_util import Server
    case = GOLDEN["cases"][request.param]
    if case["model"].startswith("bert"):
        from llama_tree import tree_root
        if not os.path.exists(os.path.join(tree_root(), BERT_VOCAB)):
            pytest.fail(f"{BERT_VOCAB} not found: run `python tests/llama_tree.py` first (tox does)")
    folder = tmp_path_factory.mktemp("models")
    model = {"stories": lambda: stories_path,
             "reranker": lambda: write_reranker(str(folder / "reranker.gguf")),
             "bert": lambda: write_bert_embedder(str(folder / "bert.gguf")),
             "bert-reranker": lambda: write_bert_reranker(str(folder / "bert-reranker.gguf"))}[case["model"]]()
    s = Server(list(GOLDEN["flags"]) + list(case["flags"]), model=model)
    yield case, s
    s.stop()


def test_embedding_routes_match_llama_server(embedding_server):
    """Status and body of every recorded request, every float identical."""
    case, s = embedding_server
    for r in case["requests"]:
        assert answer(s.url, r["path"], r["request"]) == r["answer"], json.dumps(r["request"])[:200]


# ------------------------------------------------------------------ the arithmetic, in plain Python
def vec_dot_f32(x, y) -> np.float32:
    """ggml_vec_dot_f32 as the AVX2 build runs it, one element at a time: 4 x 8 lanes of FMAs
    over blocks of 32, the reduce tree, then the tail: products rounded and added, except the
    last n % 4, fused."""
    from numllama.engine.float_ops import fma
    f32 = np.float32
    n = len(x)
    n_simd = n - n % 32
    lanes = [f32(0)] * 32
    for k in range(n_simd):
        lanes[k % 32] = fma(x[k], y[k], lanes[k % 32])
    a = lanes[:]
    for i in range(8):
        a[i], a[8 + i] = f32(a[i] + a[16 + i]), f32(a[8 + i] + a[24 + i])
    for i in range(8):
        a[i] = f32(a[i] + a[8 + i])
    total = f32(f32(f32(a[0] + a[4]) + f32(a[1] + a[5])) + f32(f32(a[2] + a[6]) + f32(a[3] + a[7]))) \
        if n_simd else f32(0)
    for k in range(n_simd, n):
        if k < n - n % 4:
            total = f32(total + f32(x[k] * y[k]))
        else:
            total = fma(x[k], y[k], total)
    return total


def tinyblas_dot(x, y) -> np.float32:
    """llamafile's tinyBLAS for one element: lane k % 8 takes element k by FMA, then hsum8."""
    from numllama.engine.float_ops import fma
    f32 = np.float32
    lanes = [f32(0)] * 8
    for k in range(len(x)):
        lanes[k % 8] = fma(x[k], y[k], lanes[k % 8])
    a = lanes
    return f32(f32(f32(a[0] + a[4]) + f32(a[2] + a[6])) + f32(f32(a[1] + a[5]) + f32(a[3] + a[7])))


@pytest.mark.parametrize("lengths", [(3,), (7,), (13,), (41,), (70,), (5, 11), (9, 7), (40, 24, 8)])
def test_mean_pool_is_llama_cpps_matmul(lengths):
    """The mean of each sequence's rows, summed over the whole batch in ggml's order: one
    sequence through ggml_vec_dot_f32, several through tinyBLAS when the batch is a multiple of 8
    tokens (and vec_dot otherwise)."""
    from numllama.engine.pooling import mean_pool
    rng = np.random.default_rng(sum(lengths))
    seq_ids = np.concatenate([np.full(n, s, np.int32) for s, n in enumerate(lengths)])
    hidden = rng.standard_normal((len(seq_ids), 24)).astype(np.float32)
    got = mean_pool(hidden, seq_ids, list(range(len(lengths))))
    tinyblas = len(lengths) >= 2 and len(seq_ids) % 8 == 0
    for s, n in enumerate(lengths):
        w = np.where(seq_ids == s, np.float32(1) / np.float32(n), np.float32(0)).astype(np.float32)
        for d in range(hidden.shape[1]):
            want = (tinyblas_dot if tinyblas else vec_dot_f32)(hidden[:, d], w)
            assert got[s, d] == want, (lengths, s, d)


def test_normalize_as_common_embd_normalize():
    from numllama.engine.pooling import normalize
    v = np.array([3.0, -4.0, 0.5], np.float32)
    np.testing.assert_array_equal(normalize(v, -1), v)
    np.testing.assert_array_equal(normalize(v, 0), v * np.float32(1.0 / (4.0 / 32760.0)))   # int16 range
    euclid = math.sqrt(9.0 + 16.0 + 0.25)
    np.testing.assert_array_equal(normalize(v, 2), v * np.float32(1.0 / euclid))
    p3 = (27.0 + 64.0 + 0.125) ** (1 / 3)
    np.testing.assert_array_equal(normalize(v, 3), v * np.float32(1.0 / p3))
    np.testing.assert_array_equal(normalize(np.zeros(3, np.float32), 2), np.zeros(3, np.float32))


def test_normalize_never_raises_where_c_gives_inf():
    """A p-norm whose powers overflow (or a negative p at a zero) is C's inf, and the vector
    scales to zeros as in llama-server; Python's math.pow would raise instead."""
    from numllama.engine.pooling import normalize
    v = np.array([3.0, -4.0, 0.0], np.float32)
    for p in (1000, -5, 2 ** 40):
        np.testing.assert_array_equal(np.abs(normalize(v, p)), np.zeros(3, np.float32))


def test_a_failing_embedding_ends_alone(stories):
    """An embedding whose result cannot be made ends with an error; the others of its batch
    get theirs."""
    from numllama.engine.slots import EmbeddingEvent, ErrorEvent, Scheduler, Task
    sched = Scheduler(stories, 2, 256, pooling="mean")
    try:
        bad = Task(stories.tokenizer.encode("Lily"), kind="embedding", embd_normalize="x")   # not a number
        good = Task(stories.tokenizer.encode("The sun"), kind="embedding")
        sched.submit_all([bad, good])
        assert isinstance(bad.outcome(timeout=60), ErrorEvent)
        assert isinstance(good.outcome(timeout=60), EmbeddingEvent)
    finally:
        sched.close()


def test_softmax_rows_sums_in_double():
    from numllama.engine.pooling import softmax_rows
    x = np.array([[2.0, -1.0], [0.0, 0.0]], np.float32)
    e = np.float32(math.exp(-3.0))
    np.testing.assert_array_equal(softmax_rows(x)[0], np.array([1, e], np.float32) * np.float32(1 / (1 + float(e))))
    np.testing.assert_array_equal(softmax_rows(x)[1], [0.5, 0.5])


# ------------------------------------------------------------------ the scheduler
def test_embeddings_beside_completions_change_nothing(stories):
    """Embedding tasks are batched only with each other; a completion running meanwhile gets the
    same tokens as alone, and the embeddings are those they get without it. (Not those each
    gets on its own: llama.cpp's mean pooling sums over the whole batch, in an order that
    depends on how many sequences share it, and numllama's follows it.)"""
    from numllama.engine.sampling import SamplingParams
    from numllama.engine.slots import Scheduler, Task
    tok = stories.tokenizer
    prompt = tok.encode("Once upon a time")
    texts = [tok.encode(t) for t in ("Lily liked cats.", "The sun was hot and bright today.")]

    def run(tasks):
        sched = Scheduler(stories, 3, 256, pooling="mean")
        try:
            sched.submit_all(tasks)
            return [t.outcome(timeout=60) for t in tasks]
        finally:
            sched.close()

    greedy = SamplingParams(temperature=0)
    alone_text = run([Task(prompt, n_predict=24, params=greedy)])[0].tokens
    alone_embd = [ev.vectors[0] for ev in run([Task(p, kind="embedding") for p in texts])]
    mixed = run([Task(prompt, n_predict=24, params=greedy)] + [Task(p, kind="embedding") for p in texts])
    assert mixed[0].tokens == alone_text
    for ev, want in zip(mixed[1:], alone_embd):
        np.testing.assert_array_equal(ev.vectors[0], want)
        assert abs(float(np.linalg.norm(ev.vectors[0].astype(np.float64))) - 1) < 1e-6   # euclidean by default


def test_an_embedding_does_not_wait_for_a_long_generation(stories):
    """Tasks of different kinds take turns (llama-server would hold the embedding back until the
    generation ends): the embedding comes back while the generation still runs."""
    from numllama.engine.sampling import SamplingParams
    from numllama.engine.slots import FinalEvent, Scheduler, Task
    sched = Scheduler(stories, 2, 1024, pooling="mean")
    try:
        long = sched.submit(Task(stories.tokenizer.encode("Once"), n_predict=900, ignore_eos=True,
                                 params=SamplingParams(temperature=0)))
        while long.events.qsize() < 3:   # generating
            time.sleep(0.01)
        emb = sched.submit(Task(stories.tokenizer.encode("Lily liked cats."), kind="embedding"))
        emb.outcome(timeout=60)
        assert not any(isinstance(ev, FinalEvent) for ev in list(long.events.queue))
        assert len(long.outcome(timeout=120).tokens) == 900
    finally:
        sched.close()


def test_too_long_for_one_batch_is_refused(stories):
    from numllama.engine.slots import Scheduler, Task
    sched = Scheduler(stories, 1, 256, n_batch=8, pooling="mean")
    try:
        with pytest.raises(ValueError, match="too large to process"):
            sched.submit(Task(list(range(1, 10)), kind="embedding"))
    finally:
        sched.close()


def test_embedding_errors_over_http(stories_path):
    from server_util import Server
    plain = Server(["-c", "256"], model=stories_path)
    try:
        r = plain.post("/v1/embeddings", {"input": "hi"})
        assert r.status_code == 501 and "Start it with `--embeddings`" in r.json()["error"]["message"]
        r = plain.post("/rerank", {"query": "a", "documents": ["b"]})
        assert r.status_code == 501
    finally:
        plain.stop()
    s = Server(["-c", "256", "-b", "16", "-ub", "16", "--embedding", "--pooling", "mean"], model=stories_path)
    try:
        r = s.post("/embeddings", {"input": "Once upon a time there was a girl who liked to play outside"})
        assert r.status_code == 500 and "too large to process" in r.json()["error"]["message"]
        r = s.post("/embeddings", {"input": []})
        assert r.status_code == 400 and r.json()["error"]["message"] == "\"input\" must not be empty"
        r = s.post("/embeddings", {"input": [[]]})
        assert r.status_code == 400 and r.json()["error"]["message"] == "Input content cannot be empty"
        r = s.post("/embeddings", {"input": ["a"] * 200})   # more than its slots and queue hold
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("too many inputs in one request: 200")
        r = s.post("/v1/embeddings", {"input": "Lily"})   # and the server goes on serving
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 64
    finally:
        s.stop()
    s = Server(["-c", "256", "--reranking", "--max-queue", "2"], model=stories_path)
    try:
        r = s.post("/rerank", {"query": "a", "documents": ["b"] * 7})   # 4 slots + 2 waiting
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("too many documents in one request: 7")
        assert s.post("/rerank", {"query": "a", "documents": ["b"] * 6}).status_code == 200
    finally:
        s.stop()


# ------------------------------------------------------------------ the encoder's kernels
@pytest.mark.parametrize("dim", [16, 21, 384])
def test_layer_norm_equals_its_twin(dim):
    """ops.layer_norm against ggml_norm written out in plain Python: the mean summed in double
    one by one, the squares of (x - mean) in f32, 8 at a time in hsum8's order into a double,
    the tail one by one; then * weight + bias."""
    from numllama.engine.ops import layer_norm
    f32 = np.float32
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((3, dim)).astype(f32) * f32(3)
    w, b = rng.standard_normal(dim).astype(f32), rng.standard_normal(dim).astype(f32)
    out = np.empty_like(x)
    layer_norm(x, w, b, 1e-12, out)
    for t in range(3):
        total = 0.0
        for v in x[t]:
            total += float(v)
        mean = f32(total) / f32(dim)
        d = (x[t] - mean).astype(f32)
        sq = (d * d).astype(f32)
        squares, n8 = 0.0, dim - dim % 8
        for i in range(0, n8, 8):
            a = sq[i:i + 8]
            squares += float(f32(f32(f32(a[0] + a[4]) + f32(a[2] + a[6])) + f32(f32(a[1] + a[5]) + f32(a[3] + a[7]))))
        for i in range(n8, dim):
            squares += float(sq[i])
        scale = f32(1) / np.sqrt(f32(f32(squares / dim) + f32(1e-12)))
        np.testing.assert_array_equal(out[t], ((d * scale) * w + b).astype(f32))


def test_gelu_is_gegelu_without_the_gate():
    from numllama.engine.ops import geglu, gelu, gelu_f16_table
    table = gelu_f16_table()
    x = np.linspace(-12, 12, 1001, dtype=np.float32)[None, :]
    a, b = np.empty_like(x), np.empty_like(x)
    gelu(x, table, a)
    geglu(x, np.ones_like(x), table, b)
    np.testing.assert_array_equal(a, b)
    assert a[0, 0] == 0 and a[0, -1] == x[0, -1]     # past +-10: 0, and x itself
