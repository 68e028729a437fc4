"""Ministral 3 / Magistral / Mistral Large 3's tool calls and [THINK] blocks:

    [THINK]reasoning[/THINK]content[TOOL_CALLS]get_weather[ARGS]{"location": "Paris"}

llama.cpp reads these templates with a parser written for them (common/parsers/ministral3.cpp,
chosen by common_chat_try_specialized_template; Mistral Small 3.2, which has [CALL_ID], is not
one of them). It also renders the conversation its own way: a system or assistant message's
reasoning and text become content blocks ({"type": "thinking"}, {"type": "text"}), which is
what the template reads. The arguments are a JSON object of the function's schema, kept as the
model wrote it; a `response_format` answer is JSON in a ```json fence.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .reasoning import ReasoningFormat
from .tool_calls import (EPS, PARSE_ERROR, SPACE, Atomic, GrammarBuilder, Lit, ParsedAnswer, Rep, Rule, Schema,
                         ToolGrammar, Until, _tool_parameters, check_parameters, choice, json_cut_short,
                         partial_marker_len, seq)

THINK_START, THINK_END = "[THINK]", "[/THINK]"
CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


@dataclass(frozen=True)
class MistralToolFormat:
    markers: tuple = (CALLS, ARGS)   # kept as text in the output (ministral3.cpp's preserved tokens)


def detect(source: str) -> MistralToolFormat | None:
    if "[SYSTEM_PROMPT]" in source and CALLS in source and ARGS in source and "[CALL_ID]" not in source:
        return MistralToolFormat()
    return None


def reasoning_format(fmt: MistralToolFormat) -> ReasoningFormat:
    """[THINK] reasoning [/THINK], the tags exact; spaces skipped after the block."""
    return ReasoningFormat(THINK_START, THINK_END, exact_tags=True)


def adjust_messages(messages: list) -> list:
    """common_chat_params_init_ministral_3's messages: a system or assistant message's
    reasoning_content and content become content blocks (thinking first, then text)."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "assistant"):
            out.append(m)
            continue
        blocks = []
        if isinstance(m.get("reasoning_content"), str):
            blocks.append({"type": "thinking", "thinking": m["reasoning_content"]})
        if isinstance(m.get("content"), str):
            blocks.append({"type": "text", "text": m["content"]})
        elif isinstance(m.get("content"), list):
            blocks += m["content"]
        adjusted = {k: v for k, v in m.items() if k != "reasoning_content"}
        adjusted["content"] = blocks
        out.append(adjusted)
    return out


def tool_call_grammar(fmt: MistralToolFormat, tools: list, required: bool, parallel: bool,
                      extract_reasoning: bool = True) -> ToolGrammar:
    """auto: lazy, waiting for [TOOL_CALLS]; required: the optional [THINK] block, content, then
    at least one call."""
    tools = [t for t in tools if isinstance(t, dict) and "function" in t]
    functions = []
    for t in tools:
        name = t["function"]["name"]
        check_parameters(_tool_parameters(t["function"]))
        args = Schema(f"tool-{name}-schema", _tool_parameters(t["function"]))
        functions.append(Rule(f"tool-{name}", seq(Atomic(seq(Lit(name), Lit(ARGS))), Atomic(args))))
    calls = Rule("tool-call", Rep(seq(Lit(CALLS), choice(*functions)), 1 if required else 0, -1 if parallel else 1),
                 trigger=True)
    if not required:
        return ToolGrammar(GrammarBuilder().grammar(calls, lazy=True), True, (CALLS,))
    block = reasoning_format(fmt).block() if extract_reasoning else EPS
    root = seq(block, SPACE, Until((CALLS,)), SPACE, calls)
    # (ministral3.cpp names the trigger for a grammar that is not lazy too: it does nothing there)
    return ToolGrammar(GrammarBuilder().grammar(root, lazy=False), False, (CALLS,))


def response_format_grammar(fmt: MistralToolFormat, schema, extract_reasoning: bool) -> str:
    block = reasoning_format(fmt).block() if extract_reasoning else EPS
    root = seq(block, SPACE, Lit("```json"), SPACE, Schema("response-format", schema), SPACE, Lit("```"))
    return GrammarBuilder().grammar(root, lazy=False)


def parse_answer(fmt: MistralToolFormat, tools: list, text: str, partial: bool, required: bool = False) -> ParsedAnswer:
    """Content up to [TOOL_CALLS], then `[TOOL_CALLS]name[ARGS]{...}` once or (parallel) more;
    a call cut short counts once its name and [ARGS] are whole, its arguments as far as written."""
    names = {t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    start = text.find(CALLS)
    if start < 0:   # (a marker the end may be cutting is held back, final answers too: lenient)
        return ParsedAnswer(text[:len(text) - partial_marker_len(text, CALLS)], [])
    calls: list[dict] = []
    pos = start
    decoder = json.JSONDecoder()
    while text.startswith(CALLS, pos):   # (without parallel calls the grammar allows one)
        head = pos + len(CALLS)
        sep = text.find(ARGS, head)
        name = text[head:sep] if sep >= 0 else text[head:]
        if sep < 0:
            if not any((n + ARGS).startswith(name) for n in names):
                break
            pos = len(text)
            break
        if name not in names:
            break
        body = sep + len(ARGS)
        try:
            _, end = decoder.raw_decode(text, body)
            calls.append({"name": name, "arguments": text[body:end].rstrip(" \t\n\r"), "id": ""})
            pos = end
        except json.JSONDecodeError as e:
            if not json_cut_short(text, e):
                break   # JSON that goes wrong before the end: the call is not read
            calls.append({"name": name, "arguments": text[body:].rstrip(" \t\n\r") or "{", "id": ""})
            pos = len(text)
            break
    if required and not calls and not partial and pos < len(text):
        return ParsedAnswer("", [], ok=False, error=PARSE_ERROR)
    return ParsedAnswer(text[:start], calls)
