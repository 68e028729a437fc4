"""Reasoning blocks (`<think>...</think>`): where a chat template puts them, and splitting them
out of the model's answer as llama-server's `reasoning_content`.

As for tool calls (engine/tool_calls.py), llama-server finds the markers by rendering the
template with and without a reasoning text (common/chat-diff-analyzer.cpp analyze_reasoning);
its parser then reads, after the generation prompt and any spaces, an optional block
`start reasoning end`, and the rest as content. Only the tag form is known here (Qwen 3,
DeepSeek R1 distills, SmolLM 3 ...): a template whose reasoning markers this analysis does not
find reads as having none.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .tool_calls import (ARG_FIRST, ARG_SECOND, ASSISTANT_MSG, CALL_ID_001, EPS, FUN_FIRST, PROBE_TOOLS, SPACE,
                         USER_MSG, GrammarBuilder, Lit, ParsedAnswer, Rule, Schema, Until, _WS, _common_prefix_len,
                         choice, diff_split, optional, parse_answer, partial_marker_len, segmentize, seq)

THINKING = "REASON_PART I am thinking END_R"
MARKER = r"(?:<[^>]*>|\[[^\]]*\])"


@dataclass(frozen=True)
class ReasoningFormat:
    """The markers around a reasoning block, as rendered (with their whitespace: "<think>\\n",
    "\\n</think>\\n\\n"); start may be empty (the block opens in the generation prompt)."""
    start: str
    end: str
    tools_only: bool = False   # the template shows reasoning only on turns with tool calls
    # a parser written for the template (engine/xml_tool_calls.py) may also end the block before
    # other markers, left for what follows, and take any whitespace after the start tag
    ends_before: tuple = ()
    loose_space: bool = False
    exact_tags: bool = False   # (engine/mistral_tool_calls.py) "[THINK]" reasoning "[/THINK]", then spaces

    @property
    def start_tag(self) -> str:
        return self.start.strip(_WS)

    @property
    def end_tag(self) -> str:
        return self.end.strip(_WS)

    @property
    def gate_end_tags(self) -> tuple:
        """The tags that end the block for llama-server's reasoning-budget sampler (which keeps
        a lazy grammar asleep inside it): the end tag, and for a parser written for the template,
        its own list ("\n</think>", "</think>", then the markers that also end the block)."""
        if self.loose_space:
            return ("\n" + self.end_tag, self.end_tag) + self.ends_before
        return (self.end_tag,)

    def head(self, generation_prompt: str) -> str:
        """The generation prompt up to this block's start tag (all of it when the tag is not
        there): llama-server's parsers and grammars begin with it."""
        i = generation_prompt.find(self.start_tag) if self.start_tag else -1
        return generation_prompt[:i] if i >= 0 else generation_prompt

    def block(self):
        """The block as a grammar node (analyze_reasoning::build_parser): optional, the
        whitespace around each marker optional character by character (optspace)."""
        def optspace(tag: str) -> list:
            lead, core, trail = _tag_parts(tag)
            return [optional(Lit(c)) for c in lead] + ([Lit(core)] if core else []) + [optional(Lit(c)) for c in trail]
        if self.exact_tags:
            return optional(seq(Lit(self.start_tag), Until((self.end_tag,)), Lit(self.end_tag)))
        if self.loose_space:   # "<think>" space until(end, others) ("</think>" | peek(others))
            return optional(seq(Lit(self.start_tag), SPACE, Until((self.end_tag,) + self.ends_before),
                                choice(Lit(self.end_tag), EPS) if self.ends_before else Lit(self.end_tag)))
        return optional(seq(*(optspace(self.start) if self.start else []), Until((self.end_tag,)),
                            *optspace(self.end)))


def _tag_parts(tag: str) -> tuple[str, str, str]:
    """A marker as (leading whitespace, the tag, trailing whitespace)."""
    core = tag.strip(_WS)
    i = tag.index(core) if core else len(tag)
    return tag[:i], core, tag[i + len(core):]


def _render(template, messages, add_generation_prompt=False, enable_thinking=True, tools=None) -> str | None:
    try:
        return template.render(messages, add_generation_prompt=add_generation_prompt,
                               extra={"enable_thinking": enable_thinking}, tools=tools)
    except Exception:
        return None


