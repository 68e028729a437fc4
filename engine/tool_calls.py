"""Tool calls in a chat: how a template writes them, the grammar that holds the model to that
form, and reading the calls back out of the model's text.

llama-server does not keep a table of model formats. Its differential autoparser
(common/chat-diff-analyzer.cpp) renders the template twice, once with a plain assistant answer
and once with a tool call, and reads the format off the difference: the markers around the call
and the JSON field names. This module does the same for the JSON formats ("JSON_NATIVE": Qwen
2.5/3 and Hermes' `<tool_call>{...}</tool_call>`, Llama 3.x's bare `{"name": ..., "parameters":
...}`, Mistral's `[TOOL_CALLS][{...}]`), then builds the grammar llama.cpp's PEG builder would
(common/chat-peg-parser.cpp standard_json_tools, peg-parser.cpp build_grammar), rule for rule.

Calls written with the template's own tags (the function's name not a JSON value) are read by
engine/tagged_tool_calls.py. A JSON form it does not know (the function's name as the key)
raises ToolFormatUnsupported: the request gets a clear 400 rather than calls parsed differently
from llama-server.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .grammar import GrammarError
from .json_schema import INVALID_RULE_CHARS, SchemaConverter, _SchemaBuilder, format_literal

# The probe's names (chat-diff-analyzer.cpp): unlikely strings, so that where they land in the
# rendered text can only be where the template put them
FUN_FIRST = "FFF_FIRST_FUN_F"
FUN_SECOND = "SSS_SECOND_FUN_S"
ARG_FIRST = "AA_ARG_FST_AA"
ARG_SECOND = "BB_ARG_SND_BB"
USER_MSG = "U_USER_MSG Hello END_U"
ASSISTANT_MSG = "A_ASST_MSG I can help END_A"
CALL_ID_001 = "call00001"
CALL_ID_002 = "call00002"

_PARAMS_SCHEMA = {"type": "object",
                  "properties": {ARG_FIRST: {"type": "string", "description": "First argument"},
                                 ARG_SECOND: {"type": "string", "description": "Second argument"}},
                  "required": []}
PROBE_TOOLS = [{"type": "function", "function": {"name": FUN_FIRST, "description": "Test function foo",
                                                 "parameters": _PARAMS_SCHEMA}},
               {"type": "function", "function": {"name": FUN_SECOND, "description": "Test function bar",
                                                 "parameters": _PARAMS_SCHEMA}}]


def _probe_call(name: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": {ARG_FIRST: "XXXX", ARG_SECOND: "YYYY"}}}


class ToolFormatUnsupported(ValueError):
    """The template writes tool calls in a form this module does not parse."""


@dataclass(frozen=True)
class ToolFormat:
    """Where a template's tool calls sit and how their JSON is keyed (llama.cpp's
    analyze_tools::format for JSON_NATIVE). A section wraps all the calls of a turn; per-call
    markers wrap each."""
    section_start: str = ""
    section_end: str = ""
    per_call_start: str = ""
    per_call_end: str = ""
    name_field: str = ""
    args_field: str = ""
    id_field: str = ""
    gen_id_field: str = ""
    parameter_order: tuple = ()
    tools_array_wrapped: bool = False
    fun_name_is_key: bool = False     # {"get_weather": {...arguments...}} (Apertus)
    openai_wrapper: bool = False      # also accept a leading "type": "function" field
    supports_parallel: bool = False   # the template renders a second call (its caps)

    @property
    def markers(self) -> tuple:
        """The markers a chat answer keeps as text even where they are control tokens
        (collect_preserved_tokens)."""
        return self.section_start, self.section_end, self.per_call_start, self.per_call_end

    @property
    def trigger(self) -> str:
        """The text that starts the calls: a lazy grammar waits for it."""
        return self.section_start or self.per_call_start

    @property
    def tool_start(self) -> str:
        """Content runs until this."""
        return self.section_start or self.per_call_start or "{"


# --- the differential analysis -------------------------------------------------------------

def segmentize(text: str) -> list[tuple[bool, str]]:
    """segmentize_markers: (is_marker, text) pieces, a marker being <...> or [...]."""
    out, in_marker, opener, last = [], False, "", 0
    for i, ch in enumerate(text):
        if not in_marker and ch in "<[":
            if last < i:
                out.append((False, text[last:i]))
            last, in_marker, opener = i, True, ch
        elif in_marker and (opener, ch) in (("<", ">"), ("[", "]")):
            out.append((True, text[last:i + 1]))
            last, in_marker = i + 1, False
    if last < len(text):
        out.append((False, text[last:]))
    return out


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


@dataclass
class DiffSplit:
    prefix: str = ""
    suffix: str = ""
    left: str = ""
    right: str = ""


def diff_split(left: str, right: str) -> DiffSplit:
    """calculate_diff_split: peel equal marker/text segments off both ends, then equal
    characters off the remaining text; what is left on each side is the difference."""
    res = DiffSplit()
    ls, rs = segmentize(left), segmentize(right)
    if not ls:
        res.right = right
        return res
    if not rs:
        res.left = left
        return res
    l0, l1, r0, r1 = 0, len(ls) - 1, 0, len(rs) - 1
    l_done = r_done = False
    while l0 != l1 and r0 != r1:
        advanced = False
        if ls[l0] == rs[r0]:
            res.prefix += ls[l0][1]
            l0 += 1
            r0 += 1
            advanced = True
        if ls[l1] == rs[r1]:
            res.suffix = ls[l1][1] + res.suffix
            if l0 != l1:
                l1 -= 1
            else:
                l_done = True
            if r0 != r1:
                r1 -= 1
            else:
                r_done = True
            advanced = True
        if not advanced:
            break
    if l0 == l1 and r0 != r1:
        if ls[l0] == rs[r1]:
            res.suffix = rs[r1][1] + res.suffix
            r1 -= 1
            l_done = True
        elif ls[l0] == rs[r0]:
            res.prefix += rs[r0][1]
            r0 += 1
            l_done = True
    elif r0 == r1 and l0 != l1:
        if ls[l1] == rs[r0]:
            res.suffix = ls[l1][1] + res.suffix
            l1 -= 1
            r_done = True
        elif ls[l0] == rs[r0]:
            res.prefix += ls[l0][1]
            l0 += 1
            r_done = True
    elif l0 == l1 and r0 == r1 and ls[l0] == rs[r0] and ls[l0][0]:
        res.prefix += rs[r0][1]
        l_done = r_done = True
    text_suffix = not ls[l1][0] and not rs[r1][0]
    text_prefix = not rs[r0][0] and not ls[l0][0]
    rem_l = "".join(s for _, s in ls[l0:l1 if l_done else l1 + 1])
    rem_r = "".join(s for _, s in rs[r0:r1 if r_done else r1 + 1])
    n_suf = _common_suffix_len(rem_l, rem_r) if text_suffix else 0
    n_pre = _common_prefix_len(rem_l[:len(rem_l) - n_suf], rem_r[:len(rem_r) - n_suf]) if text_prefix else 0
    res.prefix += rem_l[:n_pre]
    res.suffix = rem_l[len(rem_l) - n_suf:] + res.suffix
    res.left = rem_l[n_pre:len(rem_l) - n_suf]
    res.right = rem_r[n_pre:len(rem_r) - n_suf]
    if not res.left and not res.right:
        res.prefix, res.suffix = left, ""
    if not res.left and res.right and len(left) <= len(right) and right.startswith(left):
        res.prefix, res.suffix, res.right = left, "", right[len(left):]
    return res


_WS = " \t\n\v\f\r"
NOT_FOUND = 1 << 62


def analyze_tool_format(template, reasoning=None) -> ToolFormat | None:
    """The tool-call format of a engine.chat_template.ChatTemplate; None when the template
    does not render tool calls at all (then llama-server parses the answer as plain content).
    reasoning: the template's engine.reasoning.ReasoningFormat, whose markers are not part of
    the calls (a TaggedToolFormat for the tagged forms). Raises ToolFormatUnsupported for JSON
    calls keyed by the function's name."""
    caps = template.caps
    if not caps.supports_tool_calls:
        return None

    def render(messages) -> str | None:
        try:
            return template.render(messages, add_generation_prompt=False, tools=PROBE_TOOLS)
        except Exception:
            return None

    user = {"role": "user", "content": USER_MSG}
    plain = render([user, {"role": "assistant", "content": ASSISTANT_MSG}])
    one_call = render([user, {"role": "assistant", "content": "", "tool_calls": [_probe_call(FUN_FIRST, CALL_ID_001)]}])
    if plain is None or one_call is None:
        raise ToolFormatUnsupported("the template fails on a tool-call probe")
    haystack = diff_split(plain, one_call).right
    if not haystack:
        return None
    if not re.search(r'[{:]\s*"' + FUN_FIRST + '"', haystack):   # the name is not a JSON value: tags
        from .tagged_tool_calls import analyze_tagged_format
        json_args = bool(re.search(r'[{:]\s*"' + ARG_FIRST + '"', haystack))
        return analyze_tagged_format(template, haystack, json_args, reasoning)
    for marker in (reasoning.start, reasoning.end) if reasoning is not None else ():
        if marker and marker in haystack:   # the first of each goes (analyze_tool_call_format)
            haystack = haystack.replace(marker, "", 1)
    fmt = _json_native_fields(haystack)
    if caps.supports_parallel_tool_calls and fmt["section_start"]:
        two = render([user, {"role": "assistant", "content": "", "tool_calls": [
            _probe_call(FUN_FIRST, CALL_ID_001), _probe_call(FUN_SECOND, CALL_ID_002)]}])
        if two is not None and fmt["section_start"] in diff_split(one_call, two).right:
            fmt["per_call_start"], fmt["per_call_end"] = fmt["section_start"], fmt["section_end"]
            fmt["section_start"] = fmt["section_end"] = ""
    fmt["section_end"] = fmt["section_end"].strip(_WS)
    fmt["per_call_end"] = fmt["per_call_end"].strip(_WS)
    # chat-diff-analyzer.cpp's workaround for templates that describe {name, parameters} calls
    # (Llama 3.x): their models write the OpenAI wrapper's "type": "function" too
    fmt["openai_wrapper"] = ('Respond in the format {"name": function name' in template.source
                             and "Do not use variables." in template.source)
    return ToolFormat(supports_parallel=caps.supports_parallel_tool_calls, **fmt)


