"""Chat templates: a list of messages -> the prompt text the model was trained on.

The template comes from the GGUF (`tokenizer.chat_template`, a Jinja template as in Hugging
Face's tokenizer_config.json), from a built-in name (`--chat-template chatml`), or from a
template given as text. It is rendered with jinja2 in an immutable sandbox: a template is data
from a model file and must not reach the host. Like llama.cpp's Jinja, a template may append to
a list and pop from it (Kimi K2's do), up to MAX_TEMPLATE_LIST items (a loop that appends to the
list it walks ends there); it gets its own copies of the messages, tools and arguments, so
nothing it changes outlives the render. Without any template, ChatML is used, as
llama.cpp does.

Like llama.cpp (common/chat.cpp, common/jinja/caps.cpp), numllama first learns what a template
can do by rendering probe conversations (`TemplateCaps`), then adapts each request's messages
to it before rendering: a system message goes into the first user message of a template
without a system role, tool-call arguments become objects for templates that read them as
objects, tool-call messages get "" content where the template would choke on null. The date
(`date_string`, `datetime`) and `enable_thinking` are given to every render, and a BOS (EOS)
token the template writes at the start (end) is removed when the tokenizer adds it anyway.

The date is today's, as llama-server's; with $NUMLLAMA_NOW (an ISO date or date and time) it is
that one, so that a prompt renders the same on any day (the tests replay answers llama-server
gave on the day they were recorded).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime

from jinja2 import Undefined
from jinja2.ext import Extension
from jinja2.exceptions import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
           " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\\n' }}{% endif %}")

BUILTIN_TEMPLATES = {
    "chatml": _CHATML,
    "llama3": ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
               " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "llama2": ("{% set ns = namespace(sys='') %}{% for message in messages %}"
               "{% if message['role'] == 'system' %}{% set ns.sys = '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' %}"
               "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.sys + message['content'] + ' [/INST]' }}"
               "{% set ns.sys = '' %}{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"),
    "command-r": ("{% for message in messages %}{% set role = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>',"
                  " 'assistant': '<|CHATBOT_TOKEN|>'}[message['role']] %}{{ '<|START_OF_TURN_TOKEN|>' + role"
                  " + message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"),
    "gemma": ("{% set ns = namespace(sys='') %}{% for message in messages %}{% if message['role'] == 'system' %}"
              "{% set ns.sys = message['content'] + '\\n\\n' %}{% else %}{% set role = 'model' if message['role'] == "
              "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + ns.sys + message['content'] | trim"
              " + '<end_of_turn>\\n' }}{% set ns.sys = '' %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<start_of_turn>model\\n' }}{% endif %}"),
    "phi3": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
    "zephyr": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
}


# StepFun 3.5 Flash's template, known by this sentence: llama.cpp trims the whitespace around
# every message's text before rendering it (leftover whitespace drives the model into
# reasoning loops, llama.cpp issue #24181)
TRIMMED_MESSAGES_MARK = "You have access to the following functions in JSONSchema format"
_ISSPACE = " \t\n\v\f\r"


def _trimmed(message):
    """workaround::trim_all_content: content, reasoning_content and text parts, trimmed."""
    if not isinstance(message, dict):
        return message
    out = dict(message)
    for key in ("content", "reasoning_content"):
        if isinstance(out.get(key), str):
            out[key] = out[key].strip(_ISSPACE)
    if isinstance(out.get("content"), list):
        out["content"] = [{**p, "text": p["text"].strip(_ISSPACE)} if isinstance(p, dict) and p.get("type") == "text"
                          and isinstance(p.get("text"), str) else p for p in out["content"]]
    return out


class ChatTemplateError(ValueError):
    """The template failed to render (its own raise_exception, or a template bug)."""


def _raise(message):
    raise ChatTemplateError(message)


class _GenerationBlock(Extension):
    """{% generation %}...{% endgeneration %}: Hugging Face's mark of the assistant's tokens (for
    training masks); llama.cpp's Jinja renders what it holds, as is."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _LlamaUndefined(Undefined):
    """An undefined variable as llama.cpp's Jinja treats it: concatenated with a string with
    `+`, it is the empty string (templates such as firefunction-v2 rely on it; Jinja2 would
    fail). Everything else behaves as Jinja2's own Undefined."""

    def __add__(self, other):
        return other if isinstance(other, str) else super().__add__(other)

    def __radd__(self, other):
        return other if isinstance(other, str) else super().__radd__(other)


