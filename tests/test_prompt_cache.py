"""The host-RAM prompt cache (--cache-ram)."""
import numpy as np

from numllama.engine.prompt_cache import PromptCache
from server_util import TINYLLAMA2, Server


def kv(n):
    return np.ones((2, 1, n, 4), np.uint16), np.ones((2, 1, n, 4), np.uint16)


def test_save_load_and_evict_as_llama_server():
    cache = PromptCache(budget_mib=20 * 32 / 2 ** 20)   # k and v: 32 bytes per token: room for 20
    assert cache.save([1, 2, 3], *kv(3)) and not cache.save([1, 2, 3], *kv(3))
    assert cache.save([1, 2, 3, 4, 5], *kv(5), extra=((3, 0, 2),))       # supersedes its prefix
    assert list(cache.entries) == [(1, 2, 3, 4, 5)]
    assert not cache.save([1, 2, 3, 4], *kv(4))                           # held already, inside it
    assert cache.save([7, 8, 9, 10, 11, 12], *kv(6))
    # an entry of which less than a quarter would be kept is not taken
    assert cache.load([], [7, 99]) is None
    # one that beats the slot's own state is, and it leaves the cache
    key, k, v, extra = cache.load([], [1, 2, 3, 9])
    assert key == (1, 2, 3, 4, 5) and k.shape[2] == 5 and key not in cache.entries and cache.hits == 1
    assert extra == ((3, 0, 2),)   # what the state carried besides K/V (a slot's checkpoints)
    # not when the slot holds as good a state
    assert cache.load([7, 8, 9, 10, 11, 12, 13], [7, 8, 9, 10, 11, 12, 13]) is None
    cache.save(list(range(100, 116)), *kv(16))                           # over budget: the oldest go
    assert (7, 8, 9, 10, 11, 12) not in cache.entries and cache.n_bytes <= cache.budget
    assert not PromptCache(budget_mib=0.000001).save([1], *kv(1))


def test_token_budget():
    cache = PromptCache(budget_mib=-1, limit_tokens=10)
    for start in (0, 100, 200):
        cache.save(list(range(start, start + 4)), *kv(4))
    cache.update()   # 12 tokens held, 10 allowed: the oldest goes
    assert list(cache.entries) == [tuple(range(100, 104)), tuple(range(200, 204))]


def test_one_slot_serves_two_conversations(stories_path):
    a = "Once upon a time there was a little girl named Lily who loved to play in the park"
    b = "The sky is blue and the sun is shining over the green hills"
    s = Server(TINYLLAMA2 + ["--parallel", "1", "--cache-ram", "100"], model=stories_path)
    try:
        first = s.post("/completion", {"prompt": a, "n_predict": 4}).json()
        s.post("/completion", {"prompt": b, "n_predict": 4})     # a's state moves to RAM
        again = s.post("/completion", {"prompt": a, "n_predict": 4}).json()
        assert again["timings"]["cache_n"] == first["tokens_evaluated"] - 1
        assert again["content"] == first["content"]
    finally:
        s.stop()
    s = Server(TINYLLAMA2 + ["--parallel", "1", "--cache-ram", "0"], model=stories_path)
    try:
        s.post("/completion", {"prompt": a, "n_predict": 4})
        s.post("/completion", {"prompt": b, "n_predict": 4})
        again = s.post("/completion", {"prompt": a, "n_predict": 4}).json()
        assert again["timings"]["cache_n"] <= 1                 # without the RAM cache: BOS at most
    finally:
        s.stop()


SLOT_CHOICE_PROMPTS = [
    "Once upon a time there was a little girl named Lily who loved the park",
    "Tom had a big red ball and he played with it every single day in the sun",
    "Every morning the old dog went down to the river to drink some cold water",
    "Zebras and lions lived together in a zoo where children came to see them",
    "Once upon a time there was a little girl named Lily who loved the park and the trees",
    "Bob the builder made a tall tower out of wooden blocks and small stones today",
]


def test_slot_choice_as_llama_server(stories_path):
    """Which slot serves a request decides what its cache holds and the id_slot every answer
    reports. An AVX2 llama-server (-np 4 -c 1024, stories260K) answered these prompts, one after
    the other, from slots 3 2 1 0 3 2 (and the seventh below from 1): the least recently used slot is the *last* of equals, and
    a prompt that shares more than a tenth with a slot's tokens goes back to that slot."""
    s = Server(["-np", "4", "-c", "1024"], model=stories_path)
    try:
        ids = [s.post("/completion", {"prompt": p, "n_predict": 2}).json()["id_slot"] for p in SLOT_CHOICE_PROMPTS]
        assert ids == [3, 2, 1, 0, 3, 2]
        # cache_prompt false changes nothing in the choice (llama-server ignores it there):
        # no slot holds this conversation any more, so the least recently used one (1) serves it
        r = s.post("/completion", {"prompt": SLOT_CHOICE_PROMPTS[1] + " again", "n_predict": 2, "cache_prompt": False})
        assert r.json()["id_slot"] == 1
    finally:
        s.stop()


def test_slot_prompt_similarity_flag(stories_path):
    """-sps 0 turns the similarity choice off (llama-server answered 3 2 1 0 for these prompts,
    and 3 3 3 3 with its default 0.1)."""
    prompts = [f"Once upon a time number {i}" for i in (1, 2, 3, 1)]
    for sps, expected in (("0", [3, 2, 1, 0]), ("0.1", [3, 3, 3, 3])):
        s = Server(["-np", "4", "-c", "1024", "-sps", sps], model=stories_path)
        try:
            assert [s.post("/completion", {"prompt": p, "n_predict": 2}).json()["id_slot"] for p in prompts] == expected
        finally:
            s.stop()
