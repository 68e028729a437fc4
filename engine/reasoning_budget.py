"""llama.cpp's reasoning-budget sampler (common/reasoning-budget.cpp): where the model is in a
reasoning block, told by the tokens of its start and end tags, and a budget of tokens for it.

    IDLE --start tag--> COUNTING --end tag--> DONE --start tag--> COUNTING ...
                           | budget spent (on a whole character; else WAITING_UTF8 first)
                           v
                        FORCING: the message and the first end tag, token by token --> DONE

A lazy grammar sleeps while the model is inside the block (a trigger word thought is not one
written; engine/grammar.py GrammarState's gate), and the end tag's tokens are replayed to it.
With a budget (reasoning_budget_tokens), the block is closed for the model once it has used
that many tokens: each forced token is the only one the sampler may draw.
"""
from __future__ import annotations

IDLE, COUNTING, WAITING_UTF8, FORCING, DONE = "idle", "counting", "waiting-utf8", "forcing", "done"
UNLIMITED = 2**31 - 1   # (INT_MAX: no budget, the sampler only tells where the block is)


def utf8_is_complete(piece: bytes) -> bool:
    """common_utf8_is_complete: whether `piece` ends on a whole character (as far as its last
    lead byte says)."""
    for i in range(1, min(4, len(piece)) + 1):
        c = piece[-i]
        if c & 0xC0 != 0x80:
            return i >= (4 if c >= 0xF0 else 3 if c >= 0xE0 else 2 if c >= 0xC0 else 1)
    return not piece


class ReasoningBudget:

    def __init__(self, start: tuple, ends: tuple, prefill=(), budget: int = -1, forced: tuple = (),
                 whole_characters=None):
        """start, ends: the start tag's tokens and each end tag's. prefill: the generation
        prompt's tokens (a prompt that opens the block starts the count). budget: tokens allowed
        in a block (-1: unlimited). forced: what closes a block when the budget is spent (the
        message then the first end tag, as tokens). whole_characters(token): whether the
        token's text ends on a whole UTF-8 character (the block is not cut inside one)."""
        self.start = tuple(start)
        self.ends = tuple(dict.fromkeys(tuple(e) for e in ends if e))
        self.budget = UNLIMITED if budget < 0 else budget
        self.forced = tuple(forced)
        self.whole_characters = whole_characters or (lambda token: True)
        self.state = IDLE
        self.remaining = self.budget
        self.force_pos = 0
        self.seen: list[int] = []      # the last tokens since the state changed, as many as a tag awaited
        for t in prefill:
            self.accept(t)

    @property
    def inside(self) -> bool:
        return self.state in (COUNTING, WAITING_UTF8, FORCING)

    def forced_token(self) -> int | None:
        """The one token the sampler may draw now, if the block is being closed."""
        if self.state == FORCING and self.force_pos < len(self.forced):
            return self.forced[self.force_pos]
        return None

    def _matched(self, token: int, tags: tuple) -> tuple | None:
        """The tag (the longest) that this token completes, if any."""
        if not tags:
            self.seen = []
            return None
        self.seen = (self.seen + [token])[-max(len(w) for w in tags):]   # only the tags' length matters
        hits = [w for w in tags if len(self.seen) >= len(w) and tuple(self.seen[-len(w):]) == w]
        if not hits:
            return None
        self.seen = []
        return max(hits, key=len)

    def _open(self) -> None:
        self.state, self.remaining, self.seen = COUNTING, self.budget, []
        if self.remaining <= 0:
            self.state, self.force_pos = FORCING, 0

    def force(self) -> bool:
        """Close the block now, at another's request (llama-server's control action
        reasoning_end, common_reasoning_budget_force): only a block being counted is closed;
        whether it was."""
        if self.state != COUNTING:
            return False
        self.state, self.force_pos, self.seen = FORCING, 0, []
        return True

    def accept(self, token: int) -> tuple:
        """Take one token. Returns the end tag's tokens when it closed a block."""
        if self.state in (IDLE, DONE):
            if self._matched(token, (self.start,) if self.start else ()) is not None:
                self._open()
            return ()
        end = self._matched(token, self.ends)
        if self.state == FORCING:
            self.force_pos += 1
            if self.force_pos >= len(self.forced):
                self.state, self.seen = DONE, []
                return end or ()
            return ()
        if end is not None:
            self.state = DONE
            return end
        whole = self.whole_characters(token)
        if self.state == WAITING_UTF8:
            if whole:
                self.state, self.force_pos, self.seen = FORCING, 0, []
        else:
            self.remaining -= 1
            if self.remaining <= 0:
                self.state, self.force_pos, self.seen = (FORCING, 0, []) if whole else (WAITING_UTF8, 0, [])
        return ()