NOW_VARIABLE = "NUMLLAMA_NOW"


def template_now() -> datetime:
    """What a render takes as the current time: now, or $NUMLLAMA_NOW (see the module's doc)."""
    fixed = os.environ.get(NOW_VARIABLE)
    return datetime.fromisoformat(fixed) if fixed else datetime.now()


def _strftime_now(fmt):
    return template_now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """The `tojson` of llama.cpp's Jinja (and of Hugging Face's chat templating): keys in their
    order, no HTML escaping, ", " and ": " between items unless indented. (jinja2's own sorts
    the keys and escapes <, >, & and ' for HTML, which would change the prompt.)"""
    if separators is None:
        separators = (", " if indent is None else ",", ": ")
    return json.dumps(value, ensure_ascii=bool(ensure_ascii), indent=indent, separators=tuple(separators),
                      sort_keys=bool(sort_keys))


# jinja2's filters that give a generator, where llama.cpp's Jinja gives an array (which `tojson`
# writes and `{{ }}` prints: llama-cpp-deepseek-r1.jinja writes `tools | map(...) | tojson`)
LISTING_FILTERS = ("map", "select", "reject", "selectattr", "rejectattr")


def _as_list(jinja_filter):
    @functools.wraps(jinja_filter)   # (keeps jinja2's pass_context mark)
    def listed(*args, **kwargs):
        return list(jinja_filter(*args, **kwargs))
    return listed


