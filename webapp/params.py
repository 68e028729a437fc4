"""Reading a /completion request: field types and limits, prompts, logit_bias, and the
`generation_settings` echoed back. Every malformed value is a 400 naming the field."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..engine.dry import breaker_sequences
from ..engine.grammar_triggers import (TRIGGER_PATTERN, TRIGGER_PATTERN_FULL, TRIGGER_TOKEN, TRIGGER_WORD, Trigger,
                                       TriggerError, compile_pattern, trigger_pattern)
from ..engine.sampling import RANDOM_SEED, SamplingParams, parse_samplers

from .errors import APIError

INT_MAX = 2147483647
INT64_MAX = 2 ** 63 - 1
# No sampling parameter means anything beyond this magnitude, and below it the f32 arithmetic of
# the samplers (penalties times counts, logit / temperature, logit_bias) stays finite.
FLOAT_FIELD_MAX = 1e6
N_PROBS_MAX = 100   # top tokens reported per generated token (a larger n_probs is capped, see /props)
MAX_TOKEN_ID_DIGITS = 10   # a logit_bias key with more digits is no token id of any vocabulary
MAX_BIAS_TEXT_CHARS = 1000  # a logit_bias text key is a word or a phrase, tokenized per request
MAX_PRESERVED_TOKENS = 256   # texts tokenized per request; a chat template has a handful
MAX_DRY_BREAKERS = 32   # each one is looked for in the whole vocabulary, per request
# fields whose value must lie within bounds (a 400 otherwise), as llama-server
HARD_LIMITS = {"n_predict": (-1, INT_MAX), "n_keep": (-1, INT_MAX), "n_indent": (0, INT_MAX),
               "n_discard": (0, INT_MAX), "repeat_last_n": (-1, INT_MAX),
               "dry_allowed_length": (0, INT_MAX), "dry_penalty_last_n": (0, INT_MAX),
               "min_keep": (0, INT_MAX), "t_max_predict_ms": (-1, INT_MAX),
               "n_probs": (0, INT_MAX), "id_slot": (-1, INT_MAX), "adaptive_decay": (0.0, 0.99)}
INT_FIELDS = ("n_predict", "top_k", "n_probs", "seed", "repeat_last_n", "min_keep", "n_keep",
              "id_slot", "t_max_predict_ms", "n_indent", "n_discard", "n_cmpl", "mirostat",
              "dry_allowed_length", "dry_penalty_last_n", "n_cache_reuse")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "dynatemp_range", "dynatemp_exponent", "xtc_probability",
                "xtc_threshold", "top_n_sigma", "dry_multiplier", "dry_base", "mirostat_tau",
                "mirostat_eta", "adaptive_target", "adaptive_decay")
BOOL_FIELDS = ("stream", "cache_prompt", "return_tokens", "ignore_eos", "post_sampling_probs",
               "return_progress", "timings_per_token", "backend_sampling")


def _typename(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def get_number(body: dict, key: str, default, kind=float):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(f"Field '{key}': type must be number, but is {_typename(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(f"Field '{key}': value must be finite")
    if kind is int and not -INT64_MAX <= v <= INT64_MAX:
        raise APIError(f"Field '{key}': Value must be between {-INT64_MAX} <= value <= {INT64_MAX}")
    if kind is not int and not -FLOAT_FIELD_MAX <= v <= FLOAT_FIELD_MAX:
        raise APIError(f"Field '{key}': Value must be between {-FLOAT_FIELD_MAX:g} <= value <= "
                       f"{FLOAT_FIELD_MAX:g}, but got {v:g}")
    v = int(v) if kind is int else float(v)
    if key in HARD_LIMITS:
        lo, hi = HARD_LIMITS[key]
        if not lo <= v <= hi:
            raise APIError(f"Field '{key}': Value must be between {lo} <= value <= {hi}, but got {v}")
    return v


def get_bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"Field '{key}': type must be boolean, but is {_typename(v)}")
    return v


@dataclass(frozen=True)
class ServerDefaults:
    """Per-request defaults set on the server's command line: every sampling field a request
    leaves out (--temp, --top-k, --samplers, ...), and n_predict."""
    sampling: SamplingParams = SamplingParams()
    n_predict: int = -1


def first_present(body: dict, *keys):
    for k in keys:
        if body.get(k) is not None:
            return k
    return None


def effective_n_predict(body: dict, server_n_predict: int) -> int:
    key = first_present(body, "n_predict", "max_tokens", "max_completion_tokens")
    req = get_number(body, key, -1, int) if key else -1
    if key and key != "n_predict" and req < -1:
        raise APIError(f"Field '{key}': Value must be between -1 <= value <= {INT_MAX}, but got {req}")
    # the request wins whenever it gives a value (llama-server build 0c1e570: its kv-unified test
    # asks for 80 tokens from a server started with --n-predict 64 and expects 80)
    return server_n_predict if req < 0 else req


def parse_logit_bias(value, tokenizer) -> list[tuple[int, float]]:
    """[[id|"text", bias|false], ...] or {"id"|"text": bias|false}; false bans the token.
    Text is tokenized without BOS and every token of it gets the bias; bad ids are dropped."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for e in value:
            if not isinstance(e, list) or len(e) != 2:
                raise APIError("logit_bias entries must be [token or string, bias] pairs")
            items.append((e[0], e[1]))
    else:
        raise APIError(f"Field 'logit_bias': type must be array or object, but is {_typename(value)}")
    out = []
    n_vocab = tokenizer.n_vocab
    for key, bias in items:
        if bias is False:
            b = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise APIError(f"logit_bias values must be numbers or false, got {_typename(bias)}")
        elif not -FLOAT_FIELD_MAX <= bias <= FLOAT_FIELD_MAX:
            raise APIError(f"logit_bias values must be between {-FLOAT_FIELD_MAX:g} and {FLOAT_FIELD_MAX:g} "
                           f"(or false)")
        else:
            b = float(bias)
        if isinstance(key, bool):
            raise APIError("logit_bias keys must be token ids or strings")
        if isinstance(key, int):
            ids = [key]
        elif isinstance(key, str):
            ids = token_id_key(key)
            if ids is None:
                if len(key) > MAX_BIAS_TEXT_CHARS:
                    raise APIError(f"logit_bias: a text key may hold at most {MAX_BIAS_TEXT_CHARS} characters")
                ids = tokenizer.encode(key, add_special=False, parse_special=False)
        else:
            raise APIError("logit_bias keys must be token ids or strings")
        out += [(i, b) for i in ids if 0 <= i < n_vocab]
    return out