def analyze_reasoning(template) -> ReasoningFormat | None:
    """analyze_reasoning: the presence probe (a reasoning_content between markers), then the
    enable_thinking probe (markers the generation prompt gains or loses), then, for templates
    with tool calls, the scope probe; and llama.cpp's workaround for the first Qwen/DeepSeek
    reasoning templates, which split content at </think> without printing reasoning."""
    user = {"role": "user", "content": USER_MSG}
    start = end = ""
    plain = _render(template, [user, {"role": "assistant", "content": ASSISTANT_MSG}])
    with_r = _render(template, [user, {"role": "assistant", "content": ASSISTANT_MSG, "reasoning_content": THINKING}])
    if plain is not None and with_r is not None and THINKING in diff_split(plain, with_r).right:
        m = re.search(f"({MARKER}\\s*)" + re.escape(THINKING) + f"(\\s*{MARKER}\\s*)", with_r)
        if m:
            start, end = m.group(1), m.group(2)
        else:
            m = re.search(re.escape(THINKING) + f"\\s*({MARKER}\\s*)?", with_r)
            end = (m.group(1) or "") if m else ""
    found = bool(start or end)
    off = _render(template, [user], add_generation_prompt=True, enable_thinking=False)
    on = _render(template, [user], add_generation_prompt=True, enable_thinking=True)
    if off is not None and on is not None:
        d = diff_split(off, on)
        left, right = d.left.strip(_WS), d.right.strip(_WS)
        if not left and d.right:
            if right and on.endswith(right) and not start:
                start, found = d.right, True
        elif not right and d.left:
            if left and off.endswith(left) and not end:
                segs = [s for s in segmentize(off) if s[1].strip(_WS)]
                if len(segs) >= 2 and segs[-1][1] == left and segs[-2][0]:
                    start = segs[-2][1]
                end, found = d.left, True
        elif left and right:
            found_pair = _tail_anchored_markers(off, on)
            if found_pair:
                start, end = start or found_pair[0], end or found_pair[1]
                found = True
    tools_only = False
    if template.caps.supports_tool_calls:
        scope = _reasoning_scope(template)
        if scope is not None:
            tools_only = True
            start, end, found = scope[0], scope[1], bool(scope[0] or scope[1])
    if not found and "content.split('</think>')" in template.source and "reasoning_content" not in template.source \
            and "<SPECIAL_12>" not in template.source:
        start, end, found = "<think>", "</think>", True
    if not found or (not start and not end):
        return None
    return ReasoningFormat(start, end, tools_only)


def _tail_anchored_markers(off: str, on: str) -> tuple[str, str] | None:
    """compare_thinking_enabled's last resort: one output's tail found in the other, followed
    by exactly two markers (SmolLM 3 changes its system text too when thinking flips)."""
    anchor_len = 64
    for base, extended in ((on, off), (off, on)):
        anchor = base[-min(len(base), anchor_len):]
        pos = extended.rfind(anchor)
        if pos < 0 or pos + len(anchor) >= len(extended):
            continue
        extra = extended[pos + len(anchor):].strip(_WS)
        if not extra:
            continue
        segs = [s for s in segmentize(extra) if s[1].strip(_WS)]
        if len(segs) == 2 and segs[0][0] and segs[1][0]:
            return segs[0][1], segs[1][1]
    return None


def _reasoning_scope(template) -> tuple[str, str] | None:
    """compare_reasoning_scope: reasoning shown only on a turn with a tool call -> its markers."""
    user = {"role": "user", "content": USER_MSG}
    call = {"id": CALL_ID_001, "type": "function",
            "function": {"name": FUN_FIRST, "arguments": {ARG_FIRST: "VVVV", ARG_SECOND: "XXXX"}}}
    a = _render(template, [user, {"role": "assistant", "content": ASSISTANT_MSG, "reasoning_content": THINKING}],
                tools=PROBE_TOOLS)
    b = _render(template, [user, {"role": "assistant", "content": None, "reasoning_content": THINKING,
                                  "tool_calls": [call]}], tools=PROBE_TOOLS)
    if a is None or b is None or THINKING in a or THINKING not in b:
        return None
    m = re.search(f"({MARKER}\\s*)" + re.escape(THINKING) + f"\\s*({MARKER}\\s*)", b)
    if m:
        return m.group(1), m.group(2)
    m = re.search(re.escape(THINKING) + f"\\s*({MARKER}\\s*)?", b)
    return ("", m.group(1) or "") if m and m.group(1) else None


def generation_prompt(template, messages, **render) -> str:
    """What the generation prompt adds to the conversation (llama.cpp renders it with and
    without, and keeps what follows their common prefix)."""
    without = template.render(messages, add_generation_prompt=False, **render)
    with_gp = template.render(messages, add_generation_prompt=True, **render)
    return with_gp[_common_prefix_len(without, with_gp):]


def parser_input(fmt: ReasoningFormat | None, gen_prompt: str, text: str) -> str:
    """The text llama-server's parser reads after its first literal: the generation prompt
    from the reasoning start on (a prompt that opens or closes a block counts), then the answer."""
    return (gen_prompt + text)[len(fmt.head(gen_prompt) if fmt is not None else gen_prompt):]


def _optspace(tag: str) -> str:
    """common_chat_peg_builder::optspace as a regex: the tag, its surrounding whitespace optional
    character by character (ReasoningFormat.block is the same as grammar)."""
    lead, core, trail = _tag_parts(tag)
    return "".join(re.escape(c) + "?" for c in lead) + re.escape(core) + "".join(re.escape(c) + "?" for c in trail)


