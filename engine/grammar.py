"""Grammar-constrained generation: GBNF grammars (llama.cpp's format); JSON schemas become
GBNF in json_schema.py.

A grammar is a set of rules; each rule is a list of alternatives; each alternative is a
sequence of elements: a character set, or a reference to a rule. Repetition (`*`, `+`, `?`,
`{m,n}`) and groups `( ... )` are rewritten into extra rules when parsing, so the matcher
only knows sequences, alternatives and references.

Matching works like llama.cpp's: the state is a set of *stacks*. A stack's top says which
element of which alternative comes next; the frames below it are where to continue when that
rule is done. Advancing by a character expands rule references until each stack's top is a
character set, keeps the stacks whose set contains the character, and moves them on. An empty
stack means the whole root rule has been matched. As in llama.cpp, a frame whose alternative
is finished is never kept: a reference in tail position (`star ::= item star`) replaces its
frame instead of stacking on it, so a repetition of any length matches in constant depth.

What llama.cpp refuses at parse time is refused here too, with the rule's name: left recursion
(which would expand forever) and repetition counts above MAX_REPETITION.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_REPETITION = 2000            # llama.cpp's MAX_REPETITION_THRESHOLD for {m,n}
MAX_NESTING = 200                # parentheses inside parentheses
MAX_ELEMENTS = 200_000           # elements of all rules after repetitions are written out
MAX_STACK_DEPTH = 10_000         # frames of one stack (nested rules, not repetitions)
MAX_STACKS = 10_000              # alive parses at once (an ambiguous grammar multiplies them)
CLOSURE_CACHE_SIZE = 20_000      # expanded stacks remembered per grammar


class GrammarError(ValueError):
    pass


@dataclass(frozen=True)
class CharSet:
    ranges: tuple          # ((lo, hi), ...) inclusive code points
    negated: bool = False

    def matches(self, ch: str) -> bool:
        c = ord(ch)
        inside = any(lo <= c <= hi for lo, hi in self.ranges)
        return inside != self.negated

    def may_match(self, low: int, high: int) -> bool:
        """For a character known only to lie in [low, high] (its first UTF-8 bytes), as llama.cpp
        judges it: a set matches if one of its ranges meets that span; a negated set only if none
        does."""
        meets = any(lo <= high and low <= hi for lo, hi in self.ranges)
        return meets != self.negated


@dataclass(frozen=True)
class RuleRef:
    name: str


# ---------------------------------------------------------------------------------- parsing
class _Parser:
    def __init__(self, text: str):
        self.src = text
        self.rules: dict[str, list[list]] = {}
        self.n_synth = 0

    def error(self, pos: int, what: str):
        line = self.src.count("\n", 0, pos) + 1
        raise GrammarError(f"invalid grammar at line {line}: {what}")

    def skip(self, pos: int, newlines: bool) -> int:
        while pos < len(self.src):
            c = self.src[pos]
            if c == "#":
                while pos < len(self.src) and self.src[pos] != "\n":
                    pos += 1
            elif c in " \t\r" or (newlines and c == "\n"):
                pos += 1
            else:
                break
        return pos

    def name(self, pos: int) -> tuple[str, int]:
        start = pos
        while pos < len(self.src) and (self.src[pos].isalnum() or self.src[pos] in "-_"):
            pos += 1
        if pos == start:
            self.error(pos, "expected a rule name")
        return self.src[start:pos], pos

    def char(self, pos: int) -> tuple[str, int]:
        """One (possibly escaped) character of a literal or a character class."""
        if pos >= len(self.src):
            self.error(pos, "unexpected end")
        c = self.src[pos]
        if c != "\\":
            return c, pos + 1
        if pos + 1 >= len(self.src):
            self.error(pos, "dangling escape")
        e = self.src[pos + 1]
        simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^"}
        if e in simple:
            return simple[e], pos + 2
        size = {"x": 2, "u": 4, "U": 8}.get(e)
        if size:
            digits = self.src[pos + 2:pos + 2 + size]
            try:
                return chr(int(digits, 16)), pos + 2 + size
            except ValueError:
                self.error(pos, f"bad escape \\{e}{digits}")
        self.error(pos, f"unknown escape \\{e}")

    def synth(self, base: str, alternatives: list[list]) -> RuleRef:
        self.n_synth += 1
        name = f"{base}_{self.n_synth}"
        self.rules[name] = alternatives
        return RuleRef(name)

    def alternates(self, pos: int, rule: str, depth: int) -> tuple[list[list], int]:
        """depth: 0 for a rule's body, +1 inside each pair of parentheses."""
        if depth > MAX_NESTING:
            self.error(pos, f"parentheses nested deeper than {MAX_NESTING} in rule '{rule}'")
        alts = []
        seq, pos = self.sequence(pos, rule, depth)
        alts.append(seq)
        while pos < len(self.src) and self.src[pos] == "|":
            pos = self.skip(pos + 1, True)
            seq, pos = self.sequence(pos, rule, depth)
            alts.append(seq)
        return alts, pos

    def sequence(self, pos: int, rule: str, depth: int) -> tuple[list, int]:
        nested = depth > 0
        seq: list = []
        last_start = 0   # where the last element began in seq (for postfix operators)
        n_prev = 1       # copies the last element already stands for (llama.cpp's n_prev_rules)
        while pos < len(self.src):
            c = self.src[pos]
            if c not in "*+?{":
                n_prev = 1
            if c == '"':
                pos += 1
                last_start = len(seq)
                while pos < len(self.src) and self.src[pos] != '"':
                    ch, pos = self.char(pos)
                    seq.append(CharSet(((ord(ch), ord(ch)),)))
                if pos >= len(self.src):
                    self.error(pos, "unterminated string")
                pos += 1
                if len(seq) - last_start != 1 and len(seq) > last_start:  # a literal repeats as a whole
                    group = seq[last_start:]
                    del seq[last_start:]
                    seq.append(self.synth(rule, [group]))
            elif c == "[":
                pos += 1
                negated = pos < len(self.src) and self.src[pos] == "^"
                if negated:
                    pos += 1
                ranges = []
                while pos < len(self.src) and self.src[pos] != "]":
                    lo, pos = self.char(pos)
                    hi = lo
                    if pos + 1 < len(self.src) and self.src[pos] == "-" and self.src[pos + 1] != "]":
                        hi, pos = self.char(pos + 1)
                    ranges.append((ord(lo), ord(hi)))
                if pos >= len(self.src):
                    self.error(pos, "unterminated character class")
                pos += 1
                last_start = len(seq)
                seq.append(CharSet(tuple(ranges), negated))
            elif c == ".":
                pos += 1
                last_start = len(seq)
                seq.append(CharSet((), True))
            elif c.isalnum() or c in "-_":
                name, pos = self.name(pos)
                last_start = len(seq)
                seq.append(RuleRef(name))
            elif c == "(":
                alts, pos = self.alternates(self.skip(pos + 1, True), rule, depth + 1)
                if pos >= len(self.src) or self.src[pos] != ")":
                    self.error(pos, "expected ')'")
                pos += 1
                last_start = len(seq)
                seq.append(self.synth(rule, alts))
            elif c in "*+?{":
                if not seq:
                    self.error(pos, f"'{c}' with nothing to repeat")
                item = seq.pop()
                lo, hi, at = self.repetition(pos)
                if lo > MAX_REPETITION:
                    self.error(pos, f"number of repetitions exceeds sane defaults ({lo} > {MAX_REPETITION}) "
                                    f"in rule '{rule}'")
                if hi is not None and hi > MAX_REPETITION:
                    hi = None   # as llama.cpp: a huge upper bound is no bound
                n_prev *= max(1, hi if hi is not None else lo)
                if n_prev > MAX_REPETITION:
                    self.error(pos, f"repetitions of repetitions exceed sane defaults ({n_prev} > "
                                    f"{MAX_REPETITION}) in rule '{rule}'")
                seq.extend(self.repeat(rule, item, lo, hi))
                pos = at
                last_start = len(seq)
            elif c in "|)" or (c == "\n" and not nested):
                break
            else:
                self.error(pos, f"unexpected '{c}'")
            pos = self.skip(pos, nested)
        return seq, pos

    def repetition(self, pos: int) -> tuple[int, int | None, int]:
        c = self.src[pos]
        if c == "*":
            return 0, None, pos + 1
        if c == "+":
            return 1, None, pos + 1
        if c == "?":
            return 0, 1, pos + 1
        end = self.src.find("}", pos)
        if end < 0:
            self.error(pos, "unterminated {m,n}")
        body = self.src[pos + 1:end].replace(" ", "")
        try:
            if "," in body:
                a, b = body.split(",", 1)
                return int(a or 0), (int(b) if b else None), end + 1
            return int(body), int(body), end + 1
        except ValueError:
            self.error(pos, f"bad repetition {{{body}}}")

    def repeat(self, rule: str, item, lo: int, hi: int | None) -> list:
        out = [item] * lo
        if hi is None:       # item* as a right-recursive rule
            star = RuleRef(f"{rule}_star_{self.n_synth + 1}")
            self.n_synth += 1
            self.rules[star.name] = [[item, star], []]
            return out + [star]
        tail: list = []
        for _ in range(hi - lo):  # x{0,n}: (x (x ...)?)?
            tail = [self.synth(rule, [[item] + tail, []])]
        return out + tail

    def parse(self) -> dict[str, list[list]]:
        pos = self.skip(0, True)
        while pos < len(self.src):
            name, pos = self.name(pos)
            pos = self.skip(pos, False)
            if not self.src.startswith("::=", pos):
                self.error(pos, "expected '::='")
            pos = self.skip(pos + 3, True)
            alts, pos = self.alternates(pos, name, 0)
            self.rules[name] = alts
            if pos < len(self.src) and self.src[pos] not in "\n":
                self.error(pos, f"unexpected '{self.src[pos]}'")
            pos = self.skip(pos, True)
        for alts in self.rules.values():
            for seq in alts:
                for el in seq:
                    if isinstance(el, RuleRef) and el.name not in self.rules:
                        raise GrammarError(f"invalid grammar: undefined rule '{el.name}'")
        if "root" not in self.rules:
            raise GrammarError("invalid grammar: no 'root' rule")
        n_elements = sum(len(seq) for alts in self.rules.values() for seq in alts)
        if n_elements > MAX_ELEMENTS:
            raise GrammarError(f"invalid grammar: {n_elements} elements once repetitions are written out "
                               f"(at most {MAX_ELEMENTS})")
        check_left_recursion(self.rules)
        return self.rules


