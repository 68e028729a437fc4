"""The KV cache: memory taken as cells are written, and the position-major view of its cells."""
import numpy as np

from numllama.engine.hparams import HParams
from numllama.engine.kv_cache import KVCache

# SmolLM2-135M's shapes: 30 layers, 3 kv heads of 64
HP = HParams("llama", 49152, 8192, 576, 30, 9, 3, 1536, 64, 64, 100000.0, 1.0, 1e-5)


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_memory_grows_with_the_cells_written_not_the_context():
    """4 slots x 8192 positions is 1.5 GB of f16 cells; writing 4 tokens per slot must not
    make it resident (huge pages once did: ~180 MB per slot)."""
    rows = np.ones((4, HP.n_embd_kv), np.float32)
    KVCache(HP, 1, 64).store(0, np.zeros(4, np.int32), np.arange(4, dtype=np.int32), rows, rows)  # JIT
    before = _rss_mb()
    cache = KVCache(HP, n_seq=4, n_ctx=8192)
    for seq in range(4):
        for layer in range(HP.n_layer):
            cache.store(layer, np.full(4, seq, np.int32), np.arange(4, dtype=np.int32), rows, rows)
    assert _rss_mb() - before < 40


def test_cells_round_trip_and_read_what_was_stored():
    cache = KVCache(HP, n_seq=2, n_ctx=200)
    rng = np.random.default_rng(0)
    n = 150   # three key chunks, the last one partial
    k = rng.standard_normal((n, HP.n_embd_kv)).astype(np.float32)
    v = rng.standard_normal((n, HP.n_embd_kv)).astype(np.float32)
    for layer in range(HP.n_layer):
        cache.store(layer, np.ones(n, np.int32), np.arange(n, dtype=np.int32), k, v)
    keys, values = cache.cells(1, n)                          # [n_layer, n_kv, n, hd] f16 bits
    want = k.astype(np.float16).reshape(n, HP.n_head_kv, HP.head_dim).transpose(1, 0, 2)
    np.testing.assert_array_equal(keys[7].view(np.float16), want)
    np.testing.assert_array_equal(values[7].view(np.float16),
                                  v.astype(np.float16).reshape(n, HP.n_head_kv, HP.head_dim).transpose(1, 0, 2))
    other = KVCache(HP, n_seq=1, n_ctx=200)
    other.put_cells(0, keys, values)
    k2, v2 = other.cells(0, n)
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(v2, values)
