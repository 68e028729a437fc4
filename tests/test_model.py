import numpy as np

from engine.model import Batch


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


def test_stories_logprobs_close_to_llama_cpp(stories, stories_golden):
    g = stories_golden["greedy"][0]
    ids = stories.tokenizer.encode(g["prompt"])
    _, steps = greedy(stories, ids, g["n_predict"])
    diffs = []
    for logits, top in zip(steps, g["top_logprobs"]):
        l = logits.astype(np.float64) - logits.max()
        l -= np.log(np.exp(l).sum())
        diffs += [abs(l[e["id"]] - e["logprob"]) for e in top]
    assert max(diffs) < 0.01 and np.mean(diffs) < 1e-3


def test_smollm_greedy_agreement(smollm, smollm_golden):
    """SmolLM2 Q4_1: positions agreeing with llama.cpp before the first divergence.
    Measured 106/233 (45%): 8-bit activation quantization turns last-bit differences in
    summation order into flipped quants (see the issue note); the floor guards regressions."""
    agree = total = 0
    for g in smollm_golden["greedy"]:
        ids = smollm.tokenizer.encode(g["prompt"])
        assert len(ids) == g["prompt_n"]
        out, _ = greedy(smollm, ids, g["n_predict"])
        n = 0
        for a, b in zip(out, g["tokens"]):
            if a != b:
                break
            n += 1
        agree += n
        total += len(g["tokens"])
    assert agree / total >= 0.40, f"{agree}/{total}"


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
                  np.ones(len(a) + len(b), bool))
    together = model.forward(batch, cache2)[len(b):]
    np.testing.assert_array_equal(alone, together)
    # prompt split into chunks of 3
    for chunk in (1, 3, 5):
        cache3 = model.new_cache(1, 64)
        parts = [model.forward(Batch.single(a[i:i + chunk], i, 0, all_logits=True), cache3)
                 for i in range(0, len(a), chunk)]
        np.testing.assert_array_equal(np.concatenate(parts), alone)