def empty_rules(rules: dict[str, list[list]]) -> set[str]:
    """The rules with an empty alternative: what llama.cpp's left-recursion check counts as
    "may be empty" (llama_grammar_detect_left_recursion). A rule that is empty only through
    other rules (`g ::= x? space`) does not count there, so `(x? space)+` (llama-server's own
    tool-call grammars) passes; the stack-depth bound in Grammar._closure keeps such grammars
    finite."""
    return {name for name, alts in rules.items() if any(not seq for seq in alts)}


def check_left_recursion(rules: dict[str, list[list]]) -> None:
    """Refuse a rule that can reach itself without consuming a character (`root ::= root "a"`,
    or through rules that may be empty): matching it would expand forever, and llama.cpp
    refuses it too. A depth-first search over "may start with" edges, without recursion."""
    nullable = empty_rules(rules)
    starts: dict[str, list[str]] = {}
    for name, alts in rules.items():
        firsts = []
        for seq in alts:
            for el in seq:
                if not isinstance(el, RuleRef):
                    break
                firsts.append(el.name)
                if el.name not in nullable:
                    break
        starts[name] = firsts
    done: set[str] = set()
    for root in rules:
        if root in done:
            continue
        on_path = {root}
        path = [(root, iter(starts[root]))]
        while path:
            name, children = path[-1]
            child = next(children, None)
            if child is None:
                path.pop()
                on_path.discard(name)
                done.add(name)
            elif child in on_path:
                raise GrammarError(f"unsupported grammar, left recursion detected for rule '{child}'")
            elif child not in done:
                on_path.add(child)
                path.append((child, iter(starts[child])))


