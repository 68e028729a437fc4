"""Mirostat, DRY, adaptive-p, sampler names, preserved tokens and -sp, against llama-server.

tests/data/samplers-stories260K.json was written by bench/compare_samplers.py --record with an
AVX2 llama-server on stories260K: per server configuration (its options), every request's status,
text, token ids, probabilities and the settings it echoes. The same script gives 114/114 on
SmolLM2-135M (see the README).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys

import numpy as np
import pytest

from numllama.engine.dry import breaker_sequences, dry_penalties, repeat_lengths
from numllama.engine.mt19937 import MT19937
from numllama.engine.sampling import (MIROSTAT_M, Sampler, SamplingParams, _mirostat_k, _n_within_surprise,
                                      _surprise, discrete_draw, parse_samplers)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from compare_samplers import FLAGS, answer  # noqa: E402

GOLDEN = json.load(open(os.path.join(HERE, "data", "samplers-stories260K.json")))


@pytest.fixture(scope="module", params=list(GOLDEN["configs"]))
def config_server(request, stories_path):
    from server_util import Server
    config = GOLDEN["configs"][request.param]
    s = Server(list(FLAGS) + config["flags"], model=stories_path)
    yield config, s
    s.stop()


def test_answers_match_llama_server(config_server):
    config, s = config_server
    for run in config["runs"]:
        assert answer(s.url, run["request"]) == run["answer"], json.dumps(run["request"])


# ---- the pieces, against what they are ported from -------------------------------------------

LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
for _name in ("logf", "log2f", "powf"):
    getattr(LIBM, _name).restype = ctypes.c_float
LIBM.logf.argtypes = LIBM.log2f.argtypes = [ctypes.c_float]
LIBM.powf.argtypes = [ctypes.c_float, ctypes.c_float]


def _c_mirostat_k(p, m, mu, n_vocab):
    """llama_sampler_mirostat_apply's estimate, line by line, through C floats and libm."""
    f = lambda x: ctypes.c_float(x).value   # noqa: E731 (one f32 rounding)
    sum_ti_bi = sum_ti_sq = 0.0
    i = 0
    while i < m - 1 and i < len(p) - 1:
        t_i = LIBM.logf(f(f(i + 2) / f(i + 1)))
        b_i = LIBM.logf(f(float(p[i]) / float(p[i + 1])))
        sum_ti_bi = f(sum_ti_bi + f(t_i * b_i))
        sum_ti_sq = f(sum_ti_sq + f(t_i * t_i))
        i += 1
    s_hat = f(sum_ti_bi / sum_ti_sq)
    eps = f(s_hat - 1)
    num = f(eps * LIBM.powf(2, mu))
    den = f(1 - LIBM.powf(n_vocab, -eps))
    return LIBM.powf(f(num / den), f(1 / s_hat))


@pytest.mark.parametrize("seed", range(6))
def test_mirostat_arithmetic_is_c_float_arithmetic(seed):
    rng = np.random.default_rng(seed)
    logits = np.sort(rng.standard_normal(300).astype(np.float32) * (1 + seed))[::-1]
    p = np.exp(logits - logits[0])
    p = (p / p.sum()).astype(np.float32)
    mu = np.float32(2 * (3 + seed))
    assert _mirostat_k(p, MIROSTAT_M, mu, np.float32(50000)) == np.float32(_c_mirostat_k(p, MIROSTAT_M, mu, 50000))
    assert all(_surprise(x) == np.float32(-LIBM.log2f(float(x))) for x in p[:50])
    n = next((i for i, x in enumerate(p) if -LIBM.log2f(float(x)) > mu), len(p))
    assert _n_within_surprise(p, mu) == n


def test_discrete_draw_is_libstdcxx_discrete_distribution():
    """Normalize by the double sum, cumulative sums with the last set to 1, lower_bound of one
    canonical double; a single weight draws nothing."""
    p = np.array([0.5, 0.25, 0.125, 0.125], np.float32)
    for seed in range(20):
        u = MT19937(seed).uniform()
        expected = int(np.searchsorted([0.5, 0.75, 0.875, 1.0], u, side="left"))
        assert discrete_draw(p, MT19937(seed)) == expected
    rng = MT19937(1)
    assert discrete_draw(np.array([1.0], np.float32), rng) == 0
    assert rng.uniform() == MT19937(1).uniform()   # no number was drawn


