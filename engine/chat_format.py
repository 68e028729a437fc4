"""Which parser reads a chat template's answers, as llama.cpp chooses (common/chat.cpp).

A template it has a parser written for (here: Ministral 3's, engine/mistral_tool_calls.py, and
Qwen3-Coder's XML tool calls, engine/xml_tool_calls.py) gets that parser; any other is
analysed by rendering it with and without probe messages: its reasoning block
(engine/reasoning.py) and its JSON tool calls (engine/tool_calls.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import mistral_tool_calls, xml_tool_calls
from .reasoning import ReasoningFormat, analyze_reasoning
from .tool_calls import ToolFormatUnsupported, analyze_tool_format


@dataclass(frozen=True)
class ChatFormat:
    tool_format: object = None                 # ToolFormat or XmlToolFormat; None: the template writes no calls
    reasoning: ReasoningFormat | None = None   # its reasoning block, if it has one
    tool_format_error: str = ""                # why its tool calls cannot be read, if so


def analyze_template(template) -> ChatFormat:
    mistral = mistral_tool_calls.detect(template.source)   # (in llama.cpp's order of tests)
    if mistral is not None:
        return ChatFormat(mistral, mistral_tool_calls.reasoning_format(mistral))
    xml = xml_tool_calls.detect(template.source)
    if xml is not None:
        return ChatFormat(xml, xml_tool_calls.reasoning_format(xml))
    reasoning = analyze_reasoning(template)
    try:
        return ChatFormat(analyze_tool_format(template, reasoning), reasoning)
    except ToolFormatUnsupported as e:
        return ChatFormat(None, reasoning, str(e))
