"""What wakes a lazy grammar: llama.cpp's grammar triggers.

A lazy grammar lets the model write freely until a trigger appears in the output, then
constrains it from there (a chat template's tool-call marker, typically). A trigger is
(common_grammar_trigger_type):

    TOKEN         one token id: the grammar starts with that token
    WORD          a text: found anywhere in the output (llama.cpp turns it into an escaped regex)
    PATTERN       a regex searched in the output; the grammar starts at its first non-empty
                  capturing group (or at the match)
    PATTERN_FULL  the same, anchored at both ends: the whole output must match

llama.cpp matches with std::regex (ECMAScript) over the output's bytes; `ecmascript_regex`
rewrites the two places where Python's syntax means something else ('.' and '$'), and the
search runs under a time limit, since a pattern comes from the request.
"""
from __future__ import annotations

from dataclasses import dataclass

import regex

TRIGGER_TOKEN, TRIGGER_WORD, TRIGGER_PATTERN, TRIGGER_PATTERN_FULL = 0, 1, 2, 3
SEARCH_TIMEOUT_S = 0.5   # one search of the output; a pattern that backtracks longer fails the request


class TriggerError(ValueError):
    """A pattern that does not compile, or whose search ran out of time."""


@dataclass(frozen=True)
class Trigger:
    type: int
    value: str
    token: int = -1        # TOKEN: the id


def ecmascript_regex(pattern: str) -> str:
    """std::regex's ECMAScript meaning in Python's syntax: '.' matches anything but a line
    terminator ('\\n' and '\\r' here; Python's leaves out '\\n' only) and '$' is the end of the
    text (Python's also matches before a final newline). Character classes and escapes are
    copied as they are; "[^]" (any character) and "[]" (none) are ECMAScript's own."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
        elif c == "[":
            if pattern.startswith("[^]", i):
                out.append(r"[\s\S]")
                i += 3
                continue
            if pattern.startswith("[]", i):
                out.append("(?!)")
                i += 2
                continue
            j = i + 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            out.append(pattern[i:j + 1])
            i = j + 1
        elif c == ".":
            out.append(r"[^\n\r]")
            i += 1
        elif c == "$":
            out.append(r"\Z")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def trigger_pattern(t: Trigger) -> str:
    """common_sampler_init's regex for a text trigger: an escaped word, or a pattern anchored at
    both ends for PATTERN_FULL."""
    if t.type == TRIGGER_WORD:
        return regex.escape(t.value)
    if t.type == TRIGGER_PATTERN_FULL:
        if not t.value:
            return "^$"
        return ("" if t.value.startswith("^") else "^") + t.value + ("" if t.value.endswith("$") else "$")
    return t.value


def compile_pattern(text: str) -> "regex.Pattern":
    try:
        return regex.compile(ecmascript_regex(text).encode("utf-8"))
    except (regex.error, ValueError) as e:
        raise TriggerError(f"bad trigger pattern {text!r}: {e}") from None


class TriggerWatch:
    """The output so far, searched for the triggers until one fires
    (llama_grammar_accept_impl while awaiting_trigger)."""

    def __init__(self, triggers):
        self.tokens = frozenset(t.token for t in triggers if t.type == TRIGGER_TOKEN)
        texts = [trigger_pattern(t) for t in triggers if t.type != TRIGGER_TOKEN]
        self.patterns = [(text, compile_pattern(text)) for text in texts]   # (as written, compiled)
        self.buffer = b""
        self.spans: list[tuple[int, int, int]] = []   # each buffered token: (id, start, end) in buffer

    def fire(self, token: int, piece: bytes) -> list[tuple[int, bytes]] | None:
        """Feed one token; None while no trigger has fired, else the (token, text) pairs the
        grammar reads first: the trigger token itself, or every buffered token from the
        pattern's start on (the first cut to start there)."""
        if token in self.tokens:
            return [(token, piece)]
        self.spans.append((token, len(self.buffer), len(self.buffer) + len(piece)))
        self.buffer += piece
        for text, p in self.patterns:   # in order; the first that matches wins
            start = self._find(text, p)
            if start is not None:
                return [(t, self.buffer[max(a, start):b]) for t, a, b in self.spans if b > start]
        return None

    def _find(self, text: str, p: "regex.Pattern") -> int | None:
        try:
            m = p.search(self.buffer, timeout=SEARCH_TIMEOUT_S)
        except TimeoutError:
            raise TriggerError(f"the trigger pattern {text!r} took over {SEARCH_TIMEOUT_S} s "
                               f"to search the output") from None
        if m is None:
            return None
        for g in range(1, (p.groups or 0) + 1):   # the first capturing group that matched text
            if m.end(g) - m.start(g) > 0 and m.start(g) >= 0:
                return m.start(g)
        return m.start()
