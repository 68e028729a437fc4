"""Qwen3-Coder's XML tool calls, which Qwen 3.5, Nemotron Nano 3 and StepFun 3.5 Flash share:

    <tool_call>
    <function=get_weather>
    <parameter=location>
    Paris
    </parameter>
    </function>
    </tool_call>

llama.cpp does not derive this format from the template (engine/tool_calls.py does that for the
JSON ones); it recognizes the template by its markers and uses a parser written for it
(common/parsers/qwen3-coder.cpp). This module is that parser and the grammar it builds: a string
parameter is the raw text up to "\\n</parameter>\\n", any other a JSON value of its schema; the
required parameters come in any order, the optional ones after them. The calls' `arguments`
are rebuilt as compact JSON (common_chat_peg_mapper): string values quoted and escaped, the
others as written.

Templates with a <think> block (Qwen 3.5, Nemotron, StepFun) read one first, which "<tool_call>"
also ends; Qwen3-Coder itself has none, and may leave out the opening <tool_call>, so its lazy
grammar also wakes on "<function=NAME>".
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .reasoning import ReasoningFormat
from .tool_calls import (EPS, PARSE_ERROR, SPACE, Atomic, GrammarBuilder, Including, Lit, ParsedAnswer, Rep, Rule,
                         Schema, ToolGrammar, Until, _skip_ws, _tool_parameters, check_parameters, choice,
                         json_value_prefix, no_json_constant, optional, partial_marker_len, seq)

GEN_PREFIX = "<|im_start|>assistant\n"   # the parser's first literal, whatever the template adds after it
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ARG_CLOSE = "\n</parameter>\n"
MAX_PERMUTE = 4   # COMMON_CHAT_MAX_PERMUTE: more required parameters than this keep their order


@dataclass(frozen=True)
class XmlToolFormat:
    """The template's XML tool calls; thinking: it has <think> blocks (all but Qwen3-Coder)."""
    thinking: bool
    markers: tuple = (CALL_OPEN, CALL_CLOSE)   # kept as text in the output (qwen3-coder.cpp's preserved tokens)

    @property
    def parser_head(self) -> str:
        """The words the parser starts with: what follows them in the generation prompt (a
        continued assistant turn) is read as part of the answer."""
        return GEN_PREFIX

    def starts(self, tools: list) -> list[str]:
        """What opens the calls (the lazy grammar's trigger words)."""
        out = [CALL_OPEN]
        if not self.thinking:   # Qwen3-Coder sometimes omits <tool_call>
            out += [f"<function={t['function']['name']}>" for t in tools]
        return out


def detect(source: str) -> XmlToolFormat | None:
    """common_chat_try_specialized_template's test for these templates (the last one it makes)."""
    if "<tool_call>" in source and "<function=" in source and "<parameter=" in source and \
            "'<tool_call><function=' ~ tool_call.name ~ '>'" not in source:
        return XmlToolFormat(thinking="<think>" in source)
    return None


def reasoning_format(fmt: XmlToolFormat) -> ReasoningFormat | None:
    """The parser's reasoning block: "<think>", spaces, the reasoning up to "</think>" or up to a
    "<tool_call>" (which stays for the calls)."""
    if not fmt.thinking:
        return None
    # (with the whitespace a continued assistant turn is rendered with)
    return ReasoningFormat("<think>\n", "\n</think>\n\n", ends_before=(CALL_OPEN,), loose_space=True)


def response_format_grammar(fmt: XmlToolFormat, schema, extract_reasoning: bool) -> str:
    """A chat response_format with these templates: the generation prompt's first words, the
    optional <think> block, then the JSON, bare (qwen3-coder.cpp's response format parser)."""
    reasoning = reasoning_format(fmt)
    block = reasoning.block() if reasoning is not None and extract_reasoning else EPS
    return GrammarBuilder().grammar(seq(Lit(GEN_PREFIX), block, SPACE, Schema("response-format", schema)), lazy=False)


# --- the grammar -------------------------------------------------------------------------------

def _value_types(schema) -> set:
    """common_chat_schema::value_types, as far as a parameter's schema says: the JSON types its
    value may have (every type when it says nothing)."""
    every = {"string", "number", "integer", "boolean", "object", "array", "null"}
    if not isinstance(schema, dict):
        return every
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    out = set()
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                out |= _value_types(sub)
    if out:
        return out
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return {_json_type(v) for v in (values if isinstance(values, list) else [])
                if isinstance(v, (str, bool, int, float, dict, list, type(None)))}
    if "properties" in schema:
        return {"object"}
    if "items" in schema:
        return {"array"}
    return every


