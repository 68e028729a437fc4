"""llama.cpp's legacy chat formats: what llama-server renders a chat with under `--no-jinja`.

Without Jinja, llama.cpp does not run a template at all. It looks for a few markers in the
template's text (`llm_chat_detect_template` in src/llama-chat.cpp), or takes a built-in name
given as `--chat-template NAME`, and writes the conversation with a hand-written formatter
for that family (`llm_chat_apply_template`): roles and contents only, no tools, no template
variables. A template it does not recognise cannot be used (llama-server refuses it at start
when given with `--chat-template`, and fails each chat request otherwise).

`detect` and `format_chat` follow those two functions branch for branch, in their order: the
first marker that matches decides, so a template that carries another family's marker is
formatted as that family, exactly as llama-server formats it. trim() is C's isspace trim.
"""
from __future__ import annotations

# llama.cpp's built-in names (LLM_CHAT_TEMPLATES), which `--chat-template` also takes; "dots1"
# has no name there and is only detected
NAMES = (
    "chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "mistral-v1", "mistral-v3",
    "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "phi4", "falcon3", "zephyr", "monarch",
    "gemma", "orion", "openchat", "vicuna", "vicuna-orca", "deepseek", "deepseek2", "deepseek3", "deepseek-ocr",
    "command-r", "llama3", "chatglm3", "chatglm4", "glmedge", "minicpm", "exaone3", "exaone4", "exaone-moe",
    "rwkv-world", "granite", "granite-4.0", "granite-4.1", "gigachat", "megrez", "yandex", "bailing",
    "bailing-think", "bailing2", "llama4", "smolvlm", "hunyuan-moe", "gpt-oss", "hunyuan-dense", "hunyuan-vl",
    "kimi-k2", "seed_oss", "grok-2", "pangu-embedded", "solar-open",
)

NOT_SUPPORTED = "this custom template is not supported, try using --jinja"   # (each chat request, a 500)


def trim(s: str) -> str:
    """llama-chat.cpp's trim: C's isspace (space, \\t, \\n, \\v, \\f, \\r) off both ends."""
    return s.strip(" \t\n\v\f\r")


