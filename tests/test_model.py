import numpy as np
import pytest

from numllama.engine.model import Batch


def greedy(engine, prompt_ids, n):
    cache = engine.model.new_cache(1, len(prompt_ids) + n + 1)
    logits = engine.model.forward(Batch.single(prompt_ids, 0), cache)[0]
    out, steps = [], [logits]
    for i in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = engine.model.forward(Batch.single([t], len(prompt_ids) + i), cache)[0]
        steps.append(logits)
    return out, steps


def test_stories_greedy_equals_llama_cpp(stories, stories_golden):
    for g in stories_golden["greedy"]:
        ids = stories.tokenizer.encode(g["prompt"])
        assert len(ids) == g["prompt_n"]
        out, _ = greedy(stories, ids, g["n_predict"])
        assert out == g["tokens"], g["prompt"]
        assert stories.tokenizer.decode(out) == g["content"]


def top_logprobs_equal_golden(server, golden_name: str) -> None:
    """Every request of a golden file made by `bench/compare_tokens.py --record` (an AVX2
    llama-server's answers) gives the same tokens and top-5 log-probabilities, bit for bit."""
    import json
    import os
    gold = json.load(open(os.path.join(os.path.dirname(__file__), "data", golden_name)))
    tokens = gold.get("tokens", [None] * len(gold["answers"]))   # (older files: no token list)
    for req, answer, want_tokens in zip(gold["requests"], gold["answers"], tokens):
        r = server.post("/completion", {**req, "cache_prompt": False, "return_tokens": True}).json()
        got = [[c["id"], c["logprob"], [[t["id"], t["logprob"]] for t in c["top_logprobs"]]]
               for c in r.get("completion_probabilities", [])]
        assert got == answer, req
        if want_tokens is not None:
            assert r["tokens"] == want_tokens, req


def test_stories_top_logprobs_equal_llama_server(server):
    """Greedy and seeded completions of stories260K (tests/data/stories260K-top5.json). This
    used to be "close" (up to 2e-3): the F32 dot product's tail (ffn_down, K=172) was fused
    where llama.cpp rounds the product first, and the n_probs softmax summed in another order."""
    top_logprobs_equal_golden(server, "stories260K-top5.json")


def test_long_prompt_and_decode_equal_llama_server(stories_path):
    """A prompt of some 300 tokens (ggml's tiled attention: >= 64 tokens in the ubatch) and 400
    tokens decoded after it (past 256 cells ggml splits a lone decode token's attention among
    its threads, -t 2 here as when recorded): stories260K-long-top5.json, bit for bit."""
    from server_util import Server
    s = Server(["-np", "1", "-c", "2048", "-t", "2"], model=stories_path)
    try:
        top_logprobs_equal_golden(s, "stories260K-long-top5.json")
    finally:
        s.stop()


# Tiny random-weight files written by bench/random_gguf.py (--embd 64 --layers 2 --heads 4
# --kv-heads 2 --ffn 128 --type Q8_0 and what is listed), with an AVX2 llama-server's answers
# recorded by bench/compare_tokens.py --record (-n 24 --seeds 2).
TINY_MODELS = {
    "llama3-rope-tiny": "Llama 3's RoPE scaling, rope_freqs.weight (--rope-base 500000 --llama3-rope --seed 3)",
    "qwen2-tiny": "qwen2: q/k/v biases, NeoX RoPE (--arch qwen2 --rope-base 1000000 --seed 5)",
    "qwen3-tiny": "qwen3: per-head q/k RMSNorm, head_dim 32 != n_embd / n_head "
                  "(--arch qwen3 --head-dim 32 --rope-base 1000000 --seed 7)",
    "gemma3-tiny": "gemma3: scaled embeddings, q/k norms, q scaled before attention, post-norms, GeGLU, "
                   "tied output; 4 layers, a sliding window of 8 in layers 0, 1, 3 with their own RoPE base "
                   "(--layers 4 --kv-heads 1 --arch gemma3 --head-dim 32 --rope-base 1000000 "
                   "--sliding-window 8 --swa-pattern 3 --seed 11)",
    "phi3-tiny": "phi3: fused attn_qkv, ffn_up holding gate and up, q scaled before attention, RoPE on 8 "
                 "of 16 dimensions (--arch phi3 --rot 8 --seed 13)",
    "qwen2-yarn-tiny": "qwen2 with YaRN: factor 4 over an original context of 512 (--arch qwen2 --rope-base "
                       "1000000 --yarn 4 512 --seed 19)",
    "phi3-longrope-tiny": "phi3 with LongRoPE: short and long factors, original context 1024 (so -c 2048 takes "
                          "the long ones), attn_factor 1.19 (--arch phi3 --longrope-ctx 1024 --seed 17)",
}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_architecture_equals_llama_server(name):
    import os
    from server_util import Server
    s = Server(["-np", "1", "-c", "2048"], model=os.path.join(os.path.dirname(__file__), "data", name + ".gguf"))
    try:
        top_logprobs_equal_golden(s, name + "-top5.json")
    finally:
        s.stop()


