"""Weights packed once at load, and `linear`: activations times packed weights.

Each GGUF tensor type multiplies activations the way llama.cpp's CPU backend does, which is
why our logits agree with llama.cpp's:

| weight type               | activations become        | kernel                                   |
|---------------------------|---------------------------|------------------------------------------|
| F32                       | f32                       | matmul_float                             |
| F16 / BF16                | rounded to f16 / bf16     | the same (weights widened at load)       |
| Q4_0, Q5_0, Q8_0          | Q8_0 blocks of 32         | matmul_q32_lanes                         |
| Q4_1, Q5_1                | Q8_1 blocks of 32 (+ sum) | matmul_q32_lanes                         |
| Q2_K .. Q6_K              | Q8_K super-blocks of 256  | matmul_int8                              |
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import blocks
from .kernels import matmul_float, matmul_int8, matmul_q32_lanes, quantize_q8_blocks, quantize_q8_k

ACT_FORMAT = {
    "F32": "f32", "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    "Q2_K": "q8_k", "Q3_K": "q8_k", "Q4_K": "q8_k", "Q5_K": "q8_k", "Q6_K": "q8_k",
}


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix [n_rows, n_cols] ready for the kernels (one row per output feature)."""
    type_name: str
    n_rows: int
    n_cols: int
    act_format: str               # how activations are prepared (see ACT_FORMAT)
    group: int                    # weights per scale group (int8 formats), 0 for float
    w: np.ndarray | None = None   # [n_rows, n_cols] f32 (float formats)
    q: np.ndarray | None = None   # [n_rows, group, n_groups] int8, block-minor
    scale: np.ndarray | None = None    # [n_rows, n_groups] f32
    minimum: np.ndarray | None = None  # [n_rows, n_groups] f32 (zeros for symmetric types)

    @property
    def act_key(self) -> tuple[str, int]:
        return self.act_format, self.group


def _float_rows(type_name: str, data: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    if type_name == "F32":
        return np.asarray(data, dtype=np.float32).reshape(n_rows, n_cols)  # a view of the mmap
    if type_name == "F16":
        return np.asarray(data).view(np.float16).reshape(n_rows, n_cols).astype(np.float32)
    if type_name == "BF16":
        bits = np.asarray(data).view(np.uint16).reshape(n_rows, n_cols).astype(np.uint32) << 16
        return bits.view(np.float32)
    raise ValueError(type_name)


def pack_weight(type_name: str, data: np.ndarray, n_rows: int, n_cols: int) -> PackedWeight:
    """Turn a GGUF tensor's bytes into the kernels' layout."""
    fmt = ACT_FORMAT[type_name]
    if fmt in ("f32", "f16", "bf16"):
        return PackedWeight(type_name, n_rows, n_cols, fmt, 0, w=_float_rows(type_name, data, n_rows, n_cols))
    q, scale, minimum, group = blocks.unpack(type_name, data, n_rows, n_cols)
    n_groups = n_cols // group
    q_block_minor = np.ascontiguousarray(q.reshape(n_rows, n_groups, group).transpose(0, 2, 1))
    if minimum is None:
        minimum = np.zeros_like(scale)
    return PackedWeight(type_name, n_rows, n_cols, fmt, group, q=q_block_minor, scale=scale, minimum=minimum)


def pack_tensor(tensor) -> PackedWeight:
    """Pack a gguf-py ReaderTensor (shape is stored innermost-first: [n_cols, n_rows])."""
    n_cols, n_rows = int(tensor.shape[0]), int(tensor.shape[1])
    return pack_weight(tensor.tensor_type.name, tensor.data, n_rows, n_cols)


def round_f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """f32 -> bf16 -> f32 with round-to-nearest-even, as ggml_compute_fp32_to_bf16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


@dataclass(frozen=True)
class Activations:
    """Activations prepared for one kind of weight: float rows, or int8 quants and scales."""
    x: np.ndarray | None = None    # [T, K] f32
    q: np.ndarray | None = None    # [T, G, NG] int8
    d: np.ndarray | None = None    # [T, NG] f32
    s: np.ndarray | None = None    # [T, NG] f32


def prepare(x: np.ndarray, act_format: str, group: int) -> Activations:
    """Round or quantize activations x [T, K] for weights of the given format."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if act_format == "f32":
        return Activations(x=x)
    if act_format == "f16":
        return Activations(x=round_f16(x))
    if act_format == "bf16":
        return Activations(x=round_bf16(x))
    n_tokens, n_cols = x.shape
    n_groups = n_cols // group
    q = np.empty((n_tokens, group, n_groups), np.int8)
    d = np.empty((n_tokens, n_groups), np.float32)
    s = np.empty((n_tokens, n_groups), np.float32)
    if act_format == "q8_k":
        quantize_q8_k(x, group, q, d, s)
        return Activations(q=q, d=d, s=s)
    quantize_q8_blocks(x, group, q, d, s)
    # ggml stores Q8_0/Q8_1 block scales (and Q8_1's sum) as f16
    return Activations(q=q, d=round_f16(d), s=round_f16(s))


def matmul(act: Activations, w: PackedWeight, tinyblas_rows: np.ndarray | None = None) -> np.ndarray:
    """[T, K] activations times the weight's transpose -> [T, n_rows] f32.
    tinyblas_rows [T] bool marks tokens of a multi-token prompt pass, which llama.cpp sends
    through tinyBLAS (float weights only; None: every token)."""
    if w.w is not None:
        n_tokens = act.x.shape[0]
        out = np.empty((n_tokens, w.n_rows), np.float32)
        if tinyblas_rows is None:
            tinyblas_rows = np.ones(n_tokens, bool)
        matmul_float(act.x, w.w, tinyblas_rows, w.act_format == "f16", out)
        return out
    out = np.empty((act.q.shape[0], w.n_rows), np.float32)
    if w.act_format == "q8_k":
        matmul_int8(act.q, act.d, act.s, w.q, w.scale, w.minimum, out)
    else:
        matmul_q32_lanes(act.q, act.d, act.s, w.q, w.scale, w.minimum, w.act_format == "q8_1", out)
    return out


def linear(x: np.ndarray, *weights: PackedWeight, tinyblas_rows: np.ndarray | None = None) -> list[np.ndarray]:
    """x [T, K] times each weight; activations are prepared once per format (q, k and v share)."""
    prepared: dict = {}
    outs = []
    for w in weights:
        if w.act_key not in prepared:
            prepared[w.act_key] = prepare(x, *w.act_key)
        outs.append(matmul(prepared[w.act_key], w, tinyblas_rows))
    return outs