def detect(source: str) -> str | None:
    """The format llama.cpp would use for a template's text or built-in name (None: none)."""
    if source in NAMES:
        return source
    has = source.__contains__
    if has("<|im_start|>"):
        return "phi4" if has("<|im_sep|>") else "smolvlm" if has("<end_of_utterance>") else "chatml"
    if source.startswith("mistral") or has("[INST]"):
        if has("[SYSTEM_PROMPT]"):
            return "mistral-v7"
        if has("' [INST] ' + system_message") or has("[AVAILABLE_TOOLS]"):   # official v1, v3, v3-tekken
            return "mistral-v1" if has(" [INST]") else "mistral-v3-tekken" if has('"[INST]"') else "mistral-v3"
        if has("content.strip()"):
            return "llama2-sys-strip"
        if has("bos_token + '[INST]"):
            return "llama2-sys-bos"
        return "llama2-sys" if has("<<SYS>>") else "llama2"
    if has("<|assistant|>") and has("<|end|>"):
        return "phi3"
    if has("[gMASK]<sop>"):
        return "chatglm4"
    if has("<|assistant|>") and has("<|user|>"):
        if has("<|tool_declare|>"):
            return "exaone-moe"
        return "falcon3" if has("</s>") else "glmedge"
    if has("<|{{ item['role'] }}|>") and has("<|begin_of_image|>"):
        return "glmedge"
    if has("<|user|>") and has("<|endoftext|>"):
        return "zephyr"
    if has("bos_token + message['role']"):
        return "monarch"
    if has("<start_of_turn>"):
        return "gemma"
    if has("'\\n\\nAssistant: ' + eos_token"):
        return "orion"
    if has("GPT4 Correct "):
        return "openchat"
    if has("USER: ") and has("ASSISTANT: "):
        return "vicuna-orca" if has("SYSTEM: ") else "vicuna"
    if has("### Instruction:") and has("<|EOT|>"):
        return "deepseek"
    if has("<|START_OF_TURN_TOKEN|>") and has("<|USER_TOKEN|>"):
        return "command-r"
    if has("<|start_header_id|>") and has("<|end_header_id|>"):
        return "llama3"
    if has("[gMASK]sop"):
        return "chatglm3"
    if has("<用户>"):
        return "minicpm"
    if has("'Assistant: ' + message['content'] + eos_token"):
        return "deepseek2"
    if has("<｜Assistant｜>") and has("<｜User｜>") and has("<｜end▁of▁sentence｜>"):
        return "deepseek3"
    if has("[|system|]") and has("[|assistant|]") and has("[|endofturn|]"):
        return "exaone4" if has("[|tool|]") else "exaone3"
    if has("rwkv-world") or has("{{- 'User: ' + message['content']|trim + '\\n\\n' -}}"):
        return "rwkv-world"
    if has("<|start_of_role|>"):
        if has("<tool_call>") or has("<tools>"):
            return "granite-4.0" if has("g4_default_system_message") else "granite-4.1"
        return "granite"
    if has("message['role'] + additional_special_tokens[0] + message['content'] + additional_special_tokens[1]"):
        return "gigachat"
    if has("<|role_start|>"):
        return "megrez"
    if has(" Ассистент:"):
        return "yandex"
    if has("<role>ASSISTANT</role>") and has("'HUMAN'"):
        return "bailing"
    if has("<role>ASSISTANT</role>") and has('"HUMAN"') and has("<think>"):
        return "bailing-think"
    if has("<role>ASSISTANT</role>") and has("<role>HUMAN</role>") and has("<|role_end|>"):
        return "bailing2"
    if has("<|header_start|>") and has("<|header_end|>"):
        return "llama4"
    if has("<|endofuserprompt|>"):
        return "dots1"
    if has("<|extra_0|>") and has("<|extra_4|>"):
        return "hunyuan-moe"
    if has("<|start|>") and has("<|channel|>"):
        return "gpt-oss"
    if has("<｜hy_Assistant｜>") and has("<｜hy_begin▁of▁sentence｜>"):
        return "hunyuan-vl"
    if has("<｜hy_Assistant｜>") and has("<｜hy_place▁holder▁no▁3｜>"):
        return "hunyuan-dense"
    if has("<|im_assistant|>assistant<|im_middle|>"):
        return "kimi-k2"
    if has("<seed:bos>"):
        return "seed_oss"
    if has("'Assistant: '  + message['content'] + '<|separator|>"):
        return "grok-2"
    if has("[unused9]系统：[unused10]"):
        return "pangu-embedded"
    if has("<|begin|>") and has("<|end|>") and has("<|content|>"):
        return "solar-open"
    return None