_TOKEN_ID = re.compile(r"-?[0-9]+")


def token_id_key(key: str) -> list[int] | None:
    """A logit_bias key that is a token id written as text ("15043"): [id], or [] when the
    number is no id at all; None when the key is text to tokenize. (ASCII digits only:
    str.isdigit() also accepts "²", which int() refuses.)"""
    if not _TOKEN_ID.fullmatch(key):
        return None
    if len(key.lstrip("-")) > MAX_TOKEN_ID_DIGITS:
        return []
    return [int(key)]


def parse_stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise APIError("Field 'stop': must be a string or an array of strings")


def sampling_params(body: dict, defaults: ServerDefaults, tokenizer, ignore_eos: bool,
                    grammar_prefill: str = "", reasoning_tags: tuple = (), reasoning_budget: int = -1,
                    reasoning_forced: tuple = ()) -> SamplingParams:
    """The request's sampling fields. grammar_prefill and reasoning_* come from the chat
    route, never from a request body: the generation prompt its grammars read first, the
    reasoning tags' tokens that put a lazy one to sleep (chat_completions._answer_reader), and
    a reasoning block's budget with the tokens that close it (chat_completions._reasoning_budget)."""
    def num(key, default, kind=float):
        return get_number(body, key, default, kind)

    d = defaults.sampling
    seed = num("seed", d.seed, int)
    if seed < 0:
        seed = RANDOM_SEED
    samplers = d.samplers
    if body.get("samplers") is not None:
        s = body["samplers"]
        if not isinstance(s, (list, str)):
            raise APIError("Field 'samplers': must be an array of names or a string")
        samplers = parse_samplers(s)
    if "infill" in samplers:
        raise APIError("the infill sampler is not supported by numllama yet")
    grammar = parse_grammar(body)
    mirostat = min(2, max(0, num("mirostat", d.mirostat, int)))   # (llama-server clamps it)
    dry = parse_dry(body, d, samplers, mirostat, tokenizer)
    preserved = parse_preserved_tokens(body, tokenizer)
    bias = parse_logit_bias(body.get("logit_bias"), tokenizer)
    if ignore_eos:
        bias += [(t, -math.inf) for t in sorted(tokenizer.eog_ids)]
    triggers = parse_grammar_triggers(body, tokenizer, preserved) if grammar is not None else ()
    if grammar is not None and grammar_prefill and not triggers and not grammar.advance(grammar.start, grammar_prefill):
        # a grammar that refuses the generation prompt it is fed first: llama-server's sampler
        # init throws a bare std::exception there, and the request is refused as invalid
        raise APIError("Failed to initialize samplers: std::exception")
    return SamplingParams(
        temperature=max(0.0, num("temperature", d.temperature)),
        dynatemp_range=num("dynatemp_range", d.dynatemp_range),
        dynatemp_exponent=num("dynatemp_exponent", d.dynatemp_exponent),
        top_k=max(0, num("top_k", d.top_k, int)),
        top_p=min(1.0, max(0.0, num("top_p", d.top_p))),
        min_p=min(1.0, max(0.0, num("min_p", d.min_p))),
        typical_p=num("typical_p", d.typical_p),
        top_n_sigma=num("top_n_sigma", d.top_n_sigma),
        xtc_probability=min(1.0, max(0.0, num("xtc_probability", d.xtc_probability))),
        xtc_threshold=min(1.0, max(0.0, num("xtc_threshold", d.xtc_threshold))),
        repeat_last_n=num("repeat_last_n", d.repeat_last_n, int),
        repeat_penalty=num("repeat_penalty", d.repeat_penalty),
        presence_penalty=num("presence_penalty", d.presence_penalty),
        frequency_penalty=num("frequency_penalty", d.frequency_penalty),
        min_keep=num("min_keep", 0, int),
        **dry,
        mirostat=mirostat,
        mirostat_tau=num("mirostat_tau", d.mirostat_tau),
        mirostat_eta=num("mirostat_eta", d.mirostat_eta),
        adaptive_target=min(1.0, num("adaptive_target", d.adaptive_target)),
        adaptive_decay=num("adaptive_decay", d.adaptive_decay),
        seed=seed,
        logit_bias=tuple(bias),
        samplers=samplers,
        grammar=grammar,
        grammar_triggers=triggers,
        preserved_tokens=preserved,
        grammar_prefill=grammar_prefill,
        reasoning_tags=reasoning_tags,
        reasoning_budget=reasoning_budget,
        reasoning_forced=reasoning_forced,
        reasoning_control=get_bool(body, "reasoning_control", False),
    )


