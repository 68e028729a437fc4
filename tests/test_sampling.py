import numpy as np
import pytest

from numllama.engine.model import Batch
from numllama.engine.mt19937 import MT19937
from numllama.engine.sampling import Sampler, SamplingParams, parse_samplers


def test_mt19937_reference_value():
    # the C++ standard requires the 10000th output of a default-seeded std::mt19937 to be 4123659995
    rng = MT19937(5489)
    for _ in range(9999):
        rng.next_u32()
    assert rng.next_u32() == 4123659995


def sample_sequence(engine, prompt, n, params):
    ids = engine.tokenizer.encode(prompt)
    cache = engine.model.new_cache(1, len(ids) + n + 1)
    sampler = Sampler(params, engine.tokenizer.n_vocab, ids)
    logits = engine.model.forward(Batch.single(ids, 0), cache)[0]
    out = []
    for i in range(n):
        t = sampler.sample(logits)
        sampler.accept(t)
        out.append(t)
        if t in engine.tokenizer.eog_ids:  # llama-server stops at end-of-generation
            break
        logits = engine.model.forward(Batch.single([t], len(ids) + i), cache)[0]
    return out


@pytest.mark.parametrize("which", ["stories", "smollm"])
def test_seeded_sampling_equals_llama_cpp(which, request):
    """Every golden seeded draw (temperature 0.8, seeds 42 and 7), token for token."""
    engine = request.getfixturevalue(which)
    for g in request.getfixturevalue(which + "_golden")["sampled"]:
        params = SamplingParams(temperature=g["temperature"], seed=g["seed"])
        assert sample_sequence(engine, g["prompt"], g["n_predict"], params) == g["tokens"], \
            (g["prompt"], g["seed"])


def test_same_seed_same_tokens_other_seed_differs(stories):
    p = SamplingParams(temperature=1.0, seed=3)
    a = sample_sequence(stories, "Once upon a time", 24, p)
    assert a == sample_sequence(stories, "Once upon a time", 24, p)
    assert a != sample_sequence(stories, "Once upon a time", 24, SamplingParams(temperature=1.0, seed=4))


def _logits():
    return np.array([1.0, 3.0, 2.0, 0.5, -1.0], np.float32)


def test_greedy_at_zero_temperature():
    s = Sampler(SamplingParams(temperature=0.0, seed=1), 5)
    assert s.sample(_logits()) == 1
    assert s.last_candidates.p.max() == pytest.approx(1.0)


def top_k_positions_twin(logits, k):
    """The k largest, largest first, equal logits by position, NaN last: a full stable sort."""
    key = np.where(np.isnan(logits), np.inf, -logits.astype(np.float64))
    return np.argsort(key, kind="stable")[:k]


@pytest.mark.parametrize("case", ["random", "ties", "masked", "ascending", "nan"])
def test_top_k_positions_equals_a_full_sort(case):
    """top_k's one-pass selection keeps exactly what sorting the whole vocabulary would, in its
    order: ties (equal logits, -inf masks) kept and listed by position, NaN after everything."""
    from numllama.engine.sampling import top_k_positions
    rng = np.random.default_rng(7)
    n = 5000
    logits = {
        "random": rng.standard_normal(n),
        "ties": rng.integers(0, 6, n).astype(np.float64),            # many equal logits at the cut
        "masked": np.where(rng.random(n) < 0.995, -np.inf, rng.standard_normal(n)),   # fewer finite than k
        "ascending": np.arange(n, dtype=np.float64),                  # every value is inserted
        "nan": np.where(rng.random(n) < 0.01, np.nan, rng.standard_normal(n)),
    }[case].astype(np.float32)
    for k in (1, 2, 40, 100, n):
        got = top_k_positions(logits, k)
        assert np.array_equal(got, top_k_positions_twin(logits, k)), (case, k)
    few = np.where(np.arange(n) < 3, np.float32(1.0), np.float32(np.nan)).astype(np.float32)
    assert np.array_equal(top_k_positions(few, 5), [0, 1, 2, 3, 4])   # room left: NaN fill it in order


def test_top_k_one_is_argmax():
    for seed in range(5):
        s = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=seed), 5)
        assert s.sample(_logits()) == 1


def test_logit_bias_bans_token():
    s = Sampler(SamplingParams(temperature=0.0, logit_bias=((1, -np.inf),)), 5)
    assert s.sample(_logits()) == 2


