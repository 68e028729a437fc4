"""The host-RAM prompt cache (llama-server's --cache-ram): saved slot states that a later
prompt can resume from, so more conversations keep their context than there are slots.

An entry is a token sequence with its K/V cells. Saving a slot copies them out; loading the
entry that shares the longest prefix with a new prompt copies them back, and only the rest of
the prompt has to be evaluated. The least recently used entries go when the budget is full.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class PromptCache:
    def __init__(self, budget_mib: float):
        """budget_mib < 0: no limit."""
        self.budget = None if budget_mib < 0 else int(budget_mib * 1024 * 1024)
        self.entries: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.n_bytes = 0

    def refresh(self, tokens: list[int]) -> bool:
        """True (and the entry becomes the most recently used) if this state is already kept."""
        key = tuple(tokens)
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        return False

    def save(self, tokens: list[int], k: np.ndarray, v: np.ndarray) -> bool:
        """Keep a slot's state (k, v: [n_layer, n_kv, n, hd], arrays the cache now owns, such as
        KVCache.cells returns); False if there was nothing new to keep."""
        key = tuple(tokens)
        if not key or self.refresh(tokens):
            return False
        size = k.nbytes + v.nbytes
        if self.budget is not None and size > self.budget:
            return False
        # an entry that is a prefix of the new one is no longer needed
        for old in [e for e in self.entries if len(e) < len(key) and key[:len(e)] == e]:
            self._drop(old)
        self.entries[key] = (k, v)
        self.n_bytes += size
        while self.budget is not None and self.n_bytes > self.budget:
            self._drop(next(iter(self.entries)))
        return True

    def _drop(self, key) -> None:
        k, v = self.entries.pop(key)
        self.n_bytes -= k.nbytes + v.nbytes

    def best(self, prompt: list[int]) -> tuple[tuple, int] | None:
        """The entry sharing the longest prefix with the prompt, and that length."""
        best, best_n = None, 0
        for key in self.entries:
            n = 0
            for a, b in zip(key, prompt):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = key, n
        return (best, best_n) if best is not None else None

    def get(self, key: tuple) -> tuple[np.ndarray, np.ndarray]:
        self.entries.move_to_end(key)
        return self.entries[key]