INT32_MAX = 2**31 - 1


def reasoning_budget_tokens(body: dict) -> int | None:
    """reasoning_budget_tokens, checked as llama-server's request schema checks it (None: not given)."""
    budget = get_number(body, "reasoning_budget_tokens", None, int)
    if budget is not None and not -1 <= budget <= INT32_MAX:
        raise APIError(f"Field 'reasoning_budget_tokens': Value must be between -1 <= value <= {INT32_MAX}, "
                       f"but got {budget}")
    return budget


def reasoning_budget_forced(message, end_tag: tuple, ids) -> tuple:
    """The tokens a spent reasoning budget forces, on every route: the message (none when it is
    empty or not a string), then the block's first end tag (end_tag: its tokens; ids: text to
    tokens)."""
    return (ids(message) if isinstance(message, str) and message else ()) + end_tag


def parse_reasoning_budget(body: dict, tokenizer) -> tuple[tuple, int, tuple]:
    """The completion routes' reasoning budget, given by the request itself (the chat route
    derives it from the template): reasoning_budget_tokens, reasoning_budget_start_tag,
    reasoning_budget_end_tags (or one reasoning_budget_end_tag) and reasoning_budget_message,
    as llama-server's request schema reads them. Returns (tags, budget, forced) for
    SamplingParams: forced is the message then the first end tag, only when a message field is
    given (without one a spent budget forces nothing, as in llama-server)."""
    budget = reasoning_budget_tokens(body)
    budget = -1 if budget is None else budget

    def text(key: str, value) -> str:
        if not isinstance(value, str):
            raise APIError(f"Field '{key}': [json.exception.type_error.302] type must be string, "
                           f"but is {_typename(value)}")
        return value

    def ids(t: str) -> tuple:
        return tuple(tokenizer.encode(t, add_special=False, parse_special=True))
    start = ids(text("reasoning_budget_start_tag", body["reasoning_budget_start_tag"])) \
        if body.get("reasoning_budget_start_tag") is not None else ()
    if body.get("reasoning_budget_end_tags") is not None:
        tags = body["reasoning_budget_end_tags"]
        tags = tags if isinstance(tags, list) else [tags]
        ends = tuple(ids(text("reasoning_budget_end_tags", t)) for t in tags if t != "")
    elif body.get("reasoning_budget_end_tag") is not None:
        tag = text("reasoning_budget_end_tag", body["reasoning_budget_end_tag"])
        ends = (ids(tag),) if tag else ()
    else:
        ends = ()
    forced = ()
    if ends and body.get("reasoning_budget_message") is not None:
        forced = reasoning_budget_forced(body["reasoning_budget_message"], ends[0], ids)
    return ((start, ends, ()) if start and ends else ()), budget, forced


