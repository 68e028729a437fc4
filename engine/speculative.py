"""Speculative decoding: a small draft model guesses a slot's next few tokens, and the target
model checks all of them in one batched forward pass.

    target has sampled t0 (not yet evaluated)
    draft:  t0 -> d1 -> d2 -> ... -> dk          k cheap decode steps of the draft model
    target: forward([t0, d1, ..., dk])           one pass, k + 1 rows of logits
            sample row 0 -> t1; t1 == d1? keep going: row 1 -> t2; ... until a sample differs

Every token the target keeps is one it sampled itself, from its own logits, with its own sampler
and random draws, in order: the text is the one decoding without a draft gives. numllama makes
that exact, not just likely: each verified row is computed in the kernel order of a lone decode
step (engine.slots gives these rows decode order and the attention split a lone token gets), so
its logits are bit-identical to the step it replaces. What a draft buys is fewer target passes:
k + 1 rows cost little more than one, since a decode step's time goes into reading the weights.

The draft proposes as llama.cpp's draft-simple does (common/speculative.cpp): the greedy token of
its top 10, drafting stops when that token's probability among the 10 falls below p_min, after
n_max tokens, or at the end of the context; fewer than n_min tokens are not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engine import Engine
from .model import Batch
from .prompt_cache import common_prefix

DRAFT_TOP_K = 10   # the candidates the draft's probability is taken over (llama.cpp's draft sampler)


@dataclass(frozen=True)
class DraftParams:
    """llama-server's --spec-draft-n-max, --spec-draft-n-min, --spec-draft-p-min (its defaults)."""
    n_max: int = 3
    n_min: int = 0
    p_min: float = 0.0


class Drafter:
    """A draft model with a KV-cache row per slot of the target's scheduler."""

    def __init__(self, engine: Engine, n_slots: int, n_ctx: int, params: DraftParams = DraftParams()):
        self.engine = engine
        self.params = params
        self.cache = engine.model.new_cache(n_slots, n_ctx)
        self.cached: list[list[int]] = [[] for _ in range(n_slots)]   # tokens whose K/V each row holds
        self.n_ctx = n_ctx

    def draft(self, slot_id: int, tokens: list[int], n_max: int) -> list[int]:
        """Up to min(n_max, params.n_max) tokens to follow `tokens` (the slot's sequence, its
        last sampled token included), or [] when fewer than params.n_min come."""
        n_max = min(n_max, self.params.n_max, self.n_ctx - len(tokens))
        if n_max <= 0:
            return []
        model, cached = self.engine.model, self.cached[slot_id]
        # the draft's row holds what it evaluated for this slot: evaluate only what differs
        n_past = min(common_prefix(cached, tokens), len(tokens) - 1)
        new = tokens[n_past:]
        logits = model.forward(Batch.single(new, n_past, slot_id), self.cache)[0]
        cached[n_past:] = new
        out: list[int] = []
        while True:
            token, p = top_candidate(logits)
            if p < self.params.p_min:
                break
            out.append(token)
            if len(out) >= n_max:
                break
            logits = model.forward(Batch.single([token], len(cached), slot_id), self.cache)[0]
            cached.append(token)
        return out if len(out) >= self.params.n_min else []

    def forget(self, slot_id: int) -> None:
        self.cached[slot_id] = []


def top_candidate(logits: np.ndarray) -> tuple[int, float]:
    """The most likely token and its probability among the DRAFT_TOP_K most likely."""
    top = np.argpartition(logits, -DRAFT_TOP_K)[-DRAFT_TOP_K:]
    vals = logits[top].astype(np.float64)
    best = int(top[np.argmax(vals)])
    e = np.exp(vals - vals.max())
    return best, float(e.max() / e.sum())


def check_compatible(target: Engine, draft: Engine) -> None:
    """The draft must speak the target's vocabulary: the same token ids for the same texts."""
    a, b = target.tokenizer.vocab, draft.tokenizer.vocab
    if len(a.tokens) != len(b.tokens) or a.tokens != b.tokens:
        raise ValueError("the draft model's vocabulary differs from the target's: speculative decoding "
                         "needs the same tokens")
