"""POST /v1/chat/completions (and /chat/completions), /apply-template, and the input-token count."""
from __future__ import annotations

import json
from contextlib import closing
from dataclasses import dataclass

from flask import Blueprint, Response, current_app

from ..engine.chat_template import (ChatTemplateError, preserve_reasoning_variables,
                                    reasoning_effort_variables)
from ..engine import legacy_chat
from ..engine.json_schema import chat_response_format_grammar
from ..engine.slots import ErrorEvent, FinalEvent, ProgressEvent, Task, TokenEvent
from ..engine.grammar import GrammarError
from ..engine.reasoning import generation_prompt, read_answer, response_format_grammar
from ..engine.mistral_tool_calls import MistralToolFormat
from ..engine.mistral_tool_calls import response_format_grammar as mistral_response_format_grammar
from ..engine.xml_tool_calls import XmlToolFormat
from ..engine.xml_tool_calls import response_format_grammar as xml_response_format_grammar
from ..engine.tool_calls import tool_call_grammar

from .completions import Completion, collect_finals, engine_error, task_events
from .errors import APIError, json_response
from .http import random_id, request_json, sse
from .params import (TRIGGER_PATTERN, TRIGGER_WORD, get_bool, get_number, parse_stop, reasoning_budget_forced,
                     reasoning_budget_tokens, response_format_schema, schema_grammar)
from .tokens import check_tokenizable

bp = Blueprint("chat", __name__)

UNSUPPORTED = ("functions",)   # OpenAI's legacy function calling; `tools` replaced it
TOOL_CHOICES = ("auto", "none", "required")


# llama-server reads media parts only with a multimodal projector (--mmproj), which numllama
# does not load: they are refused as it refuses them without one (a 500, with its words)
MEDIA_PARTS = {"image_url": "image", "input_audio": "audio", "input_video": "video", "video_url": "video"}


