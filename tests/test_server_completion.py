"""The /completion family over real HTTP: every behaviour of llama.cpp's test_completion.py."""
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from server_util import TINYLLAMA2, Server


def match(pattern, text):
    return re.search(pattern, text, re.I | re.M | re.S) is not None


def _args(**changes):
    args = list(TINYLLAMA2)
    for flag, value in changes.items():
        flag = "--" + flag.replace("_", "-")
        i = args.index(flag)
        args[i + 1] = str(value)
    return args


@pytest.fixture(scope="module")
def greedy_server(stories_path):
    s = Server(_args(temp=0.0, batch_size=16), model=stories_path)
    yield s
    s.stop()


MEANING = "I believe the meaning of life is"
JOKE = "Write a joke about AI from a very long prompt which will not be truncated"


@pytest.mark.parametrize("prompt,n_predict,regex,n_prompt,n_pred,return_tokens", [
    (MEANING, 8, "(going|bed)+", 18, 8, False),
    (JOKE, 64, "(princesses|everyone|kids|Anna|forest)+", 46, 64, True),
])
def test_completion(server, prompt, n_predict, regex, n_prompt, n_pred, return_tokens):
    r = server.post("/completion", {"prompt": prompt, "n_predict": n_predict, "return_tokens": return_tokens})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.headers["Server"] == "llama.cpp"
    b = r.json()
    # the server is shared between tests, so part of the prompt may come from the slot's cache
    assert b["timings"]["prompt_n"] + b["timings"]["cache_n"] == n_prompt == b["tokens_evaluated"]
    assert b["timings"]["predicted_n"] == n_pred
    assert b["truncated"] is False and isinstance(b["has_new_line"], bool)
    assert match(regex, b["content"])
    if return_tokens:
        assert b["tokens"] and all(isinstance(t, int) for t in b["tokens"])
    else:
        assert b["tokens"] == []


def test_sampled_text_is_llama_cpp_text(server):
    """Seed 42 at temperature 0.8: real llama-server answered " going to bed. I"."""
    b = server.post("/completion", {"prompt": MEANING, "n_predict": 8, "cache_prompt": False}).json()
    assert b["content"] == " going to bed. I"


@pytest.mark.parametrize("prompt,n_predict,regex,n_prompt", [
    (MEANING, 8, "(going|bed)+", 18),
    (JOKE, 64, "(princesses|everyone|kids|Anna|forest)+", 46),
])
def test_completion_stream(server, prompt, n_predict, regex, n_prompt):
    content, finals = "", []
    for data in server.stream("/completion", {"prompt": prompt, "n_predict": n_predict, "stream": True}):
        assert isinstance(data["stop"], bool)
        if data["stop"]:
            finals.append(data)
        else:
            assert data["tokens"] and all(isinstance(t, int) for t in data["tokens"])
            assert data["id_slot"] == -1
            content += data["content"]
    assert len(finals) == 1
    f = finals[0]
    assert f["timings"]["prompt_n"] + f["timings"]["cache_n"] == n_prompt
    assert f["timings"]["predicted_n"] == n_predict and f["truncated"] is False
    assert f["stop_type"] == "limit" and isinstance(f["has_new_line"], bool)
    gs = f["generation_settings"]
    assert gs["n_predict"] == min(n_predict, 64) and gs["seed"] == 42
    assert "adaptive_target" in gs and "adaptive_decay" in gs
    assert f["content"] == "" and f["tokens"] == []
    assert match(regex, content)


def test_stream_equals_non_stream(server):
    data = {"prompt": "Once upon a time", "n_predict": 16}
    streamed = "".join(d["content"] for d in server.stream("/completion", {**data, "stream": True}))
    assert streamed == server.post("/completion", data).json()["content"]


def test_openai_library(server):
    client = OpenAI(api_key="dummy", base_url=server.url + "/v1")
    res = client.completions.create(model="davinci-002", prompt=MEANING, max_tokens=8)
    assert res.system_fingerprint and res.system_fingerprint.startswith("b")
    assert res.choices[0].finish_reason == "length"
    assert match("(going|bed)+", res.choices[0].text)
    assert res.usage.prompt_tokens == 18 and res.usage.completion_tokens == 8


def test_openai_library_stream(server):
    client = OpenAI(api_key="dummy", base_url=server.url + "/v1")
    text = ""
    finish = None
    for chunk in client.completions.create(model="davinci-002", prompt=MEANING, max_tokens=8, stream=True):
        c = chunk.choices[0]
        if c.finish_reason is None:
            assert c.text is not None
            text += c.text
        else:
            finish = c.finish_reason
    assert finish == "length" and match("(going|bed)+", text)


