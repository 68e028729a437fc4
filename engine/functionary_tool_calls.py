"""Functionary v3.2's answers: a recipient after ">>>", then what is sent to it.

    <|start_header_id|>assistant<|end_header_id|>\\n\\n>>>all\\nThe weather is sunny.
    <|start_header_id|>assistant<|end_header_id|>\\n\\n>>>get_weather\\n{"city": "Paris"}

The generation prompt ends with ">>>", so the model's first words name the recipient: "all"
(the user: the content follows its newline) or a function (its JSON arguments follow). llama.cpp
reads these templates with a parser written for them (common/parsers/functionary-v3-2.cpp) and
this module is that parser, read off its PEG rules as they behave, including where they read
less than the template writes:

- Every answer goes through it, with tools or without: one that neither starts "all\\n" nor
  names a tool cannot be read (llama-server answers 500).
- Content runs to the end. The rule for content followed by calls stops the content at ">>>",
  but then wants a function's name where ">>>" stands, so it never matches: a call after
  content stays in the content (tool_choice "auto"), or fails the answer ("required").
- Calls follow one another with nothing between them; the ">>>" the template writes before a
  second call ends the answer's reading, which then fails. Nothing may follow the last call.

The grammar is built from the same rules (the lazy one wakes on ">>>" not followed by "all",
which cannot begin a call it accepts: a second call fails there too, as in llama-server).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .tool_calls import (PARSE_ERROR, Atomic, GrammarBuilder, Lit, ParsedAnswer, Rep, Rule, Schema, ToolGrammar,
                         Until, _tool_parameters, check_parameters, choice, json_cut_short, no_json_constant,
                         partial_marker_len, seq)

HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n>>>"   # the generation prompt: the parser's first words
TO_ALL = "all\n"          # the recipient of plain content
RECIPIENT = ">>>"         # what starts a recipient (the template writes it before each message and call)
TRIGGER = ">>>(?!all)"    # the lazy grammar's trigger pattern: a recipient other than "all"


@dataclass(frozen=True)
class FunctionaryToolFormat:
    markers: tuple = (">>>all",)   # kept as text in the output (functionary-v3-2.cpp's preserved tokens)
    content_lead: str = TO_ALL  # what a continued assistant turn is rendered with before its content
    exact_head: bool = True     # nothing is skipped after HEADER: the recipient follows at once
    reads_every_answer: bool = True   # the parser reads answers without tools too

    @property
    def parser_head(self) -> str:
        return HEADER


def detect(source: str) -> FunctionaryToolFormat | None:
    """common_chat_try_specialized_template's test for Functionary v3.2."""
    if ">>>all" in source and ">>>${recipient}" in source:
        return FunctionaryToolFormat()
    return None


# --- the grammar -------------------------------------------------------------------------------

def _call(tool: dict) -> Rule:
    """tool_open(name "\\n") then the arguments: a JSON value of the function's schema."""
    name = tool["function"]["name"]
    params = _tool_parameters(tool["function"])
    check_parameters(params)
    return Rule(f"tool-{name}", seq(Atomic(seq(Lit(name), Lit("\n"))), Schema(f"tool-{name}-schema", params)))


def tool_call_grammar(fmt: FunctionaryToolFormat, tools: list, required: bool, parallel: bool) -> ToolGrammar:
    """auto: lazy, the calls alone once the trigger fires; required: the whole answer, from the
    generation prompt on: "all\\n", text without ">>>", then calls, or the calls alone."""
    tools = [t for t in tools if isinstance(t, dict) and "function" in t]
    one = choice(*[_call(t) for t in tools])
    calls = Rule("tools", Rep(one, 1, -1), trigger=True)
    if not required:
        return ToolGrammar(GrammarBuilder().grammar(calls, lazy=True), True, (TRIGGER,), triggers_are_patterns=True)
    content = seq(Lit(TO_ALL), Until((RECIPIENT,)))
    root = seq(Lit(HEADER), choice(seq(content, calls if parallel else one), calls))
    # (functionary-v3-2.cpp names its trigger for a grammar that is not lazy too: it does nothing there)
    return ToolGrammar(GrammarBuilder().grammar(root, lazy=False), False, (TRIGGER,), triggers_are_patterns=True)


# --- reading the answer -----------------------------------------------------------------------

def parse_answer(fmt: FunctionaryToolFormat, tools: list, text: str, partial: bool, required: bool = False,
                 parallel: bool = True) -> ParsedAnswer:
    """text: what follows HEADER (a continued turn's "all\\n" and content included). No tools
    (or tool_choice "none"): "all\\n" then the content. With tools: that, or calls. What is
    still a beginning of "all\\n" or of a call's name reads as nothing yet."""
    failed = ParsedAnswer("", [], ok=False, error="" if partial else PARSE_ERROR)
    if text.startswith(TO_ALL):
        content = text[len(TO_ALL):]
        if tools and required and (RECIPIENT in content or partial_marker_len(content, RECIPIENT)):
            return failed   # (the content-then-calls rule stops at ">>>" and finds no name there)
        return ParsedAnswer(content, [])
    if TO_ALL.startswith(text):
        return ParsedAnswer("", [])
    if not tools:
        return failed
    names = [t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    calls: list[dict] = []
    pos = 0
    while True:
        name = next((n for n in names if text.startswith(n + "\n", pos)), None)
        if name is None:
            if pos < len(text) and not any((n + "\n").startswith(text[pos:]) for n in names):
                return failed   # neither a call nor the start of one: the answer cannot be read
            break               # the end, or a name still being written
        body = pos + len(name) + 1
        end = _json_end(text, body)
        if end is None:
            return failed
        if end < 0:             # the arguments cut short: as far as written
            written = text[body:].rstrip(" \t\n\r")
            calls.append({"name": name, "arguments": written if written.startswith("{") else "{", "id": ""})
            break
        value = text[body:end]
        calls.append({"name": name, "arguments": value if value.startswith("{") else "{", "id": ""})
        pos = end
        if pos == len(text):
            break
        if not (parallel or required):
            return failed       # a single call ends the answer ("required" reads calls alone as many)
    return ParsedAnswer("", calls)


def _json_end(text: str, start: int) -> int | None:
    """Where the JSON value at start ends; -1 when the text ends inside it (or before it);
    None when it goes wrong before the end."""
    if start == len(text):
        return -1
    try:
        _, end = json.JSONDecoder(parse_constant=no_json_constant).raw_decode(text, start)
        return end
    except json.JSONDecodeError as e:
        return -1 if json_cut_short(text, e) else None
    except ValueError:   # NaN or Infinity: Python's decoder takes them, JSON (and llama.cpp's parser) not
        return None