def _json_native_fields(haystack: str) -> dict:
    """analyze_tool_call_format_json_native: the call's JSON object in the rendered text, its
    field names, their order, and the markers around it."""
    start, end = haystack.find("{"), haystack.rfind("}")
    cut = haystack[start:end + 1]
    try:
        call = json.loads(cut)
    except ValueError:
        raise ToolFormatUnsupported("the rendered tool call is not one JSON object") from None
    fields = {"name_field": "", "args_field": "", "id_field": "", "gen_id_field": ""}
    name_is_key = False
    for key, value in call.items():
        if key == FUN_FIRST:   # the function's name is the key, its arguments the value
            name_is_key = True
            fields["name_field"] = fields["args_field"] = ""
            continue
        if isinstance(value, dict) and ARG_FIRST not in json.dumps(value):
            raise ToolFormatUnsupported("tool calls nested in a function object")
        if isinstance(value, str) and "call0000" in value:
            fields["id_field"] = key
        elif isinstance(value, str) and value == FUN_FIRST:
            fields["name_field"] = key
        elif ARG_FIRST in json.dumps(value):
            fields["args_field"] = key
        elif "id" in key:
            fields["gen_id_field"] = key
    wrapped = re.search(r"(\[\s*)" + re.escape(cut) + r"(\s*\])", haystack)
    if wrapped:
        start -= len(wrapped.group(1))
        end += len(wrapped.group(2))
    end += 1
    # a field not found sorts last, as std::string::npos does
    located = sorted((haystack.find(f) if f in haystack else NOT_FOUND, f) for f in fields.values() if f)
    section_end = haystack[end:].strip(_WS)
    if wrapped and section_end == "]":
        section_end = ""
    return {**fields, "parameter_order": tuple(f for _, f in located), "tools_array_wrapped": bool(wrapped),
            "fun_name_is_key": name_is_key,
            "section_start": haystack[:start].lstrip(_WS), "section_end": section_end,
            "per_call_start": "", "per_call_end": ""}