def test_same_seed_same_result(server):
    last = None
    for _ in range(4):
        b = server.post("/completion", {"prompt": MEANING, "seed": 42, "temperature": 0.0,
                                        "cache_prompt": False, "n_predict": 16}).json()
        assert last is None or b["content"] == last
        last = b["content"]


def test_different_seed_different_result(server):
    last = None
    for seed in range(4):
        b = server.post("/completion", {"prompt": MEANING, "seed": seed, "temperature": 1.0,
                                        "cache_prompt": False, "n_predict": 16}).json()
        assert last is None or b["content"] != last
        last = b["content"]


def test_consistent_with_batch_size_16(greedy_server, server):
    contents = {greedy_server.post("/completion", {"prompt": MEANING, "n_predict": 24}).json()["content"]
                for _ in range(3)}
    assert len(contents) == 1
    other = server.post("/completion", {"prompt": MEANING, "n_predict": 24, "temperature": 0.0}).json()
    assert other["content"] in contents  # batch size 32 vs 16: same greedy text


def test_prompt_longer_than_context(server):
    r = server.post("/completion", {"prompt": MEANING * 32, "cache_prompt": False})
    assert r.status_code == 400
    e = r.json()["error"]
    assert e["type"] == "exceed_context_size_error" and e["code"] == 400
    assert e["n_prompt_tokens"] == 545 and e["n_ctx"] == 256
    assert "exceeds the available context size" in e["message"]


def test_json_prompt(server):
    r = server.post("/completion", {"prompt": {"prompt_string": MEANING}, "n_predict": 4})
    assert r.status_code == 200
    r = server.post("/completion", {"prompt": {"prompt_string": MEANING + " <__media__>",
                                               "multimodal_data": ["iVBORw0KGgo="]}})
    assert r.status_code == 400 and "multimodal" in r.json()["error"]["message"].lower()


def test_tokens_input(greedy_server):
    s = greedy_server
    toks = s.post("/tokenize", {"content": MEANING, "add_special": True}).json()["tokens"]
    assert toks[0] == 1
    one = s.post("/completion", {"prompt": toks, "n_predict": 8}).json()
    assert isinstance(one["content"], str)
    two = s.post("/completion", {"prompt": [toks, toks], "n_predict": 8}).json()
    assert isinstance(two, list) and len(two) == 2 and two[0]["content"] == two[1]["content"] == one["content"]
    assert [b["index"] for b in two] == [0, 1]
    mixed = s.post("/completion", {"prompt": [toks, MEANING], "n_predict": 8}).json()
    assert len(mixed) == 2 and mixed[0]["content"] == mixed[1]["content"]
    obj = s.post("/completion", {"prompt": [toks, {"prompt_string": MEANING}], "n_predict": 8}).json()
    assert len(obj) == 2 and obj[0]["content"] == obj[1]["content"]
    seq = s.post("/completion", {"prompt": [1, 2, 3, 4, 5, 6, MEANING, 7, 8, 9, 10, MEANING], "n_predict": 8})
    assert seq.status_code == 200 and isinstance(seq.json()["content"], str)


PROMPTS = ["I believe the meaning of life is", "Write a joke about AI", "Once upon a time",
           "The sky is blue", "Lily and Tom went", "The capital of France is"]


@pytest.mark.parametrize("n_slots,n_requests", [(1, 3), (2, 4), (4, 6)])
def test_parallel_slots(stories_path, n_slots, n_requests):
    s = Server(_args(parallel=n_slots, temp=0.0).__add__(["--slots"]), model=stories_path)
    try:
        seen_busy = []

        def watch():
            for _ in range(200):
                slots = s.get("/slots").json()
                seen_busy.append(sum(x["is_processing"] for x in slots))
                time.sleep(0.005)
        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(n_requests) as ex:
            futs = [ex.submit(s.post, "/completion", {"prompt": PROMPTS[i % 6], "seed": 42,
                                                      "temperature": 1.0, "n_predict": 48})
                    for i in range(n_requests)]
            results = [f.result() for f in futs]
        watcher.join()
        for r in results:
            assert r.status_code == 200 and isinstance(r.json()["content"], str)
            assert len(r.json()["content"]) > 10
        assert max(seen_busy) <= n_slots
    finally:
        s.stop()


@pytest.mark.parametrize("n_predict", [[80, 40, 80, 80], [90, 90, 40, 75]])
def test_kv_unified(stories_path, n_predict):
    s = Server(_args(ctx_size=256, parallel=4) + ["--kv-unified"], model=stories_path)
    try:
        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(s.post, "/completion", {"prompt": "A", "n_predict": n}) for n in n_predict]
            for n, f in zip(n_predict, futs):
                r = f.result()
                assert r.status_code == 200, r.text
                assert r.json()["timings"]["predicted_n"] == n
    finally:
        s.stop()


