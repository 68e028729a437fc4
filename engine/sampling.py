"""Choosing the next token from logits: llama.cpp's sampler chain, step for step.

The chain (llama-server's default order):

    logit_bias -> penalties -> dry -> top_n_sigma -> top_k -> typ_p -> top_p -> min_p -> xtc
               -> temperature -> dist (a seeded draw)

DRY (engine/dry.py) penalizes the token that would extend a repetition. Two other final draws
replace `dist`: adaptive-p, when the "adaptive_p" sampler is named, and mirostat (v1 or v2),
which with temperature replaces the whole chain (llama.cpp's common_sampler_init).

Each step narrows or reshapes a list of candidates (token id, logit), kept sorted by logit once
a step has sorted them. The arithmetic (f32 softmax sums, `logf(min_p)`, the double-precision
running sum of the draw) follows llama-sampler.cpp so that a seed gives llama.cpp's tokens.
At temperature <= 0 the result is the argmax.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
from numba import njit

from .dry import dry_penalties
from .float_ops import expf_array
from .mt19937 import MT19937

DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p",
                    "xtc", "temperature")
# llama.cpp's sampler names (common_sampler_types_from_names): each canonical name, its kebab-case
# and its no-dash spelling, and three more aliases; matched in lower case
_SAMPLER_NAMES = ("dry", "top_k", "top_p", "top_n_sigma", "typ_p", "min_p", "temperature", "xtc",
                  "infill", "penalties", "adaptive_p")
_SAMPLER_ALIASES = {
    **{n.replace("_", "-"): n for n in _SAMPLER_NAMES}, **{n.replace("_", ""): n for n in _SAMPLER_NAMES},
    "nucleus": "top_p", "temp": "temperature", "typ": "typ_p", **{n: n for n in _SAMPLER_NAMES},
}
_SAMPLER_LETTERS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p",
                    "p": "top_p", "m": "min_p", "x": "xtc", "t": "temperature", "i": "infill",
                    "a": "adaptive_p"}
DEFAULT_DRY_BREAKERS = ("\n", ":", "\"", "*")
MIROSTAT_M = 100   # the tokens mirostat (v1) estimates the distribution's exponent from

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: pick a random seed


def parse_samplers(value) -> tuple[str, ...]:
    """A list of sampler names (with llama.cpp's aliases) or a string of letters ("edskypmxt")."""
    if isinstance(value, str):
        names = [_SAMPLER_LETTERS[c] for c in value if c in _SAMPLER_LETTERS]
    else:
        names = [_SAMPLER_ALIASES[v.lower()] for v in value if isinstance(v, str) and v.lower() in _SAMPLER_ALIASES]
    return tuple(names)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repeat_last_n: int = 64
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_keep: int = 0
    seed: int = RANDOM_SEED
    dry_multiplier: float = 0.0       # DRY (engine/dry.py): 0 turns it off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple = DEFAULT_DRY_BREAKERS
    dry_breaker_tokens: object = None  # the breakers in this vocabulary: engine.dry.breaker_sequences
    mirostat: int = 0                 # 1 or 2: temperature then mirostat replace the whole chain
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    adaptive_target: float = -1.0     # adaptive-p (the "adaptive_p" sampler): < 0 is a plain draw
    adaptive_decay: float = 0.9
    logit_bias: tuple = ()            # ((token_id, bias), ...); bias -inf bans the token
    samplers: tuple = DEFAULT_SAMPLERS
    grammar: object = None            # engine.grammar.Grammar constraining the output
    grammar_triggers: tuple = ()      # words: the grammar waits for one of them (lazy)
    preserved_tokens: frozenset = frozenset()   # control tokens written into the output as text
    grammar_prefill: str = ""         # text the grammar reads before the first token
    reasoning_tags: tuple = ()        # (start ids, (end ids, ...), prompt ids): a lazy grammar sleeps in <think>
    reasoning_budget: int = -1        # tokens a reasoning block may take (-1: no limit)
    reasoning_forced: tuple = ()      # the ids that close a block whose budget is spent
    reasoning_control: bool = False   # the block may be closed from outside (Scheduler.end_reasoning)


@dataclass
class Candidates:
    """The tokens still in the running, their logits, and (after softmax) probabilities."""
    ids: np.ndarray        # [n] i32
    logits: np.ndarray     # [n] f32
    p: np.ndarray | None = None
    sorted: bool = False   # ids are in descending logit order

    def sort(self) -> None:
        if not self.sorted:
            order = np.argsort(-self.logits, kind="stable")
            self.ids, self.logits = self.ids[order], self.logits[order]
            if self.p is not None:
                self.p = self.p[order]
            self.sorted = True

    def keep(self, n: int) -> None:
        self.ids, self.logits = self.ids[:n], self.logits[:n]
        if self.p is not None:
            self.p = self.p[:n]

    def softmax(self) -> None:
        """p = exp(logit - max) / sum, in f32 with a sequential f32 sum (llama_sampler_softmax_impl)."""
        max_l = self.logits[0] if self.sorted else self.logits.max()
        p = expf_array(self.logits - max_l)
        total = np.cumsum(p, dtype=np.float32)[-1]
        self.p = p / total


def _penalties(c: Candidates, prm: SamplingParams, history: list[int]) -> None:
    if prm.repeat_last_n == 0 or (prm.repeat_penalty == 1.0 and prm.frequency_penalty == 0.0
                                  and prm.presence_penalty == 0.0):
        return
    window = history[-prm.repeat_last_n:] if prm.repeat_last_n > 0 else history
    counts = Counter(window)
    for i, tid in enumerate(c.ids):
        n = counts.get(int(tid), 0)
        if n == 0:
            continue
        l = c.logits[i]
        l = l * np.float32(prm.repeat_penalty) if l <= 0 else l / np.float32(prm.repeat_penalty)
        c.logits[i] = l - np.float32(n * prm.frequency_penalty + prm.presence_penalty)
    c.sorted = False


def _top_n_sigma(c: Candidates, n: float) -> None:
    if n <= 0:
        return
    finite = c.logits[np.isfinite(c.logits)]
    if finite.size == 0:
        return
    max_l = finite.max()
    std = np.float32(np.sqrt(np.mean((finite - finite.mean()) ** 2)))
    c.logits = np.where(c.logits < max_l - np.float32(n) * std, np.float32(-np.inf), c.logits)


def _top_k(c: Candidates, k: int) -> None:
    """Keep the k best, sorted by logit (ties by id). Selecting them in one pass
    (top_k_positions) instead of sorting the whole vocabulary is what makes this cheap for
    49152 tokens."""
    if k <= 0:
        return
    n = len(c.ids)
    if k >= n or c.sorted:
        c.sort()
        c.keep(min(k, n))
        return
    order = top_k_positions(np.ascontiguousarray(c.logits, np.float32), k)
    c.ids, c.logits = c.ids[order], c.logits[order]
    if c.p is not None:
        c.p = c.p[order]
    c.sorted = True


@njit(cache=True, nogil=True)
def top_k_positions(logits, k):
    """Positions of the k largest logits, largest first, equal logits in position order (NaN
    after everything else). One pass keeps the k best so far in order; only a value that
    beats the k-th so far is inserted (for random logits ~k ln(n/k) of them), so the vocabulary
    is read once instead of partitioned (argpartition over SmolLM2's 49152 logits, its
    negation and a sort took ~0.35 ms a token; this ~0.03).
    logits: [n] f32, 0 < k <= n -> [k] i64"""
    best = np.empty(k, np.int64)
    vals = np.empty(k, np.float32)
    m = 0
    for i in range(logits.shape[0]):
        v = logits[i]
        if m == k:
            if not v > vals[k - 1]:
                continue
            j = k - 1            # the k-th drops out
        elif v != v:
            continue             # NaN: only where room is left at the end
        else:
            j = m
            m += 1
        while j > 0 and vals[j - 1] < v:
            vals[j] = vals[j - 1]
            best[j] = best[j - 1]
            j -= 1
        vals[j] = v
        best[j] = i
    for i in range(logits.shape[0]):
        if m == k:
            break
        if logits[i] != logits[i]:
            best[m] = i
            m += 1
    return best


def _n_before_cut(reached: np.ndarray, min_keep: int) -> int:
    """How many candidates a cumulative-probability cut keeps: up to and including the first
    whose running sum has reached the threshold (reached [n] bool), and at least min_keep."""
    hits = np.nonzero(reached[max(min_keep, 1) - 1:])[0]
    return int(hits[0]) + max(min_keep, 1) if hits.size else len(reached)


def _typical(c: Candidates, p: float, min_keep: int) -> None:
    if p >= 1.0:
        return
    c.softmax()
    logp = np.log(c.p)
    entropy = -np.sum(c.p * logp)
    shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(c.p[order], dtype=np.float32)
    order = order[:_n_before_cut(cum > p, min_keep)]   # llama.cpp: cum > p (a double)
    c.ids, c.logits, c.p = c.ids[order], c.logits[order], c.p[order]
    c.sorted = False


def _top_p(c: Candidates, p: float, min_keep: int) -> None:
    if p >= 1.0:
        return
    c.softmax()
    c.sort()
    cum = np.cumsum(c.p, dtype=np.float32)
    c.keep(_n_before_cut(cum >= np.float32(p), min_keep))   # llama.cpp: cum >= p (a float)


def _min_p(c: Candidates, p: float, min_keep: int) -> None:
    if p <= 0.0 or len(c.ids) == 0:
        return
    log_p = np.float32(math.log(np.float32(p)))
    if not c.sorted:
        min_logit = c.logits.max() + log_p
        keep = c.logits >= min_logit
        if keep.any() and keep.sum() >= min_keep:
            c.ids, c.logits = c.ids[keep], c.logits[keep]
            if c.p is not None:
                c.p = c.p[keep]
            return
        c.sort()
    min_logit = c.logits[0] + log_p
    i = 1
    while i < len(c.ids) and not (c.logits[i] < min_logit and i >= min_keep):
        i += 1
    c.keep(i)


def _xtc(c: Candidates, prm: SamplingParams, rng: random.Random) -> None:
    """Exclude Top Choices: with some probability, drop every candidate above the threshold but
    the least likely of them."""
    if prm.xtc_probability <= 0 or prm.xtc_threshold > 0.5 or len(c.ids) < 2:
        return
    if rng.random() > prm.xtc_probability:
        return
    c.softmax()
    c.sort()
    above = int(np.sum(c.p >= prm.xtc_threshold))
    if above >= 2 and len(c.ids) - (above - 1) >= max(prm.min_keep, 1):
        c.ids, c.logits, c.p = c.ids[above - 1:], c.logits[above - 1:], c.p[above - 1:]


def _temperature(c: Candidates, prm: SamplingParams) -> None:
    temp = prm.temperature
    if prm.dynatemp_range > 0 and len(c.ids) > 1:
        # entropy-scaled temperature between temp -/+ range, in f32 as llama_sampler_temp_ext:
        # an extreme exponent gives an infinite or zero temperature there, not an error
        lo = np.float32(max(0.0, temp - prm.dynatemp_range))
        hi = np.float32(temp + prm.dynatemp_range)
        c.sort()
        c.softmax()
        with np.errstate(all="ignore"):
            p = c.p[c.p > 0]
            entropy = -np.sum(p * np.log(p), dtype=np.float32)
            max_entropy = -np.log(np.float32(1.0) / np.float32(len(c.ids)))
            norm = np.float32(entropy / max_entropy)
            temp = lo + (hi - lo) * np.power(norm, np.float32(prm.dynatemp_exponent))
    if temp <= 0:
        best = int(np.argmax(c.logits))
        logits = np.full_like(c.logits, -np.inf)
        logits[best] = c.logits[best]
        c.logits = logits
        return
    with np.errstate(all="ignore"):
        c.logits = c.logits / np.float32(temp)


def _plain_temperature(c: Candidates, temp: float) -> None:
    """llama_sampler_temp (what mirostat follows): logits / temp, or only the best at temp <= 0."""
    _temperature(c, SamplingParams(temperature=temp))


def _dry_active(prm: SamplingParams) -> bool:
    return prm.dry_multiplier != 0.0 and prm.dry_base >= 1.0 and prm.dry_penalty_last_n != 0


def _c_int(x) -> int:
    """C's (int) of a float on x86: truncation, and INT_MIN for NaN and whatever does not fit."""
    if not math.isfinite(x) or not -2.0**31 <= x < 2.0**31:
        return -2**31
    return int(x)


@njit(cache=True, nogil=True, error_model="numpy")
def _mirostat_k(p, m, mu, n_vocab):
    """Mirostat's k, in f32 with libm's logf and powf as llama.cpp computes it (a zero
    probability gives inf or NaN, as in C, not an exception)."""
    one, two = np.float32(1.0), np.float32(2.0)
    sum_ti_bi = np.float32(0.0)
    sum_ti_sq = np.float32(0.0)
    i = 0
    while i < m - 1 and i < p.shape[0] - 1:
        t_i = np.log(np.float32(i + 2) / np.float32(i + 1))
        b_i = np.log(p[i] / p[i + 1])
        sum_ti_bi += t_i * b_i
        sum_ti_sq += t_i * t_i
        i += 1
    s_hat = sum_ti_bi / sum_ti_sq
    epsilon_hat = s_hat - one
    return ((epsilon_hat * two ** mu) / (one - n_vocab ** -epsilon_hat)) ** (one / s_hat)


@njit(cache=True, nogil=True)
def _surprise(p):
    """-log2f(p)."""
    return -np.log2(np.float32(p))


@njit(cache=True, nogil=True)
def _n_within_surprise(p, mu):
    """How many of the (sorted) candidates come before the first whose surprise exceeds mu."""
    for i in range(p.shape[0]):
        if -np.log2(p[i]) > mu:
            return i
    return p.shape[0]


def discrete_draw(p: np.ndarray, rng: MT19937) -> int:
    """llama_sample_dist: libstdc++'s std::discrete_distribution over p [n] f32. The weights are
    normalized by their double sum, summed again into a cumulative table whose last entry is set
    to 1, and the first entry >= one uniform double wins. Fewer than two weights: the first,
    with no draw."""
    if len(p) < 2:
        return 0
    w = p.astype(np.float64)
    cumulative = np.cumsum(w / np.cumsum(w)[-1])   # (np.cumsum adds in order, as std::accumulate)
    cumulative[-1] = 1.0
    return min(int(np.searchsorted(cumulative, rng.uniform(), side="left")), len(p) - 1)


ADAPTIVE_WIDTH = np.float32(0.3)      # adaptive-p's transform: how far from the target a
ADAPTIVE_PEAK = np.float32(5.0)       # probability may be and still count as near it,
ADAPTIVE_SHARPNESS = np.float32(10.0)  # the logit it gets there, and how fast that falls off


class _AdaptiveP:
    """llama.cpp's adaptive-p: draw tokens whose probability is near a target, the target
    corrected by an exponential moving average of the probabilities drawn so far."""

    def __init__(self, target: np.float32, decay: np.float32):
        one = np.float32(1.0)
        self.target, self.decay = target, decay
        self.weighted_sum = np.float32(target / (one - decay))   # sum(p_i * decay^i)
        self.total_weight = np.float32(one / (one - decay))      # sum(decay^i)
        self.pending: tuple[int, np.float32] | None = None       # (token, its original p)

    def draw(self, c: Candidates, rng: MT19937) -> int:
        c.softmax()
        if self.target < 0:
            return int(c.ids[discrete_draw(c.p, rng)])
        original = c.p.copy()
        target = np.float32(min(max(self.target, 0.0), 1.0))
        if self.total_weight == 0:
            adapted = target
        else:
            adapted = np.float32(np.float32(2.0) * target - np.float32(self.weighted_sum / self.total_weight))
        adapted = np.float32(min(max(adapted, 0.0), 1.0))
        inv_width = np.float32(1.0) / ADAPTIVE_WIDTH
        dist = np.abs((c.p - adapted) * inv_width)
        transformed = ADAPTIVE_PEAK - ADAPTIVE_SHARPNESS * dist * dist / (np.float32(1.0) + dist)
        c.logits = np.where(np.isneginf(c.logits), c.logits, transformed).astype(np.float32)
        c.sorted = False
        c.softmax()
        i = discrete_draw(c.p, rng)
        self.pending = (int(c.ids[i]), original[i])
        return int(c.ids[i])

    def accept(self, token: int) -> None:
        if self.pending is not None and self.pending[0] == token:
            self.weighted_sum = np.float32(self.pending[1] + np.float32(self.decay * self.weighted_sum))
            self.total_weight = np.float32(np.float32(1.0) + np.float32(self.decay * self.total_weight))
        self.pending = None


class Sampler:
    """One request's sampler: its parameters, its RNG, and the tokens seen so far."""

    def __init__(self, params: SamplingParams, n_vocab: int, history=(), token_text=None, eog_ids=(),
                 token_piece=None):
        """token_text(id) -> str, token_piece(id) -> bytes and eog_ids are needed with a grammar
        (what each token spells, and which tokens end the text)."""
        self.params = params
        seed = params.seed
        if seed in (RANDOM_SEED, -1):
            seed = random.SystemRandom().getrandbits(32)
        self.seed = seed & 0xFFFFFFFF
        self.rng = MT19937(self.seed)   # the final draw's: dist, mirostat or adaptive-p (one per chain)
        self.xtc_rng = random.Random(self.seed)
        self.n_vocab = n_vocab
        self.history: list[int] = list(history)
        self.bias = np.zeros(n_vocab, np.float32)
        self.all_ids = np.arange(n_vocab, dtype=np.int32)   # every draw's candidates start as all of them:
        self.all_ids.flags.writeable = False                # shared, so never changed in place
        for tid, b in params.logit_bias:
            if 0 <= tid < n_vocab:
                self.bias[tid] += np.float32(b)
        self.last_candidates: Candidates | None = None
        self.mu = np.float32(2.0) * np.float32(params.mirostat_tau)   # mirostat's running surprise bound
        decay = np.float32(min(max(params.adaptive_decay, 0.0), 0.99))
        self.adaptive = _AdaptiveP(np.float32(params.adaptive_target), decay)
        self.grammar = None
        # llama.cpp's reasoning-budget sampler: where a reasoning block is, for a lazy grammar
        # (which sleeps inside it, and then feeds it every token) or for a budget
        self.budget = None
        lazy = params.grammar is not None and bool(params.grammar_triggers)
        start, ends, prompt = params.reasoning_tags or ((), (), ())
        if start and ends and (lazy or params.reasoning_budget >= 0 or params.reasoning_control):
            from .reasoning_budget import ReasoningBudget, utf8_is_complete
            whole = (lambda t: utf8_is_complete(token_piece(t, False))) if token_piece is not None else None
            self.budget = ReasoningBudget(start, ends, prompt, params.reasoning_budget, params.reasoning_forced, whole)
        if params.grammar is not None:
            from .grammar import GrammarState
            self.grammar = GrammarState(params.grammar, token_text, frozenset(eog_ids), params.grammar_triggers,
                                        token_piece, "" if lazy else params.grammar_prefill,
                                        self.budget if lazy else None)

    def accept(self, token: int) -> None:
        self.history.append(int(token))
        self.adaptive.accept(int(token))
        if self.grammar is not None:
            self.grammar.accept(int(token))
        if self.budget is not None and (self.grammar is None or self.grammar.gate is None):
            self.budget.accept(int(token))   # (a lazy grammar feeds the budget it sleeps by)

    def sample(self, logits: np.ndarray) -> int:
        """Run the chain on logits [n_vocab] and draw. With a grammar, as llama.cpp does: draw
        freely first; if that token breaks the grammar, mask the tokens the grammar forbids and
        run the chain (and the draw) again."""
        token = self._sample(self._forced(np.asarray(logits, np.float32)) + self.bias)
        if self.grammar is None or self.grammar.allows(token):
            return token
        return self._sample(self._grammar_masked(self._forced(np.asarray(logits, np.float32)) + self.bias))

    def _forced(self, logits: np.ndarray) -> np.ndarray:
        """A reasoning block whose budget is spent is being closed: its next token is the only
        one left (the reasoning-budget sampler comes first in llama.cpp's chain)."""
        forced = self.budget.forced_token() if self.budget is not None else None
        if forced is None:
            return logits
        out = np.full_like(logits, -np.inf)
        out[forced] = logits[forced]
        return out

    def _grammar_masked(self, biased: np.ndarray) -> np.ndarray:
        """-inf for every token the grammar forbids now (llama.cpp masks the whole vocabulary).
        Where only the k best allowed tokens can matter, the scan stops there: same result."""
        masked = biased.copy()
        stop_at = self.params.top_k if self._top_k_decides() else None
        found = 0
        for tid in np.argsort(-biased, kind="stable"):
            if stop_at is not None and found >= stop_at:
                break
            if np.isneginf(masked[tid]):
                continue
            if self.grammar.allows(int(tid)):
                found += 1
            else:
                masked[tid] = -np.inf
        return masked

    def _top_k_decides(self) -> bool:
        """True when the candidates that reach top_k are the biased logits as they are: every
        sampler before it is a no-op with these parameters. (Penalties change the order; top_n_sigma
        looks at the mean and spread of every logit, which masking changes.)"""
        prm = self.params
        if prm.top_k <= 0 or "top_k" not in prm.samplers or prm.mirostat:
            return False
        for name in prm.samplers[:prm.samplers.index("top_k")]:
            if name == "penalties" and (prm.repeat_penalty != 1.0 or prm.frequency_penalty != 0.0
                                        or prm.presence_penalty != 0.0):
                return False
            if name == "top_n_sigma" and prm.top_n_sigma > 0:
                return False
            if name == "dry" and _dry_active(prm):
                return False
            if name not in ("penalties", "dry", "top_n_sigma"):   # dry: a no-op at multiplier 0
                return False
        return True

    def _sample(self, biased: np.ndarray) -> int:
        prm = self.params
        c = Candidates(self.all_ids, biased)
        if prm.mirostat:   # common_sampler: logit bias, temperature, mirostat; nothing else
            _plain_temperature(c, prm.temperature)
            token = self._mirostat(c) if prm.mirostat == 1 else self._mirostat_v2(c)
            self.last_candidates = c
            return token
        for name in prm.samplers:
            if name == "penalties":
                _penalties(c, prm, self.history)
            elif name == "dry":
                self._dry(c)
            elif name == "top_n_sigma":
                _top_n_sigma(c, prm.top_n_sigma)
            elif name == "top_k":
                _top_k(c, prm.top_k)
            elif name == "typ_p":
                _typical(c, prm.typical_p, prm.min_keep)
            elif name == "top_p":
                _top_p(c, prm.top_p, prm.min_keep)
            elif name == "min_p":
                _min_p(c, prm.min_p, prm.min_keep)
            elif name == "xtc":
                _xtc(c, prm, self.xtc_rng)
            elif name == "temperature":
                _temperature(c, prm)
            # "adaptive_p" is not a step: named anywhere, it replaces the final draw
        # ("infill" is refused before a request gets here: webapp/params.py)
        if "adaptive_p" in prm.samplers:
            token = self.adaptive.draw(c, self.rng)
        else:
            token = self._dist(c)
        self.last_candidates = c
        return token

    def _dry(self, c: Candidates) -> None:
        prm = self.params
        penalties = dry_penalties(self.history, prm.dry_multiplier, prm.dry_base, prm.dry_allowed_length,
                                  prm.dry_penalty_last_n, prm.dry_breaker_tokens or {})
        if not penalties:
            return
        where = np.nonzero(np.isin(c.ids, np.fromiter(penalties, np.int32)))[0]
        for i in where:
            c.logits[i] = c.logits[i] - penalties[int(c.ids[i])]
        c.sorted = False

    def _mirostat(self, c: Candidates) -> int:
        """llama_sampler_mirostat_apply: estimate the exponent s of the distribution's Zipf law
        from the top MIROSTAT_M tokens, keep the k tokens whose expected surprise is mu, draw, and
        move mu toward tau by the surprise observed."""
        c.sort()
        c.softmax()
        k = _mirostat_k(c.p, MIROSTAT_M, self.mu, np.float32(self.n_vocab))
        c.keep(min(max(_c_int(k), 1), len(c.ids)))
        c.softmax()
        return self._mirostat_draw(c)

    def _mirostat_v2(self, c: Candidates) -> int:
        """llama_sampler_mirostat_v2_apply: keep the tokens whose surprise (-log2 p) is at most mu."""
        c.sort()
        c.softmax()
        c.keep(max(_n_within_surprise(c.p, self.mu), 1))
        c.softmax()
        return self._mirostat_draw(c)

    def _mirostat_draw(self, c: Candidates) -> int:
        prm = self.params
        i = discrete_draw(c.p, self.rng)
        error = _surprise(c.p[i]) - np.float32(prm.mirostat_tau)
        self.mu = np.float32(self.mu - np.float32(np.float32(prm.mirostat_eta) * error))
        return int(c.ids[i])

    def _dist(self, c: Candidates) -> int:
        """llama_sampler_dist_apply: p_i = exp(l_i - max) in f32, a double running sum, and the
        first candidate whose running sum reaches uniform() * total is chosen."""
        n = len(c.ids)
        if n == 1:
            self.rng.uniform()  # llama.cpp draws even when there is no choice
            c.p = np.ones(1, np.float32)
            return int(c.ids[0])
        max_l = c.logits[0] if c.sorted else c.logits.max()
        p = expf_array(c.logits - max_l)
        running = np.cumsum(p.astype(np.float64))
        target = running[-1] * self.rng.uniform()
        chosen = int(np.searchsorted(running, target, side="left"))
        chosen = min(chosen, n - 1)
        c.p = (p / running[-1]).astype(np.float32)
        return int(c.ids[chosen])


# ---- n_probs before sampling: llama-server's get_token_probabilities, bit for bit -----------
# Its softmax adds the probabilities in f32 in the order std::partial_sort leaves the vocabulary
# (the n_top best first, sorted; the rest as libstdc++'s heap selection leaves them), so that
# order is reproduced too: another order changes the sum, and every probability, in the last bit.

@njit(cache=True, nogil=True, inline="always")
def _heap_push(ids, lg, hole, top, vid, vl):
    """libstdc++ __push_heap with comp(a, b) = a.logit > b.logit."""
    parent = (hole - 1) // 2
    while hole > top and lg[parent] > vl:
        ids[hole], lg[hole] = ids[parent], lg[parent]
        hole = parent
        parent = (hole - 1) // 2
    ids[hole], lg[hole] = vid, vl


@njit(cache=True, nogil=True)
def _heap_adjust(ids, lg, hole, length, vid, vl):
    """libstdc++ __adjust_heap on ids/lg[0:length]."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if lg[child] > lg[child - 1]:
            child -= 1
        ids[hole], lg[hole] = ids[child], lg[child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        ids[hole], lg[hole] = ids[child - 1], lg[child - 1]
        hole = child - 1
    _heap_push(ids, lg, hole, top, vid, vl)


@njit(cache=True, nogil=True)
def _partial_sort_desc(ids, lg, middle):
    """libstdc++ std::partial_sort(first, first + middle, last) by descending logit:
    __heap_select, then __sort_heap, moving ids along with their logits."""
    n = lg.shape[0]
    if middle >= 2:   # __make_heap
        parent = (middle - 2) // 2
        while True:
            _heap_adjust(ids, lg, parent, middle, ids[parent], lg[parent])
            if parent == 0:
                break
            parent -= 1
    for i in range(middle, n):   # __heap_select: a better element replaces the heap's top
        if lg[i] > lg[0]:
            vid, vl = ids[i], lg[i]
            ids[i], lg[i] = ids[0], lg[0]
            _heap_adjust(ids, lg, 0, middle, vid, vl)
    last = middle
    while last > 1:   # __sort_heap
        last -= 1
        vid, vl = ids[last], lg[last]
        ids[last], lg[last] = ids[0], lg[0]
        _heap_adjust(ids, lg, 0, last, vid, vl)


def token_probabilities(logits: np.ndarray, n_top: int) -> tuple[np.ndarray, np.ndarray]:
    """llama-server's get_token_probabilities: the vocabulary with the n_top most likely tokens
    first, and every token's softmax probability, summed in f32 in that order (the sampler's
    own softmax, Candidates.softmax, is the same arithmetic).
    logits: [n_vocab] f32 -> ids [n_vocab] i32, p [n_vocab] f32"""
    c = Candidates(np.arange(len(logits), dtype=np.int32), np.array(logits, np.float32))
    if n_top > 0:
        _partial_sort_desc(c.ids, c.logits, min(n_top, len(logits)))
    c.softmax()
    return c.ids, c.p


LOWEST_F32 = float(np.finfo(np.float32).min)   # llama-server's log of 0 (JSON has no -inf)


@njit(cache=True, nogil=True)
def logf(x):
    """std::log of an f32 (libm's logf, as Numba calls it; NumPy's vectorised log may differ)."""
    return np.log(np.float32(x))


def logprob(p) -> float:
    """llama-server's completion_token_output::logarithm."""
    return LOWEST_F32 if p == 0 else float(logf(p))