# ---------------------------------------------------------------------------------- matching
class Grammar:
    def __init__(self, text: str):
        self.text = text
        self.rules = {name: tuple(tuple(seq) for seq in alts) for name, alts in _Parser(text).parse().items()}
        self.start = frozenset(self._enter((), "root"))
        # stack -> its expansion; per grammar and bounded, so a grammar's memory goes with it
        self._closures: dict[tuple, tuple] = {}

    def _enter(self, base: tuple, rule: str) -> list[tuple]:
        """The stacks that begin each alternative of `rule` on top of `base` (an empty
        alternative is finished at once: `base` itself)."""
        return [base + ((rule, a, 0),) if seq else base for a, seq in enumerate(self.rules[rule])]

    def _closure(self, stack: tuple) -> tuple:
        """Stacks whose top is a character set (or the empty stack: all matched)."""
        cached = self._closures.get(stack)
        if cached is not None:
            return cached
        out, seen, work = set(), set(), [stack]
        while work:
            st = work.pop()
            if st in seen:
                continue
            seen.add(st)
            if not st:
                out.add(st)
                continue
            if len(st) > MAX_STACK_DEPTH:
                raise GrammarError(f"grammar nests rules deeper than {MAX_STACK_DEPTH}")
            rule, alt, i = st[-1]
            seq = self.rules[rule][alt]
            el = seq[i]
            if isinstance(el, CharSet):
                out.add(st)
                continue
            # the reference is replaced by the rule it names; what follows it (if anything)
            # waits below
            base = st[:-1] + (((rule, alt, i + 1),) if i + 1 < len(seq) else ())
            work.extend(self._enter(base, el.name))
        result = tuple(out)
        if len(self._closures) >= CLOSURE_CACHE_SIZE:
            self._closures.clear()
        self._closures[stack] = result
        return result

    def advance(self, stacks: frozenset, text: str) -> frozenset:
        """The stacks after matching `text`; empty when it cannot be matched."""
        for ch in text:
            nxt = set()
            for st in stacks:
                for cst in self._closure(st):
                    if not cst:
                        continue
                    rule, alt, i = cst[-1]
                    seq = self.rules[rule][alt]
                    if seq[i].matches(ch):
                        nxt.add(cst[:-1] + ((rule, alt, i + 1),) if i + 1 < len(seq) else cst[:-1])
            if len(nxt) > MAX_STACKS:
                raise GrammarError(f"grammar too ambiguous: more than {MAX_STACKS} parses alive at once")
            stacks = frozenset(nxt)
            if not stacks:
                break
        return stacks

    def accepts_end(self, stacks: frozenset) -> bool:
        return any(() in self._closure(st) for st in stacks)

    def accepts_partial(self, stacks: frozenset, partial: tuple) -> bool:
        """Whether a character begun by a token's last bytes may still match somewhere:
        llama_grammar_match_partial_char over the code points those bytes could become."""
        value, n_remain = partial
        if n_remain == 1 and value < 2:   # (a 7-bit character in two bytes: overlong)
            return False
        low = value << (n_remain * 6)
        high = low | ((1 << (n_remain * 6)) - 1)
        if low == 0:
            low = {2: 1 << 11, 3: 1 << 16}.get(n_remain, low)
        for st in stacks:
            for cst in self._closure(st):
                if cst:
                    rule, alt, i = cst[-1]
                    el = self.rules[rule][alt][i]
                    if isinstance(el, CharSet) and el.may_match(low, high):
                        return True
        return False


