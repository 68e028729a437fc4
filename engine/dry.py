"""DRY, "Don't Repeat Yourself": llama.cpp's penalty on the token that would extend a repeat.

If the text so far ends with a run of tokens that also appeared earlier, the token that followed
that earlier run would make the repeat one longer. DRY lowers that token's logit by

    multiplier * base ** (repeat_length - allowed_length)

for repeats at least allowed_length tokens long, looking at the last penalty_last_n tokens.
Sequence breakers (by default a newline, ':', '"' and '*') cut repeats: none reaches back across
one, and a breaker token itself is never penalized. A breaker is text, so it is found in the
vocabulary as every token that holds it, or that starts it and is followed by the tokens of its
remaining text (get_overlapping_token_sequences, from koboldcpp, as llama.cpp ported it).

llama_sampler_dry (llama-sampler.cpp) is the reference; this is its arithmetic step for step.
"""
from __future__ import annotations

import math

import numpy as np

MAX_BREAKER_BYTES = 40     # llama.cpp cuts a longer breaker to this many bytes
MAX_BREAKER_TAIL = 20      # and keeps at most this many tokens after a breaker's first token
FLOAT_MAX_LOG = np.float32(88.7228391)   # log(FLT_MAX): base ** exponent must stay finite


def breaker_sequences(tokenizer, breakers) -> dict[int, tuple[tuple[int, ...], ...]]:
    """head token -> the tails that complete a breaker after it (an empty tail: the token holds a
    whole breaker), for a tokenizer (engine.tokenizer.Tokenizer)."""
    words = tokenizer.single_token_words()
    out: dict[int, list[tuple[int, ...]]] = {}
    for breaker in breakers:
        b = breaker.encode("utf-8")[:MAX_BREAKER_BYTES]
        if not b:
            continue   # llama.cpp skips empty breakers (with a warning)
        for tid, word in enumerate(words):
            if b in word:
                out.setdefault(tid, []).append(())
                continue
            # the word ends with the start of the breaker: its rest, tokenized, is the tail
            pos = word.find(b[:1])
            while pos != -1:
                n = len(word) - pos   # (the whole breaker is not in the word: n < len(b))
                if word[pos:] == b[:n]:
                    rest = b[n:].decode("utf-8", "replace")
                    tail = tuple(tokenizer.encode(rest, add_special=False, parse_special=False)[:MAX_BREAKER_TAIL])
                    if tail not in out.setdefault(tid, []):
                        out[tid].append(tail)
                pos = word.find(b[:1], pos + 1)
    return {tid: tuple(tails) for tid, tails in out.items()}


def repeat_lengths(last: list[int], rep_limit: int) -> list[int]:
    """For each position of `last` (the newest token last), how long a suffix of `last` ends
    there, capped at rep_limit (the Z-algorithm run backwards; index i counts from the oldest).
    Example: a b c c b c y a b c -> 0 0 3 1 0 2 0 0 0 0."""
    n = len(last)
    rat = last[::-1]     # rat[i]: the i-th token from the end (ring_buffer::rat)
    count = [0] * n
    lt = rt = 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rat[m] == rat[m + k]:
                m += 1
            count[n - 1 - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        else:
            p = k - lt
            right_part_len = rt - k + 1
            if count[n - 1 - p] < right_part_len:
                count[n - 1 - k] = min(count[n - 1 - p], rep_limit)
            else:
                i = rt + 1
                while i < n and rat[i] == rat[i - k]:
                    i += 1
                count[n - 1 - k] = min(i - k, rep_limit)
                lt, rt = k, i - 1
    return count


def dry_penalties(history: list[int], multiplier: float, base: float, allowed_length: int,
                  penalty_last_n: int, breakers: dict) -> dict[int, np.float32]:
    """token -> what DRY subtracts from its logit, given the tokens so far (prompt and output)."""
    if multiplier == 0.0 or base < 1.0 or penalty_last_n <= 0:
        return {}
    last = history[-penalty_last_n:]
    n = len(last)
    if n <= allowed_length:
        return {}
    rat = last[::-1]
    # 1. the newest breaker limits how far back a repeat may reach
    rep_limit = n
    for i in range(n):
        tails = breakers.get(rat[i])
        if tails is None:
            continue
        longest = -1
        for tail in tails:
            if longest < len(tail) <= i and all(tail[o] == rat[i - o - 1] for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}
    # 2. repeat lengths, 3. the longest repeat each next token would extend
    count = repeat_lengths(last, rep_limit)
    longest_by_token: dict[int, int] = {}
    for i in range(n - 1):
        if count[i] >= allowed_length:
            tok = rat[n - 2 - i]
            if longest_by_token.get(tok, -1) < count[i]:
                longest_by_token[tok] = count[i]
    # 4. the penalty (std::pow(float, int) is computed in double; the exponent is capped so the
    # power stays a finite float)
    max_exponent = 0
    if base > 1.000001:
        max_exponent = int(FLOAT_MAX_LOG / np.float32(math.log(np.float32(base))))
    out = {}
    for tok, length in longest_by_token.items():
        if () in breakers.get(tok, ()):
            continue   # a breaker is never penalized
        exponent = length - allowed_length
        if max_exponent > 0 and exponent > max_exponent:
            exponent = max_exponent
        out[tok] = np.float32(float(np.float32(multiplier)) * math.pow(float(np.float32(base)), exponent))
    return out