def parse_preserved_tokens(body: dict, tokenizer) -> frozenset:
    """`preserved_tokens`: texts of control tokens to keep in the output (llama-server: each text
    that is one token, special tokens parsed)."""
    texts = body.get("preserved_tokens")
    if texts is None:
        return frozenset()
    if isinstance(texts, str):   # (nlohmann::json iterates a lone value as itself)
        texts = [texts]
    elif isinstance(texts, dict):
        texts = list(texts.values())
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise APIError("Field 'preserved_tokens': must be an array of strings")
    if len(texts) > MAX_PRESERVED_TOKENS:
        raise APIError(f"Field 'preserved_tokens': at most {MAX_PRESERVED_TOKENS} texts")
    out = set()
    for t in texts:
        if len(t.encode("utf-8")) > tokenizer.max_piece_bytes:
            continue   # longer than any token: it cannot be one
        ids = tokenizer.encode(t, add_special=False, parse_special=True)
        if len(ids) == 1:
            out.add(ids[0])
    return frozenset(out)


def parse_dry(body: dict, d: SamplingParams, samplers: tuple, mirostat: int, tokenizer) -> dict:
    """The DRY fields, and the breakers found in the vocabulary when DRY will run."""
    out = {"dry_multiplier": get_number(body, "dry_multiplier", d.dry_multiplier),
           "dry_base": get_number(body, "dry_base", d.dry_base),
           "dry_allowed_length": get_number(body, "dry_allowed_length", d.dry_allowed_length, int),
           "dry_penalty_last_n": get_number(body, "dry_penalty_last_n", d.dry_penalty_last_n, int),
           "dry_sequence_breakers": d.dry_sequence_breakers}
    if out["dry_base"] < 1.0:   # llama-server: "any values < 1.0 will be replaced with the default"
        out["dry_base"] = d.dry_base
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None:
        if not isinstance(breakers, list) or not all(isinstance(b, str) for b in breakers):
            raise APIError("Field 'dry_sequence_breakers': must be an array of strings")
        if not breakers:
            raise APIError("Error: dry_sequence_breakers must be a non-empty array of strings")
        if len(breakers) > MAX_DRY_BREAKERS:
            raise APIError(f"Field 'dry_sequence_breakers': at most {MAX_DRY_BREAKERS} breakers")
        out["dry_sequence_breakers"] = tuple(breakers)
    runs = (out["dry_multiplier"] != 0.0 and out["dry_penalty_last_n"] != 0 and mirostat == 0
            and "dry" in samplers)
    if runs:
        out["dry_breaker_tokens"] = breaker_sequences(tokenizer, out["dry_sequence_breakers"])
    return out


