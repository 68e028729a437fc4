"""Chat templates: a list of messages -> the prompt text the model was trained on.

The template comes from the GGUF (`tokenizer.chat_template`, a Jinja template as in Hugging
Face's tokenizer_config.json), from a built-in name (`--chat-template chatml`), or from a
template given as text. It is rendered with jinja2 in an immutable sandbox: a template is data
from a model file and must not reach the host. Without any template, ChatML is used, as
llama.cpp does.
"""
from __future__ import annotations

from datetime import datetime

from jinja2.exceptions import TemplateError
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


class ChatTemplateError(ValueError):
    """The template failed to render (its own raise_exception, or a template bug)."""


def _raise(message):
    raise ChatTemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        """source: a built-in name, a Jinja template, or None for ChatML."""
        self.source = BUILTIN_TEMPLATES.get(source, source) if source else _CHATML
        self.name = source if source in BUILTIN_TEMPLATES else ("chatml" if not source else "jinja")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"invalid chat template: {e}") from e
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True, extra: dict | None = None) -> str:
        """extra: more template variables (a request's chat_template_kwargs); they cannot
        replace the four this method sets."""
        variables = {**(extra or {}), "messages": messages, "add_generation_prompt": add_generation_prompt,
                     "bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            return self._template.render(variables)
        except ChatTemplateError:
            raise
        except Exception as e:  # template code is data: any failure is the request's problem
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