def test_gemma3_270m_equals_llama_server(gemma3_path):
    """A real gemma3 file (Q8_0, Q5_0, Q4_K, Q6_K; 262,144-token SPM vocabulary; sliding-window
    layers; prompts cut where llama-server cuts them for its checkpoints): greedy and seeded
    tokens and top-5 log-probabilities, bit for bit (tests/data/gemma-3-270m-q4_k_m-top5.json)."""
    from server_util import Server
    s = Server(["-np", "1", "-c", "2048"], model=gemma3_path)
    try:
        top_logprobs_equal_golden(s, "gemma-3-270m-q4_k_m-top5.json")
    finally:
        s.stop()


def test_smollm_greedy_equals_llama_cpp(smollm, smollm_golden):
    """SmolLM2 Q4_1 with 8-bit activations: every golden token. Only exact arithmetic gets
    here (ggml's lane order, FMA, ggml's expf), since one flipped int8 rounding changes tokens."""
    for g in smollm_golden["greedy"]:
        ids = smollm.tokenizer.encode(g["prompt"])
        assert len(ids) == g["prompt_n"]
        out, steps = greedy(smollm, ids, len(g["tokens"]))
        assert out == g["tokens"], g["prompt"]
        first = steps[0].astype(np.float64) - steps[0].max()
        first -= np.log(np.exp(first).sum())
        for e in g["top_logprobs"][0]:
            assert abs(first[e["id"]] - e["logprob"]) < 5e-4  # measured <= 2.7e-4


def test_batch_invariance_across_sequences_and_chunks(stories):
    """A sequence's logits are bit-identical alone, batched with others, or prompt-chunked."""
    tok = stories.tokenizer
    a = tok.encode("Once upon a time, there was a little girl")
    b = tok.encode("The sky is blue")
    model = stories.model
    # alone, all logits
    cache = model.new_cache(2, 64)
    alone = model.forward(Batch.single(a, 0, 0, all_logits=True), cache)
    # together with b in one batch, b first
    cache2 = model.new_cache(2, 64)
    batch = Batch(np.array(b + a, np.int32),
                  np.array(list(range(len(b))) + list(range(len(a))), np.int32),
                  np.array([1] * len(b) + [0] * len(a), np.int32),
                  np.ones(len(a) + len(b), bool), np.ones(len(a) + len(b), bool))
    together = model.forward(batch, cache2)[len(b):]
    np.testing.assert_array_equal(alone, together)
    # prompt split into chunks of 3
    for chunk in (1, 3, 5):
        cache3 = model.new_cache(1, 64)
        parts = [model.forward(Batch.single(a[i:i + chunk], i, 0, all_logits=True, prompt_pass=True), cache3)
                 for i in range(0, len(a), chunk)]
        np.testing.assert_array_equal(np.concatenate(parts), alone)


def test_prompt_chunks_end_where_llama_server_checkpoints(stories):
    """A model with sliding-window layers: llama-server stops filling a batch when 4 + n_ubatch
    or 4 prompt tokens remain (to checkpoint there), and the batch decides the kernels' order,
    so numllama's scheduler cuts the same chunks. Other models' prompts are not cut."""
    import os
    from numllama.engine.engine import Engine
    from numllama.engine.slots import Scheduler
    gemma = Engine.load(os.path.join(os.path.dirname(__file__), "data", "gemma3-tiny.gguf"))
    swa = Scheduler(gemma, 1, 256, n_batch=2048, n_ubatch=8)
    plain = Scheduler(stories, 1, 256, n_batch=2048, n_ubatch=8)
    # (tokens left, batch budget) -> tokens taken now
    assert [swa._chunk_length(n, 2048) for n in (600, 12, 9, 8, 5, 4, 1)] == [588, 8, 5, 4, 1, 4, 1]
    assert swa._chunk_length(600, 100) == 100          # the budget cuts first
    assert [plain._chunk_length(n, 2048) for n in (600, 12, 5)] == [600, 12, 5]


@pytest.mark.parametrize("name", ["gemma3-tiny-turns.json", "gemma-3-270m-q4_k_m-turns.json"])
def test_conversation_with_cached_prompts_equals_llama_server(name, gemma3_path):
    """Three turns, each prompt the last one plus its answer plus more, cache_prompt on: a
    sliding-window model resumes where llama-server resumes (Gemma 3 270M: from its last context
    checkpoint; the tiny model, window 8: from the shared prefix, whose window is still cached),
    so the same tokens are evaluated (timings prompt_n, cache_n) in the same batches, and the
    answers are llama-server's to the byte (tokens, probabilities, their texts)."""
    import json
    import os
    from server_util import Server
    gold = json.load(open(os.path.join(os.path.dirname(__file__), "data", name)))
    model = gemma3_path if gold["model"].startswith("gemma-3-270m") else \
        os.path.join(os.path.dirname(__file__), "data", gold["model"])
    s = Server(["-np", "1", "-c", "2048", "-t", "2"], model=model)
    try:
        for turn in gold["turns"]:
            r = s.post("/completion", turn["request"]).json()
            assert (r["tokens"], r.get("completion_probabilities"), r["timings"]["prompt_n"], r["timings"]["cache_n"]) == \
                (turn["tokens"], turn["probs"], turn["prompt_n"], turn["cache_n"]), turn["request"]["prompt"]
    finally:
        s.stop()


