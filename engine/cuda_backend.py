"""Run the first `n_gpu_layers` layers' matmuls, attention and RMSNorm on an NVIDIA GPU.

Weights of those layers are uploaded once, unpacked to the layout the CUDA kernels read.
Activations, quantized on the host exactly as for the CPU (cheap, O(tokens x width)), travel
to the device per operation; the KV cache stays on the host and the layer's part is sent for
attention. That keeps one cache, one scheduler and one code path, at the price of transfers:
this is the correct, simple first GPU path, not yet a fast one.
"""
from __future__ import annotations

import math

import numpy as np

from .quants import KernelOrder, PackedWeight, blocks, float_rows, prepare, repacked_order, tinyblas_rows
from .quants.kquants import unpack_k


class CudaUnavailable(RuntimeError):
    """No usable CUDA device (or numba-cuda is not installed); the message says which."""


def cuda_status() -> tuple[bool, str]:
    """(usable, why not)."""
    try:
        from numba import config, cuda
    except Exception as e:  # pragma: no cover - numba itself is a dependency
        return False, f"numba cannot load its CUDA target: {e}"
    if config.ENABLE_CUDASIM:
        return True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    try:
        import numba_cuda  # noqa: F401  (the maintained CUDA target, the [cuda] extra)
    except ImportError:
        return False, "the numba-cuda package is not installed (pip install 'numllama[cuda]')"
    try:
        if not cuda.is_available():
            return False, "no CUDA driver or device found"
        name = cuda.get_current_device().name   # bytes in older numba-cuda, str in 0.30
    except Exception as e:  # pragma: no cover
        return False, f"CUDA failed to initialise: {e}"
    try:   # a broken install fails here with a reason, not at the first real kernel
        cuda.jit("void(float32[:])")(_probe_kernel)
    except Exception as e:  # pragma: no cover - needs a GPU
        return False, (f"numba-cuda cannot compile kernels here ({type(e).__name__}: {e}); numba-cuda 0.30 "
                       f"needs NumPy below 2.5: pip install 'numllama[cuda]'")
    return True, "CUDA device " + (name.decode(errors="replace") if isinstance(name, bytes) else str(name))


def _probe_kernel(a):
    a[0] = 1.0