def _function(tool: dict, arg_string: Rule) -> Rule:
    fn = tool["function"]
    name = fn["name"]
    params = _tool_parameters(fn)
    check_parameters(params)
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    required_names = params.get("required") if isinstance(params.get("required"), list) else []
    close = Atomic(Lit(ARG_CLOSE))
    required, optional_args = [], []
    for pname, pschema in props.items():
        rule_name = f"tool-{name}-arg-{pname}"
        opener = Atomic(seq(Lit("<parameter="), Lit(pname), Lit(">\n")))
        types = _value_types(pschema)
        if "string" in types:   # only a string, or a string among others: the raw text
            value = arg_string
        else:
            value = seq(Schema(rule_name + "-schema", pschema), close)
        (required if pname in required_names else optional_args).append(Rule(rule_name, seq(opener, value)))
    args = _permute(f"tool-{name}-args", required)
    if optional_args:
        args = seq(args, Rep(choice(*optional_args), 0, -1))
    # (tool_args is a tag in llama.cpp: its sequence stays a group, printed in parentheses)
    body = seq(Atomic(seq(Lit("<function="), Lit(name), Lit(">\n"))), Atomic(args), Atomic(Lit("</function>\n")))
    return Rule(f"tool-{name}", body)


def _permute(prefix: str, parsers: list):
    """common_chat_peg_builder::permute: the parsers in any order, one rule per set still to come."""
    if not parsers:
        return EPS
    if len(parsers) == 1 or len(parsers) > MAX_PERMUTE:
        return seq(*parsers)
    rules: dict[int, Rule] = {}

    def remaining_of(mask: int):
        if mask == 0:
            return EPS
        if mask not in rules:
            alts = [seq(p, remaining_of(mask & ~(1 << i))) for i, p in enumerate(parsers) if mask & (1 << i)]
            rules[mask] = Rule(f"{prefix}-{mask}", choice(*alts))
        return rules[mask]
    return remaining_of((1 << len(parsers)) - 1)


def xml_tool_call_grammar(fmt: XmlToolFormat, tools: list, required: bool, parallel: bool,
                          extract_reasoning: bool = True) -> ToolGrammar:
    """The grammar of common_chat_params_init_qwen3_coder: "auto" waits for a call's opening
    (lazy), "required" constrains the whole answer: the generation prompt's first words, the
    optional <think> block, any content, then at least one call."""
    tools = [t for t in tools if isinstance(t, dict) and "function" in t]
    arg_string = Rule("xml-arg-string", Including((ARG_CLOSE,)))
    functions = choice(*[_function(t, arg_string) for t in tools])
    body = seq(functions, Lit(CALL_CLOSE), SPACE)
    call = Rule("tool-call", seq(Lit(CALL_OPEN + "\n"), body))
    first = Rule("tool-call-first", seq(optional(Lit(CALL_OPEN + "\n")), body)) if not fmt.thinking else call
    calls = seq(first, Rep(call, 0, -1)) if parallel else first
    root_calls = Rule("tool-call-root", Rep(calls, 1 if required else 0, 1), trigger=True)
    starts = fmt.starts(tools)
    if not required:
        return ToolGrammar(GrammarBuilder().grammar(root_calls, lazy=True), True, tuple(starts))
    reasoning = reasoning_format(fmt)
    block = reasoning.block() if reasoning is not None and extract_reasoning else EPS
    root = seq(Lit(GEN_PREFIX), block, SPACE, Until(tuple(starts)), SPACE, root_calls)
    return ToolGrammar(GrammarBuilder().grammar(root, lazy=False))


# --- reading the answer -----------------------------------------------------------------------