def _content_text(content: list, joiner: str) -> str:
    """A message's content parts, which must be text, joined."""
    parts: list[str] = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in MEDIA_PARTS:
            raise APIError(f"{MEDIA_PARTS[kind]} input is not supported - hint: if this is unexpected, "
                           f"you may need to provide the mmproj", 500)
        if kind != "text":
            raise APIError("unsupported content[].type")
        if not isinstance(p.get("text"), str):
            raise APIError("Only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
        parts.append(p["text"])
    return joiner.join(parts)


def _messages(body: dict) -> list[dict]:
    if "messages" not in body or body["messages"] is None:
        raise APIError("'messages' is required")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise APIError("Expected 'messages' to be an array")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError("Each message must be an object with a string 'role'")
        content = m.get("content")
        if content is None:
            if m["role"] != "assistant":
                raise APIError("All non-assistant messages must contain 'content'")
            if "content" not in m and "tool_calls" not in m:
                raise APIError("Assistant message must contain either 'content' or 'tool_calls'!")
            content = ""
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise APIError("'tool_calls' must be an array")
        if isinstance(content, list):
            # text parts join with a newline; a prefilled assistant turn joins them with a blank line
            content = _content_text(content, "\n\n" if m["role"] == "assistant" and m is messages[-1] else "\n")
        elif not isinstance(content, str):
            raise APIError("'content' must be a string or an array of text parts")
        out.append({**m, "content": content})
    return out


def _template_kwargs(body: dict, defaults: dict) -> dict:
    """The server's template variables with the request's chat_template_kwargs over them, as
    llama-server merges them; reasoning_effort "none" turns thinking off."""
    given = body.get("chat_template_kwargs") or {}
    if not isinstance(given, dict):
        raise APIError("'chat_template_kwargs' must be an object")
    kwargs = {**defaults, **given}
    if isinstance(kwargs.get("enable_thinking"), str):
        raise APIError('invalid type for "enable_thinking" (expected boolean, got string)')
    effort = body.get("reasoning_effort")
    if effort == "none":
        kwargs["enable_thinking"] = False
        kwargs.pop("reasoning_effort", None)
    elif isinstance(effort, str) and effort:
        kwargs["reasoning_effort"] = effort
    # as llama.cpp renders them: an effort under both names templates use, and preserve_reasoning
    # as the variables that keep (or drop) earlier turns' reasoning
    if isinstance(kwargs.get("reasoning_effort"), str) and kwargs["reasoning_effort"]:
        kwargs.update(reasoning_effort_variables(kwargs["reasoning_effort"]))
    if isinstance(kwargs.get("preserve_reasoning"), bool):
        kwargs.update(preserve_reasoning_variables(kwargs["preserve_reasoning"]))
    return kwargs


@dataclass(frozen=True)
class RenderedChat:
    prompt: str
    tools: list              # the request's tools, checked (_tools)
    generation_prompt: str   # what the template adds for the answer (llama-server's parser reads it first)
    parse_prompt: str        # the same, with a continued assistant message (reasoning templates)


def render_prompt(body: dict, for_answer: bool = True) -> RenderedChat:
    """The prompt text for a chat request (the last assistant message, if any, is continued:
    llama-server's prefill). With a reasoning template the continued turn is rebuilt as
    llama-server does: the header, the reasoning block (closed unless only reasoning is given,
    or continue_final_message says "reasoning_content": _continuation), then the content.
    for_answer: the answer will be generated and read, so the generation prompt is wanted (two
    more renders) where its reading needs it."""
    ctx = current_app.config["NUMLLAMA"]
    messages = _messages(body)
    add_gen = get_bool(body, "add_generation_prompt", True)
    kwargs = _template_kwargs(body, ctx.template_kwargs)
    last_given = body["messages"][-1] if messages else None
    continuation = _continuation(body.get("continue_final_message"), last_given)
    if continuation is not None and add_gen:   # (add_generation_prompt is true unless the request says false)
        raise APIError("Cannot set both add_generation_prompt and continue_final_message to true.")
    if continuation is None and ctx.prefill_assistant and messages and messages[-1]["role"] == "assistant":
        # llama-server's prefill: a final assistant message is continued
        if len(messages) >= 2 and messages[-2]["role"] == "assistant":
            raise APIError("Cannot have 2 or more assistant messages at the end of the list.")
        continuation = _continuation(True, last_given)
    # (no messages at all is allowed, as llama-server allows it: the template renders what it will)
    prefill = bool(messages) and continuation is not None
    tools = _tools(body)
    if not ctx.jinja:   # (llama-server answers these 500; they are the request's to fix)
        if tools:
            raise APIError("tools param requires --jinja flag")
        if isinstance(body.get("tool_choice"), str) and body["tool_choice"] != "auto":
            raise APIError("tool_choice param requires --jinja flag")
    if prefill and messages[-1].get("tool_calls"):
        raise APIError("Cannot continue an assistant message that contains tool calls.")
    if not ctx.jinja:
        return _legacy_prompt(body["messages"], add_gen and not prefill)
    tmpl, reasoning = ctx.chat_template, ctx.reasoning_format
    shown = tools or None   # as the template gets them: an empty list is no tools
    try:
        history = messages[:-1] if prefill else messages
        gp = ""
        own_parser = bool(getattr(ctx.tool_format, "parser_head", ""))   # (xml_tool_calls: read from its head)
        if (reasoning is not None and (prefill or for_answer)) or (
                for_answer and tools and ctx.tool_format is not None) or (own_parser and (prefill or for_answer)):
            gp = generation_prompt(tmpl, history, extra=kwargs, tools=shown)
        if prefill:
            last = messages[-1]
            content = last["content"] if continuation == "content" else ""   # (not written when continuing reasoning)
            if reasoning is not None and reasoning.start:
                answer = reasoning.head(gp) + reasoning.start + (last.get("reasoning_content") or "")
                if continuation == "content":
                    answer += reasoning.end + content
                prompt = tmpl.render(history, add_generation_prompt=False, extra=kwargs, tools=shown) + answer
                return RenderedChat(prompt, tools, gp, answer)
            # (a parser written for the template may render a continued turn with a lead, and
            # its content whatever the mode: Functionary's "all\n")
            lead = getattr(ctx.tool_format, "content_lead", "")
            answer = lead + (last["content"] if lead else content)
            # the history, then what the generation prompt adds to it (a template that writes
            # something else when it has no generation prompt keeps it: Phi-3.5's end of text)
            head = gp or generation_prompt(tmpl, history, extra=kwargs, tools=shown)
            prompt = tmpl.render(history, add_generation_prompt=False, extra=kwargs, tools=shown) + head + answer
            return RenderedChat(prompt, tools, gp, gp + answer)
        prompt = tmpl.render(messages, add_generation_prompt=add_gen, extra=kwargs, tools=shown)
    except ChatTemplateError as e:
        raise APIError(str(e))
    return RenderedChat(prompt, tools, gp, gp)


CONTINUATIONS = {"reasoning_content": "reasoning", "content": "content"}


def _continuation(value, last: dict | None) -> str | None:
    """How the last message (as the request gave it) is continued, by continue_final_message's
    value (common_chat_continuation_parse): true lets the message decide ("reasoning" when it
    holds reasoning_content and no content, else "content"), "reasoning_content" and "content"
    say it, anything else is no continuation (None). "reasoning" leaves the reasoning block
    open and writes no content."""
    if value is True:
        thought, content = (last.get("reasoning_content"), last.get("content")) if last else (None, None)
        return "reasoning" if isinstance(thought, str) and thought and not content else "content"
    return CONTINUATIONS.get(value) if isinstance(value, str) else None


def _legacy_prompt(messages: list, add_generation_prompt: bool) -> RenderedChat:
    """--no-jinja: llama.cpp's hand-written format for the template (engine.legacy_chat), with
    roles and contents only. A continued assistant turn is written whole, without a generation
    prompt, as llama-server's legacy path writes it."""
    ctx = current_app.config["NUMLLAMA"]
    if ctx.legacy_format is None:
        raise APIError(legacy_chat.NOT_SUPPORTED, 500)
    prompt = legacy_chat.format_chat(ctx.legacy_format, legacy_chat.conversation(messages), add_generation_prompt)
    return RenderedChat(prompt, [], "", "")


def _tools(body: dict) -> list:
    """The request's tools: function definitions, each with a name, as llama-server keeps them
    (common_chat_tools_parse_oaicompat): name, description and parameters only, so that other
    fields (OpenAI's "strict") never reach the template."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError("'tools' must be an array")
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type") != "function" or not isinstance(fn.get("name"), str) \
                or not fn["name"]:
            raise APIError('Each tool must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(f"Tool '{fn['name']}': 'parameters' must be a JSON schema object")
        if not isinstance(fn.get("description", ""), str):
            raise APIError(f"Tool '{fn['name']}': 'description' must be a string")
        out.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""),
                                                     "parameters": fn.get("parameters") or {}}})
    return out


@dataclass(frozen=True)
class AnswerReader:
    """How llama-server's chat parser reads this request's answer: its reasoning block (split
    out unless reasoning_format is "none"), then content and, with tools, calls."""
    reasoning: object          # engine.reasoning.ReasoningFormat, or None
    extract: bool              # reasoning_format is not "none"
    parse_prompt: str          # the generation prompt (with a continued turn) read before the answer
    tool_format: object = None # engine.tool_calls.ToolFormat, when calls are parsed
    tools: tuple = ()
    response_format: bool = False  # the content is a response_format's JSON
    required: bool = False     # tool_choice "required"
    parser_head: str = ""      # the first words of a parser written for the template (xml_tool_calls)
    parallel: bool = True      # parallel_tool_calls

    def read(self, text: str, partial: bool):
        parsed = read_answer(text, partial, self.parse_prompt, self.reasoning, self.extract,
                             self.tool_format, self.tools, self.required, self.parser_head, self.parallel)
        if self.response_format and parsed.ok:
            parsed.content = _response_format_content(parsed.content)
        return parsed


REASONING_FORMATS = ("none", "auto", "deepseek")


def preserved_texts(reasoning, tool_format) -> list[str]:
    """The template's markers that a chat answer keeps even where they are control tokens
    (llama.cpp's autoparser::collect_preserved_tokens): reasoning tags and tool-call markers."""
    marks = [reasoning.start_tag, reasoning.end_tag] if reasoning is not None else []
    if tool_format is not None:
        marks += list(tool_format.markers)
    out = []
    for m in (m.strip() for m in marks):
        if m and m not in out:
            out.append(m)
    return out


def _answer_reader(body: dict, out: dict, chat: RenderedChat, extract: bool) -> AnswerReader | None:
    """tools + tool_choice -> the grammar llama-server would use (set in `out`), and how the
    answer is read; None when it is plain content (a template without a reasoning block, and no
    tools, tool_choice "none", or a template that writes no tool calls: it still sees them)."""
    ctx = current_app.config["NUMLLAMA"]
    tools = chat.tools
    choice = body.get("tool_choice")
    if not isinstance(choice, str):   # llama-server reads a string only: an object (a named
        choice = "auto"               # function) or null counts as "auto"
    if choice not in TOOL_CHOICES:
        raise APIError(f"Invalid tool_choice: {choice}")
    reasoning = ctx.reasoning_format
    head = getattr(ctx.tool_format, "parser_head", "")   # a parser written for the template
    if out.pop("_response_format_reasoning", False):
        return AnswerReader(reasoning, extract, chat.parse_prompt, response_format=True, parser_head=head)
    calls = bool(tools) and choice != "none"
    if calls and "grammar" in body:
        raise APIError("Cannot use custom grammar constraints with tools.")
    if calls and ctx.tool_format_error:
        raise APIError(f"Tool calls with this chat template are not supported by numllama yet: "
                       f"{ctx.tool_format_error}")
    fmt = ctx.tool_format if calls else None
    if fmt is None:
        if getattr(ctx.tool_format, "reads_every_answer", False):   # (Functionary: "all\n" before the content)
            return AnswerReader(reasoning, extract, chat.parse_prompt, ctx.tool_format, parser_head=head)
        if reasoning is None and not head:
            return None
        return AnswerReader(reasoning, extract, chat.parse_prompt, parser_head=head)
    parallel = body.get("parallel_tool_calls", ctx.chat_template.caps.supports_parallel_tool_calls)
    if not isinstance(parallel, bool):
        raise APIError("'parallel_tool_calls' must be a boolean")
    try:
        grammar = tool_call_grammar(fmt, tools, choice == "required", parallel, chat.generation_prompt,
                                    reasoning, extract)
    except GrammarError as e:
        raise APIError(f"tools: {e}")
    if grammar.grammar is not None:
        out["grammar"] = grammar.grammar
        if grammar.lazy:
            out["grammar_lazy"] = True
            kind = TRIGGER_PATTERN if grammar.triggers_are_patterns else TRIGGER_WORD
            out["grammar_triggers"] = [{"type": kind, "value": w} for w in grammar.triggers]
            if reasoning is not None and reasoning.start_tag and reasoning.end_tag:
                out["_reasoning_tags"] = _reasoning_tags(reasoning, chat)
        else:   # llama-server feeds the generation prompt to the grammar first
            out["_grammar_prefill"] = chat.parse_prompt
    return AnswerReader(reasoning, extract, chat.parse_prompt, fmt, tuple(tools), required=choice == "required",
                        parser_head=head, parallel=parallel)


def _ids(text: str) -> tuple:
    """A text's tokens, as the reasoning-budget sampler matches and forces them."""
    return tuple(current_app.config["NUMLLAMA"].engine.tokenizer.encode(text, add_special=False))


def _reasoning_tags(reasoning, chat: RenderedChat) -> tuple:
    """The reasoning-budget sampler's tags as tokens: (start, (end, ...), the parser's prompt)."""
    return _ids(reasoning.start_tag), tuple(_ids(t) for t in reasoning.gate_end_tags), _ids(chat.parse_prompt)


def _reasoning_budget(body: dict, out: dict, chat: RenderedChat) -> None:
    """reasoning_budget_tokens (or thinking_budget_tokens; the server's --reasoning-budget when
    -1): a template with a reasoning block closes it for the model after that many tokens,
    writing reasoning_budget_message and its end tag (llama-server's reasoning-budget sampler)."""
    ctx = current_app.config["NUMLLAMA"]
    budget = reasoning_budget_tokens(body)
    if budget is None:
        budget = body.get("thinking_budget_tokens", -1)
        budget = int(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else -1
    if budget == -1:
        budget = ctx.reasoning_budget
    message = body.get("reasoning_budget_message")
    if not isinstance(message, str):   # (a value of another type: the default, as json_value does)
        message = ctx.reasoning_budget_message
    reasoning = ctx.reasoning_format
    # (reasoning_control arms the sampler without a budget: the block may be closed from outside)
    if (budget < 0 and not get_bool(body, "reasoning_control", False)) or reasoning is None \
            or not reasoning.start_tag or not reasoning.end_tag:
        return
    out.setdefault("_reasoning_tags", _reasoning_tags(reasoning, chat))
    out["_reasoning_budget"] = (budget, reasoning_budget_forced(message, _ids(reasoning.gate_end_tags[0]), _ids))


def _call_id(call: dict, i: int, ids: list) -> str:
    while len(ids) <= i:
        ids.append(call["id"] or random_id())
    return ids[i]


def _oai_call(call: dict, call_id: str) -> dict:
    return {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}, "id": call_id}


def _chat_response_format(out: dict, chat: RenderedChat, extract: bool) -> None:
    """A response_format becomes the grammar llama-server's chat parser would build for it
    (optional whitespace, an optional ```json fence; a reasoning block first, for templates with
    one); its JSON becomes the content."""
    ctx = current_app.config["NUMLLAMA"]
    if out.get("response_format") is None or out.get("grammar") or not ctx.jinja:
        return   # (--no-jinja: llama-server's legacy path, the schema's own grammar and the raw answer)
    schema = response_format_schema(out["response_format"])
    if schema is None:
        return
    if isinstance(ctx.tool_format, (XmlToolFormat, MistralToolFormat)):   # a parser written for the template
        own = xml_response_format_grammar if isinstance(ctx.tool_format, XmlToolFormat) else mistral_response_format_grammar
        out["grammar"] = schema_grammar(schema, lambda s: own(ctx.tool_format, s, extract))
        out["_grammar_prefill"] = chat.parse_prompt
        out["_response_format_reasoning"] = True
    elif ctx.reasoning_format is None:
        out["grammar"] = schema_grammar(schema, chat_response_format_grammar)
        if not getattr(ctx.tool_format, "reads_every_answer", False):   # (else its parser reads the JSON too)
            out["_response_format"] = True
    else:
        out["grammar"] = schema_grammar(schema, lambda s: response_format_grammar(
            s, chat.generation_prompt, ctx.reasoning_format, extract))
        out["_grammar_prefill"] = chat.parse_prompt
        out["_response_format_reasoning"] = True
    del out["response_format"]


def _reasoning_extract(body: dict) -> bool:
    """Whether the reasoning block is split out: reasoning_format (or --reasoning-format) is
    not "none"."""
    ctx = current_app.config["NUMLLAMA"]
    name = body.get("reasoning_format", ctx.reasoning_format_default)
    if name == "deepseek-legacy":
        raise APIError("reasoning_format 'deepseek-legacy' is not supported by numllama yet")
    if name not in REASONING_FORMATS:
        raise APIError(f"Unknown reasoning format: {name}" if isinstance(name, str) else
                       "'reasoning_format' must be a string")
    return name != "none"


def _response_format_content(text: str) -> str:
    """What llama-server's chat parser takes as the content of a response_format answer, so far:
    the JSON without the whitespace and ```json fence around it. Once the JSON value is
    complete, what follows it is not content; until then all of it is (a JSON cut short keeps
    its trailing whitespace: it is inside the value)."""
    text = text.lstrip(" \t\n")
    if FENCE.startswith(text):   # (the fence may still be coming)
        return ""
    if text.startswith(FENCE):
        text = text[len(FENCE):].lstrip(" \t\n")
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return text
    return text[:end]


FENCE = "```json"


def _completion_body(body: dict, chat: RenderedChat) -> dict:
    for key in UNSUPPORTED:
        if body.get(key):
            raise APIError(f"'{key}' is not supported by numllama yet", 400)
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise APIError("top_logprobs requires logprobs to be set to true")
    out = {k: v for k, v in body.items()
           if k not in ("messages", "logprobs", "top_logprobs", "n", "grammar_lazy", "grammar_triggers")
           and not k.startswith("_")}   # (the route's own fields below start with "_")
    out["prompt"] = chat.prompt
    extract = _reasoning_extract(body)
    _chat_response_format(out, chat, extract)
    ctx = current_app.config["NUMLLAMA"]
    if ctx.jinja:   # (--no-jinja is llama-server's legacy path: the answer is the content, as written)
        out["preserved_tokens"] = preserved_texts(ctx.reasoning_format, ctx.tool_format)
        if ctx.template_stops:   # (after the request's own, as llama-server appends them)
            out["stop"] = list(parse_stop(out.get("stop"))) + list(ctx.template_stops)
        out["_reader"] = _answer_reader(body, out, chat, extract) if "_response_format" not in out else None
        _reasoning_budget(body, out, chat)
    else:
        reasoning_budget_tokens(body)   # (still checked: llama-server's request schema reads every body)
        out["_reader"] = None
    if body.get("logprobs"):
        out["n_probs"] = get_number(body, "top_logprobs", 20, int) if body.get("top_logprobs") is not None else 20
        out["n_probs"] = max(out["n_probs"], 1)
    n = get_number(body, "n", 1, int)
    ctx = current_app.config["NUMLLAMA"]
    if not 1 <= n <= ctx.scheduler.n_slots:
        raise APIError(f"Field 'n': Value must be between 1 <= value <= {ctx.scheduler.n_slots}, but got {n}")
    out["_n"] = n
    return out


@dataclass(frozen=True)
class ChatRun:
    """A chat request ready to run: the completion to submit (one task per choice) and how each
    choice's text is read into a message. The Anthropic and Responses routes run theirs here too."""
    completion: Completion
    reader: AnswerReader | None   # reasoning and tool calls read out; None: the text is the content
    json_content: bool            # a response_format answer: the content is its JSON only
    prompt: str                   # the prompt as `verbose` shows it
    verbose: bool

    def message_stream(self) -> "MessageStream":
        return MessageStream(self.reader, self.json_content)


def start_chat(body: dict) -> ChatRun:
    """Render and check a chat request; nothing runs until its completion is submitted."""
    chat = render_prompt(body)
    cbody = _completion_body(body, chat)
    n = cbody.pop("_n")
    json_content = cbody.pop("_response_format", False)
    reader = cbody.pop("_reader")
    prefill, tags = cbody.pop("_grammar_prefill", ""), cbody.pop("_reasoning_tags", ())
    budget, forced = cbody.pop("_reasoning_budget", (-1, ()))
    cbody["prompt"] = [chat.prompt] * n if n > 1 else chat.prompt
    c = Completion(cbody, oai=True, grammar_prefill=prefill, reasoning_tags=tags, reasoning_budget=budget,
                   reasoning_forced=forced)
    verbose = get_bool(body, "verbose", False) or c.ctx.verbose
    # verbose shows what the model actually read: the prompt tokens, special tokens rendered
    prompt = c.ctx.engine.tokenizer.decode(c.prompts[0], special=True) if verbose else chat.prompt
    return ChatRun(c, reader, json_content, prompt, verbose)


class MessageStream:
    """One choice's answer read into an assistant message as llama-server reads it while it
    streams: after each token the text so far is read again (partially), and what changed since
    the last reading is returned as deltas (common_chat_msg_diff::compute_diffs): the reasoning's
    new text, the content's; for the last call known, its new argument text; each new call
    whole, with its id and name. Without a reader the text is the content, token by token."""

    def __init__(self, reader: AnswerReader | None, json_content: bool = False):
        self.reader = reader
        self.json_content = json_content
        self.text = ""
        self.reasoning = ""
        self.content = ""
        self.calls: list[dict] = []   # {"name", "arguments", "id"}
        self.ids: list = []

    def deltas(self, text: str, final: bool) -> list[dict]:
        self.text += text
        if self.reader is None:
            return self._content_deltas(text)
        parsed = self.reader.read(self.text, partial=not final)
        if parsed.error:   # llama-server's parser throws: the request fails
            raise APIError(parsed.error, 500)
        if final and not parsed.ok:   # out of format: the message is what was read (the raw text)
            self.reasoning, self.content = parsed.reasoning, parsed.content
            return []
        if not parsed.ok or not (parsed.content or parsed.tool_calls or parsed.reasoning):
            return []    # nothing read yet: nothing to send
        calls = [{**c, "id": _call_id(c, i, self.ids)} for i, c in enumerate(parsed.tool_calls)]
        out = []
        if parsed.reasoning != self.reasoning:
            d = _string_diff(self.reasoning, parsed.reasoning)
            out.append({"reasoning_content": d} if d else {})
        if parsed.content != self.content:
            d = _string_diff(self.content, parsed.content)
            out.append({"content": d} if d else {})
        if self.calls and len(calls) >= len(self.calls):
            i = len(self.calls) - 1
            old, new = self.calls[i], calls[i]
            args = _string_diff(old["arguments"], new["arguments"])
            renamed = old["id"] != new["id"] or old["name"] != new["name"]
            if args or renamed:
                out.append({"tool_calls": [_call_delta(i, new["id"] if renamed else "",
                                                       new["name"] if renamed else "", args)]})
        for i in range(len(self.calls), len(calls)):
            out.append({"tool_calls": [_call_delta(i, calls[i]["id"], calls[i]["name"], calls[i]["arguments"])]})
        self.reasoning, self.content, self.calls = parsed.reasoning, parsed.content, calls
        return out

    def _content_deltas(self, text: str) -> list[dict]:
        """Plain content: the token's text; a response_format answer: what its JSON grew by."""
        content = _response_format_content(self.text) if self.json_content else self.content + text
        if len(content) <= len(self.content):
            return []   # never an empty content delta
        d, self.content = content[len(self.content):], content
        return [{"content": d}]

    def message(self) -> dict:
        """The assistant message read so far, in the chat API's shape."""
        msg = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.calls:
            msg["tool_calls"] = [_oai_call(c, c["id"]) for c in self.calls]
        return msg


def _string_diff(last: str, current: str) -> str:
    """What `current` adds to `last` (nothing when it went back: a stop word was cut)."""
    return current[len(last):] if current.startswith(last) else ""


def _call_delta(index: int, call_id: str, name: str, arguments: str) -> dict:
    """A tool call's delta as llama-server writes it (server_chat_msg_diff_to_json_oaicompat)."""
    d: dict = {"index": index}
    if call_id:
        d.update(id=call_id, type="function")
    if name or arguments:
        d["function"] = {**({"name": name} if name else {}), **({"arguments": arguments} if arguments else {})}
    return d


@dataclass(frozen=True)
class Answer:
    """One finished choice: its task, final event and message."""
    task: Task
    final: FinalEvent
    message: dict


def run_to_end(run: ChatRun) -> list[Answer]:
    """Run a chat request and wait for every choice."""
    tasks = run.completion.submit()
    answers = []
    for t, f in zip(tasks, collect_finals(run.completion.ctx, tasks)):
        ms = run.message_stream()
        ms.deltas(f.content, final=True)
        answers.append(Answer(t, f, ms.message()))
    return answers


def run_streaming(run: ChatRun):
    """Run a chat request, streaming: (task, event, message stream, deltas) for every event of
    every choice, one choice after the other (engine.slots' events; deltas: what a TokenEvent,
    or the last reading at the FinalEvent, adds to the message). Call it while handling the
    request (task_events takes the disconnect probe then); close the iterator when done."""
    tasks = run.completion.submit()
    task_evs = task_events(run.completion.ctx, tasks)

    def events():
        streams: dict = {}
        with closing(task_evs):
            for t, ev in task_evs:
                ms = streams.setdefault(t.index, run.message_stream())
                if isinstance(ev, TokenEvent):
                    yield t, ev, ms, ms.deltas(ev.text, final=False)
                elif isinstance(ev, FinalEvent):
                    yield t, ev, ms, ms.deltas("", final=True)
                else:
                    yield t, ev, ms, []
    return tasks, events()


def finish_reason(c: Completion, fin: FinalEvent, message: dict) -> str:
    finish = c.finish_reason(fin)
    return "tool_calls" if message.get("tool_calls") and finish == "stop" else finish


def _chunk(c: Completion, index: int, delta: dict, finish_reason, logprobs=None) -> dict:
    choice = {"finish_reason": finish_reason, "index": index, "delta": delta}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"choices": [choice], "created": c.created, "id": c.id, "model": c.model_name,
            "system_fingerprint": c.ctx.build_fingerprint, "object": "chat.completion.chunk"}


def _handle() -> Response:
    run = start_chat(request_json())
    c = run.completion
    if c.stream:
        return _stream(run)
    answers = run_to_end(run)
    choices = []
    for a in answers:
        choice = {"finish_reason": finish_reason(c, a.final, a.message), "index": a.task.index,
                  "message": a.message}
        if c.n_probs > 0:
            choice["logprobs"] = {"content": c.probs_items(a.final.probs)}
        choices.append(choice)
    fins = [a.final for a in answers]
    out = {"choices": choices, "created": c.created, "model": c.model_name,
           "system_fingerprint": c.ctx.build_fingerprint, "object": "chat.completion",
           "usage": c.usage(fins) if len(fins) == 1 else _multi_usage(fins),
           "id": c.id, "timings": c.timings(fins[-1])}
    if run.verbose:
        out["__verbose"] = {"prompt": run.prompt}
    return json_response(out)


def _multi_usage(fins) -> dict:
    """n completions of one prompt: the prompt counts once, every completion's tokens count."""
    pt = fins[0].n_prompt
    ct = sum(f.n_decoded for f in fins)
    return {"completion_tokens": ct, "prompt_tokens": pt, "total_tokens": pt + ct,
            "prompt_tokens_details": {"cached_tokens": fins[0].n_cached}}


def _stream(run: ChatRun) -> Response:
    c = run.completion
    ctx = c.ctx
    tasks, choice_events = run_streaming(run)

    def events():
        fins, current = [], None
        with closing(choice_events):
            for t, ev, ms, deltas in choice_events:
                if t is not current:   # each choice opens with the assistant's role
                    current = t
                    # (which llama-server sends with its first token's update: a first token
                    # that ends inside a character sends none, and the role is never sent)
                    if not (isinstance(ev, TokenEvent) and ev.n_decoded > 1):
                        yield sse(_chunk(c, t.index, {"role": "assistant", "content": None}, None))
                if isinstance(ev, ErrorEvent):
                    yield sse(engine_error(ev).body())
                    return
                if isinstance(ev, ProgressEvent):
                    yield sse({"choices": [], "created": c.created, "id": c.id, "model": c.model_name,
                               "system_fingerprint": ctx.build_fingerprint,
                               "object": "chat.completion.chunk", "prompt_progress": ev.as_dict()})
                elif isinstance(ev, TokenEvent):
                    lp = {"content": c.probs_items([ev.probs])} if ev.probs else None
                    for k, delta in enumerate(deltas):   # the token's logprobs ride on its last delta
                        chunk = _chunk(c, t.index, delta, None, lp if k == len(deltas) - 1 else None)
                        if c.timings_per_token:
                            chunk["timings"] = token_timings(ev)
                        yield sse(chunk)
                else:   # the FinalEvent
                    fins.append(ev)
                    for delta in deltas:
                        yield sse(_chunk(c, t.index, delta, None))
                    chunk = _chunk(c, t.index, {}, finish_reason(c, ev, ms.message()))
                    chunk["timings"] = c.timings(ev)
                    if run.verbose:
                        chunk["__verbose"] = {"prompt": run.prompt}
                    yield sse(chunk)
        if len(fins) < len(tasks):   # the client hung up
            return
        if c.include_usage:
            usage = c.usage(fins) if len(fins) == 1 else _multi_usage(fins)
            yield sse({"choices": [], "created": c.created, "id": c.id, "model": c.model_name,
                       "system_fingerprint": ctx.build_fingerprint, "object": "chat.completion.chunk",
                       "usage": usage, "timings": c.timings(fins[-1])})
        yield "data: [DONE]\n\n"

    return Response(events(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def token_timings(ev: TokenEvent) -> dict:
    """The timings a streamed token carries with timings_per_token."""
    return {"predicted_n": ev.n_decoded, "prompt_n": ev.n_prompt,
            "prompt_per_second": 0.0, "predicted_per_second": 0.0}


@bp.post("/chat/completions")
@bp.post("/v1/chat/completions")
def chat_completions():
    return _handle()


@bp.post("/apply-template")
def apply_template():
    return json_response({"prompt": render_prompt(request_json(), for_answer=False).prompt})


def count_input_tokens(body: dict) -> int:
    """The tokens of a chat request's prompt, as the input_tokens routes count them."""
    prompt = render_prompt(body, for_answer=False).prompt
    ctx = current_app.config["NUMLLAMA"]
    check_tokenizable([prompt], ctx)
    return len(ctx.engine.tokenizer.encode(prompt, add_special=True))


@bp.post("/v1/chat/completions/control")
def control():
    """llama-server's control route: {"id": a running completion's id, "action": "reasoning_end"}
    closes that request's reasoning block now (the request must have asked for it with
    "reasoning_control": true). {"success": true}, or false with llama-server's reason."""
    body = request_json()
    completion_id, action = body.get("id"), body.get("action")
    if not isinstance(completion_id, str) or not completion_id:
        raise APIError("missing completion id")
    if action != "reasoning_end":
        raise APIError("unknown control action")
    scheduler = current_app.config["NUMLLAMA"].scheduler
    refused = scheduler.end_reasoning(completion_id) if scheduler is not None else "no active completion for this id"
    return json_response({"success": False, "message": refused} if refused else {"success": True})


@bp.post("/chat/completions/input_tokens")
@bp.post("/v1/chat/completions/input_tokens")
def input_tokens():
    # llama-server labels the OpenAI-style counts alike, chat's too
    return json_response({"input_tokens": count_input_tokens(request_json()), "object": "response.input_tokens"})
