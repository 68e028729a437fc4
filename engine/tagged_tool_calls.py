"""Tool calls written with the template's own tags rather than as one JSON object:

    <tool_call>get_weather                          GLM 4.6/4.7, Laguna, Spark 2.5 (arguments tagged)
    <arg_key>location</arg_key>
    <arg_value>Paris</arg_value>
    </tool_call>

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"location": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>
                                                    DeepSeek V3.1 (arguments as JSON)

Like the JSON formats (engine/tool_calls.py), llama.cpp reads these off the template by
rendering it with probe calls and comparing the texts (common/chat-diff-analyzer.cpp,
TAG_WITH_TAGGED and TAG_WITH_JSON): the markers around the calls' section and each call, the
text around the function's name, and for tagged arguments the text around each argument's name
and value. Its generator (common/chat-auto-parser-generator.cpp) then builds from those markers
one PEG parser that is both the grammar and the reader of the answer. This module is that
analysis, that grammar, and a reader of the same language.

The analysis cuts the rendered texts with small PEG patterns, as llama.cpp's does; the few
parsing combinators it needs (`_lit`, `_until`, `_marker`, ...) are at the top. A "marker" is
any `<...>` or `[...]`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .tool_calls import (ARG_FIRST, ARG_SECOND, ASSISTANT_MSG, CALL_ID_001, EPS, FUN_FIRST, FUN_SECOND,
                         PROBE_TOOLS, SPACE, USER_MSG, _WS, Atomic, DiffSplit, GrammarBuilder, Including, Lit,
                         ParsedAnswer, Rep, Rule, Schema, ToolGrammar, Until, _tool_parameters, check_parameters,
                         choice, diff_split, json_value_prefix, optional, partial_marker_len, required_calls_grammar,
                         seq)
from .xml_tool_calls import _value_types

CALL_ID_999 = "call99999"


# --- the analysis' patterns: a PEG is a function (text, pos) -> (end, tags) or None -------------

def _lit(s: str):
    return lambda t, i: (i + len(s), ()) if t.startswith(s, i) else None


def _until(*delims: str):
    """Any text up to the first place a delimiter starts, or starts and is cut by the end
    (llama.cpp's until never fails)."""
    longest = max(len(d) for d in delims)

    def parse(t, i):
        n = len(t)
        first = min([k for k in (t.find(d, i) for d in delims) if k >= 0], default=n)
        for j in range(max(i, n - longest + 1), first):
            if any(d.startswith(t[j:]) for d in delims):
                return j, ()
        return first, ()
    return parse


def _any(t, i):
    return (i + 1, ()) if i < len(t) else None


def _space(t, i):
    while i < len(t) and t[i] in _WS:
        i += 1
    return i, ()


def _rest(t, i):
    return len(t), ()


def _end(t, i):
    return (i, ()) if i == len(t) else None


def _seq(*parts):
    def parse(t, i):
        tags = ()
        for p in parts:
            r = p(t, i)
            if r is None:
                return None
            i, tags = r[0], tags + r[1]
        return i, tags
    return parse


def _choice(*alts):
    def parse(t, i):
        for p in alts:
            r = p(t, i)
            if r is not None:
                return r
        return None
    return parse


def _star(p):
    def parse(t, i):
        tags = ()
        while True:
            r = p(t, i)
            if r is None or r[0] == i:
                return i, tags
            i, tags = r[0], tags + r[1]
    return parse


def _not(p):
    return lambda t, i: (i, ()) if p(t, i) is None else None


def _tag(name: str, p):
    def parse(t, i):
        r = p(t, i)
        return None if r is None else (r[0], ((name, t[i:r[0]]),) + r[1])
    return parse


_marker = _choice(_seq(_lit("<"), _until(">"), _lit(">")), _seq(_lit("["), _until("]"), _lit("]")))
_not_marker_char = _seq(_not(_marker), _any)


def _match(p, text: str) -> dict | None:
    """parse_and_extract: p at the start of text; its tags (the last of a name wins)."""
    r = p(text, 0)
    return None if r is None else dict(r[1])


def _search(p, text: str) -> dict | None:
    """parse_anywhere_and_extract: p from the first position where it matches."""
    for i in range(max(len(text), 1)):
        r = p(text, i)
        if r is not None:
            return dict(r[1])
    return None


def _tags(found: dict | None, name: str) -> str:
    return (found or {}).get(name, "")


# --- the analysis ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaggedToolFormat:
    """What chat-diff-analyzer.cpp reads off a template whose calls are tagged: the markers of
    the calls' section and of each call, the text around a function's name and after its
    arguments (close), and for tagged arguments (json_args False) the text around each
    argument's name and value. A call id, where the template writes one between the name and
    the arguments (Mistral Small 3.2's [CALL_ID]), sits between call_id_prefix and _suffix."""
    json_args: bool
    section_start: str = ""
    section_end: str = ""
    per_call_start: str = ""
    per_call_end: str = ""
    name_prefix: str = ""
    name_suffix: str = ""
    args_separator: str = ""
    close: str = ""
    call_id_prefix: str = ""
    call_id_suffix: str = ""
    arg_name_prefix: str = ""
    arg_name_suffix: str = ""
    arg_value_prefix: str = ""
    arg_value_suffix: str = ""
    arg_separator: str = ""
    call_id_between: bool = False
    tolerate_ws: bool = False        # Laguna: spaces allowed before the call's end marker
    supports_parallel: bool = False

    @property
    def trigger(self) -> str:
        """The text that starts the calls: a lazy grammar waits for it."""
        return self.section_start or self.per_call_start

    @property
    def markers(self) -> tuple:
        """The analysis' markers that an answer keeps as text (collect_preserved_tokens)."""
        return (self.section_start, self.section_end, self.per_call_start, self.per_call_end, self.name_prefix,
                self.name_suffix, self.args_separator, self.close, self.call_id_prefix, self.call_id_suffix,
                self.arg_name_prefix, self.arg_name_suffix, self.arg_value_prefix, self.arg_value_suffix,
                self.arg_separator)


def _call(name: str, args: dict, call_id: str = CALL_ID_001) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _until_common_prefix(full: str, left: str, right: str) -> str:
    n = 0
    while n < min(len(left), len(right)) and left[n] == right[n]:
        n += 1
    if n == 0 or full.find(left[:n]) < 0:
        return ""
    return full[:full.find(left[:n])]


class _Probe:
    """Renders the template with the probe tools and one assistant message, and compares."""

    def __init__(self, template):
        self.template = template
        self.user = {"role": "user", "content": USER_MSG}

    def render(self, assistant: dict) -> str | None:
        try:
            return self.template.render([self.user, assistant], add_generation_prompt=False, tools=PROBE_TOOLS)
        except Exception:
            return None

    def calls(self, *calls) -> dict:
        return {"role": "assistant", "content": "", "tool_calls": list(calls)}

    def compare(self, a: dict, b: dict) -> tuple[DiffSplit, str, str] | None:
        ra, rb = self.render(a), self.render(b)
        if ra is None or rb is None:
            return None
        return diff_split(ra, rb), ra, rb

    def diff(self, a: dict, b: dict) -> DiffSplit | None:
        """The two calls' renders compared (None: the template failed on one)."""
        got = self.compare(self.calls(a), self.calls(b))
        return None if got is None else got[0]


FIRST = _call(FUN_FIRST, {ARG_FIRST: "XXXX", ARG_SECOND: "YYYY"})
SECOND = _call(FUN_SECOND, {ARG_FIRST: "XXXX", ARG_SECOND: "YYYY"}, "call00002")
FIRST_ONE_ARG = _call(FUN_FIRST, {ARG_FIRST: "XXXX"})
FIRST_ONE_ARG_Y = _call(FUN_FIRST, {ARG_FIRST: "YYYY"})
FIRST_OTHER_ARG = _call(FUN_FIRST, {ARG_SECOND: "YYYY"})
FIRST_ALT_ID = _call(FUN_FIRST, {ARG_FIRST: "XXXX", ARG_SECOND: "YYYY"}, CALL_ID_999)


def analyze_tagged_format(template, haystack: str, json_args: bool, reasoning=None) -> TaggedToolFormat:
    """analyze_tools for TAG_WITH_JSON (json_args) and TAG_WITH_TAGGED: `haystack` is what a
    call adds to a rendered assistant turn; the probes that follow find each marker."""
    probe = _Probe(template)
    f: dict = {}
    for marker in (reasoning.start, reasoning.end) if reasoning is not None else ():
        if marker and marker in haystack:   # the first of each goes
            haystack = haystack.replace(marker, "", 1)
    _section_markers(haystack, f)
    f["section_end"] = f["section_end"].strip(_WS)
    f["per_call_end"] = f["per_call_end"].strip(_WS)
    if template.caps.supports_parallel_tool_calls:
        _per_call_markers(probe, f)
    _function_markers(probe, f, json_args)
    if not json_args:
        _argument_name_markers(probe, f)
        _argument_value_markers(probe, f)
    d = probe.diff(FIRST_ONE_ARG, FIRST)   # (the text between two arguments)
    if d is not None and d.right:
        f["arg_separator"] = _until_common_prefix(d.right, ARG_FIRST, ARG_SECOND)
    _call_id_markers(probe, f)
    _workarounds(template.source, f)
    return TaggedToolFormat(json_args=json_args, supports_parallel=template.caps.supports_parallel_tool_calls,
                            **{k: f.get(k, "") for k in _FIELDS}, tolerate_ws=f.get("tolerate_ws", False),
                            call_id_between=f.get("call_id_between", False))


_FIELDS = ("section_start", "section_end", "per_call_start", "per_call_end", "name_prefix", "name_suffix",
           "args_separator", "close", "call_id_prefix", "call_id_suffix", "arg_name_prefix", "arg_name_suffix",
           "arg_value_prefix", "arg_value_suffix", "arg_separator")


def _section_markers(haystack: str, f: dict) -> None:
    """analyze_tool_call_format_non_json: the function's name inside a marker or alone; up to
    two markers before it (section, call) and after the call (call end, section end)."""
    n = FUN_FIRST
    fun = _tag("fun_marker", _choice(
        _seq(_tag("fun_pre", _seq(_lit("<"), _until(">", n))), _lit(n),
             _tag("fun_post", _seq(_not(_seq(_space, _lit("<"))), _until(">"), _lit(">"))), _space),
        _seq(_tag("fun_pre", _seq(_lit("["), _until("]", n))), _lit(n),
             _tag("fun_post", _not(_seq(_space, _lit("["), _until("]"), _lit("]")))), _space)))
    found = _search(fun, haystack)
    fun_marker = found["fun_marker"] if found else n
    fun_pre = _tags(found, "fun_pre")
    per_tool = _seq(_tag("sec_start", _seq(_marker, _space)), _tag("call_start", _seq(_marker, _space)),
                    _tag("fun_pre", _until(fun_marker)), _lit(fun_marker), _tag("rest", _rest))
    section = _seq(_tag("sec_start", _seq(_marker, _space)), _lit(fun_marker), _tag("rest", _rest))
    result = _search(per_tool, haystack)
    f["name_prefix"] = ""
    if result is not None:
        closers = _seq(_tag("call_end", _seq(_marker, _space)), _tag("sec_end", _seq(_marker, _space)), _end)
        end = _search(closers, result["rest"])
        f["name_prefix"] = fun_pre
    else:
        result = _search(section, haystack)
        end = _search(_seq(_tag("sec_end", _seq(_marker, _space)), _end), _tags(result, "rest"))
    f["per_call_start"] = _tags(result, "call_start")
    f["per_call_end"] = _tags(end, "call_end")
    f["section_start"] = _tags(result, "sec_start")
    f["section_end"] = _tags(end, "sec_end")


def _per_call_markers(probe: _Probe, f: dict) -> None:
    """check_per_call_markers: a second call that repeats the section's opening makes it a
    per-call marker; a call end that appears as often for one call as for two ends the section."""
    got = probe.compare(probe.calls(FIRST), probe.calls(FIRST, SECOND))
    if got is None:
        return
    d, one, two = got
    second = diff_split(d.suffix, d.right).right.lstrip(_WS)
    if f["section_start"] and second.startswith(f["section_start"]):
        f["per_call_start"], f["per_call_end"] = f["section_start"], f["section_end"]
        f["section_start"] = f["section_end"] = ""
    end = f["per_call_end"]
    if end and 0 < one.count(end) == two.count(end):
        f["section_end"], f["per_call_end"] = end, ""


def _function_markers(probe: _Probe, f: dict, json_args: bool) -> None:
    """extract_function_markers: the text around the function's name (two calls differing only
    in their name), and what closes a call after its arguments."""
    d = probe.diff(FIRST, SECOND)
    if d is None or FUN_FIRST not in d.left or FUN_SECOND not in d.right:
        return
    opener = f["per_call_start"] or f["section_start"]
    if opener and opener in d.prefix:
        f["name_prefix"] = d.prefix[d.prefix.rfind(opener) + len(opener):]
    name = _match(_seq(_tag("pre", _until(FUN_FIRST)), _lit(FUN_FIRST), _tag("post", _star(_not_marker_char))), d.left)
    if name is not None:
        f["name_prefix"] += name.get("pre", "")
        f["name_suffix"] = name.get("post", "")
    if json_args:
        # up to the first "{" or "[" that is not inside a marker, markers included, provided
        # a marker follows the JSON
        non_json = _choice(_marker, _seq(_not(_lit("{")), _not(_lit("[")), _any))
        ext = _match(_seq(_tag("ext", _star(non_json)), _star(_not_marker_char), _marker), d.suffix)
        if ext is not None:
            f["name_suffix"] += ext.get("ext", "")
    else:
        ext = _match(_tag("ext", _star(_not_marker_char)), d.suffix)
        if ext is not None:
            f["name_suffix"] += ext.get("ext", "")
            arg_start = _seq(_marker, _space, _choice(_lit(ARG_FIRST), _lit(ARG_SECOND)))
            sep = _match(_seq(_tag("sep", _star(_seq(_not(arg_start), _any))), arg_start),
                         d.suffix[len(ext.get("ext", "")):])
            if sep is not None:
                f["args_separator"] = sep.get("sep", "").strip(_WS)
    end_marker = f["per_call_end"] or f["section_end"]
    closer = ""
    if not end_marker:
        plain = probe.compare(probe.calls(FIRST), {"role": "assistant", "content": ASSISTANT_MSG})
        if plain is not None:
            left = plain[0].left
            closer = left[left.find("YYYY") + 4:] if "YYYY" in left else left[3:]   # (npos + 4 wraps to 3)
    else:
        closer = d.suffix[:d.suffix.find(end_marker)] if end_marker in d.suffix else d.suffix
    if closer:
        if not json_args:
            close = _match(_seq(_until("YYYY"), _lit("YYYY"), _space, _marker, _space, _tag("close", _rest)), closer)
            if close is not None:
                f["close"] = close.get("close", "")
        else:
            close = _match(_seq(_until("YYYY"), _lit("YYYY"), _tag("post_val", _rest)), closer)
            if close is not None:
                post = close.get("post_val", "")
                pos = max(post.rfind("}"), post.rfind("]"))
                if 0 <= pos < len(post) - 1:
                    f["close"] = post[pos + 1:].lstrip(_WS)
    f["close"] = f.get("close", "").lstrip(_WS)


def _last_marker_and_after():
    """A marker, then text with no marker, to the end."""
    return _seq(_marker, _star(_not_marker_char), _end)


def _from_last_marker(text: str) -> str | None:
    """The text from its last marker on (None: it has none)."""
    last = _last_marker_and_after()
    found = _match(_seq(_star(_seq(_not(last), _any)), _tag("m", last)), text)
    return None if found is None else found["m"]


def _argument_name_markers(probe: _Probe, f: dict) -> None:
    """extract_argument_name_markers: two calls whose one argument differs in name."""
    d = probe.diff(FIRST_ONE_ARG, FIRST_OTHER_ARG)
    if d is None or not d.left or not d.right:
        return
    left = _search(_seq(_tag("pre", _until(ARG_FIRST)), _lit(ARG_FIRST), _tag("suffix", _until('"', "X"))), d.left)
    right = _search(_seq(_tag("pre", _until(ARG_SECOND)), _lit(ARG_SECOND), _tag("suffix", _until('"', "Y"))),
                    d.right)
    if left is not None and right is not None and left.get("pre") and left.get("pre") == right.get("pre") \
            and left.get("suffix", "") == right.get("suffix", ""):
        f["arg_name_prefix"], f["arg_name_suffix"] = left["pre"], left.get("suffix", "")
    elif d.left.startswith(ARG_FIRST) and d.right.startswith(ARG_SECOND):
        pre = _from_last_marker(d.prefix)
        f["arg_name_prefix"] = pre if pre is not None else d.prefix
        after = d.left[len(ARG_FIRST):] + d.suffix
        suf = _search(_tag("suffix", _seq(_star(_not_marker_char), _marker, _space)), after)
        if suf is not None:
            f["arg_name_suffix"] = suf["suffix"]


def _argument_value_markers(probe: _Probe, f: dict) -> None:
    """extract_argument_value_markers: two calls whose one argument differs in value."""
    d = probe.diff(FIRST_ONE_ARG, FIRST_ONE_ARG_Y)
    if d is None or d.left != "XXXX" or d.right != "YYYY":
        return
    ending = ARG_FIRST + f.get("arg_name_suffix", "")
    prefix = d.prefix
    if ending in prefix:
        prefix = prefix[prefix.rfind(ending) + len(ending):]
    if prefix:
        pre = _from_last_marker(prefix)
        f["arg_value_prefix"] = pre if pre is not None else prefix
    suffix = d.suffix
    if f.get("close"):
        if f["close"] in suffix:
            suffix = suffix[:suffix.find(f["close"])]
    elif f["per_call_end"] or f["section_end"]:
        end = f["per_call_end"] or f["section_end"]
        if end in suffix:
            suffix = suffix[:suffix.find(end)]
    if suffix.strip(_WS):
        f["arg_value_suffix"] = suffix


def _call_id_markers(probe: _Probe, f: dict) -> None:
    """extract_call_id_markers: where a call's id sits (two calls differing only in their id).
    The generated parser reads an id only between the function's name and its arguments
    (Mistral Small 3.2's [CALL_ID]); the other positions matter for the call's end marker."""
    d = probe.diff(FIRST, FIRST_ALT_ID)
    if d is None or (not d.left and not d.right):
        return
    common = "call"   # (the common start of call00001 and call99999)
    last = _last_marker_and_after()
    find_last = _seq(_star(_seq(_not(last), _any)), _tag("m", _marker))
    in_prefix, in_suffix = d.prefix.rfind(FUN_FIRST), d.suffix.find(FUN_FIRST)
    prefix = suffix = ""
    placed = False
    if in_prefix >= 0 and in_suffix < 0:
        args_in_prefix, args_in_suffix = d.prefix.find("{", in_prefix), d.suffix.find("{")
        if args_in_suffix >= 0 and args_in_prefix < 0:
            placed = f["call_id_between"] = True
            after = d.prefix[in_prefix + len(FUN_FIRST):]
            found = _search(_seq(_tag("prefix", _marker), _star(_seq(_not(_marker), _not(_lit(common)), _any)),
                                 _lit(common)), after)
            prefix = found["prefix"] if found is not None else _tags(_search(find_last, after), "m")
            suffix = _tags(_search(_seq(_star(_seq(_not(_marker), _not(_lit("{")), _any)), _tag("suffix", _marker)),
                                   d.suffix), "suffix")
        elif args_in_prefix >= 0:   # after the arguments
            placed = True
            after_args = d.prefix[args_in_prefix:]
            if "}" in after_args:
                prefix = _tags(_search(find_last, after_args[after_args.rfind("}") + 1:]), "m")
            suffix = _tags(_search(_tag("m", _marker), d.suffix), "m")
    elif in_suffix >= 0 and in_prefix < 0:   # before the function's name
        placed = True
        prefix = _tags(_search(find_last, d.prefix), "m")
        suffix = _tags(_search(_tag("m", _marker), d.suffix[:in_suffix]), "m")
    if f.get("call_id_between"):
        f["call_id_prefix"], f["call_id_suffix"] = prefix, suffix
    if placed and suffix and f["per_call_end"].startswith(suffix):
        f["per_call_end"] = ""


LAGUNA = "laguna_glm_thinking"   # (in Poolside's Laguna templates, which llama.cpp corrects in places)


def _workarounds(source: str, f: dict) -> None:
    """chat-diff-analyzer.cpp's corrections for templates its analysis misreads."""
    if 'set has_code_interpreter = tools | selectattr("type", "equalto", "code_interpreter") | list | length > 0' \
            in source:   # Functionary v3.1: no section, each call in <function=NAME>{...}</function>
        f.update(name_prefix="", section_start="", section_end="", per_call_start="<function=",
                 per_call_end="</function>", close="")
    if "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'" in source:
        f.update(section_start="<｜tool▁calls▁begin｜>", section_end="<｜tool▁calls▁end｜>",
                 per_call_start="<｜tool▁call▁begin｜>function", name_prefix="<｜tool▁sep｜>",
                 per_call_end="<｜tool▁call▁end｜>", close="```")   # DeepSeek R1 distills
    if "Bailing V3 chat template" in source:   # Ling 3 (whose calls llama.cpp reads with its own parser)
        f["arg_value_suffix"] = f.get("arg_value_suffix", "").strip(_WS)
        f["tolerate_ws"] = True
    if LAGUNA in source:   # the model writes its tags without the newlines (its reasoning markers and stop string: engine/chat_format.py)
        for k in ("arg_value_prefix", "arg_value_suffix", "arg_separator"):
            f[k] = f.get(k, "").strip(_WS)
        f["tolerate_ws"] = True


# --- the grammar -------------------------------------------------------------------------------
# chat-auto-parser-generator.cpp builds one PEG parser per request from the markers above;
# these are its grammar rules, node for node. llama.cpp writes `marker + parser` even when the
# marker is empty, which prints as "" in the grammar: the empty literals below are kept for that.

def _tagged_arguments(fmt: TaggedToolFormat, name: str, params: dict) -> tuple:
    """build_tool_parser_tag_tagged's arguments: each a rule, the required ones in their order,
    then any of the optional ones, any number of times. Returns (arguments, the required ones)."""
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    required_names = params.get("required") if isinstance(params.get("required"), list) else []
    required, optional_args = [], []
    for pname, pschema in props.items():
        rule_name = f"tool-{name}-arg-{pname}"
        opener = Atomic(seq(Lit(fmt.arg_name_prefix), Atomic(Lit(pname)), Lit(fmt.arg_name_suffix)))
        if "string" in _value_types(pschema):   # the raw text up to and including the value's end
            value = Including((fmt.arg_value_suffix,))
        else:
            value = seq(Atomic(Schema(rule_name + "-schema", pschema)), Atomic(Lit(fmt.arg_value_suffix)))
        arg = Atomic(seq(opener, Lit(fmt.arg_value_prefix), value))
        (required if pname in required_names else optional_args).append(Rule(rule_name, arg))
    args = EPS
    for i, r in enumerate(required):
        args = seq(args, SPACE, r) if i else seq(args, r)
    if optional_args:
        args = seq(args, Rep(seq(SPACE, choice(*optional_args)), 0, -1))
    return args, required


def _function(fmt: TaggedToolFormat, tool: dict):
    """build_func_parser: the name between its markers, an optional call id, the arguments,
    then the call's close (its text, or a look at the call's end marker)."""
    fn = tool["function"]
    name = fn["name"]
    params = _tool_parameters(fn)
    check_parameters(params)
    call_id = EPS
    have_id = bool(fmt.call_id_between and fmt.call_id_prefix and fmt.call_id_suffix)
    if have_id:
        ident = Atomic(Until((fmt.call_id_suffix,)))
        if fmt.json_args:
            call_id = seq(optional(seq(Lit(fmt.call_id_prefix), ident)), Lit(fmt.call_id_suffix))
        else:
            call_id = optional(seq(Lit(fmt.call_id_prefix), ident, Lit(fmt.call_id_suffix)))
    peek = False
    if fmt.json_args:
        args = Atomic(Schema(f"tool-{name}-schema", params))
    else:
        args, required = _tagged_arguments(fmt, name, params)
        peek = bool(fmt.arg_name_prefix and required)   # (a look ahead: nothing in the grammar)
    opener = Atomic(seq(Lit(fmt.name_prefix), Atomic(Lit(name)), Lit(fmt.name_suffix)))
    if fmt.args_separator:
        opener = seq(opener, SPACE, Lit(fmt.args_separator))
    if fmt.name_suffix:
        body, atomic = seq(opener, call_id, SPACE, args), True
    elif have_id:
        body, atomic = seq(Atomic(seq(opener, call_id)), SPACE, args), True
    elif peek:
        body, atomic = seq(Atomic(seq(opener, call_id, SPACE)), args), True
    else:
        body, atomic = seq(opener, call_id, SPACE, args), False
    if fmt.close:
        body = seq(body, SPACE, Atomic(Lit(fmt.close)))
    elif fmt.per_call_end:
        pass   # the close is a look at the call's end marker
    else:
        body = seq(body, Atomic(SPACE))
    return Rule(f"tool-{name}", body if atomic else Atomic(body))


def tool_call_grammar(fmt: TaggedToolFormat, tools: list, required: bool, parallel: bool,
                      generation_prompt: str = "", reasoning=None, extract_reasoning: bool = True) -> ToolGrammar:
    """build_tool_parser_tag_json / _tag_tagged: content up to the calls' first marker, then
    the calls. tool_choice "auto" waits for that marker (lazy); "required" constrains the whole
    answer, from the generation prompt's last words on."""
    tools = [t for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not required and not fmt.trigger:   # nothing to wait for: the answer is free
        return ToolGrammar(None)
    functions = choice(*[_function(fmt, t) for t in tools])
    space = SPACE if not fmt.json_args else EPS
    if fmt.per_call_start:
        call = seq(Lit(fmt.per_call_start), space, functions, space, Lit(fmt.per_call_end))
        if parallel:
            body = seq(call, Rep(seq(SPACE, call), 0, -1), space)
        else:
            body = seq(call, space)
        calls = Rule("tool-call", body, trigger=True)
        if fmt.section_start:
            end = (seq(Lit(fmt.section_end), space) if fmt.section_end else EPS) if not fmt.json_args \
                else (Lit(fmt.section_end) if fmt.section_end else EPS)
            calls = Rule("tool-calls", seq(Lit(fmt.section_start), SPACE, calls, SPACE, end), trigger=True)
    else:
        more = Rep(seq(Lit(", "), functions), 0, -1) if parallel else EPS
        calls = Rule("tool-call", seq(Lit(fmt.section_start), space, functions, more, space, Lit(fmt.section_end)),
                     trigger=True)
    if not required:
        return ToolGrammar(GrammarBuilder().grammar(optional(calls), lazy=True), True, (fmt.trigger,))
    content = optional(Until((fmt.trigger,))) if fmt.trigger else optional(EPS)
    return required_calls_grammar(generation_prompt, reasoning, extract_reasoning, content, calls)


# --- reading the answer ------------------------------------------------------------------------

class _Cut(Exception):
    """The answer ends here, inside the calls (streaming, or the token limit)."""


class _Wrong(Exception):
    """The answer leaves the format here."""


class _Reader:
    """The calls of an answer, read as the generated parser reads them (text: from the calls'
    first marker on). A call counts once its name is read; its arguments are rebuilt as
    common_chat_peg_mapper writes them: tagged ones as compact JSON (string values quoted and
    escaped, other values as written), JSON ones as written."""

    def __init__(self, fmt: TaggedToolFormat, schemas: dict, text: str):
        self.fmt, self.schemas, self.text = fmt, schemas, text
        self.calls: list[dict] = []
        self.complete = 0   # how many calls were read to their close

    def expect(self, pos: int, lit: str) -> int:
        if self.text.startswith(lit, pos):
            return pos + len(lit)
        if lit.startswith(self.text[pos:]):
            raise _Cut
        raise _Wrong

    def space(self, pos: int) -> int:
        while pos < len(self.text) and self.text[pos] in _WS:
            pos += 1
        return pos

    def section(self, pos: int) -> int:
        fmt = self.fmt
        tagged = not fmt.json_args
        if fmt.section_start:
            pos = self.space(self.expect(pos, fmt.section_start))
        if fmt.per_call_start:
            pos = self.wrapped_call(pos)
            while True:
                nxt = self.space(pos)
                if not self.text.startswith(fmt.per_call_start, nxt):
                    if nxt == len(self.text) and nxt > pos:
                        raise _Cut
                    break
                pos = self.wrapped_call(nxt)
        else:
            pos = self.function(pos)
            while self.text.startswith(", ", pos):
                pos = self.function(pos + 2)
        if tagged or fmt.section_start:
            pos = self.space(pos)
        if fmt.section_end:
            pos = self.expect(pos, fmt.section_end)
            if tagged:
                pos = self.space(pos)
        return pos

    def wrapped_call(self, pos: int) -> int:
        fmt = self.fmt
        pos = self.expect(pos, fmt.per_call_start)
        if not fmt.json_args:
            pos = self.space(pos)
        pos = self.function(pos)
        if not fmt.json_args:
            pos = self.space(pos)
        return self.expect(pos, fmt.per_call_end)

    def function(self, pos: int) -> int:
        fmt, text = self.fmt, self.text
        pos = self.expect(pos, fmt.name_prefix)
        name = next((n for n in self.schemas if text.startswith(n, pos)), None)
        if name is None:
            if any(n.startswith(text[pos:]) for n in self.schemas):
                raise _Cut
            raise _Wrong
        call = {"name": name, "arguments": "{", "id": ""}
        self.calls.append(call)   # (llama.cpp's mapper shows a call from its name on)
        pos = self.expect(pos + len(name), fmt.name_suffix)
        if fmt.args_separator:
            pos = self.expect(self.space(pos), fmt.args_separator)
        if fmt.call_id_between and fmt.call_id_prefix and fmt.call_id_suffix:
            if text.startswith(fmt.call_id_prefix, pos):
                end = text.find(fmt.call_id_suffix, pos + len(fmt.call_id_prefix))
                if end < 0:
                    raise _Cut
                call["id"] = text[pos + len(fmt.call_id_prefix):end].rstrip(_WS)
                pos = end
            pos = self.expect(pos, fmt.call_id_suffix)
        pos = self.space(pos)
        pos = self.json_arguments(call, pos) if fmt.json_args else self.tagged_arguments(call, name, pos)
        if fmt.close:
            pos = self.expect(self.space(pos), fmt.close)
        elif fmt.per_call_end:   # closed where the call's end marker is seen
            at = self.space(pos) if fmt.tolerate_ws else pos
            if not text.startswith(fmt.per_call_end, at):
                raise _Cut if fmt.per_call_end.startswith(text[at:]) else _Wrong
        if not fmt.json_args:
            call["arguments"] += "}"
        self.complete = len(self.calls)
        return pos

    def json_arguments(self, call: dict, pos: int) -> int:
        try:
            value, end = json.JSONDecoder().raw_decode(self.text, pos)
        except ValueError:
            rest = self.text[pos:].rstrip(_WS)
            if rest.startswith("{"):
                call["arguments"] = rest
            if _json_may_continue(self.text[pos:]):
                raise _Cut from None
            raise _Wrong from None
        if not isinstance(value, dict):
            raise _Wrong
        call["arguments"] = self.text[pos:end]
        return end

    def tagged_arguments(self, call: dict, name: str, pos: int) -> int:
        """The required arguments in their order, then optional ones in any order."""
        schema = self.schemas[name]
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        n = 0
        for pname in [p for p in props if p in required]:
            pos = self.argument(call, props, [pname], self.space(pos) if n else pos, n)
            n += 1
        optional_names = [p for p in props if p not in required]
        while True:
            at = self.space(pos)
            if optional_names and self.text.startswith(self.fmt.arg_name_prefix, at):
                pos = self.argument(call, props, optional_names, at, n)
                if pos <= at:   # (an argument that reads as nothing: markers and a name all empty)
                    raise _Wrong
                n += 1
                continue
            if self.fmt.arg_name_prefix.startswith(self.text[at:]) and optional_names:
                raise _Cut   # (an argument may be coming)
            return pos

    def argument(self, call: dict, props: dict, names: list, pos: int, n: int) -> int:
        fmt, text = self.fmt, self.text
        at = self.expect(pos, fmt.arg_name_prefix)
        pname = next((p for p in names if text.startswith(p + fmt.arg_name_suffix, at)), None)
        if pname is None:
            if any((p + fmt.arg_name_suffix).startswith(text[at:]) for p in names):
                raise _Cut
            raise _Wrong
        call["arguments"] += ("," if n else "") + json.dumps(pname, ensure_ascii=False) + ":"
        at = self.expect(at + len(pname) + len(fmt.arg_name_suffix), fmt.arg_value_prefix)
        if "string" in _value_types(props[pname]):   # the raw text up to the value's end
            end = text.find(fmt.arg_value_suffix, at)
            if end < 0:
                raw = text[at:]
                raw = raw[:len(raw) - partial_marker_len(raw, fmt.arg_value_suffix)]
                call["arguments"] += json.dumps(raw, ensure_ascii=False)[:-1]
                raise _Cut
            call["arguments"] += json.dumps(text[at:end], ensure_ascii=False)
            return end + len(fmt.arg_value_suffix)
        try:
            _, end = json.JSONDecoder().raw_decode(text, at)
        except ValueError:
            call["arguments"] += text[at:]
            if _json_may_continue(text[at:]):
                raise _Cut from None
            raise _Wrong from None
        call["arguments"] += text[at:end]
        return self.expect(end, fmt.arg_value_suffix)


def _json_may_continue(text: str) -> bool:
    """Whether `text` may be the start of a JSON value that the end of the answer cut short."""
    text = text.rstrip(_WS)
    try:
        json.loads(text)
        return False
    except ValueError as e:
        rest = text[e.pos:]
        return e.pos >= len(text) or "Unterminated string" in e.msg or json_value_prefix(rest, _ALL_TYPES)


_ALL_TYPES = ("boolean", "null", "number", "object", "array")


def parse_answer(fmt: TaggedToolFormat, tools: list, text: str, partial: bool, required: bool = False) -> ParsedAnswer:
    """Content up to the calls' first marker, then the calls (text: after the generation prompt
    and any reasoning block, engine/reasoning.py read_answer). A final answer whose calls do not
    read to its end is all content, and not ok (llama-server's parser fails; it keeps the raw
    text); a partial one gives what was read."""
    schemas = {t["function"]["name"]: _tool_parameters(t["function"])
               for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    start = text.find(fmt.trigger) if fmt.trigger else 0
    if start < 0:   # (a final answer too: llama.cpp parses it as leniently, the marker may be coming)
        return ParsedAnswer(text[:len(text) - partial_marker_len(text, fmt.trigger)], [])
    reader = _Reader(fmt, schemas, text)
    try:
        end = reader.section(start)
    except _Cut:   # read as far as it goes
        return ParsedAnswer(text[:start], reader.calls)
    except _Wrong:
        if partial:
            return ParsedAnswer(text[:start], reader.calls[:reader.complete])
        return ParsedAnswer(text, [], ok=False)
    if not partial and reader.space(end) < len(text):
        return ParsedAnswer(text, [], ok=False)
    return ParsedAnswer(text[:start], reader.calls)
