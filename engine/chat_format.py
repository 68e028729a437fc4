"""Which parser reads a chat template's answers, as llama.cpp chooses (common/chat.cpp).

A template it has a parser written for (here: Ministral 3's, engine/mistral_tool_calls.py,
Functionary v3.2's, engine/functionary_tool_calls.py, and Qwen3-Coder's XML tool calls,
engine/xml_tool_calls.py) gets that parser; one whose parser numllama has not written is
refused (SPECIALIZED_PARSERS without a format); any other is analysed by rendering it
with and without probe messages: its reasoning block (engine/reasoning.py) and its tool calls,
JSON (engine/tool_calls.py) or tagged (engine/tagged_tool_calls.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import functionary_tool_calls, mistral_tool_calls, xml_tool_calls
from .reasoning import ReasoningFormat, analyze_reasoning
from .tagged_tool_calls import LAGUNA
from .tool_calls import ToolFormatUnsupported, analyze_tool_format


@dataclass(frozen=True)
class ChatFormat:
    tool_format: object = None                 # ToolFormat, TaggedToolFormat, ...; None: the template writes no calls
    reasoning: ReasoningFormat | None = None   # its reasoning block, if it has one
    tool_format_error: str = ""                # why its tool calls cannot be read, if so
    stops: tuple = ()                          # stop strings every chat request gets (additional_stops)
    supports_thinking: bool = False            # the template has a reasoning block (enable_thinking's default)


# The templates llama.cpp reads with parsers written for them: their tests in
# common_chat_try_specialized_template, in its order (after Ministral 3's), and numllama's format
# for those it has written. Analysing the others as the rest would read their calls differently
# from llama-server, so they are refused instead.
def _has(*words):
    return lambda src: all(w in src for w in words)


SPECIALIZED_PARSERS = (   # (name, test, whether its parser reads a reasoning block: supports_thinking[, format])
    ("GPT-OSS", _has("<|channel|>"), True),
    ("Muse Glimmer", _has("<atem:function_calls>", "<|eom|>"), True),
    ("Functionary v3.2", functionary_tool_calls.detect, False, functionary_tool_calls.FunctionaryToolFormat),
    ("Kimi K2", _has("<|tool_calls_section_begin|>", "<|tool_call_begin|>"), True),
    ("Kimi K3", _has("<|open|>", "<|close|>", "<|end_of_msg|>"), True),
    ("Ling 3", _has("<role>ASSISTANT</role>", "<arg_key>"), True),
    ("Cohere2 MoE", _has("<|START_TEXT|>", "<|START_ACTION|>"), True),
    ("LFM2", lambda src: "<|tool_list_start|>" in src and "<|tool_list_end|>" in src, True),
    ("LFM2.5", lambda src: "List of tools: [" in src and "<|tool_list_start|>" not in src, True),
    ("GigaChat 3", lambda src: "<|role_sep|>" in src and "<|message_sep|>" in src and "<|function_call|>" not in src,
     False),
    ("MiniMax-M3", _has("]<]minimax[>[", "<tool_call>", "<invoke name="), True),
    ("DeepSeek V3.2/V4", lambda src: "dsml_token" in src and "DSML" in src
     and ("function_calls" in src or "tool_calls" in src), True),
    ("Gemma 4", _has("'<|tool_call>call:'"), True),
    ("MiniCPM5", _has("Tool usage guidelines:", '<function name="', '<param name="'), True),
)


def analyze_template(template) -> ChatFormat:
    mistral = mistral_tool_calls.detect(template.source)   # (in llama.cpp's order of tests)
    if mistral is not None:
        return ChatFormat(mistral, mistral_tool_calls.reasoning_format(mistral), supports_thinking=True)
    specialized = next((entry for entry in SPECIALIZED_PARSERS if entry[1](template.source)), None)
    if specialized is not None:
        name, _, thinks, *written = specialized
        if written:
            return ChatFormat(written[0]())
        return ChatFormat(None, analyze_reasoning(template),
                          f"{name}'s tool calls (a parser llama.cpp writes for that template)", supports_thinking=thinks)
    xml = xml_tool_calls.detect(template.source)
    if xml is not None:
        return ChatFormat(xml, xml_tool_calls.reasoning_format(xml), supports_thinking=xml.thinking)
    reasoning = analyze_reasoning(template)
    try:
        fmt = ChatFormat(analyze_tool_format(template, reasoning), reasoning, supports_thinking=reasoning is not None)
    except ToolFormatUnsupported as e:
        fmt = ChatFormat(None, reasoning, str(e), supports_thinking=reasoning is not None)
    if LAGUNA in template.source and reasoning is not None:
        # chat-diff-analyzer.cpp's workaround: the model writes "<think>" without the rendered
        # newlines, and may spell out its end-of-turn token as text, which stops it too
        fmt = replace(fmt, reasoning=replace(reasoning, start=reasoning.start_tag, end=reasoning.end_tag),
                      stops=("</assistant>",))
    return fmt