def test_response_fields(server):
    b = server.post("/completion", {"prompt": MEANING, "n_predict": 8, "response_fields": []}).json()
    assert "generation_settings" in b and b["content"]
    b = server.post("/completion", {"prompt": MEANING, "n_predict": 32,
                                    "response_fields": ["content", "generation_settings/n_predict", "prompt"]}).json()
    assert set(b) == {"content", "generation_settings/n_predict", "prompt"}
    assert b["generation_settings/n_predict"] == 32
    assert b["prompt"] == "<s> " + MEANING
    assert isinstance(b["content"], str) and b["content"]


def _check_prob_item(tok, key="logprob", top="top_logprobs", n=10):
    assert tok["id"] > 0 and isinstance(tok["token"], str) and isinstance(tok["bytes"], list)
    if key == "logprob":
        assert tok[key] <= 0
        assert len(tok[top]) == n
    for t in tok[top]:
        assert t["id"] > 0 and isinstance(t["token"], str) and isinstance(t["bytes"], list)
        if key == "logprob":
            assert t[key] <= 0
        else:
            assert 0 < t[key] <= 1


def test_n_probs(server):
    b = server.post("/completion", {"prompt": MEANING, "n_probs": 10, "temperature": 0.0, "n_predict": 5}).json()
    assert len(b["completion_probabilities"]) == 5
    for tok in b["completion_probabilities"]:
        _check_prob_item(tok)
        # greedy: the chosen token is the most likely one
        assert tok["id"] == tok["top_logprobs"][0]["id"]


def test_n_probs_stream(server):
    n = 0
    for d in server.stream("/completion", {"prompt": MEANING, "n_probs": 10, "temperature": 0.0,
                                           "n_predict": 5, "stream": True}):
        if not d["stop"]:
            assert len(d["completion_probabilities"]) == 1
            _check_prob_item(d["completion_probabilities"][0])
            n += 1
    assert n == 5


def test_n_probs_post_sampling(server):
    b = server.post("/completion", {"prompt": "Today was the day. Today I would finally become a",
                                    "n_probs": 10, "temperature": 1.0, "n_predict": 5,
                                    "post_sampling_probs": True}).json()
    probs = b["completion_probabilities"]
    assert len(probs) == 5
    assert len(probs[0]["top_probs"]) == 10
    for tok in probs:
        assert 0 < tok["prob"] <= 1
        _check_prob_item(tok, "prob", "top_probs")
        if len(tok["top_probs"]) < 10:
            assert sum(t["prob"] for t in tok["top_probs"]) == pytest.approx(1.0, rel=1e-6)


def test_post_sampling_at_zero_temperature_is_certain(server):
    b = server.post("/completion", {"prompt": MEANING, "n_probs": 10, "temperature": 0.0,
                                    "n_predict": 2, "post_sampling_probs": True}).json()
    for tok in b["completion_probabilities"]:
        assert [t["prob"] for t in tok["top_probs"]] == [1.0]


WORDS = ["i", "I", "the", "The", "to", "a", "an", "and", "was", "were", "is", "he", "she", "it",
         "they", "It", "He", "She", "They", "you", "his", "her", "of", "in", "on", "with", "big", "day",
         "so", "that", "had", "what", "What", "what's"]


@pytest.mark.parametrize("style", ["list-strings", "dict-strings", "list-ids", "dict-ids"])
def test_logit_bias(greedy_server, style):
    s = greedy_server
    ids = s.post("/tokenize", {"content": " " + " ".join(WORDS) + " "}).json()["tokens"]
    if style == "list-strings":
        bias = [[" " + w + " ", -100] for w in WORDS]
    elif style == "dict-strings":
        bias = {" " + w + " ": -100 for w in WORDS}
    elif style == "list-ids":
        bias = [[t, -100] for t in ids]
    else:
        bias = {str(t): -100 for t in ids}
    b = s.post("/completion", {"prompt": "What is the best book", "n_predict": 64, "logit_bias": bias}).json()
    for w in WORDS:
        assert " " + w + " " not in b["content"]


def test_logit_bias_false_bans_and_shows_null(greedy_server):
    s = greedy_server
    first = s.post("/completion", {"prompt": MEANING, "n_predict": 1}).json()
    tok = s.post("/tokenize", {"content": first["content"]}).json()["tokens"][0]
    b = s.post("/completion", {"prompt": MEANING, "n_predict": 1, "logit_bias": [[tok, False]],
                               "return_tokens": True}).json()
    assert b["tokens"][0] != tok
    assert {"bias": None, "token": tok} in b["generation_settings"]["logit_bias"]


def test_ignore_eos(server):
    b = server.post("/completion", {"prompt": MEANING, "n_predict": 4, "ignore_eos": True}).json()
    assert {"bias": None, "token": 2} in b["generation_settings"]["logit_bias"]
    b = server.post("/completion", {"prompt": MEANING, "n_predict": 4}).json()
    assert b["generation_settings"]["logit_bias"] == []


