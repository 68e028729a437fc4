"""Malformed input never yields a 5xx and never stops the server: random JSON values in
every field of every POST route, streamed or not (bounded: a few hundred requests, fixed seed).
A streamed answer is read to its end: an error event inside it must not be a 5xx either."""
import json
import random

import requests


FIELDS = ["prompt", "n_predict", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "logit_bias",
          "n_probs", "stream", "cache_prompt", "id_slot", "samplers", "grammar", "json_schema",
          "response_format", "messages", "max_tokens", "n", "n_cmpl", "tokens", "content", "add_special",
          "with_pieces", "response_fields", "ignore_eos", "post_sampling_probs", "t_max_predict_ms",
          "n_keep", "repeat_penalty", "logprobs", "top_logprobs", "continue_final_message", "chat_template_kwargs",
          "system", "input", "instructions", "max_output_tokens", "stop_sequences", "tools", "tool_choice",
          "thinking", "reasoning", "reasoning_effort"]
# 501: a feature the server was not started with (llama-server's answer); 503: busy, try again
DELIBERATE = (501, 503)
ROUTES = ["/completion", "/completions", "/v1/completions", "/v1/chat/completions", "/chat/completions",
          "/tokenize", "/detokenize", "/apply-template", "/chat/completions/input_tokens",
          "/v1/chat/completions/input_tokens", "/props", "/slots/0?action=save", "/slots/0?action=restore",
          "/slots/0?action=erase", "/slots/9?action=erase", "/tools", "/cors-proxy",
          "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/responses/input_tokens"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["int", "bigint", "float", "str", "bool", "null", "list", "dict"] if depth < 2 else
                      ["int", "float", "str", "bool", "null"])
    if kind == "int":
        return rng.choice([-1, 0, 1, 2, 5, 7, -5, 99999])
    if kind == "bigint":
        return rng.choice([2 ** 31, -(2 ** 63), 10 ** 30])
    if kind == "float":
        return rng.choice([0.5, -0.1, 1e308, 3.5, -1e4, 1e-300])
    if kind == "str":
        return rng.choice(["", "Once", "<s>", "\u00e9\u65e5\ud83c\udf89", "[[[", "root ::= x", '{"a":', "\ud800",
                           "root ::= root", "root ::= [a-z]{0,5000}", "9" * 50, "../x"])
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(FIELDS + ["role", "type", "text"]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def test_random_bodies_never_5xx(server):
    rng = random.Random(1234)
    failures = []
    for i in range(400):
        route = rng.choice(ROUTES)
        body = {k: random_value(rng) for k in rng.sample(FIELDS, rng.randint(1, 6))}
        if rng.random() < 0.5:  # a valid base, so the odd fields reach deeper code
            base = {"prompt": "Once upon", "messages": [{"role": "user", "content": "Hi"}],
                    "content": "Hi", "tokens": [1, 2, 3], "input": "Hi"}
            body = {**base, **{k: v for k, v in body.items() if k not in base}}
        body.setdefault("n_predict", 2)
        body["max_tokens"] = 2 if not isinstance(body.get("max_tokens"), int) else body["max_tokens"]
        try:
            r = requests.post(server.url + route, data=json.dumps(body, allow_nan=True), timeout=60,
                              headers={"Content-Type": "application/json"}, stream=True)
            if r.status_code == 200 and r.headers.get("Content-Type", "").startswith("text/event-stream"):
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data: {"):
                        code = json.loads(line[6:]).get("error", {}).get("code", 200)
                        if code >= 500 and code not in DELIBERATE:
                            failures.append((route, body, "stream", line[:200]))
                continue
        except requests.RequestException as e:
            failures.append((route, body, repr(e)))
            continue
        if r.status_code >= 500 and r.status_code not in DELIBERATE:
            failures.append((route, body, r.status_code, r.text[:200]))
        elif r.status_code >= 400:
            err = r.json()["error"]
            assert err["code"] == r.status_code and isinstance(err["message"], str)
    assert not failures, failures[:5]
    assert server.get("/health").status_code == 200
    assert server.post("/completion", {"prompt": "Once", "n_predict": 2}).status_code == 200