class GrammarState:
    """One request's progress through a grammar, and which tokens may come next.

    A lazy grammar (triggers: engine.grammar_triggers) constrains nothing until a trigger fires;
    it then reads the output from the trigger on (llama_grammar_accept_impl: the token where a
    matched text starts is read from there)."""

    def __init__(self, grammar: Grammar, token_text, eog_ids, triggers=(), token_piece=None, prefill: str = "",
                 gate=None):
        """triggers: Trigger objects (a plain string is a WORD trigger). prefill: text the grammar
        reads first (llama-server feeds its tool-call grammars the generation prompt). gate: a
        lazy grammar sees no token inside a reasoning block (an engine.reasoning_budget
        ReasoningBudget, which this state feeds every token)."""
        from .grammar_triggers import TRIGGER_WORD, Trigger, TriggerWatch
        self.grammar = grammar
        self.stacks = grammar.start
        if prefill:
            self.stacks = grammar.advance(self.stacks, prefill)
            if not self.stacks:
                raise GrammarError("the grammar does not accept the generation prompt")
        self.gate = gate
        self.token_text = token_text     # id -> str, or None for bytes that are not whole characters
        self.eog_ids = eog_ids
        self.token_piece = token_piece   # id -> bytes (the text the triggers are looked for in)
        self.awaiting = bool(triggers)
        self.partial = (0, 0)   # a character begun by the last token: (its value so far, bytes to come)
        self.watch = TriggerWatch([Trigger(TRIGGER_WORD, t) if isinstance(t, str) else t for t in triggers])

    def allows(self, token: int) -> bool:
        if self.awaiting or (self.gate is not None and self.gate.inside):
            return True
        if token in self.eog_ids:
            return self.grammar.accepts_end(self.stacks)
        decoded = self._read(token)
        if decoded is None:
            return False
        text, partial = decoded
        if not text and partial == self.partial:   # (a token that spells nothing)
            return False
        stacks = self.grammar.advance(self.stacks, text) if text else self.stacks
        if not stacks:
            return False
        return partial[1] == 0 or self.grammar.accepts_partial(stacks, partial)

    def _read(self, token: int) -> tuple[str, tuple] | None:
        """decode_utf8 of the token after the bytes still pending; a token of whole characters
        after none (the common case) takes its text as is."""
        if self.partial == (0, 0):
            text = self.token_text(token)
            if text is not None or self.token_piece is None:   # (no bytes to read: nothing read)
                return text or "", (0, 0)
        return decode_utf8(self.token_piece(token), self.partial)

    def accept(self, token: int) -> None:
        """common_sampler_accept: with a gate, a token inside a reasoning block is not the
        grammar's; the block's closing tokens are replayed to it (they may hold a trigger)."""
        if self.gate is None:
            self._accept(token)
            return
        applies = not self.gate.inside
        closed_by = self.gate.accept(token)
        if closed_by and not applies:
            for t in closed_by:
                self._accept(t)
        if applies:
            self._accept(token)

    def _accept(self, token: int) -> None:
        if self.awaiting:
            fired = self.watch.fire(token, self.token_piece(token))
            if fired is not None:
                self.awaiting = False
                for _, text in fired:
                    self._advance(decode_utf8(text, self.partial))
        elif token not in self.eog_ids:
            self._advance(self._read(token))

    def _advance(self, decoded: tuple | None) -> None:
        """The grammar reads a token's whole characters; the first bytes of one it ends inside
        wait for the next token (llama_grammar_accept_token's partial_utf8)."""
        if decoded is None:   # (not UTF-8, or a match starting inside a character: no way on)
            self.stacks, self.partial = frozenset(), (0, 0)
            return
        text, self.partial = decoded
        if text:
            self.stacks = self.grammar.advance(self.stacks, text)