def test_the_kernels_of_a_prompt_pass_and_a_decode_step_can_all_be_cached(smollm_path, tmp_path):
    """Numba will not cache a kernel that uses dynamic globals (numba.get_num_threads inside a
    parallel kernel is one) and compiles it again at every start, which a warm start would pay:
    run SmolLM2 (Q4_1 and Q8_0 matrices) through a prompt pass of 40 tokens and a decode step
    with an empty cache, every warning an error. And the warm-up (what /health waits for) has
    compiled the row-wise ops' parallel variants, which only a prompt of PARALLEL_ROWS tokens
    reaches, before any request."""
    import os
    import subprocess
    import sys
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from numllama.engine.engine import Engine\n"
            "from numllama.engine.model import Batch\n"
            f"e = Engine.load({smollm_path!r}, warm_up=True)\n"
            "from numllama.engine.ops import rms_norm_parallel, swiglu_parallel\n"
            "from numllama.engine.quants.kernels import quantize_q8_blocks_parallel\n"
            "for k in (rms_norm_parallel, swiglu_parallel, quantize_q8_blocks_parallel):\n"
            "    assert k.signatures, k\n"
            "from numllama.engine.ops import attention\n"
            # a cold start compiles attention in a second process (engine/compile_ahead.py):
            # this one found it in the cache, compiled by the helper
            "assert attention.stats.cache_hits and not attention.stats.cache_misses, attention.stats\n"
            "c = e.model.new_cache(1, 256)\n"
            "e.model.forward(Batch.single(list(range(1, 41)), 0), c)\n"
            "e.model.forward(Batch.single([5], 40), c)\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_warm_up_runs_its_kernels_in_a_thread_that_has_ended(stories, monkeypatch):
    """A thread that has run a parallel kernel keeps an OpenMP pool of workers while it lives,
    and a second pool beside the batcher's made every parallel kernel of a decode step wait for
    a sleeping worker (engine.in_passing_thread). So a warm-up (at load, or when a sleeping
    server wakes inside a request's thread) runs its passes in a thread of its own, with the
    caller's Numba thread count, which has ended when warm_up returns; what fails there fails
    the caller."""
    import threading
    import numba
    seen = []
    forward = stories.model.forward

    def recording(*args, **kwargs):
        seen.append((threading.current_thread(), numba.get_num_threads()))
        return forward(*args, **kwargs)
    monkeypatch.setattr(stories.model, "forward", recording)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        stories.warm_up()
    finally:
        numba.set_num_threads(before)
    assert seen and {n for _, n in seen} == {1}
    assert all(t is not threading.current_thread() and not t.is_alive() for t, _ in seen)

    def failing(*args, **kwargs):
        raise ValueError("a pass failed")
    monkeypatch.setattr(stories.model, "forward", failing)
    with pytest.raises(ValueError, match="a pass failed"):
        stories.warm_up()


def test_attention_has_one_signature_for_every_model(tmp_path):
    """The cold start's helper compiles attention for ATTENTION_SIGNATURE (and _attend for
    ATTEND_SIGNATURE, while the server compiles _attend_tiled for ATTEND_TILED_SIGNATURE) without
    seeing the model (engine/compile_ahead.py); every architecture's forward pass (sliding
    windows, biases, per-head norms, prompt passes and decode steps) calls them with exactly
    those types."""
    import glob
    import os
    import subprocess
    import sys
    models = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "*.gguf")))
    code = ("from numllama.engine import compile_ahead\n"
            "compile_ahead.start = lambda: None\n"   # everything compiled here, callees included
            "from numllama.engine.engine import Engine\n"
            "from numllama.engine.ops import attention, _attend, _attend_tiled\n"
            "from numllama.engine.compile_ahead import ATTENTION_SIGNATURE, ATTEND_SIGNATURE, ATTEND_TILED_SIGNATURE\n"
            f"for path in {models!r}:\n"
            "    Engine.load(path, warm_up=True)\n"
            "assert attention.signatures == [ATTENTION_SIGNATURE], attention.signatures\n"
            # (and its two callees, whose compiles the cold start shares out by signature)
            "assert _attend.signatures == [ATTEND_SIGNATURE], _attend.signatures\n"
            "assert _attend_tiled.signatures == [ATTEND_TILED_SIGNATURE], _attend_tiled.signatures\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