# --- the grammar ---------------------------------------------------------------------------
# A few PEG nodes, enough for the JSON formats, turned into GBNF exactly as llama.cpp's
# common_peg_arena::build_grammar writes them (so its rules and ours read the same).

@dataclass(frozen=True)
class Lit:
    """These characters, exactly."""
    text: str


@dataclass(frozen=True)
class Seq:
    """Each item in turn (build with seq(), which flattens nested sequences as llama.cpp does)."""
    items: tuple


@dataclass(frozen=True)
class Choice:
    """One of the items."""
    items: tuple


@dataclass(frozen=True)
class Rep:
    """The item lo to hi times (hi -1: no bound)."""
    item: object
    lo: int
    hi: int


@dataclass(frozen=True)
class Atomic:
    """A group kept whole (llama.cpp's atomic parser): a sequence inside it is not flattened
    into its parent, so it prints in parentheses."""
    item: object


@dataclass(frozen=True)
class Until:
    """Any text in which no delimiter occurs (content before the calls)."""
    delimiters: tuple


@dataclass(frozen=True)
class Including:
    """Any text up to and including the first occurrence of a delimiter (llama.cpp's ac parser)."""
    delimiters: tuple


@dataclass(frozen=True)
class Schema:
    """A JSON value of this schema (a function's arguments); its rules are named after `name`."""
    name: str
    schema: object = field(hash=False, compare=False)


@dataclass(frozen=True)
class Rule:
    name: str
    body: object
    trigger: bool = False


SPACE = "space"     # the PEG space parser: GBNF's `space` rule
EPS = Seq(())
STRING_CONTENT = Lit(None)   # a JSON string's characters (common_peg_string_parser, '"')
JSON_NUMBER = "json-number"


def seq(*items) -> Seq:
    """common_peg_parser_builder::sequence: nested sequences flatten."""
    out = []
    for it in items:
        out.extend(it.items if isinstance(it, Seq) else (it,))
    return Seq(tuple(out))


def choice(*items) -> Choice:
    out = []
    for it in items:
        out.extend(it.items if isinstance(it, Choice) else (it,))
    return Choice(tuple(out))


def optional(item) -> Rep:
    return Rep(item, 0, 1)


JSON_NUMBER_RULE = '"-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)? (("e" | "E") [+-]? [0-9]+)?'
STRING_CONTENT_GBNF = '( [^"\\\\] | "\\\\" ( ["\\\\/ bfnrt] | "u" [0-9a-fA-F]{4} ) )*'


