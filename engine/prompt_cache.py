"""The host-RAM prompt cache (llama-server's --cache-ram): saved slot states that a later
prompt can resume from, so more conversations keep their context than there are slots.

An entry is a token sequence with its K/V cells, oldest first. It follows llama-server's
`server_prompt_cache` (tools/server/server-task.cpp) step for step, because what it keeps
decides how much memory a long-running server holds:

* `save` (alloc): nothing is copied when an entry already holds the state (the slot's tokens
  are a prefix of it); entries that are prefixes of the new state go; the oldest go until the
  new one fits the byte budget.
* `load`: the entry that would keep the most of itself *and* match the most of the prompt,
  better on both counts than what the slot holds, skipping entries of which less than a
  quarter would be kept. It *moves* into the slot: the cache no longer holds it (the slot does,
  and saves it again when it is displaced).
* `update`: the oldest go while over the byte budget, or over a token budget (the server's
  context, raised to what the byte budget would hold at the current bytes per token).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

MIN_KEEP_FRACTION = 0.25   # llama-server: "don't trash large prompts"


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    def __init__(self, budget_mib: float, limit_tokens: int = 0):
        """budget_mib < 0: no byte limit; limit_tokens: the server's context (0: none)."""
        self.budget = None if budget_mib < 0 else int(budget_mib * 1024 * 1024)
        self.limit_tokens = limit_tokens
        # tokens -> (k, v, extra): extra is what else a slot's state carries (its checkpoints)
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()   # oldest first
        self.n_bytes = 0
        self.hits = 0          # states restored into a slot

    def holds(self, tokens) -> bool:
        """True if an entry already holds this state (the tokens are a prefix of its tokens)."""
        n = len(tokens)
        return any(len(key) >= n and common_prefix(key, tokens) == n for key in self.entries)

    def save(self, tokens: list[int], k: np.ndarray, v: np.ndarray, extra: tuple = ()) -> bool:
        """Keep a slot's state (k, v: [n_layer, n_kv, n, hd], arrays the cache now owns, such as
        KVCache.cells returns); False if there was nothing new to keep or it does not fit."""
        key = tuple(tokens)
        if not key or self.holds(key):
            return False
        size = k.nbytes + v.nbytes
        if self.budget is not None and size > self.budget:
            return False
        for old in [e for e in self.entries if common_prefix(e, key) == len(e)]:
            self._drop(old)
        while self.entries and self.budget is not None and self.n_bytes + size > self.budget:
            self._drop(next(iter(self.entries)))
        self.entries[key] = (k, v, extra)
        self.n_bytes += size
        return True

    def load(self, slot_tokens, prompt) -> tuple[tuple, np.ndarray, np.ndarray, tuple] | None:
        """The entry to resume `prompt` from instead of the slot's own state, taken out of the
        cache (None: the slot's state is as good)."""
        lcp = common_prefix(slot_tokens, prompt)
        f_keep_best = lcp / len(slot_tokens) if slot_tokens else -1.0   # an empty slot: any entry wins
        f_sim_best = lcp / max(len(prompt), 1)
        best = None
        for key in self.entries:
            n = common_prefix(key, prompt)
            f_keep, f_sim = n / len(key), n / max(len(prompt), 1)
            if f_keep < MIN_KEEP_FRACTION:
                continue
            if f_keep_best < f_keep and f_sim_best < f_sim:
                f_keep_best, f_sim_best, best = f_keep, f_sim, key
        if best is None:
            return None
        k, v, extra = self.entries[best]
        self._drop(best)
        self.hits += 1
        return best, k, v, extra

    def update(self) -> None:
        """Evict the oldest entries beyond the byte budget, then beyond the token budget."""
        while self.entries and self.budget is not None and self.n_bytes > self.budget:
            self._drop(next(iter(self.entries)))
        if not self.limit_tokens:
            return
        n_tokens = sum(len(key) for key in self.entries)
        per_token = max(1.0, self.n_bytes / max(1, n_tokens))
        limit = self.limit_tokens if self.budget is None else max(self.limit_tokens, int(self.budget / per_token))
        while self.entries and n_tokens > limit:
            oldest = next(iter(self.entries))
            n_tokens -= len(oldest)
            self._drop(oldest)

    def _drop(self, key) -> None:
        k, v, _ = self.entries.pop(key)
        self.n_bytes -= k.nbytes + v.nbytes
