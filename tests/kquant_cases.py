"""Shared by test_kquants.py and portable_check.py: random weights of every block type and the
matmul outputs for each summation path."""
import numpy as np

from numllama.engine.quants import KernelOrder, blocks, linear, pack_weight

SCALE_AT = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
            "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0]}
CASES = [(name, path) for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K") for path in ("plain", "tiled", "grouped")] \
    + [(name, "plain") for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")] \
    + [("Q4_0", "odd_rows")]   # not a multiple of 8 rows: ggml_vec_dot's 8 lanes, not the repacked order
N_TOKENS = 11   # more than one tile of prompt tokens (simd.PROMPT_TOKEN_TILE) and a remainder


def weights(name, n_rows=40, n_cols=512):
    rng = np.random.default_rng(len(name) * 7 + n_rows)
    bb, bw = blocks.BLOCK_SIZES[name]
    raw = rng.integers(0, 256, size=(n_rows, n_cols // bw * bb), dtype=np.uint8)
    flat = raw.reshape(-1, bb)
    for at in SCALE_AT[name]:
        flat[:, at:at + 2] = rng.uniform(0.001, 0.02, flat.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def outputs(name, path, n_rows=40, n_cols=512):
    if path == "odd_rows":
        n_rows = 37
    w = pack_weight(name, weights(name, n_rows, n_cols), n_rows, n_cols)
    x = (np.random.default_rng(3).standard_normal((N_TOKENS, n_cols)) * 2).astype(np.float32)
    flag = np.arange(N_TOKENS) < N_TOKENS - 1
    (out,) = linear(x, w, order=KernelOrder.of(N_TOKENS, tiled=flag if path == "tiled" else None,
                                               grouped=flag if path == "grouped" else None))
    return out