def test_dry_repeat_lengths_example():
    """llama.cpp's own comment: a b c c b c y a b c -> repeat counts 0 0 3 1 0 2 0 0 0 0."""
    assert repeat_lengths(list("abccbcyabc"), 100) == [0, 0, 3, 1, 0, 2, 0, 0, 0, 0]
    assert repeat_lengths(list("abccbcyabc"), 2) == [0, 0, 2, 1, 0, 2, 0, 0, 0, 0]


def test_dry_penalizes_the_token_that_extends_a_repeat():
    # history: 1 2 3 9 1 2 -> "3" would repeat "1 2 3" (a repeat of 2 extended): penalty
    # multiplier * base ** (2 - allowed_length)
    pen = dry_penalties([1, 2, 3, 9, 1, 2], 0.5, 2.0, 2, 64, {})
    assert pen == {3: np.float32(0.5)}
    assert dry_penalties([1, 2, 3, 9, 1, 2], 0.5, 2.0, 3, 64, {}) == {}      # not long enough
    assert dry_penalties([1, 2, 3, 9, 1, 2], 0.5, 2.0, 2, 64, {3: ((),)}) == {}   # a breaker itself
    assert dry_penalties([1, 2, 3, 9, 1, 2], 0.5, 2.0, 2, 64, {1: ((),)}) == {}   # a breaker in the repeat
    assert dry_penalties([1, 2, 3, 9, 1, 2], 0.0, 2.0, 2, 64, {}) == {}      # off


def test_dry_breakers_in_the_vocabulary(stories_path):
    from numllama.engine.gguf_file import load_gguf
    from numllama.engine.tokenizer import Tokenizer
    tok = Tokenizer(load_gguf(stories_path).vocab)
    seqs = breaker_sequences(tok, ("\n", "sat on"))
    newline = tok.encode("\n", add_special=False, parse_special=False)[-1]
    assert seqs[newline] == ((),)
    # a token that ends with the start of "sat on" is a head, completed by the rest's tokens
    heads = [t for t, tails in seqs.items() if any(tails)]
    assert heads
    for t in heads:
        word = tok.detokenize([t])
        for tail in seqs[t]:
            rest = tok.detokenize(list(tail)) if tail else b""
            assert (word + b" " + rest).find(b"sat on") >= 0 or (word + rest).find(b"sat on") >= 0


def test_sampler_names_as_llama_cpp_reads_them():
    assert parse_samplers(["Top-K", "minp", "typ", "nucleus", "temp", "TOPNSIGMA", "adaptive-p"]) == \
        ("top_k", "min_p", "typ_p", "top_p", "temperature", "top_n_sigma", "adaptive_p")
    assert parse_samplers(["typical", "typical_p", "bogus"]) == ()   # not llama.cpp's names
    assert parse_samplers("edskypmxta") == ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p",
                                             "min_p", "xtc", "temperature", "adaptive_p")


def test_mirostat_ignores_the_chain_and_adapts_mu():
    logits = np.linspace(5, -5, 400).astype(np.float32)
    a = Sampler(SamplingParams(seed=5, mirostat=2, top_k=1), 400)
    b = Sampler(SamplingParams(seed=5, mirostat=2, top_k=40, repeat_penalty=2.0), 400, history=[0, 1, 2])
    tokens_a = [a.sample(logits) for _ in range(20)]
    assert tokens_a == [b.sample(logits) for _ in range(20)]
    assert len(set(tokens_a)) > 1            # top_k=1 did not apply
    assert a.mu != np.float32(10.0)          # mu moved from 2 * tau


def test_dry_breakers_are_found_whenever_dry_runs(stories_path):
    """mirostat -1 is clamped to 0 (no mirostat), so DRY runs, with its breakers found."""
    from numllama.engine.gguf_file import load_gguf
    from numllama.engine.tokenizer import Tokenizer
    from numllama.webapp.params import ServerDefaults, sampling_params
    tok = Tokenizer(load_gguf(stories_path).vocab)
    p = sampling_params({"dry_multiplier": 0.8, "mirostat": -1}, ServerDefaults(), tok, False)
    assert p.mirostat == 0 and p.dry_breaker_tokens
    assert sampling_params({"dry_multiplier": 0.8, "mirostat": 5}, ServerDefaults(), tok, False).dry_breaker_tokens is None