def test_min_p_and_top_p_narrow_candidates():
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3, seed=1), 5)
    s.sample(_logits())
    kept = set(s.last_candidates.ids.tolist())
    assert kept == {1, 2}  # e^(2-3) = 0.37 >= 0.3, e^(1-3) = 0.14 < 0.3
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=1), 5)
    s.sample(_logits())
    assert s.last_candidates.ids.tolist() == [1]


def test_repeat_penalty_lowers_seen_token():
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=10.0), 5, history=[1])
    assert s.sample(_logits()) == 2


def test_parse_samplers():
    assert parse_samplers(["top_k", "nucleus", "temp"]) == ("top_k", "top_p", "temperature")
    assert parse_samplers("kpt") == ("top_k", "top_p", "temperature")


def full_mask(sampler: Sampler, biased: np.ndarray) -> np.ndarray:
    """What llama.cpp does with a grammar: -inf for every forbidden token of the vocabulary."""
    return np.array([l if sampler.grammar.allows(t) else -np.inf for t, l in enumerate(biased)], np.float32)


@pytest.mark.parametrize("top_n_sigma", [1.0, -1.0])
def test_grammar_early_stop_equals_full_masking(stories, top_n_sigma):
    """The grammar's scan may stop after top_k allowed tokens only where that cannot change the
    result: with top_n_sigma on before top_k (it looks at every logit) the whole vocabulary is
    masked, as llama.cpp does; with it off the shortcut is taken and gives the same candidates."""
    from numllama.engine.grammar import Grammar
    tok = stories.tokenizer
    params = SamplingParams(temperature=0.8, top_k=40, top_n_sigma=top_n_sigma, seed=3,
                            grammar=Grammar("root ::= [a-m ]+"))

    def sampler():
        return Sampler(params, tok.n_vocab, token_text=tok.token_text, eog_ids=tok.eog_ids)

    fast, full = sampler(), sampler()
    assert fast._top_k_decides() == (top_n_sigma <= 0)
    rng = np.random.default_rng(0)
    for _ in range(100):
        biased = (rng.standard_normal(tok.n_vocab) * 3).astype(np.float32)
        assert fast._sample(fast._grammar_masked(biased)) == full._sample(full_mask(full, biased))
        a, b = fast.last_candidates, full.last_candidates
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.p, b.p)


PARTIAL_SORT_CPP = r"""
#include <algorithm>
#include <cstdio>
#include <vector>
int main() {
    int n, top; std::scanf("%d %d", &n, &top);
    std::vector<std::pair<int, float>> v(n);
    for (int i = 0; i < n; i++) { v[i].first = i; std::scanf("%f", &v[i].second); }
    std::partial_sort(v.begin(), v.begin() + top, v.end(),
                      [](const auto & a, const auto & b) { return a.second > b.second; });
    for (auto & x : v) std::printf("%d\n", x.first);
}
"""


def test_token_probabilities_follow_libstdcxx_partial_sort(tmp_path):
    """llama-server sums the softmax in the order std::partial_sort leaves the vocabulary; our
    heap selection must leave it in the same order. Checked against libstdc++ itself, compiled
    here (g++ is part of the project's build machines)."""
    import shutil
    import subprocess
    from numllama.engine.float_ops import expf_array
    from numllama.engine.sampling import token_probabilities
    gxx = shutil.which("g++")
    assert gxx, "g++ is needed to check the partial sort against libstdc++"
    src, exe = tmp_path / "ps.cpp", tmp_path / "ps"
    src.write_text(PARTIAL_SORT_CPP)
    subprocess.run([gxx, "-O1", "-std=c++17", str(src), "-o", str(exe)], check=True, timeout=120)
    rng = np.random.default_rng(7)
    for n, top in [(512, 5), (1000, 1), (49, 10), (300, 300), (64, 2)]:
        logits = rng.standard_normal(n).astype(np.float32)
        logits[rng.integers(0, n, n // 10)] = logits[0]   # ties too
        out = subprocess.run([str(exe)], input=f"{n} {top}\n" + "\n".join(f"{x:.9g}" for x in logits),
                             capture_output=True, text=True, check=True, timeout=60).stdout
        ids, p = token_probabilities(logits, top)
        assert ids.tolist() == [int(x) for x in out.split()]
        # the probabilities: libm's expf of the distance to the best (not NumPy's exp, which may
        # differ in the last bit), normalised by their f32 sum in that order
        e = expf_array(logits[ids] - logits[ids[0]])
        total = np.float32(0)
        for x in e:
            total = np.float32(total + x)
        assert np.array_equal(p, (e / total).astype(np.float32))