def _rule_name(rule: Rule) -> str:
    return INVALID_RULE_CHARS.sub("-", rule.name)


def _effective(node):
    while isinstance(node, Atomic):
        node = node.item
    return node


class GrammarBuilder:
    """to_gbnf over our nodes, collecting rules in a json_schema SchemaConverter (llama.cpp's
    common_grammar_builder wraps the same converter)."""

    def __init__(self):
        self.conv = SchemaConverter()
        self.rules: list[Rule] = []
        self.n_until = 0

    def gbnf(self, node) -> str:
        if node == SPACE:
            return "space"
        if node == JSON_NUMBER:
            self.conv.add_rule("json-number", JSON_NUMBER_RULE)
            return "json-number"
        if node is STRING_CONTENT:
            return STRING_CONTENT_GBNF
        if isinstance(node, Lit):
            return format_literal(node.text)
        if isinstance(node, Atomic):
            return self.gbnf(node.item)
        if isinstance(node, Seq):
            parts = []
            for child in node.items:
                g = self.gbnf(child)
                if g:
                    parts.append(f"({g})" if isinstance(_effective(child), (Seq, Choice)) else g)
            return " ".join(parts)
        if isinstance(node, Choice):
            return " | ".join(f"({self.gbnf(c)})" if isinstance(_effective(c), Choice) else self.gbnf(c)
                              for c in node.items)
        if isinstance(node, Rep):
            g = self.gbnf(node.item)
            if isinstance(_effective(node.item), (Seq, Choice)):
                g = f"({g})"
            suffix = {(0, 1): "?", (0, -1): "*", (1, -1): "+", (1, 1): ""}.get((node.lo, node.hi))
            if suffix is not None:
                return g + suffix
            if node.lo == node.hi:
                return g + "{%d}" % node.lo
            return g + "{%d,%s}" % (node.lo, "" if node.hi < 0 else node.hi)
        if isinstance(node, Until):
            self.n_until += 1
            return excluding_grammar(self.conv, f"until-{self.n_until}", node.delimiters)
        if isinstance(node, Including):
            self.n_until += 1
            return including_grammar(self.conv, f"ac-{self.n_until}", node.delimiters)
        if isinstance(node, Schema):
            return self.conv.visit(_SchemaBuilder(node.schema).build(), node.name)
        if isinstance(node, Rule):
            if node not in self.rules:
                self.rules.append(node)
                self.conv.add_rule(node.name, self.gbnf(node.body))
            return _rule_name(node)
        raise TypeError(f"no GBNF for {node!r}")

    def grammar(self, root, lazy: bool) -> str:
        """Lazy: the root is the choice of the trigger rules (what the grammar constrains once
        the trigger word has appeared); otherwise the whole answer."""
        if lazy:
            self.gbnf(root)
            triggers = sorted(_rule_name(r) for r in self.rules if r.trigger)
            self.conv.add_rule("root", " | ".join(triggers))
        else:
            self.conv.add_rule("root", self.gbnf(root))
        if self.conv.errors:   # a schema that cannot be converted (a tool's parameters, ...)
            raise GrammarError("JSON schema conversion failed:\n" + "\n".join(self.conv.errors))
        return self.conv.format_grammar()


def excluding_grammar(conv: SchemaConverter, prefix: str, strings) -> str:
    """gbnf_excluding_grammar: any text in which none of `strings` occurs. Every state accepts,
    and a character that would complete a string has no way on. Returns the start rule's name."""
    def rule(completing, buckets, specific, name):
        rhs = "|"
        for d in sorted(buckets):
            rhs += f" {_char_class(buckets[d], False)} {name(d)} |"
        return rhs + f" {_char_class(specific, True)} {name(0)}"
    return _automaton_grammar(conv, prefix, strings, rule)


def including_grammar(conv: SchemaConverter, prefix: str, strings) -> str:
    """gbnf_including_grammar: any text up to and including the first occurrence of one of
    `strings`: a character that completes one ends the match, no state accepts otherwise."""
    def rule(completing, buckets, specific, name):
        alts = [_char_class(completing, False)] if completing else []
        alts += [f"{_char_class(buckets[d], False)} {name(d)}" for d in sorted(buckets)]
        return " | ".join(alts + [f"{_char_class(specific, True)} {name(0)}"])
    return _automaton_grammar(conv, prefix, strings, rule)