_UTF8_LENGTH = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4)   # by a lead byte's high nibble


def decode_utf8(piece: bytes, partial: tuple) -> tuple[str, tuple] | None:
    """llama-grammar.cpp's decode_utf8: the whole characters of `piece`, continuing a character
    begun by earlier bytes (partial: its value so far and how many bytes it still needs), and
    the one it ends inside; None for bytes that are not UTF-8."""
    value, n_remain = partial
    pos, out = 0, []
    while pos < len(piece) and n_remain > 0:
        b = piece[pos]
        if b >> 6 != 2:
            return None
        value, pos, n_remain = (value << 6) + (b & 0x3F), pos + 1, n_remain - 1
    if partial[1] > 0 and n_remain == 0:
        out.append(value)
    while pos < len(piece):
        first = piece[pos]
        n_remain = _UTF8_LENGTH[first >> 4] - 1
        if n_remain < 0:
            return None
        value, pos = first & ((1 << (7 - n_remain)) - 1), pos + 1
        while pos < len(piece) and n_remain > 0:
            value, pos, n_remain = (value << 6) + (piece[pos] & 0x3F), pos + 1, n_remain - 1
        if n_remain == 0:
            out.append(value)
    if any(c > 0x10FFFF for c in out):   # (no such character: nothing matches it)
        return None
    return "".join(map(chr, out)), ((value, n_remain) if n_remain > 0 else (0, 0))