def conversation(messages: list[dict]) -> list[tuple[str, str]]:
    """OpenAI-style messages (checked already) as the legacy path sees them: (role, content),
    text parts joined by a newline after each non-empty text so far (common_chat_templates_apply_legacy);
    tool calls and other fields are not written."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = ""
            for part in content:
                text += ("\n" if text else "") + part["text"]
            content = text
        out.append((m["role"], content or ""))
    return out


def format_chat(fmt: str, messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    """The conversation ((role, content), ...) in a detected format, as llm_chat_apply_template
    writes it; add_generation_prompt: open the assistant's turn (where the format has one)."""
    out: list[str] = []
    w = out.append
    add = add_generation_prompt
    if fmt == "chatml":
        for role, content in messages:
            w(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        if add:
            w("<|im_start|>assistant\n")
    elif fmt in ("mistral-v7", "mistral-v7-tekken"):
        space = " " if fmt == "mistral-v7" else ""
        for role, content in messages:
            if role == "system":
                w(f"[SYSTEM_PROMPT]{space}{content}[/SYSTEM_PROMPT]")
            elif role == "user":
                w(f"[INST]{space}{content}[/INST]")
            else:
                w(f"{space}{content}</s>")
    elif fmt in ("mistral-v1", "mistral-v3", "mistral-v3-tekken"):
        lead = " " if fmt == "mistral-v1" else ""
        trail = "" if fmt == "mistral-v3-tekken" else " "
        inside = False
        for role, content in messages:
            if not inside:
                w(f"{lead}[INST]{trail}")
                inside = True
            if role == "system":
                w(content + "\n\n")
            elif role == "user":
                w(f"{content}{lead}[/INST]")
            else:
                w(f"{trail}{trim(content) if fmt == 'mistral-v3' else content}</s>")
                inside = False
    elif fmt in ("llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip"):
        inside = True   # (no BOS at the start)
        w("[INST] ")
        for role, content in messages:
            content = trim(content) if fmt == "llama2-sys-strip" else content
            if not inside:
                inside = True
                w("<s>[INST] " if fmt == "llama2-sys-bos" else "[INST] ")
            if role == "system":
                w(f"<<SYS>>\n{content}\n<</SYS>>\n\n" if fmt != "llama2" else content + "\n")
            elif role == "user":
                w(content + " [/INST]")
            else:
                w(content + "</s>")
                inside = False
    elif fmt == "phi3":
        for role, content in messages:
            w(f"<|{role}|>\n{content}<|end|>\n")
        if add:
            w("<|assistant|>\n")
    elif fmt == "phi4":
        for role, content in messages:
            w(f"<|im_start|>{role}<|im_sep|>{content}<|im_end|>")
        if add:
            w("<|im_start|>assistant<|im_sep|>")
    elif fmt == "falcon3":
        for role, content in messages:
            w(f"<|{role}|>\n{content}\n")
        if add:
            w("<|assistant|>\n")
    elif fmt == "zephyr":
        for role, content in messages:
            w(f"<|{role}|>\n{content}<|endoftext|>\n")
        if add:
            w("<|assistant|>\n")
    elif fmt == "monarch":
        for i, (role, content) in enumerate(messages):
            w(f"{'' if i == 0 else '<s>'}{role}\n{content}</s>\n")
        if add:
            w("<s>assistant\n")
    elif fmt == "gemma":
        system = ""
        for role, content in messages:
            if role == "system":   # gemma has none: merged into the next user turn
                system += trim(content)
                continue
            role = "model" if role == "assistant" else role
            w(f"<start_of_turn>{role}\n")
            if system and role != "model":
                w(system + "\n\n")
                system = ""
            w(trim(content) + "<end_of_turn>\n")
        if add:
            w("<start_of_turn>model\n")
    elif fmt == "orion":
        system = ""
        for role, content in messages:
            if role == "system":
                system += content
            elif role == "user":
                w("Human: ")
                if system:
                    w(system + "\n\n")
                    system = ""
                w(content + "\n\nAssistant: </s>")
            else:
                w(content + "</s>")
    elif fmt == "openchat":
        for role, content in messages:
            if role == "system":
                w(content + "<|end_of_turn|>")
            else:
                w(f"GPT4 Correct {_ascii_upper(role[:1])}{role[1:]}: {content}<|end_of_turn|>")
        if add:
            w("GPT4 Correct Assistant:")
    elif fmt in ("vicuna", "vicuna-orca"):
        for role, content in messages:
            if role == "system":
                w(f"SYSTEM: {content}\n" if fmt == "vicuna-orca" else content + "\n\n")
            elif role == "user":
                w(f"USER: {content}\n")
            elif role == "assistant":
                w(f"ASSISTANT: {content}</s>\n")
        if add:
            w("ASSISTANT:")
    elif fmt == "deepseek":
        for role, content in messages:
            if role == "system":
                w(content)
            elif role == "user":
                w(f"### Instruction:\n{content}\n")
            elif role == "assistant":
                w(f"### Response:\n{content}\n<|EOT|>\n")
        if add:
            w("### Response:\n")
    elif fmt == "command-r":
        tokens = {"system": "<|SYSTEM_TOKEN|>", "user": "<|USER_TOKEN|>", "assistant": "<|CHATBOT_TOKEN|>"}
        for role, content in messages:
            if role in tokens:
                w(f"<|START_OF_TURN_TOKEN|>{tokens[role]}{trim(content)}<|END_OF_TURN_TOKEN|>")
        if add:
            w("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
    elif fmt == "llama3":
        for role, content in messages:
            w(f"<|start_header_id|>{role}<|end_header_id|>\n\n{trim(content)}<|eot_id|>")
        if add:
            w("<|start_header_id|>assistant<|end_header_id|>\n\n")
    elif fmt == "chatglm3":
        w("[gMASK]sop")
        for role, content in messages:
            w(f"<|{role}|>\n {content}")
        if add:
            w("<|assistant|>")
    elif fmt in ("chatglm4", "glmedge"):
        if fmt == "chatglm4":
            w("[gMASK]<sop>")
        for role, content in messages:
            w(f"<|{role}|>\n{content}")
        if add:
            w("<|assistant|>\n" if fmt == "chatglm4" else "<|assistant|>")
    elif fmt == "minicpm":
        for role, content in messages:
            w(f"<用户>{trim(content)}<AI>" if role == "user" else trim(content))
    elif fmt == "deepseek2":
        for role, content in messages:
            if role == "system":
                w(content + "\n\n")
            elif role == "user":
                w(f"User: {content}\n\n")
            elif role == "assistant":
                w(f"Assistant: {content}<｜end▁of▁sentence｜>")
        if add:
            w("Assistant:")
    elif fmt == "deepseek3":
        for role, content in messages:
            if role == "system":
                w(content + "\n\n")
            elif role == "user":
                w("<｜User｜>" + content)
            elif role == "assistant":
                w(f"<｜Assistant｜>{content}<｜end▁of▁sentence｜>")
        if add:
            w("<｜Assistant｜>")
    elif fmt == "deepseek-ocr":
        for _, content in messages:
            w(content)
    elif fmt in ("exaone3", "exaone4"):
        for role, content in messages:
            if role == "system":
                w(f"[|system|]{trim(content)}[|endofturn|]\n")
            elif role == "user":
                w(f"[|user|]{trim(content)}\n")
            elif role == "assistant":
                w(f"[|assistant|]{trim(content)}[|endofturn|]\n")
            elif role == "tool" and fmt == "exaone4":
                w(f"[|tool|]{trim(content)}[|endofturn|]\n")
        if add:
            w("[|assistant|]")
    elif fmt == "exaone-moe":
        for role, content in messages:
            if role in ("system", "user", "assistant", "tool"):
                w(f"<|{role}|>\n{trim(content)}<|endofturn|>\n")
        if add:
            w("<|assistant|>\n")
    elif fmt == "rwkv-world":   # (the model's end of turn is "\n\n")
        for i, (role, content) in enumerate(messages):
            if role == "system":
                w(f"System: {trim(content)}\n\n")
            elif role == "user":
                w(f"User: {trim(content)}\n\n")
                if i == len(messages) - 1:
                    w("Assistant:")
            elif role == "assistant":
                w(f"Assistant: {trim(content)}\n\n")
    elif fmt == "granite":
        for role, content in messages:
            w(f"<|start_of_role|>{role}<|end_of_role|>")
            if role == "assistant_tool_call":
                w("<|tool_call|>")
            w(content + "<|end_of_text|>\n")
        if add:
            w("<|start_of_role|>assistant<|end_of_role|>")
    elif fmt in ("granite-4.0", "granite-4.1"):
        for role, content in messages:
            w("<|start_of_role|>assistant<|end_of_role|><|tool_call|>" if role == "assistant_tool_call"
              else f"<|start_of_role|>{role}<|end_of_role|>")
            w(content + "<|end_of_text|>\n")
        if add:
            w("<|start_of_role|>assistant<|end_of_role|>")
    elif fmt == "gigachat":
        has_system = bool(messages) and messages[0][0] == "system"
        w(f"<s>{messages[0][1]}<|message_sep|>" if has_system else "<s>")
        for role, content in messages[1 if has_system else 0:]:
            if role == "user":
                w(f"user<|role_sep|>{content}<|message_sep|>available functions<|role_sep|>[]<|message_sep|>")
            elif role == "assistant":
                w(f"assistant<|role_sep|>{content}<|message_sep|>")
        if add:
            w("assistant<|role_sep|>")
    elif fmt == "megrez":
        for role, content in messages:
            w(f"<|role_start|>{role}<|role_end|>{content}<|turn_end|>")
        if add:
            w("<|role_start|>assistant<|role_end|>")
    elif fmt == "yandex":   # (the model's end of turn is "\n\n")
        for role, content in messages:
            if role == "user":
                w(f" Пользователь: {content}\n\n")
            elif role == "assistant":
                w(f" Ассистент: {content}\n\n")
        if add:
            w(" Ассистент:[SEP]")
    elif fmt in ("bailing", "bailing-think", "bailing2"):
        if fmt == "bailing2" and not (messages and messages[0][0] == "system"):
            w("<role>SYSTEM</role>detailed thinking off<|role_end|>")
        for role, content in messages:
            role = "HUMAN" if role == "user" else _ascii_upper(role)
            w(f"<role>{role}</role>{content}{'<|role_end|>' if fmt == 'bailing2' else ''}")
        if add:
            w("<role>ASSISTANT</role>" + ("<think>" if fmt == "bailing-think" else ""))
    elif fmt == "llama4":
        for role, content in messages:
            w(f"<|header_start|>{role}<|header_end|>\n\n{trim(content)}<|eot|>")
        if add:
            w("<|header_start|>assistant<|header_end|>\n\n")
    elif fmt == "smolvlm":
        w("<|im_start|>")   # (its BOS; the turns are not ChatML)
        for role, content in messages:
            if role == "system":
                w(content + "\n\n")
            elif role == "user":
                w(f"User: {content}<end_of_utterance>\n")
            else:
                w(f"Assistant: {content}<end_of_utterance>\n")
        if add:
            w("Assistant:")
    elif fmt == "dots1":
        for role, content in messages:
            if role == "system":
                w(f"<|system|>{content}<|endofsystem|>")
            elif role == "user":
                w(f"<|userprompt|>{content}<|endofuserprompt|>")
            else:
                w(f"<|response|>{content}<|endofresponse|>")
        if add:
            w("<|response|>")
    elif fmt == "hunyuan-moe":
        for role, content in messages:
            if role == "system":
                w(f"<|startoftext|>{content}<|extra_4|>")
            elif role == "assistant":
                w(content + "<|eos|>")
            else:
                w(f"<|startoftext|>{content}<|extra_0|>")
    elif fmt == "gpt-oss":
        for role, content in messages:
            w(f"<|start|>{role}<|message|>{content}{'<|return|>' if role == 'assistant' else '<|end|>'}")
        if add:
            w("<|start|>assistant")
    elif fmt == "hunyuan-dense":
        for i, (role, content) in enumerate(messages):
            if i == 0 and role == "system":
                w(content + "<｜hy_place▁holder▁no▁3｜>")
            if role == "assistant":
                w(f"<｜hy_Assistant｜>{content}<｜hy_place▁holder▁no▁2｜>")
            elif role == "user":
                w(f"<｜hy_User｜>{content}<｜hy_Assistant｜>")
    elif fmt == "hunyuan-vl":
        w("<｜hy_begin▁of▁sentence｜>")
        for i, (role, content) in enumerate(messages):
            if i == 0 and role == "system":
                w(content + "<｜hy_place▁holder▁no▁3｜>")
            elif role == "user":
                w(content + "<｜hy_User｜>")
            elif role == "assistant":
                w(content + "<｜hy_Assistant｜>")
    elif fmt == "kimi-k2":
        heads = {"system": "<|im_system|>system", "user": "<|im_user|>user", "assistant": "<|im_assistant|>assistant",
                 "tool": "<|im_system|>tool"}
        for role, content in messages:
            if role in heads:
                w(heads[role] + "<|im_middle|>")
            w(content + "<|im_end|>")
        if add:
            w("<|im_assistant|>assistant<|im_middle|>")
    elif fmt == "seed_oss":
        for role, content in messages:
            w(f"<seed:bos>{role}\n{trim(content) if role == 'assistant' else content}<seed:eos>")
        if add:
            w("<seed:bos>assistant\n")
    elif fmt == "grok-2":
        for role, content in messages:
            if role == "system":
                w(f"System: {trim(content)}<|separator|>\n\n")
            elif role == "user":
                w(f"Human: {trim(content)}<|separator|>\n\n")
            elif role == "assistant":
                w(f"Assistant: {content}<|separator|>\n\n")
        if add:
            w("Assistant:")
    elif fmt == "pangu-embedded":
        names = {"system": "系统", "user": "用户", "assistant": "助手", "tool": "工具", "function": "方法"}
        for i, (role, content) in enumerate(messages):
            if i == 0 and role != "system":
                w("[unused9]系统：[unused10]")
            if role in names:
                w(f"[unused9]{names[role]}：{content}[unused10]")
        if add:
            w("[unused9]助手：")
    elif fmt == "solar-open":
        for role, content in messages:
            w(f"<|begin|>{role}<|content|>{content}<|end|>")
        if add:
            w("<|begin|>assistant")
    else:
        raise ValueError(f"unknown legacy chat format {fmt!r}")
    return "".join(out)


def _ascii_upper(s: str) -> str:
    """C's toupper over each byte: ASCII letters only."""
    return "".join(c.upper() if "a" <= c <= "z" else c for c in s)