def test_cancel_request_frees_slot(stories_path):
    s = Server(_args(ctx_size=4096, n_predict=-1, parallel=1) + ["--slots"], model=stories_path)
    try:
        import requests
        with pytest.raises(requests.exceptions.ReadTimeout):
            s.post("/completion", {"prompt": MEANING}, timeout=0.1)
        t0 = time.time()
        while s.get("/slots").json()[0]["is_processing"]:
            assert time.time() - t0 < 2.0, "slot still busy 2 s after the client left"
            time.sleep(0.01)
        # the server still serves
        assert s.post("/completion", {"prompt": MEANING, "n_predict": 4}).status_code == 200
    finally:
        s.stop()


def test_closed_stream_frees_slot(stories_path):
    import requests
    s = Server(_args(ctx_size=4096, n_predict=-1, parallel=1) + ["--slots"], model=stories_path)
    try:
        r = requests.post(s.url + "/completion", json={"prompt": MEANING, "stream": True}, stream=True)
        it = r.iter_lines()
        next(it)
        r.close()
        t0 = time.time()
        while s.get("/slots").json()[0]["is_processing"]:
            assert time.time() - t0 < 2.0, "slot still busy 2 s after the stream closed"
            time.sleep(0.01)
    finally:
        s.stop()


def test_prompt_cache_accounting(server):
    import random
    rnd = random.Random(0)
    for _ in range(8):
        r = rnd.randint(0, 4)
        n = rnd.randint(1, 8)
        b = server.post("/completion", {"prompt": (" Hello " + str(r)) * (40 + r), "n_predict": n}).json()
        t = b["timings"]
        assert t["prompt_n"] + t["cache_n"] == (40 + r) * 5 + 2
        assert t["predicted_n"] == n and b["content"]


def test_repeated_prompt_reuses_cache(server):
    data = {"prompt": "The sky is blue and I love it.", "n_predict": 4, "id_slot": 1}
    server.post("/completion", data)
    b = server.post("/completion", data).json()
    assert b["timings"]["cache_n"] == 16 and b["timings"]["prompt_n"] == 1
    assert b["tokens_cached"] == 17 + 4 - 1 and b["id_slot"] == 1


def test_n_predict_request_wins_server_default_otherwise(server):
    b = server.post("/completion", {"prompt": MEANING, "n_predict": 70, "ignore_eos": True}).json()
    assert b["timings"]["predicted_n"] == 70 and b["generation_settings"]["n_predict"] == 70
    b = server.post("/completion", {"prompt": MEANING, "ignore_eos": True}).json()
    assert b["timings"]["predicted_n"] == 64 and b["generation_settings"]["n_predict"] == 64


def test_truncated_at_slot_context(stories_path):
    s = Server(_args(ctx_size=64, parallel=1, n_predict=-1), model=stories_path)
    try:
        b = s.post("/completion", {"prompt": MEANING, "ignore_eos": True}).json()
        assert b["truncated"] is True and b["stop_type"] == "limit"
        assert b["timings"]["predicted_n"] == 64 - 18
    finally:
        s.stop()


def test_stop_strings(greedy_server):
    s = greedy_server
    full = s.post("/completion", {"prompt": MEANING, "n_predict": 32}).json()["content"]
    word = full.split()[3]
    b = s.post("/completion", {"prompt": MEANING, "n_predict": 32, "stop": [word], "n_probs": 1}).json()
    assert b["stop_type"] == "word" and b["stopping_word"] == word
    assert b["content"] == full[:full.index(word)]
    streamed = "".join(d["content"] for d in s.stream("/completion", {"prompt": MEANING, "n_predict": 32,
                                                                       "stop": word, "stream": True}))
    assert streamed == b["content"] and word not in streamed
    client = OpenAI(api_key="dummy", base_url=s.url + "/v1")
    res = client.completions.create(model="x", prompt=MEANING, max_tokens=32, stop=[word])
    assert res.choices[0].finish_reason == "stop" and res.choices[0].text == b["content"]


def test_t_max_predict_ms(server):
    b = server.post("/completion", {"prompt": "Once upon a time", "n_predict": 64, "t_max_predict_ms": 1,
                                    "temperature": 0.0}).json()
    assert b["stop_type"] == "limit"
    assert b["has_new_line"] is False or b["timings"]["predicted_n"] < 64 or "\n" in b["content"]


def test_v1_completions_logprobs(server):
    b = server.post("/v1/completions", {"prompt": MEANING, "max_tokens": 3, "logprobs": 2}).json()
    content = b["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert b["object"] == "text_completion" and b["id"].startswith("chatcmpl-") and len(b["id"]) == 41