def _automaton_grammar(conv: SchemaConverter, prefix: str, strings, build_rule) -> str:
    """gbnf_ac_grammar: the states of an Aho-Corasick automaton over `strings` (peg-parser.cpp,
    trie.cpp) as rules, each written by build_rule(completing chars, {next state: chars},
    chars with a transition of their own, state name). Returns the start rule's name."""
    children: list[dict] = [{}]
    terminal: list[bool] = [False]
    for s in strings:
        node = 0
        for ch in s:
            if ch not in children[node]:
                children.append({})
                terminal.append(False)
                children[node][ch] = len(children) - 1
            node = children[node][ch]
        terminal[node] = True
    fail = [0] * len(children)
    order, queue = [], [0]
    while queue:
        u = queue.pop(0)
        order.append(u)
        for ch, v in sorted(children[u].items()):
            if u != 0:
                f = fail[u]
                while f and ch not in children[f]:
                    f = fail[f]
                nxt = children[f].get(ch)
                fail[v] = nxt if nxt is not None and nxt != v else 0
            queue.append(v)
    match = list(terminal)
    for u in order:
        if u and not match[u]:
            match[u] = match[fail[u]]
    alphabet = sorted({ch for c in children for ch in c})

    def nxt(state: int, ch: str) -> int:
        while state and ch not in children[state]:
            state = fail[state]
        return children[state].get(ch, 0)

    def name(s: int) -> str:
        return prefix if s == 0 else f"{prefix}-{s:02d}"

    for q in range(len(children)):
        if match[q]:
            continue
        buckets: dict[int, list[str]] = {}
        completing, specific = [], []
        for ch in alphabet:
            d = nxt(q, ch)
            if match[d]:
                completing.append(ch)
                specific.append(ch)
            elif d:
                buckets.setdefault(d, []).append(ch)
                specific.append(ch)
        conv.add_rule(name(q), build_rule(completing, buckets, specific, name))
    if match[0]:
        conv.add_rule(prefix, "|")
    return name(0)