LLGUIDANCE_PREFIX = "%llguidance"   # a Lark grammar for llguidance, which numllama does not have
MAX_TRIGGERS = 32            # triggers of one lazy grammar; each is searched at every token
MAX_TRIGGER_PATTERN_CHARS = 1000


def parse_grammar_triggers(body: dict, tokenizer, preserved: frozenset) -> tuple:
    """`grammar_lazy` with `grammar_triggers` ([{"type": 0-3, "value": ..., "token": id}]): the
    grammar waits for one of them (llama-server's tool-call grammars; also open to /completion).
    As llama-server reads them: a word that is a single token becomes a TOKEN trigger, and must
    then be one of `preserved_tokens`."""
    lazy = body.get("grammar_lazy", False)
    if not isinstance(lazy, bool):
        raise APIError("Field 'grammar_lazy': must be a boolean")
    if not lazy:
        return ()
    triggers = body.get("grammar_triggers")
    if not isinstance(triggers, list) or not triggers:
        raise APIError("Error: no triggers set for lazy grammar!")
    if len(triggers) > MAX_TRIGGERS:
        raise APIError(f"Field 'grammar_triggers': at most {MAX_TRIGGERS} triggers")
    out = []
    for t in triggers:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or isinstance(t.get("type"), bool) \
                or t.get("type") not in (TRIGGER_TOKEN, TRIGGER_WORD, TRIGGER_PATTERN, TRIGGER_PATTERN_FULL):
            raise APIError("Field 'grammar_triggers': each trigger is {\"type\": 0 (token), 1 (word), 2 (pattern) "
                           "or 3 (full pattern), \"value\": \"...\"} (a token trigger also has \"token\": id)")
        kind, value = t["type"], t["value"]
        if len(value) > MAX_TRIGGER_PATTERN_CHARS:
            raise APIError(f"Field 'grammar_triggers': a trigger holds at most {MAX_TRIGGER_PATTERN_CHARS} characters")
        if kind == TRIGGER_TOKEN:
            token = t.get("token")
            if isinstance(token, bool) or not isinstance(token, int):
                raise APIError("Field 'grammar_triggers': a token trigger needs \"token\": a token id")
            out.append(Trigger(kind, value, token))
        elif kind == TRIGGER_WORD:
            ids = tokenizer.encode(value, add_special=False, parse_special=True) \
                if len(value.encode("utf-8")) <= tokenizer.max_piece_bytes else []
            if len(ids) == 1:
                if ids[0] not in preserved:
                    raise APIError(f"Field 'grammar_triggers': Grammar trigger word should be marked as "
                                   f"preserved token: {value}")
                out.append(Trigger(TRIGGER_TOKEN, value, ids[0]))
            else:
                out.append(Trigger(kind, value))
        else:
            try:
                compile_pattern(trigger_pattern(Trigger(kind, value)))
            except TriggerError as e:
                raise APIError(f"Failed to initialize samplers: {e}") from None
            out.append(Trigger(kind, value))
    return tuple(out)


def response_format_schema(rf):
    """The JSON schema OpenAI's `response_format` asks for, as llama-server reads it (None: plain
    text)."""
    kind = rf.get("type", "") if isinstance(rf, dict) else None
    if kind not in ("", "text", "json_object", "json_schema"):
        raise APIError(f'response_format type must be one of "text" or "json_object", but got: {kind}')
    if kind == "json_object":
        return rf.get("schema", {})
    if kind == "json_schema":
        wrapper = rf.get("json_schema")
        return (wrapper if isinstance(wrapper, dict) else {}).get("schema", {})
    return None