def parse_xml_answer(fmt: XmlToolFormat, tools: list, text: str, partial: bool, required: bool = False) -> ParsedAnswer:
    """What llama.cpp's parser reads (text: after the generation prompt and the reasoning
    block): the content up to the first call's opening, then the calls, one or (parallel) more;
    whatever follows them is not read. A call the end of the text cuts short counts once its
    function name is whole, its arguments being those written so far ("lenient" parsing, for
    streaming and for answers stopped by length). A call that goes wrong before the end is
    dropped, with the calls after it; when calls are required and the first one goes wrong the
    answer cannot be read (`error`: llama-server answers 500)."""
    tools = [t for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    schemas = {t["function"]["name"]: _tool_parameters(t["function"]) for t in tools}
    starts = fmt.starts(tools)
    found = [i for i in (text.find(s) for s in starts) if i >= 0]
    if not found:
        held = max((partial_marker_len(text, s) for s in starts), default=0) if partial else 0
        return ParsedAnswer(text[:len(text) - held], [])
    start = min(found)
    calls: list[dict] = []
    pos = start
    while True:
        n_before = len(calls)
        got = _read_call(text, pos, schemas, calls, first=not calls and not fmt.thinking)
        if got is None:   # this call goes wrong before the end: it and what follows are not read
            del calls[n_before:]
            if n_before == 0 and required:
                return ParsedAnswer("", [], ok=False, error="" if partial else PARSE_ERROR)
            break
        pos, complete = got
        if not complete:
            break
        nxt = _skip_ws(text, pos)
        if not text.startswith(CALL_OPEN, nxt):
            break
        pos = nxt
    return ParsedAnswer(text[:start], calls)


def _read_call(text: str, pos: int, schemas: dict, calls: list, first: bool):
    """One call at pos, appended to calls once its name is read. Returns (where it ends,
    whether it is complete), or None when it goes wrong before the end of the text."""
    opener = CALL_OPEN + "\n"
    if text.startswith(opener, pos):
        pos += len(opener)
    elif opener.startswith(text[pos:]):
        return len(text), False               # the opening itself is cut short
    elif not first:                           # (Qwen3-Coder's first call may leave it out)
        return None
    head = "<function="
    if not text.startswith(head, pos):
        return (len(text), False) if head.startswith(text[pos:]) else None
    end_name = text.find(">\n", pos)
    name = text[pos + len(head):end_name] if end_name >= 0 else text[pos + len(head):]
    if end_name < 0:   # the name cut short: fine while it may still become a tool's name
        return (len(text), False) if any((n + ">\n").startswith(name) for n in schemas) else None
    if name not in schemas:
        return None
    props = schemas[name].get("properties")
    props = props if isinstance(props, dict) else {}
    call = {"name": name, "arguments": "{", "id": ""}
    calls.append(call)
    pos = end_name + 2
    n = 0
    while True:
        if text.startswith("<parameter=", pos):
            end_pname = text.find(">\n", pos)
            if end_pname < 0:
                return (len(text), False) if _name_may_come(text[pos + len("<parameter="):], props) else None
            pname = text[pos + len("<parameter="):end_pname]
            if pname not in props:
                return None
            call["arguments"] += ("," if n else "") + json.dumps(pname, ensure_ascii=False) + ":"
            n += 1
            vstart = end_pname + 2
            vend = text.find(ARG_CLOSE, vstart)
            if vend < 0:   # cut inside the value: what came so far, a possible closing held back
                raw = text[vstart:]
                raw = raw[:len(raw) - partial_marker_len(raw, ARG_CLOSE)]
                call["arguments"] += _partial_value(raw, props[pname])
                return len(text), False
            call["arguments"] += _arg_value(text[vstart:vend], props[pname])
            pos = vend + len(ARG_CLOSE)
            continue
        if "<parameter=".startswith(text[pos:]) and pos < len(text):
            return len(text), False
        break
    for closer in ("</function>\n", CALL_CLOSE):
        if pos + len(closer) > len(text) and closer.startswith(text[pos:]):
            return len(text), False
        if not text.startswith(closer, pos):
            return None
        pos += len(closer)
    call["arguments"] += "}"
    return pos, True


def _name_may_come(cut: str, props: dict) -> bool:
    return any((p + ">\n").startswith(cut) for p in props)


def _arg_value(raw: str, schema) -> str:
    """A whole parameter value as the mapper writes it into the arguments JSON: a string is
    quoted and escaped; another type stays as written; a value that may be either is a JSON
    value of another type when it reads as one (llama.cpp tries those first)."""
    types = _value_types(schema)
    if "string" in types and len(types) > 1 and raw == raw.strip(" \t\n\r"):
        try:
            value = json.loads(raw, parse_constant=no_json_constant)
            if not isinstance(value, str) and _json_type(value) in types:
                return raw
        except ValueError:
            pass
    if "string" in types:
        return json.dumps(raw, ensure_ascii=False)
    return raw


def _partial_value(raw: str, schema) -> str:
    """A value the end of the text cut short: a string so far, opening quote and all (it closes
    with its parameter); another type as written so far; a value that may be either and still
    reads as the start of another type's JSON: nothing yet."""
    types = _value_types(schema)
    if "string" not in types:
        return raw
    if len(types) > 1 and json_value_prefix(raw, types - {"string"}):
        return ""
    return json.dumps(raw, ensure_ascii=False)[:-1]


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", dict: "object", list: "array"}[type(value)]