def _char_class(chars, negate: bool) -> str:
    out = "[^" if negate else "["
    for ch in chars:
        c = ord(ch)
        if ch in "-][\\":
            out += "\\" + ch
        elif ch in "\n\t\r":
            out += {"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch]
        elif 0x20 <= c <= 0x7E:
            out += ch
        elif c <= 0xFF:
            out += f"\\x{c:02X}"
        elif c <= 0xFFFF:
            out += f"\\u{c:04X}"
        else:
            out += f"\\U{c:08X}"
    return out + "]"


def _tool_parameters(function: dict) -> dict:
    """common_chat_tool_parameters: a function's parameters schema (an empty object schema when
    it has none)."""
    params = function.get("parameters")
    return params if isinstance(params, dict) else {"type": "object", "properties": {}}


def _keyed_call_object(fmt: ToolFormat, tool: dict) -> Rule:
    """build_json_tools_function_is_key: {"NAME": ARGUMENTS}, or {"NAME": {ids, "ARGS": ARGUMENTS}}
    when the template writes ids or names the arguments."""
    name = tool["function"]["name"]
    args = Atomic(Schema(f"tool-{name}-schema", _tool_parameters(tool["function"])))
    inner = []
    for key, values in ((fmt.id_field, (seq(Lit('"'), STRING_CONTENT, Lit('"')),)),
                        (fmt.gen_id_field, (seq(Lit('"'), STRING_CONTENT, Lit('"')), JSON_NUMBER))):
        if key:
            field = Atomic(seq(Lit(f'"{key}"'), SPACE, Lit(":"), SPACE, choice(*values) if len(values) > 1 else
                               values[0]))
            inner.append(optional(seq(field, SPACE, optional(seq(Lit(","), SPACE)))))
    inner.append(seq(Lit(f'"{fmt.args_field}"'), SPACE, Lit(":"), SPACE, args) if fmt.args_field else args)
    if not fmt.args_field and len(inner) == 1:
        value = inner[0]
    else:
        value = seq(Lit("{"), SPACE, *[x for i, f in enumerate(inner) for x in ((SPACE, f) if i else (f,))],
                    SPACE, Lit("}"))
    return Rule(f"tool-{name}", Atomic(seq(Atomic(Lit("{")), SPACE, Lit('"'), Atomic(Lit(name)), Lit('"'), SPACE,
                                           Lit(":"), SPACE, value, SPACE, Atomic(Lit("}")))))


def _call_object(fmt: ToolFormat, tool: dict) -> Rule:
    """build_json_tools_flat_keys: one function's call, its fields in the template's order."""
    if fmt.fun_name_is_key:
        return _keyed_call_object(fmt, tool)
    name = tool["function"]["name"]
    name_key = fmt.name_field or "name"
    args_key = fmt.args_field or "arguments"
    fields = [(seq(Lit(f'"{name_key}"'), SPACE, Lit(":"), SPACE, Atomic(seq(Lit('"'), Lit(name), Lit('"')))), name_key),
              (seq(Lit(f'"{args_key}"'), SPACE, Lit(":"), SPACE,
                   Schema(f"tool-{name}-schema", _tool_parameters(tool["function"]))), args_key)]
    for key in (fmt.id_field, fmt.gen_id_field):
        if key:
            value = choice(seq(Lit('"'), STRING_CONTENT, Lit('"')), JSON_NUMBER)
            fields.append((optional(Atomic(seq(Lit(f'"{key}"'), SPACE, Lit(":"), SPACE, value))), key))
    order = list(fmt.parameter_order)
    fields.sort(key=lambda f: order.index(f[1]) if f[1] in order else len(order))
    body = [Lit("{"), SPACE]
    if fmt.openai_wrapper:
        body.append(optional(seq(Lit('"type"'), SPACE, Lit(":"), SPACE, Lit('"function"'), SPACE, Lit(","), SPACE)))
    for i, (parser, _) in enumerate(fields):
        body.append(parser)
        if i < len(fields) - 1:
            body += [SPACE, Lit(","), SPACE]
    body += [SPACE, Lit("}")]
    return Rule(f"tool-{name}", seq(*body))


def _calls_section(fmt: ToolFormat, start: str, end: str, tools: list, parallel: bool, required: bool):
    """standard_json_tools: the marked section holding one call (or, parallel, several
    separated by commas), itself optional unless calls are required."""
    calls = choice(*[_call_object(fmt, t) for t in tools])
    if parallel:
        calls = seq(calls, Rep(seq(SPACE, Lit(","), SPACE, calls), 0, -1))
    if fmt.tools_array_wrapped:
        calls = seq(Lit("["), SPACE, calls, SPACE, Lit("]"))
    section = Rule("tool-call", seq(Lit(start), SPACE, calls, SPACE, Lit(end)), trigger=True)
    return section if required else optional(section)


@dataclass(frozen=True)
class ToolGrammar:
    """What constrains a tool-calling answer: the GBNF, whether it waits for a trigger word
    (lazy) and which (a parser may name them for a grammar that is not lazy, where they do
    nothing); None grammar: the answer is free."""
    grammar: str | None
    lazy: bool = False
    triggers: tuple = ()
    triggers_are_patterns: bool = False   # the triggers are regular expressions, not words


def tool_call_grammar(fmt: ToolFormat, tools: list, required: bool, parallel: bool,
                      generation_prompt: str = "", reasoning=None, extract_reasoning: bool = True) -> ToolGrammar:
    """The grammar llama-server builds for a JSON_NATIVE template (chat-auto-parser-generator.cpp
    generate_parser + build_tool_parser_json_native). tool_choice "auto" gets a lazy grammar that
    waits for the calls' opening marker (none when the format has no marker: the answer is then
    free); "required" constrains the whole answer: any content, then the calls.

    generation_prompt: llama-server's grammar starts with the prompt's last words (the
    assistant header, up to a reasoning marker), and the whole generation prompt is fed to the
    grammar before sampling (SamplingParams.grammar_prefill). reasoning (a ReasoningFormat),
    when extracted: an optional reasoning block comes first."""
    from . import functionary_tool_calls, mistral_tool_calls, tagged_tool_calls
    from .xml_tool_calls import XmlToolFormat, xml_tool_call_grammar
    if isinstance(fmt, functionary_tool_calls.FunctionaryToolFormat):
        return functionary_tool_calls.tool_call_grammar(fmt, tools, required, parallel)
    if isinstance(fmt, XmlToolFormat):   # a format with a parser of its own
        return xml_tool_call_grammar(fmt, tools, required, parallel, extract_reasoning)
    if isinstance(fmt, tagged_tool_calls.TaggedToolFormat):
        return tagged_tool_calls.tool_call_grammar(fmt, tools, required, parallel, generation_prompt, reasoning,
                                                   extract_reasoning)
    if isinstance(fmt, mistral_tool_calls.MistralToolFormat):
        return mistral_tool_calls.tool_call_grammar(fmt, tools, required, parallel, extract_reasoning)
    tools = [t for t in tools if isinstance(t, dict) and "function" in t]
    if not required and not fmt.trigger:
        return ToolGrammar(None)
    if not fmt.section_start and fmt.per_call_start:
        single = _calls_section(fmt, fmt.per_call_start, fmt.per_call_end, tools, parallel, required)
        calls = Rule("tool-calls", Rep(seq(single, SPACE), 1, -1), trigger=True)
    else:
        calls = _calls_section(fmt, fmt.section_start, fmt.section_end, tools, parallel, required)
    lazy = not required
    if lazy:
        return ToolGrammar(GrammarBuilder().grammar(calls, lazy=True), True, (fmt.trigger,))
    return required_calls_grammar(generation_prompt, reasoning, extract_reasoning,
                                  optional(Until((fmt.tool_start,))), calls)


def required_calls_grammar(generation_prompt: str, reasoning, extract_reasoning: bool, content, calls) -> ToolGrammar:
    """An analysed template's grammar with tool_choice "required" (autoparser::build_parser):
    the generation prompt's last words (up to a reasoning block's start), spaces, the optional
    block when extracted, the content before the calls, then the calls."""
    head = reasoning.head(generation_prompt) if reasoning is not None else generation_prompt
    block = reasoning.block() if reasoning is not None and extract_reasoning else EPS
    root = seq(Lit(head) if head else EPS, SPACE, block, content, calls)
    return ToolGrammar(GrammarBuilder().grammar(root, lazy=False))


# --- reading the calls back ----------------------------------------------------------------

# what llama-server answers (a 500) when a parser written for a template cannot read an answer
PARSE_ERROR = "The model produced output that does not match the expected peg-native format"


@dataclass
class ParsedAnswer:
    content: str
    tool_calls: list          # [{"name", "arguments" (the JSON text as written), "id"}]
    ok: bool = True           # False: a final answer that is not in the format (read as content)
    reasoning: str = ""       # the reasoning block's text (engine/reasoning.py read_answer)
    error: str = ""           # the answer cannot be read at all: llama-server's parser throws (a 500)


def parse_answer(fmt: ToolFormat, tools: list, text: str, partial: bool, required: bool = False,
                 parallel: bool = True) -> ParsedAnswer:
    """Content, then the calls, as llama-server's PEG parser reads a JSON_NATIVE answer: the
    content runs up to the first call marker; each call is a JSON object whose name is one of
    the request's tools; its arguments are kept as the model wrote them. A call cut short
    (partial, or an answer stopped by length) gives what was complete. `text` starts after the
    generation prompt, its spaces and any reasoning block (engine/reasoning.py read_answer). A
    final answer that does not parse (a marker followed by no call, text after the calls) is
    all content, and not ok: llama-server's parser throws, and it falls back to the raw text."""
    from . import functionary_tool_calls, mistral_tool_calls, tagged_tool_calls
    from .xml_tool_calls import XmlToolFormat, parse_xml_answer
    if isinstance(fmt, functionary_tool_calls.FunctionaryToolFormat):
        return functionary_tool_calls.parse_answer(fmt, tools, text, partial, required, parallel)
    if isinstance(fmt, XmlToolFormat):
        return parse_xml_answer(fmt, tools, text, partial, required)
    if isinstance(fmt, tagged_tool_calls.TaggedToolFormat):
        return tagged_tool_calls.parse_answer(fmt, tools, text, partial, required)
    if isinstance(fmt, mistral_tool_calls.MistralToolFormat):
        return mistral_tool_calls.parse_answer(fmt, tools, text, partial, required)
    names = {t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    start = text.find(fmt.tool_start)
    if start < 0:   # a marker may be coming (a final answer too: llama.cpp parses it as leniently)
        return ParsedAnswer(text[:len(text) - partial_marker_len(text, fmt.tool_start)], [])
    calls: list[dict] = []
    pos = start
    opener, closer = (fmt.per_call_start, fmt.per_call_end) if fmt.per_call_start else (fmt.section_start, fmt.section_end)
    while True:
        got = _read_section(fmt, text, pos, opener, closer, names, calls)
        if got is None:
            break
        pos = got
        if not fmt.per_call_start:
            break
        nxt = _skip_ws(text, pos)
        if not text.startswith(opener, nxt):
            break
        pos = nxt
    if not partial and ((not calls and not _unfinished_call(fmt, text[start:], names))
                        or (calls and _skip_ws(text, pos) < len(text))):
        return ParsedAnswer(text, [], ok=False)
    return ParsedAnswer(text[:start], calls)


def partial_marker_len(text: str, marker: str) -> int:
    """How many of text's last characters begin `marker` without completing it (llama.cpp's
    until() stops before them: the marker may be coming)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


_JSON_NUMBER_PREFIX = re.compile(r"-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][-+]?[0-9]*)?")


def json_value_prefix(text: str, types) -> bool:
    """Whether `text`, cut short by the end of an answer, may still become a JSON value of one
    of these types ("boolean", "null", "number" or "integer", "object", "array")."""
    return (("boolean" in types and ("true".startswith(text) or "false".startswith(text)))
            or ("null" in types and "null".startswith(text))
            or (bool({"number", "integer"} & set(types)) and bool(_JSON_NUMBER_PREFIX.fullmatch(text)))
            or ("object" in types and text.startswith("{")) or ("array" in types and text.startswith("[")))


def json_cut_short(text: str, e: json.JSONDecodeError) -> bool:
    """Whether the JSON failed only because the text ends (a prefix of valid JSON), not because
    it goes wrong before the end."""
    tail = text[e.pos:]
    if e.msg.startswith("Unterminated string"):
        return True
    return not tail.strip(" \t\n\r") or json_value_prefix(tail, ("boolean", "null", "number"))


def no_json_constant(name: str):
    """parse_constant for Python's JSON decoder: NaN and Infinity, which it takes and JSON (and
    llama.cpp's parser) does not, fail the value."""
    raise ValueError(f"{name} is not JSON")


def check_parameters(params: dict) -> None:
    """What common_chat_schema_from_json refuses in a function's parameters (llama-server answers
    500 there; the request's mistake, a 400 here): properties that are not an object, a
    property's schema that is not one, a local $ref that leads nowhere."""
    props = params.get("properties", {})
    if not isinstance(props, dict):
        raise GrammarError("JSON schema error at #: properties must be an object")
    for pname, pschema in props.items():
        if not isinstance(pschema, dict):
            raise GrammarError(f"JSON schema error at #/properties/{pname}: schema must be an object")
        ref = pschema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            node = params
            for part in (p for p in ref[1:].split("/") if p):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise GrammarError(f"JSON schema error at #/properties/{pname}: cannot resolve $ref {ref}")


def _unfinished_call(fmt: ToolFormat, rest: str, names: set) -> bool:
    """Whether `rest` (from the calls' marker to the end) is the start of a call the token
    limit cut before its name was whole: llama-server's lenient parser reads that as content
    so far, not as a mismatch. (Compared without whitespace.)"""
    squeezed = re.sub(r"\s+", "", rest)
    opener = re.sub(r"\s+", "", fmt.trigger)
    wrap = "[" if fmt.tools_array_wrapped else ""
    name_key = fmt.name_field or "name"
    heads = [f'{opener}{wrap}{{"{n}"' if fmt.fun_name_is_key else f'{opener}{wrap}{{"{name_key}":"{n}"'
             for n in names]
    if fmt.openai_wrapper:
        heads += [f'{opener}{wrap}{{"type":"function","{name_key}":"{n}"' for n in names]
    return any(h.startswith(squeezed) for h in heads)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _read_section(fmt, text, pos, opener, closer, names, calls) -> int | None:
    """One marked section at pos: its calls are appended; returns where it ends, or None. An
    answer cut short inside the section (the token limit) is read as far as it goes, as
    llama-server's lenient parser does: a call counts once its name is complete, its arguments
    being the text written so far."""
    if not text.startswith(opener, pos):
        return None
    pos = _skip_ws(text, pos + len(opener))
    wrapped = fmt.tools_array_wrapped
    if wrapped:
        if pos == len(text):
            return pos
        if not text.startswith("[", pos):
            return None
        pos = _skip_ws(text, pos + 1)
    decoder = json.JSONDecoder()
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError:
            call = _cut_call(fmt, text[pos:], names)
            if call is None:
                return None
            calls.append(call)
            return len(text)
        call = _call_fields(fmt, obj, text[pos:end], names)
        if call is None:
            return None
        calls.append(call)
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
            continue
        break
    for marker in (("]" if wrapped else ""), closer):
        if not marker:
            continue
        if marker.startswith(text[pos:]):   # the answer ends before (or inside) the marker
            return len(text)
        if not text.startswith(marker, pos):
            return None
        pos = _skip_ws(text, pos + len(marker)) if marker == "]" else pos + len(marker)
    return pos


def _cut_call(fmt: ToolFormat, rest: str, names: set) -> dict | None:
    """A call whose JSON the answer's end cut short (rest: from its "{" to the end): known once
    its name is whole; its arguments are what was written of them ("{" before any)."""
    if fmt.fun_name_is_key:   # {"NAME": ARGUMENTS
        m = re.match(r'\{\s*"([^"\\]*)"\s*:\s*', rest)
        if not m or m.group(1) not in names:
            return None
        args = rest[m.end():]
    else:
        name_key, args_key = fmt.name_field or "name", fmt.args_field or "arguments"
        wrapper = r'(?:"type"\s*:\s*"function"\s*,\s*)?' if fmt.openai_wrapper else ""
        m = re.match(r'\{\s*' + wrapper + '"' + re.escape(name_key) + r'"\s*:\s*"([^"\\]*)"', rest)
        if not m or m.group(1) not in names:
            return None
        a = re.match(r'\s*,\s*"' + re.escape(args_key) + r'"\s*:\s*', rest[m.end():])
        args = rest[m.end() + a.end():] if a else ""
    try:
        _, end = json.JSONDecoder().raw_decode(args)
        args = args[:end]
    except ValueError:
        args = args.rstrip(_WS)
    return {"name": m.group(1), "arguments": args or "{", "id": ""}


def _call_fields(fmt: ToolFormat, obj, raw: str, names: set) -> dict | None:
    if not isinstance(obj, dict):
        return None
    if fmt.fun_name_is_key:   # {"NAME": ARGUMENTS}: the arguments as written
        if len(obj) != 1 or next(iter(obj)) not in names or not isinstance(next(iter(obj.values())), dict):
            return None
        m = re.match(r'\{\s*"(?:[^"\\]|\\.)*"\s*:\s*', raw)
        _, end = json.JSONDecoder().raw_decode(raw, m.end())
        return {"name": next(iter(obj)), "arguments": raw[m.end():end], "id": ""}
    name = obj.get(fmt.name_field or "name")
    args_key = fmt.args_field or "arguments"
    if name not in names or not isinstance(obj.get(args_key), dict):
        return None
    # the arguments as written: re-found in the raw object text by decoding from its key
    decoder = json.JSONDecoder()
    m = re.search(r'"' + re.escape(args_key) + r'"\s*:\s*', raw)
    args_text = json.dumps(obj[args_key], ensure_ascii=False)
    if m:
        try:
            _, end = decoder.raw_decode(raw, m.end())
            args_text = raw[m.end():end]
        except ValueError:
            pass
    call_id = ""
    for key in (fmt.id_field, fmt.gen_id_field):
        if key and key in obj:
            call_id = str(obj[key])
    return {"name": name, "arguments": args_text, "id": call_id}