def schema_grammar(schema, convert=None) -> str:
    """A schema's grammar text (json_schema.json_schema_to_grammar, or `convert`); an empty
    schema means any object, and a schema that cannot be converted is the request's error."""
    from ..engine.grammar import GrammarError
    from ..engine.json_schema import json_schema_to_grammar
    if isinstance(schema, dict) and not schema:
        schema = {"type": "object"}
    try:
        return (convert or json_schema_to_grammar)(schema)
    except GrammarError as e:
        raise APIError(f'"json_schema": {e}')


def parse_grammar(body: dict):
    """`grammar` (GBNF), `json_schema`, or OpenAI's `response_format` -> a Grammar (or None), as
    llama-server chooses: a grammar wins over a schema."""
    from ..engine.grammar import Grammar, GrammarError
    text = None
    try:
        if body.get("grammar") is not None:
            if not isinstance(body["grammar"], str):
                raise APIError("Field 'grammar': must be a string (GBNF)")
            text = body["grammar"] or None
        elif body.get("json_schema") is not None:
            text = schema_grammar(body["json_schema"])
        elif body.get("response_format") is not None:
            schema = response_format_schema(body["response_format"])
            text = schema_grammar(schema) if schema is not None else None
        if text and text.startswith(LLGUIDANCE_PREFIX):   # as a llama-server built without LLAMA_LLGUIDANCE
            raise APIError("Failed to initialize samplers: failed to parse grammar: llguidance is not enabled")
        return Grammar(text) if text else None
    except GrammarError as e:
        raise APIError(str(e))


def tokenize_prompt_element(el, tokenizer, max_tokens: int | None = None, on_too_long=None) -> list[int]:
    """One prompt: a string, a list of token ids, a mixed list, or {"prompt_string": ...}.
    When the text's lower bound of tokens (Tokenizer.min_tokens) exceeds max_tokens, it is not
    tokenized: on_too_long(that bound) is called, and must raise."""
    n_vocab = tokenizer.n_vocab
    if max_tokens is not None:
        texts = [el] if isinstance(el, str) else [el.get("prompt_string")] if isinstance(el, dict) else \
            el if isinstance(el, list) else []
        at_least = sum(tokenizer.min_tokens(t) if isinstance(t, str) else 1 for t in texts)
        if at_least > max_tokens:
            on_too_long(at_least)
    if isinstance(el, str):
        return tokenizer.encode(el, add_special=True, parse_special=True)
    if isinstance(el, dict):
        if el.get("multimodal_data"):
            raise APIError("Multimodal data provided, but model does not support multimodal requests.")
        ps = el.get("prompt_string")
        if not isinstance(ps, str):
            raise APIError("\"prompt_string\" must be a string")
        return tokenizer.encode(ps, add_special=True, parse_special=True)
    if isinstance(el, list):
        out: list[int] = []
        for i, part in enumerate(el):
            if isinstance(part, bool):
                raise APIError("Prompt contains invalid tokens")
            if isinstance(part, int):
                if not 0 <= part < n_vocab:
                    raise APIError("Prompt contains invalid tokens")
                out.append(part)
            elif isinstance(part, str):
                out += tokenizer.encode(part, add_special=(i == 0), parse_special=True)
            else:
                raise APIError("\"prompt\" elements must be a string, a list of tokens, a JSON object "
                               "containing a prompt string, or a list of mixed strings & tokens.")
        return out
    raise APIError("\"prompt\" elements must be a string, a list of tokens, a JSON object containing "
                   "a prompt string, or a list of mixed strings & tokens.")


def check_task_count(n: int, limit: int | None, what: str = "prompts") -> None:
    """A request may bring as many tasks as the scheduler holds at once (its slots and its queue:
    Scheduler.capacity, None for no limit), no more: a 400 before anything is tokenized."""
    if limit is not None and n > limit:
        raise APIError(f"too many {what} in one request: {n} (this server takes at most {limit}: "
                       f"its slots and its queue)")