def split_reasoning(fmt: ReasoningFormat, text: str, partial: bool) -> tuple[str, int, bool]:
    """The reasoning block at the start of `text` (the parser input, spaces already skipped):
    (reasoning, where the rest begins, whether the text can be read yet). A block not closed
    (still thinking, or cut by the token limit) reads as the reasoning so far, a partial end
    marker held back; while the answer is partial, a partial start marker is held back too."""
    if fmt.start_tag and partial and text and partial_marker_len(text, fmt.start_tag) == len(text):
        return "", 0, False
    if fmt.exact_tags:
        m = re.match(re.escape(fmt.start_tag), text)
    elif fmt.loose_space:
        m = re.match(re.escape(fmt.start_tag) + "[ \t\n\v\f\r]*", text)   # (isspace)
    else:
        m = re.match(_optspace(fmt.start), text) if fmt.start else re.match("", text)
    if not m:
        return "", 0, True
    body = m.end()
    close = text.find(fmt.end_tag, body) if fmt.end_tag else -1
    for other in fmt.ends_before:   # ends the block, and stays for what follows
        i = text.find(other, body)
        if i >= 0 and (close < 0 or i < close):
            return _drop_blank(text[body:i]), i, True
    if (fmt.loose_space or fmt.exact_tags) and close >= 0:   # (then the spaces before the content)
        after = close + len(fmt.end_tag)
        while after < len(text) and text[after] in _WS:
            after += 1
        return _drop_blank(text[body:close]), after, True
    if close < 0:
        reasoning = text[body:]
        held = max(partial_marker_len(reasoning, t) for t in (fmt.end_tag,) + fmt.ends_before)
        return _drop_blank(reasoning[:len(reasoning) - held]), len(text), True
    # the end tag's own optional whitespace: the reasoning text (until the tag) keeps what
    # precedes it, as llama.cpp's until() does
    after = re.match(_optspace(fmt.end), text[close:])
    return _drop_blank(text[body:close]), close + after.end(), True


def _drop_blank(reasoning: str) -> str:
    """Whitespace-only reasoning (an empty block from the prompt) is no reasoning."""
    return "" if not reasoning.strip(" \n\r\t") else reasoning


def read_answer(text: str, partial: bool, gen_prompt: str = "", reasoning: ReasoningFormat | None = None,
                extract: bool = True, tool_format=None, tools=(), required: bool = False,
                parser_head: str = "", parallel: bool = True) -> ParsedAnswer:
    """A chat answer as llama-server's parser reads it, for a template with a reasoning block
    or tool calls (plain templates: the text is the content). After the generation prompt's
    first words come spaces (skipped), the reasoning block (split out when `extract`, the
    request's reasoning_format not being "none"), then content and calls. A final answer out of
    format (a call never finished, trailing text) or that reads as nothing at all is the raw
    text as content, and not ok (llama-server keeps its raw text when the parsed message is
    empty, and its stream then sends nothing more). parser_head: the first words of a parser
    written for the template (engine/xml_tool_calls.py), when it has one; its format may say
    that nothing is skipped after them (exact_head: engine/functionary_tool_calls.py)."""
    if reasoning is None and tool_format is None and not parser_head:
        return ParsedAnswer(text, [])
    skipped = "" if getattr(tool_format, "exact_head", False) else _WS
    if parser_head and reasoning is None and gen_prompt.startswith(parser_head):
        # a parser written for the template starts with its own words: the rest of the
        # generation prompt (a continued assistant turn) is read as part of the answer
        rest = (gen_prompt + text)[len(parser_head):].lstrip(skipped)
    else:
        rest = parser_input(reasoning, gen_prompt, text)
    # a parser written for the template looks for its reasoning block right where the answer
    # starts, and skips spaces after it (`reasoning << content`); the analysed ones skip first
    own_block = reasoning is not None and (reasoning.exact_tags or reasoning.loose_space)
    if not own_block:
        rest = rest.lstrip(skipped)
    thought = ""
    if reasoning is not None and extract:
        thought, pos, readable = split_reasoning(reasoning, rest, partial)
        if not readable:
            return ParsedAnswer("", [], ok=False)
        rest = rest[pos:]
    if own_block:
        rest = rest.lstrip(_WS)
    if tool_format is None:
        parsed = ParsedAnswer(rest, [], reasoning=thought)
    else:
        parsed = parse_answer(tool_format, list(tools), rest, partial, required, parallel)
        parsed.reasoning = thought
    if parsed.error:
        return parsed
    if not partial and (not parsed.ok or not (parsed.content or parsed.reasoning or parsed.tool_calls)):
        return ParsedAnswer(text, [], ok=False)
    return parsed


def response_format_grammar(schema, generation_prompt: str, reasoning: ReasoningFormat, extract: bool) -> str:
    """A chat response_format's grammar for a template with a reasoning block, as llama-server's
    chat parser builds it (chat-auto-parser-generator.cpp): the generation prompt up to the
    block, spaces, the optional block (when extracted), spaces, then the JSON bare or in a
    ```json fence. The generation prompt is fed to it first (SamplingParams.grammar_prefill)."""
    head = reasoning.head(generation_prompt)
    answer = Rule("response-format", Schema("response-format-schema", schema))
    body = choice(seq(Lit("```json"), SPACE, answer, SPACE, Lit("```")), seq(SPACE, answer, SPACE))
    root = seq(Lit(head) if head else EPS, SPACE, reasoning.block() if extract else EPS, SPACE, body)
    return GrammarBuilder().grammar(root, lazy=False)
