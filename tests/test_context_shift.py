"""Context shift: old tokens dropped, later keys re-rotated to their new positions."""
import numpy as np

from numllama.engine.model import Batch
from server_util import TINYLLAMA2, Server


def test_shifted_keys_equal_keys_computed_at_the_new_positions(stories):
    """Layer 0's keys depend only on the token and its position, so a key computed at
    position p and shifted by -d must equal (to f16 rounding) the key computed at p - d."""
    model = stories.model
    ids = stories.tokenizer.encode("Once upon a time there was a little girl named Lily who loved")
    n = len(ids)
    far = model.new_cache(1, 64)
    model.forward(Batch.single([0] * 10 + ids, 0), far)     # ids at positions 10..10+n
    far.shift(0, n_keep=0, n_discard=10, n_past=10 + n)     # now at 0..n
    near = model.new_cache(1, 64)
    model.forward(Batch.single(ids, 0), near)
    (k_far, v_far), (k_near, v_near) = far.cells(0, n), near.cells(0, n)
    shifted = k_far[0].view(np.float16).astype(np.float32)
    direct = k_near[0].view(np.float16).astype(np.float32)
    assert np.allclose(shifted, direct, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(v_far[0], v_near[0])  # values just move


def test_server_context_shift(stories_path):
    args = TINYLLAMA2 + ["--ctx-size", "128", "--parallel", "1"]
    s = Server(args + ["--context-shift"], model=stories_path)
    try:
        b = s.post("/completion", {"prompt": "Once upon a time", "n_predict": 200, "ignore_eos": True}).json()
        assert b["timings"]["predicted_n"] == 200 and b["truncated"] is True
        assert b["tokens_cached"] < 128
    finally:
        s.stop()
    s = Server(args, model=stories_path)
    try:
        b = s.post("/completion", {"prompt": "Once upon a time", "n_predict": 200, "ignore_eos": True}).json()
        assert b["timings"]["predicted_n"] == 128 - 5 and b["truncated"] is True
    finally:
        s.stop()