def parse_prompts(prompt, tokenizer, max_tokens: int | None = None, on_too_long=None,
                  max_prompts: int | None = None) -> tuple[list[list[int]], bool]:
    """(token lists, is_batch): a top-level list without bare ids is several prompts."""
    if isinstance(prompt, list):
        if not prompt:
            raise APIError("\"prompt\" must not be empty")
        if not any(isinstance(e, int) and not isinstance(e, bool) for e in prompt):
            check_task_count(len(prompt), max_prompts)
            return [tokenize_prompt_element(e, tokenizer, max_tokens, on_too_long) for e in prompt], True
    return [tokenize_prompt_element(prompt, tokenizer, max_tokens, on_too_long)], False


def generation_settings(p: SamplingParams, n_predict: int, stop, stream: bool, n_probs: int,
                        ignore_eos: bool, post_sampling_probs: bool, backend_sampling: bool,
                        full: bool = True, speculative: str = "none", lora: list = ()) -> dict:
    """What llama-server echoes as `generation_settings` (full) or `params` (short).
    speculative: the server's speculative decoding ("draft-simple" with a draft model); lora: the
    request's "lora" field as llama-server echoes it."""
    def f32(x):
        import numpy as np
        return float(np.float32(x))
    d = {
        "seed": p.seed, "temperature": f32(p.temperature), "dynatemp_range": f32(p.dynatemp_range),
        "dynatemp_exponent": f32(p.dynatemp_exponent), "top_k": p.top_k, "top_p": f32(p.top_p),
        "min_p": f32(p.min_p), "top_n_sigma": f32(p.top_n_sigma),
        "xtc_probability": f32(p.xtc_probability), "xtc_threshold": f32(p.xtc_threshold),
        "typical_p": f32(p.typical_p), "repeat_last_n": p.repeat_last_n,
        "repeat_penalty": f32(p.repeat_penalty), "presence_penalty": f32(p.presence_penalty),
        "frequency_penalty": f32(p.frequency_penalty), "dry_multiplier": f32(p.dry_multiplier),
        "dry_base": f32(p.dry_base), "dry_allowed_length": p.dry_allowed_length,
        "dry_penalty_last_n": p.dry_penalty_last_n,
    }
    if full:
        d["dry_sequence_breakers"] = list(p.dry_sequence_breakers)
    d.update({"mirostat": p.mirostat, "mirostat_tau": f32(p.mirostat_tau), "mirostat_eta": f32(p.mirostat_eta),
              "adaptive_target": f32(p.adaptive_target), "adaptive_decay": f32(p.adaptive_decay)})
    if full:
        d["stop"] = list(stop)
    d.update({"max_tokens": n_predict, "n_predict": n_predict, "n_keep": 0, "n_discard": 0,
              "ignore_eos": ignore_eos, "stream": stream})
    if full:
        d["logit_bias"] = [{"bias": None if math.isinf(b) else b, "token": t} for t, b in p.logit_bias]
    d.update({"n_probs": n_probs, "min_keep": p.min_keep})
    if full:
        d.update({"grammar": p.grammar.text if p.grammar is not None else "",
                  "grammar_lazy": bool(p.grammar_triggers),
                  "grammar_triggers": [{"type": t.type, "value": t.value, **({"token": t.token} if t.type == TRIGGER_TOKEN
                                                                              else {})} for t in p.grammar_triggers],
                  "preserved_tokens": sorted(p.preserved_tokens)})
    d.update({"chat_format": "Content-only", "reasoning_format": "deepseek",
              "reasoning_in_content": False, "generation_prompt": "",
              "samplers": list(p.samplers), "speculative.types": speculative,
              "timings_per_token": False, "post_sampling_probs": post_sampling_probs,
              "backend_sampling": backend_sampling, "lora": list(lora)})
    return d