class DeviceWeight:
    """One weight matrix on the device, in the kernels' unpacked layout."""

    def __init__(self, raw: np.ndarray, packed: PackedWeight):
        """raw: the GGUF bytes (or float rows) of the matrix, [n_rows, ...]."""
        from numba import cuda
        self.packed = packed
        name, n_rows, n_cols = packed.type_name, packed.n_rows, packed.n_cols
        if packed.act_format in ("f32", "f16", "bf16"):   # row-major f32, as matmul_float reads
            self.w = cuda.to_device(np.ascontiguousarray(float_rows(name, raw, n_rows, n_cols)))
            return
        if packed.act_format == "q8_k_rows":   # the K-quants: their integers, row-major
            q, sub, d, dmin = unpack_k(name, raw, n_rows, n_cols)
            self.q, self.sub = cuda.to_device(np.ascontiguousarray(q)), cuda.to_device(np.ascontiguousarray(sub))
            self.scale = cuda.to_device(np.ascontiguousarray(d))
            self.minimum = cuda.to_device(np.ascontiguousarray(dmin))
            return
        q, scale, minimum, group = blocks.unpack(name, raw, n_rows, n_cols)
        if minimum is None:
            minimum = np.zeros_like(scale)
        q = q.reshape(n_rows, n_cols // group, 32)                          # [N, NB, 32]
        self.q = cuda.to_device(np.ascontiguousarray(q))
        self.scale = cuda.to_device(np.ascontiguousarray(scale, np.float32))
        self.minimum = cuda.to_device(np.ascontiguousarray(minimum, np.float32))


def _grid(n_tokens: int, n_rows: int):
    threads = (4, 32)
    return ((n_tokens + 3) // 4, (n_rows + 31) // 32), threads


class CudaLayers:
    """The GPU twin of the CPU ops, for layers 0 .. n_layers - 1."""

    def __init__(self, model, n_layers: int):
        ok, why = cuda_status()
        if not ok:
            raise CudaUnavailable(why)
        from numba import cuda

        from . import cuda_kernels
        self.cuda, self.k = cuda, cuda_kernels
        self.n_layers = min(n_layers, len(model.layers))
        self.device_name = why
        t = model.gguf.tensors
        self.weights: dict[int, DeviceWeight] = {}
        for i in range(self.n_layers):
            layer = model.layers[i]
            for packed in (*layer.qkv, layer.wo, *layer.gate_up, layer.w_down):
                raws = [np.asarray(t[name].data) for name in model.sources[id(packed)]]
                raw = raws[0] if len(raws) == 1 else np.concatenate(raws)   # a stacked projection
                self.weights[id(packed)] = DeviceWeight(raw, packed)

    def linear(self, x: np.ndarray, *weights: PackedWeight, order: KernelOrder | None = None) -> list[np.ndarray]:
        cuda, k = self.cuda, self.k
        n_tokens = x.shape[0]
        if order is None:
            order = KernelOrder.of(n_tokens)
        outs = []
        for w in weights:
            rows = cuda.to_device(tinyblas_rows(order, w))
            dw = self.weights[id(w)]
            act = prepare(x, w.act_format, w.group)          # host: the CPU's quantization
            out = cuda.device_array((n_tokens, w.n_rows), np.float32)
            blocks_, threads = _grid(n_tokens, w.n_rows)
            if w.act_format in ("f32", "f16", "bf16"):
                k.matmul_float[blocks_, threads](cuda.to_device(act.x), dw.w, rows, w.act_format == "f16", out)
            elif w.act_format == "q8_k_rows":
                kind = {"Q4_K": 0, "Q5_K": 1}.get(w.type_name, 2)
                k.matmul_kquant[blocks_, threads](cuda.to_device(act.q), cuda.to_device(act.d), cuda.to_device(act.s),
                                                  dw.q, dw.sub, dw.scale, dw.minimum, kind,
                                                  32 if w.type_name == "Q6_K" else 0,
                                                  repacked_order(w.type_name, w.n_rows),
                                                  cuda.to_device(order.tiled), cuda.to_device(order.grouped), out)
            else:
                k.matmul_q32[blocks_, threads](cuda.to_device(act.q), cuda.to_device(act.d),
                                               cuda.to_device(act.s), dw.q, dw.scale, dw.minimum,
                                               w.act_format == "q8_1", repacked_order(w.type_name, w.n_rows), out)
            outs.append(out.copy_to_host())
        return outs

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        cuda = self.cuda
        out = cuda.device_array(x.shape, np.float32)
        self.k.rms_norm[(x.shape[0] + 31) // 32, 32](cuda.to_device(np.ascontiguousarray(x)),
                                                     cuda.to_device(weight), np.float32(eps), out)
        return out.copy_to_host()

    def attention(self, q, k_cache, v_cache, seq_ids, positions, n_head, n_head_kv, head_dim, scale, window,
                  tiled, kv_chunk, out):
        if tiled.any() or kv_chunk.any():   # ggml's tiled and split-KV orders have no CUDA twin yet
            from .ops import attention
            return attention(q, k_cache, v_cache, seq_ids, positions, n_head, n_head_kv, head_dim,
                             np.float32(scale), window, tiled, kv_chunk, out)
        cuda = self.cuda
        n_ctx = int(positions.max()) + 1
        kc = cuda.to_device(np.ascontiguousarray(k_cache[:, :, :-(-n_ctx // k_cache.shape[-1])]).view(np.float16))
        vc = cuda.to_device(np.ascontiguousarray(v_cache[:, :, :n_ctx]).view(np.float16))
        jobs = q.shape[0] * n_head
        scores = cuda.device_array((jobs, n_ctx), np.float32)
        dev_out = cuda.device_array(out.shape, np.float32)
        self.k.attention[math.ceil(jobs / 32), 32](cuda.to_device(q), kc, vc, cuda.to_device(seq_ids),
                                                   cuda.to_device(positions), n_head, n_head_kv, head_dim,
                                                   np.float32(scale), window, scores, dev_out)
        out[:] = dev_out.copy_to_host()
