"""A cold start's compile, on two cores at once.

The first start on a machine compiles every kernel (Numba's cache then holds them, and later
starts load them in about a second). Attention is more than half of that work (ops.attention
with _attend, _attend_range and _attend_tiled). Numba compiles one function at a time within a
process, so a second process compiles attention while this one compiles everything else:

    this process                               the helper (python -m numllama.engine.compile_ahead)
    ops._attend_tiled.compile(...)             ops._attend.compile(ATTEND_SIGNATURE)
    -> written to Numba's cache                ops.attention.compile(ATTENTION_SIGNATURE), which
    a warm-up pass with attention left out       finds _attend_tiled in the cache by then
    (every other kernel compiled)              -> written to Numba's cache
    waits for the helper
    the warm-up proper: attention from the cache

(_attend_tiled is this process's share because attention alone, ~14 s on two cores, was the
longer of the two; compiled here first, while the helper is busy with _attend, it is in the
cache when the helper's attention asks for it.)

On a warm start (attention is in the cache) or a one-core machine nothing of this happens.
Attention's argument types are the same for every model (tests/test_model.py checks the
signatures against the warm-up's own), so the helper needs no model.
"""
from __future__ import annotations

import os
import subprocess
import sys

from numba import types

from .model import CPU_OPS

HELPER_TIMEOUT_S = 300

ATTENTION_SIGNATURE = (
    types.float32[:, ::1],                 # q
    types.uint16[:, :, :, :, ::1],         # k_cache (one layer)
    types.uint16[:, :, :, ::1],            # v_cache (one layer)
    types.int32[::1], types.int32[::1],    # seq_ids, positions
    types.int64, types.int64, types.int64,  # n_head, n_head_kv, head_dim
    types.float32,                         # scale
    types.int64,                           # window
    types.boolean[::1], types.int32[::1],  # tiled, kv_chunk
    types.float32[:, ::1],                 # out
)
_Q, _K, _V, _IDS, _OUT = ATTENTION_SIGNATURE[0], ATTENTION_SIGNATURE[1], ATTENTION_SIGNATURE[2], types.int32[::1], \
    types.float32[:, ::1]
_F32_ROW = types.float32[::1]
ATTEND_TILED_SIGNATURE = (   # ops._attend_tiled as attention calls it
    _Q, _K, _V, _IDS, _IDS,
    types.int64, types.int64, types.int64, types.int64, types.int64,   # t0, t1, kv_head, group, head_dim
    types.float32, types.int64, _OUT,                                  # scale, window, out
    _F32_ROW, types.int64, types.int64,                                # scratch, block_rows, padded_dim
)
ATTEND_SIGNATURE = (         # ops._attend as attention calls it
    _Q, _K, _V, _IDS, _IDS,
    types.int64, types.int64, types.int64, types.int64,                # t, h, group, head_dim
    types.float32, types.int64, types.int32, _OUT,                     # scale, window, kv_chunk, out
    _F32_ROW, _F32_ROW, _F32_ROW, _F32_ROW, _F32_ROW, _F32_ROW,        # qh, acc, part, scores, ms, vs
    types.float32[:, ::1], types.float64[::1],                         # lanes, wide
)


class WithoutAttention(CPU_OPS):
    """The CPU ops with attention left out: for the warm-up pass that compiles the others (its
    output is never read)."""
    @staticmethod
    def attention(*_args) -> None:
        pass


def attention_is_cached() -> bool:
    """Whether Numba's cache has attention already (its index file; a private attribute of
    Numba's, hence the fallback: when in doubt, do nothing ahead)."""
    from . import ops
    try:
        return os.path.exists(ops.attention._cache._cache_file._index_path)
    except AttributeError:
        return True


def start() -> subprocess.Popen | None:
    """Start the helper on a cold start with a second core to run it; None otherwise."""
    if (os.cpu_count() or 1) < 2 or attention_is_cached():
        return None
    return subprocess.Popen([sys.executable, "-m", "numllama.engine.compile_ahead"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def compile_share() -> None:
    """This process's share of attention's compile (see the module's docstring)."""
    from . import ops
    ops._attend_tiled.compile(ATTEND_TILED_SIGNATURE)


def finish(helper: subprocess.Popen) -> None:
    """Wait for the helper (whatever it did, the warm-up that follows compiles what is missing)."""
    try:
        helper.wait(HELPER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()


if __name__ == "__main__":
    from .ops import _attend, attention
    _attend.compile(ATTEND_SIGNATURE)
    attention.compile(ATTENTION_SIGNATURE)
