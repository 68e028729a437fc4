"""Run under NUMBA_ENABLE_CUDASIM=1 by tests/test_cuda.py: the CUDA kernels against their CPU
twins (small shapes, every quant type) and on stories260K. Prints one line per check."""
import sys

import numpy as np

import kquant_cases
from gguf import GGMLQuantizationType as GQ
from gguf import quants as gq

from numllama.engine.cuda_backend import CudaLayers, DeviceWeight, cuda_status
from numllama.engine.quants import ACT_FORMAT, KernelOrder, linear, pack_weight, round_bf16

ok, why = cuda_status()   # the simulator in CI; a real device when run by tests/cuda_device_check.py
assert ok, why
print("cuda:", why)
rng = np.random.default_rng(0)
K_TYPES = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def weight(name, n_rows, n_cols):
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    if name == "F32":
        return w
    if name == "F16":
        return w.astype(np.float16)
    if name == "BF16":
        return (round_bf16(w).view(np.uint32) >> 16).astype(np.uint16)
    if name in K_TYPES:
        return kquant_cases.weights(name, n_rows, n_cols)
    return gq.quantize(w, GQ[name])


class GpuOnly(CudaLayers):
    def __init__(self):  # kernels only, no model
        from numba import cuda

        from numllama.engine import cuda_kernels
        self.cuda, self.k, self.weights = cuda, cuda_kernels, {}


gpu = GpuOnly()
# every type in ggml_vec_dot's order (5 rows); then the repacked orders (Q4_0, Q4_K with 8 rows:
# tokens 0-1 in groups of 4 for Q4_K) and the tiled K-quant order (tokens 0-1)
CASES = [(n, 5, None) for n in ACT_FORMAT] + [("Q4_0", 8, "repacked"), ("Q4_K", 8, "grouped")] + \
    [(n, 5, "tiled") for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]
for name, n_rows, path in CASES:
    n_cols = 256 if name in K_TYPES else 96
    data = weight(name, n_rows, n_cols)
    packed = pack_weight(name, data, n_rows, n_cols)
    gpu.weights[id(packed)] = DeviceWeight(data, packed)
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    rows = np.array([True, False, True])
    flag = np.array([True, True, False])
    order = KernelOrder.of(3, tinyblas=rows, tiled=flag if path == "tiled" else None,
                           grouped=flag if path == "grouped" else None)
    (cpu,) = linear(x, packed, order=order)
    (dev,) = gpu.linear(x, packed, order=order)
    ok = np.array_equal(cpu, dev)
    print(f"matmul {name} {path or 'vec_dot'}: bit-identical {ok}")
    if not ok:
        sys.exit(1)

from numllama.engine.ops import rms_norm  # noqa: E402
x = rng.standard_normal((3, 64)).astype(np.float32)
w = rng.standard_normal(64).astype(np.float32)
cpu = np.empty_like(x)
rms_norm(x, w, 1e-5, cpu)
ok = np.array_equal(cpu, gpu.rms_norm(x, w, 1e-5))
print("rms_norm bit-identical", ok)
if not ok:
    sys.exit(1)

# attention over an f16 cache, with a sliding window and q scaled beforehand (gemma3), or not
from numllama.engine.hparams import HParams  # noqa: E402
from numllama.engine.kv_cache import KVCache  # noqa: E402
from numllama.engine.ops import attention  # noqa: E402
for head_dim, window, scale in ((48, 0, 1 / np.sqrt(np.float32(48))), (64, 5, 1.0)):
    hp = HParams("llama", 32, 80, 2 * head_dim, 1, 2, 1, 8, head_dim, head_dim, 10000.0, 1.0, 1e-5)
    cache = KVCache(hp, n_seq=1, n_ctx=80)
    kv = rng.standard_normal((2, 70, head_dim)).astype(np.float32)
    cache.store(0, np.zeros(70, np.int32), np.arange(70, dtype=np.int32), kv[0], kv[1])
    q = rng.standard_normal((3, 2 * head_dim)).astype(np.float32)
    seq_ids, positions = np.zeros(3, np.int32), np.array([3, 40, 69], np.int32)
    cpu, dev = np.empty_like(q), np.empty_like(q)
    one_chunk, no_split = np.zeros(3, bool), np.zeros(3, np.int32)   # (the CUDA kernel's path)
    attention(q, cache.k[0], cache.v[0], seq_ids, positions, 2, 1, head_dim, np.float32(scale), window,
              one_chunk, no_split, cpu)
    gpu.attention(q, cache.k[0], cache.v[0], seq_ids, positions, 2, 1, head_dim, scale, window, one_chunk,
                  no_split, dev)
    ok = np.array_equal(cpu, dev)
    print(f"attention head_dim {head_dim} window {window}: bit-identical {ok}")
    if not ok:
        sys.exit(1)

# stories260K: the first layer on the (simulated) GPU, the rest on the CPU
from numllama.engine.engine import Engine  # noqa: E402
from numllama.engine.model import Batch  # noqa: E402

e = Engine.load(sys.argv[1])
ids = e.tokenizer.encode("Once upon a time")
cpu_logits = e.model.forward(Batch.single(ids, 0), e.model.new_cache(1, 8))
print("device:", e.model.use_gpu(1))
gpu_logits = e.model.forward(Batch.single(ids, 0), e.model.new_cache(1, 8))
diff = float(np.abs(cpu_logits - gpu_logits).max())
print(f"stories260K logits, layer 0 on the GPU: max |diff| {diff:.2e}, same argmax "
      f"{int(np.argmax(cpu_logits)) == int(np.argmax(gpu_logits))}")
sys.exit(0 if diff < 1e-3 and int(np.argmax(cpu_logits)) == int(np.argmax(gpu_logits)) else 1)