MAX_TEMPLATE_LIST = 100_000   # items a template may append to one list (jinja2's own MAX_RANGE)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, but for a list's append (bounded) and pop, which llama.cpp's
    Jinja has (the only list methods llama.cpp's vendored templates call)."""
    LIST_METHODS = ("append", "pop")

    def is_safe_attribute(self, obj, attr, value) -> bool:
        if isinstance(obj, list) and attr in self.LIST_METHODS:
            return super(ImmutableSandboxedEnvironment, self).is_safe_attribute(obj, attr, value)
        return super().is_safe_attribute(obj, attr, value)

    def getattr(self, obj, attribute):
        value = super().getattr(obj, attribute)
        if isinstance(obj, list) and attribute == "append":
            def append(item):
                if len(obj) >= MAX_TEMPLATE_LIST:
                    raise SecurityError(f"a template's list may hold at most {MAX_TEMPLATE_LIST} items")
                obj.append(item)
            return append
        return value


def _probe_tools(name: str) -> list[dict]:
    return [{"name": "tool", "type": "function", "function": {
        "name": name, "description": "Tool description",
        "parameters": {"type": "object", "properties": {"arg": {"type": "string", "description": "Arg description"}},
                       "required": ["arg"]}}}]


def _probe_conversation(arguments, with_calls: bool = True, name: str = "tool1") -> list[dict]:
    """llama.cpp's tool-call probe: a call, its result, an answer and a new question. (Without
    the call, or with another function's name: templates that raise on a tool result with no
    call before it still show whether they print the call.)"""
    call = {"role": "assistant", "content": ""}
    if with_calls:
        call["tool_calls"] = [{"id": "call00001", "type": "function",
                               "function": {"name": name, "arguments": arguments}}]
    return [{"role": "user", "content": "User message"}, call,
            {"role": "tool", "content": "Tool response", "tool_call_id": "call00001"},
            {"role": "assistant", "content": "The tool response was 'tool response'"},
            {"role": "user", "content": "User message"}]


CONTENT_MARKER = "STRING_MARKER"
EFFORT_LEVELS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
REASONING_MARKER = "<REASONING_CONTENT_PLACEHOLDER>"


def preserve_reasoning_variables(enabled: bool) -> dict:
    """What llama.cpp sets for preserve_reasoning: the names templates use to keep or drop
    earlier turns' reasoning (caps_apply_preserve_reasoning)."""
    return {"preserve_thinking": enabled, "clear_thinking": not enabled,
            "truncate_history_thinking": not enabled, "drop_thinking": not enabled}


def reasoning_effort_variables(level: str) -> dict:
    """llama.cpp's caps_apply_reasoning_effort: both names templates use for it."""
    return {"reasoning_effort": level, "reasoning_strength": level}


@dataclass(frozen=True)
class TemplateCaps:
    """What a template does with what it is given, found by rendering probes (llama.cpp's
    caps_get): a probe's marker that does not reach the output was not used."""
    supports_system_role: bool = True
    supports_tools: bool = True
    supports_tool_calls: bool = True
    supports_object_arguments: bool = False
    supports_parallel_tool_calls: bool = False
    supports_string_content: bool = True    # a message's content may be a string
    supports_typed_content: bool = False    # ... or a list of typed parts it reads
    supports_preserve_reasoning: bool = False   # earlier turns' reasoning_content is rendered
    supports_reasoning_effort: bool = False     # reasoning_effort changes the prompt

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 add_bos: bool = False, add_eos: bool = False):
        """source: a built-in name, a Jinja template, or None for ChatML. add_bos/add_eos: the
        tokenizer adds these tokens itself, so the template's own are removed."""
        self.source = BUILTIN_TEMPLATES.get(source, source) if source else _CHATML
        self.name = source if source in BUILTIN_TEMPLATES else ("chatml" if not source else "jinja")
        from .mistral_tool_calls import detect
        self._mistral = detect(self.source) is not None
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, undefined=_LlamaUndefined,
                                            extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        for name in LISTING_FILTERS:
            env.filters[name] = _as_list(env.filters[name])
        # llama.cpp's Jinja marks nothing safe: `"a"|safe + text` is plain concatenation (jinja2's
        # Markup would HTML-escape the text, as Functionary v3.1's tool list showed)
        env.filters["safe"] = str
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"invalid chat template: {e}") from e
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.caps = self._probe()

    def _try(self, messages: list[dict], tools: list | None = None, extra: dict | None = None,
             add_generation_prompt: bool = False) -> str | None:
        variables = {**(extra or {}), "messages": messages, "add_generation_prompt": add_generation_prompt,
                     "bos_token": self.bos_token, "eos_token": self.eos_token}
        if tools:
            variables["tools"] = tools
        try:
            return self._template.render(copy.deepcopy(variables))
        except Exception:   # a template that raises on a probe tells what it does not take
            return None

    def _probe(self) -> TemplateCaps:
        """llama.cpp asks whether the render used a value; here, whether changing the value
        changes the output (a template that fails on a probe does not take what it probes)."""
        def differs(a, b) -> bool:
            return a is not None and b is not None and a != b

        def system(text):
            return self._try([{"role": "system", "content": text}, {"role": "user", "content": "User message"}])

        caps = {"supports_system_role": differs(system("System message"), system("System text"))}
        obj = self._try(_probe_conversation({"arg": "value"}), _probe_tools("tool1"))
        if obj is not None:
            caps["supports_tools"] = differs(obj, self._try(_probe_conversation({"arg": "value"}), _probe_tools("tool2")))
            caps["supports_object_arguments"] = differs(obj, self._try(_probe_conversation({"arg": "other"}),
                                                                       _probe_tools("tool1")))
            caps["supports_tool_calls"] = (differs(obj, self._try(_probe_conversation(None, False), _probe_tools("tool1")))
                                           or differs(obj, self._try(_probe_conversation({"arg": "value"}, name="tool2"),
                                                                     _probe_tools("tool1"))))
        if not caps.get("supports_object_arguments"):
            text = self._try(_probe_conversation('{"arg": "value"}'), _probe_tools("tool1"))
            if text is None:
                caps.update(supports_tools=False, supports_tool_calls=False)
            else:
                caps["supports_tools"] = differs(text, self._try(_probe_conversation('{"arg": "value"}'),
                                                                 _probe_tools("tool2")))
                caps["supports_tool_calls"] = differs(text, self._try(_probe_conversation(None, False),
                                                                      _probe_tools("tool1")))
        if caps.get("supports_tool_calls", True):
            caps["supports_parallel_tool_calls"] = self._second_call_used(caps.get("supports_object_arguments", False))
        caps.update(self._content_caps())
        caps.update(self._reasoning_caps())
        return TemplateCaps(**caps)

    def _content_caps(self) -> dict:
        """String and typed content: is a string read, are parts read (the marker reaches the
        output from inside a part, not as the printed list)?"""
        text = self._try([{"role": "user", "content": CONTENT_MARKER}])
        parts = self._try([{"role": "user", "content": [{"type": "text", "text": CONTENT_MARKER}]}])
        typed = parts is not None and CONTENT_MARKER in parts and "'text'" not in parts and '"text"' not in parts
        return {"supports_typed_content": typed,
                "supports_string_content": text is not None and (CONTENT_MARKER in text or not typed)}

    def _reasoning_caps(self) -> dict:
        """llama.cpp's reasoning probes: does an earlier turn's reasoning reach the prompt (with
        thinking on and the preserve variables set), does reasoning_effort change it?"""
        conv = [{"role": "user", "content": "User message"},
                {"role": "assistant", "content": "Assistant message", "reasoning_content": REASONING_MARKER},
                {"role": "user", "content": "User message"},
                {"role": "assistant", "content": "Assistant message", "reasoning_content": "Reasoning content"},
                {"role": "user", "content": "User message"}]
        kept = self._try(conv, extra={"enable_thinking": True, **preserve_reasoning_variables(True)},
                         add_generation_prompt=True)
        user = [{"role": "user", "content": "User message"}]

        # templates test for particular levels ("max", "none", "low"...): the effort is read if
        # some level renders otherwise than no effort given
        plain = self._try(user, extra={"enable_thinking": True}, add_generation_prompt=True)
        efforts = [self._try(user, extra={"enable_thinking": True, **reasoning_effort_variables(level)},
                             add_generation_prompt=True) for level in EFFORT_LEVELS]
        return {"supports_preserve_reasoning": kept is not None and REASONING_MARKER in kept,
                "supports_reasoning_effort": any(e is not None and e != plain for e in efforts)}

    def _second_call_used(self, object_arguments: bool) -> bool:
        """llama.cpp's parallel-call probe: a turn with two calls; does the second reach the
        output? (Templates made for one call at a time raise or ignore it.)"""
        def two_calls(second: str):
            args = {"arg": "value"} if object_arguments else '{"arg": "value"}'
            conv = _probe_conversation(args)
            conv[1]["tool_calls"].append({"id": "call00002", "type": "function",
                                          "function": {"name": second, "arguments": args}})
            return self._try(conv, _probe_tools("tool1"))
        a, b = two_calls("tool1"), two_calls("tool2")
        return a is not None and b is not None and a != b

    def adapt(self, messages: list[dict]) -> list[dict]:
        """The messages as llama.cpp hands them to this template (its `workaround`s)."""
        messages = copy.deepcopy(messages)
        if not self.caps.supports_system_role and messages and messages[0].get("role") == "system":
            system = messages.pop(0)
            if messages:
                messages[0]["content"] = system.get("content", "") + "\n" + messages[0].get("content", "")
        for m in messages:
            if "tool_calls" not in m:
                continue
            if self.caps.supports_tool_calls and m.get("content") is None:
                m["content"] = ""
            if self.caps.supports_object_arguments:
                for call in m["tool_calls"] or []:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        try:
                            fn["arguments"] = json.loads(fn["arguments"])
                        except ValueError as e:
                            raise ChatTemplateError(f"Failed to parse tool call arguments as JSON: {e}") from e
        return messages

    def render(self, messages: list[dict], add_generation_prompt: bool = True, extra: dict | None = None,
               tools: list | None = None) -> str:
        """extra: more template variables (a request's chat_template_kwargs); they cannot
        replace the four this method sets. tools: the request's tools, if any."""
        if TRIMMED_MESSAGES_MARK in self.source:
            messages = [_trimmed(m) for m in messages]
        if self._mistral:   # llama.cpp's parser for Ministral 3 renders reasoning as content blocks
            from .mistral_tool_calls import adjust_messages
            messages = adjust_messages(messages)
        now = template_now()
        variables = {"date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y"),
                     "enable_thinking": True, **(extra or {}),
                     "messages": self.adapt(messages), "add_generation_prompt": add_generation_prompt,
                     "bos_token": self.bos_token, "eos_token": self.eos_token}
        if tools:
            variables["tools"] = tools
        try:   # (the messages are adapt()'s copies already)
            text = self._template.render({k: v if k == "messages" else copy.deepcopy(v) for k, v in variables.items()})
        except ChatTemplateError:
            raise
        except Exception as e:  # template code is data: any failure is the request's problem
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        if self.add_eos and self.eos_token and text.endswith(self.eos_token):
            text = text[:-len(self.eos_token)]
        return text
