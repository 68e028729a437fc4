"""Weights packed once at load, and `linear`: activations times packed weights.

Each GGUF tensor type multiplies activations the way llama.cpp's CPU backend does, which is
why our logits agree with llama.cpp's:

| weight type               | activations become        | kernel                                   |
|---------------------------|---------------------------|------------------------------------------|
| F32                       | f32                       | matmul_float_tiles                       |
| F16 / BF16                | rounded to f16 / bf16     | the same (weights widened at load)       |
| Q4_0, Q5_0, Q8_0          | Q8_0 blocks of 32         | matmul_q32_lanes                         |
| Q4_1, Q5_1                | Q8_1 blocks of 32 (+ sum) | matmul_q32_lanes                         |
| Q2_K .. Q6_K              | Q8_K super-blocks of 256  | kquants.matmul_q4_k / matmul_k16         |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..float_ops import round_f16_array
from . import blocks
from .kernels import (FLOAT_ROW_TILE, PARALLEL_ROWS, ROW_TILE, TINYBLAS_ROWS, tile_rows, matmul_float_tiles, matmul_int8_dot, matmul_q4_dot, matmul_q4_lanes, offset_sums, matmul_q32_lanes,
                      matmul_q32_simd,
                      quantize_q8_blocks, quantize_q8_blocks_parallel, row_parts)
from .kquants import (matmul_k16, matmul_q4_k, matmul_q4_k_repacked, offset_starts, pack_k, quantize_q8_k_rows,
                      quantize_q8_k_rows_parallel)
from .simd import AVX2, INT8_BIAS, VNNI_ROWS   # 32-weight blocks through simd.py, else the portable kernels

ACT_FORMAT = {
    "F32": "f32", "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    "Q2_K": "q8_k_rows", "Q3_K": "q8_k_rows", "Q4_K": "q8_k_rows", "Q5_K": "q8_k_rows", "Q6_K": "q8_k_rows",
}


TILED_MIN_TOKENS = 8   # llama.cpp's tiled K-quant kernels take a sequence's prompt chunk of >= 8 tokens
GROUP_TOKENS = 4       # its repacked Q4_K kernel multiplies tokens 4 at a time


@dataclass(frozen=True)
class KernelOrder:
    """For each token (row) of a batch, the summation order llama.cpp's CPU backend would use
    for it: which kernel a matmul goes through decides the last bits of the result.

    tinyblas [T] bool   float weights: tinyBLAS (a prompt pass of >= 2 tokens), else vec_dot
    tiled    [T] bool   Q4_K/Q6_K: the tiled kernels (a prompt chunk of >= TILED_MIN_TOKENS)
    grouped  [T] bool   repacked Q4_K: in groups of GROUP_TOKENS (the first n - n % 4 of a
                        prompt chunk of n >= 4 tokens)"""
    tinyblas: np.ndarray
    tiled: np.ndarray
    grouped: np.ndarray

    @staticmethod
    def of(n_tokens: int, tinyblas=None, tiled=None, grouped=None) -> "KernelOrder":
        """Given rows as they are; tinyBLAS for every token and no K-quant tiling by default."""
        return KernelOrder(np.ones(n_tokens, bool) if tinyblas is None else tinyblas,
                           np.zeros(n_tokens, bool) if tiled is None else tiled,
                           np.zeros(n_tokens, bool) if grouped is None else grouped)

    @staticmethod
    def vec_dot(n_tokens: int) -> "KernelOrder":
        """Row by row, as llama.cpp multiplies single tokens."""
        none = np.zeros(n_tokens, bool)
        return KernelOrder(none, none, none)

    @staticmethod
    def columns(n: int) -> "KernelOrder":
        """One product over n columns taken together (a head over a batch's pooled rows, a mean
        over its sequences): llamafile's tinyBLAS from two columns on, ggml_vec_dot for one."""
        return KernelOrder.of(n, tinyblas=np.full(n, n >= 2))

    @staticmethod
    def for_batch(prompt_pass: np.ndarray, seq_ids: np.ndarray) -> "KernelOrder":
        """What llama.cpp would do with each token: prompt_pass [T] marks tokens of prompts
        evaluated >= 2 tokens at a time; the K-quant choices go by the size of each sequence's
        prompt chunk in this batch."""
        if not prompt_pass.any():   # decode steps alone: every token row by row
            return KernelOrder.vec_dot(len(seq_ids))
        chunk = np.bincount(seq_ids[prompt_pass], minlength=int(seq_ids.max(initial=0)) + 1)
        tiled = prompt_pass & (chunk[seq_ids] >= TILED_MIN_TOKENS)
        grouped = np.zeros(len(seq_ids), bool)
        for seq in np.nonzero(chunk >= GROUP_TOKENS)[0]:
            rows = np.nonzero(prompt_pass & (seq_ids == seq))[0]
            grouped[rows[:len(rows) - len(rows) % GROUP_TOKENS]] = True
        return KernelOrder(prompt_pass, tiled, grouped)


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix [n_rows, n_cols] ready for the kernels (one row per output feature)."""
    type_name: str
    n_rows: int
    n_cols: int
    act_format: str               # how activations are prepared (see ACT_FORMAT)
    group: int                    # weights per scale group (int8 formats), 0 for float
    w: np.ndarray | None = None   # [n_tiles, n_cols, FLOAT_ROW_TILE] f32, or f16 bits (uint16) for F16,
                                  # rows transposed (float formats)
    # int8 formats, all in tiles of ROW_TILE rows (kernels.tile_rows). K-quants: see
    # kquants.pack_k. 32-blocks: q [n_tiles, n_blocks, 32, ROW_TILE] int8 with ROW_TILE
    # rows interleaved (Q4_0/Q4_1: [n_tiles, n_blocks, 16, ROW_TILE] uint8, the packed nibble
    # bytes, or [n_tiles, n_blocks, 4, ROW_TILE, 4] groups of 4 for the AVX2 kernel, with f16
    # scale/minimum bits; on AVX2 the int8 types [n_tiles, n_blocks, 8, ROW_TILE, 4], uint8 plus
    # 128 with VNNI), scale/minimum [n_tiles, n_blocks, ROW_TILE] (rows padded to the tile).
    q: np.ndarray | None = None
    scale: np.ndarray | None = None
    minimum: np.ndarray | None = None  # zeros for symmetric types
    sub_scales: np.ndarray | None = None  # K-quants: integer sub-block scales (kquants.pack_k)

    @property
    def act_key(self) -> tuple[str, int]:
        return self.act_format, self.group


def float_rows(type_name: str, data: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    if type_name == "F32":
        return np.asarray(data, dtype=np.float32).reshape(n_rows, n_cols)  # a view of the mmap
    if type_name == "F16":
        return np.asarray(data).view(np.float16).reshape(n_rows, n_cols).astype(np.float32)
    if type_name == "BF16":
        bits = np.asarray(data).view(np.uint16).reshape(n_rows, n_cols).astype(np.uint32) << 16
        return bits.view(np.float32)
    raise ValueError(type_name)


def pack_weight(type_name: str, data: np.ndarray, n_rows: int, n_cols: int,
                simd: bool | None = None) -> PackedWeight:
    """Turn a GGUF tensor's bytes into the kernels' layout. `simd` picks the layout of the
    AVX2 kernels for 32-weight blocks (default: where this CPU has AVX2) or of the portable ones."""
    fmt = ACT_FORMAT[type_name]
    if fmt in ("f32", "f16", "bf16"):   # transposed in row tiles: [tiles, K, R]
        # F16 stays f16 (its bits, uint16: the kernel widens each weight as it reads it, and a
        # decode step reads half the bytes); F32 as it is, BF16 widened to f32
        rows = np.asarray(data).view(np.uint16).reshape(n_rows, n_cols) if type_name == "F16" \
            else float_rows(type_name, data, n_rows, n_cols)
        return PackedWeight(type_name, n_rows, n_cols, fmt, 0,
                            w=tile_rows(rows.reshape(n_rows, 1, n_cols), FLOAT_ROW_TILE)[:, 0])
    if n_rows > PACK_CHUNK_ROWS:
        return _pack_in_chunks(type_name, data, n_rows, n_cols, simd)
    if type_name in ("Q4_0", "Q4_1"):
        return _pack_q4(type_name, data, n_rows, n_cols, AVX2 if simd is None else simd)
    if fmt == "q8_k_rows":   # kquants.py: int8 quants, integer sub-block scales
        q, sub, d, dmin = pack_k(type_name, data, n_rows, n_cols)
        return PackedWeight(type_name, n_rows, n_cols, fmt, 256, q=q, scale=d, minimum=dmin, sub_scales=sub)
    q, scale, minimum, group = blocks.unpack(type_name, data, n_rows, n_cols)
    n_groups = n_cols // group
    if minimum is None:
        minimum = np.zeros_like(scale)
    # 32-weight blocks: interleave ROW_TILE rows (padded with zero rows) for matmul_q32_lanes
    tiles = tile_rows(q.reshape(n_rows, n_groups, 32))    # [tiles, NB, 32, R]
    if AVX2 if simd is None else simd:   # -> [tiles, NB, 8, R, 4]: weights 4i..4i+3 per row
        tiles = np.ascontiguousarray(tiles.reshape(tiles.shape[0], n_groups, 8, 4, ROW_TILE).transpose(0, 1, 2, 4, 3))
        if VNNI_ROWS:   # plus 128, unsigned: vpdpbusd's unsigned operand (simd.int8_dot)
            tiles = (tiles.view(np.uint8) ^ np.uint8(INT8_BIAS))
    return PackedWeight(type_name, n_rows, n_cols, fmt, group, q=tiles,
                        scale=tile_rows(scale), minimum=tile_rows(minimum))


PACK_CHUNK_ROWS = 4096   # a multiple of ROW_TILE


def _pack_in_chunks(type_name: str, data: np.ndarray, n_rows: int, n_cols: int, simd) -> PackedWeight:
    """pack_weight for a large matrix (an output projection: 49152 rows for SmolLM2), a few
    thousand rows at a time into the final arrays, so that loading never holds the whole
    matrix twice (unpacked, then tiled)."""
    out = None
    for r0 in range(0, n_rows, PACK_CHUNK_ROWS):
        rows = min(PACK_CHUNK_ROWS, n_rows - r0)
        part = pack_weight(type_name, data[r0:r0 + rows], rows, n_cols, simd)
        if out is None:   # the first chunk (PACK_CHUNK_ROWS rows) tells the arrays' layout
            unit = ROW_TILE if part.q.shape[0] != rows else 1   # row tiles, or one entry per row
            full = -(-n_rows // unit)
            out = {name: np.empty((full,) + getattr(part, name).shape[1:], getattr(part, name).dtype)
                   for name in ("q", "scale", "minimum", "sub_scales") if getattr(part, name) is not None}
        for name, arr in out.items():
            arr[r0 // unit:r0 // unit + getattr(part, name).shape[0]] = getattr(part, name)
    return PackedWeight(type_name, n_rows, n_cols, part.act_format, part.group, **out)


def _pack_q4(type_name: str, data, n_rows: int, n_cols: int, simd: bool) -> PackedWeight:
    """Q4_0 (f16 d, 16 nibble bytes) / Q4_1 (f16 d, f16 m, 16 nibble bytes) per 32 weights:
    the nibble bytes are kept as they are, only regrouped into row tiles."""
    block_bytes, _ = blocks.BLOCK_SIZES[type_name]
    n_blocks = n_cols // 32
    raw = np.asarray(data, np.uint8).reshape(n_rows, n_blocks, block_bytes)
    # scales stay f16 (as uint16 bits): the kernel widens them, and weight traffic is ggml's
    d = np.ascontiguousarray(raw[:, :, 0:2]).view(np.uint16)[..., 0]
    if type_name == "Q4_1":
        m = np.ascontiguousarray(raw[:, :, 2:4]).view(np.uint16)[..., 0]
        qs = raw[:, :, 4:20]
    else:
        m = np.zeros_like(d)
        qs = raw[:, :, 2:18]
    tiles = tile_rows(qs)   # [tiles, NB, 16 bytes, R]
    if simd:   # -> [tiles, NB, 4 slots, R, 4]: slot i = bytes 4i..4i+3 (simd._make_dot)
        tiles = np.ascontiguousarray(tiles.reshape(tiles.shape[0], n_blocks, 4, 4, ROW_TILE).transpose(0, 1, 2, 4, 3))
    return PackedWeight(type_name, n_rows, n_cols, ACT_FORMAT[type_name], 32, q=tiles,
                        scale=tile_rows(d), minimum=tile_rows(m))


def pack_tensor(tensor) -> PackedWeight:
    """Pack a GGUFTensor of gguf_file.py (shape is stored innermost-first: [n_cols, n_rows])."""
    n_cols, n_rows = int(tensor.shape[0]), int(tensor.shape[1])
    return pack_weight(tensor.tensor_type.name, tensor.data, n_rows, n_cols)


def round_f16(a: np.ndarray) -> np.ndarray:
    """a rounded to f16 values (the activations of F16 weights, as ggml converts them)."""
    x = np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty_like(x)
    round_f16_array(x.reshape(-1), out.reshape(-1))
    return out


def round_bf16(a: np.ndarray) -> np.ndarray:
    """f32 -> bf16 -> f32 with round-to-nearest-even, as ggml_compute_fp32_to_bf16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


class Activations(NamedTuple):
    """Activations prepared for one kind of weight: float rows, or int8 quants and scales.
    (A named tuple: made for every product of a decode step, where a frozen dataclass's
    construction cost a microsecond of the step's Python.)"""
    x: np.ndarray | None = None    # [T, K] f32
    q: np.ndarray | None = None    # [T, G, NG] int8
    d: np.ndarray | None = None    # [T, NG] f32
    s: np.ndarray | None = None    # [T, NG] f32

    @property
    def n_tokens(self) -> int:
        return (self.x if self.x is not None else self.q).shape[0]


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
    d = np.empty((n_tokens, n_groups), np.float32)
    s = np.empty((n_tokens, n_groups), np.float32)
    if act_format == "q8_k_rows":   # s holds the sums of each 16 quants (bsums)
        q = np.empty((n_tokens, n_cols), np.int8)
        bsums = np.empty((n_tokens, n_groups, 16), np.int32)
        if n_tokens >= PARALLEL_ROWS:
            quantize_q8_k_rows_parallel(x, q, d, bsums, row_parts(n_tokens))
        else:
            quantize_q8_k_rows(x, q, d, bsums)
        return Activations(q=q, d=d, s=bsums)
    q = np.empty((n_tokens, n_groups, 32), np.int8)
    # d and s come back rounded to f16, as ggml stores them
    if n_tokens >= PARALLEL_ROWS:
        quantize_q8_blocks_parallel(x, q, d, s, row_parts(n_tokens))
    else:
        quantize_q8_blocks(x, q, d, s)
    return Activations(q=q, d=d, s=s)


def tinyblas_rows(order: KernelOrder, w: PackedWeight) -> np.ndarray:
    """[T] bool: the tokens whose product with float weights w goes through tinyBLAS."""
    return order.tinyblas & (w.n_rows % TINYBLAS_ROWS == 0)


def matmul(act: Activations, w: PackedWeight, order: KernelOrder | None = None) -> np.ndarray:
    """[T, K] activations times the weight's transpose -> [T, n_rows] f32, each token summed
    in the order llama.cpp would use for it (None: KernelOrder.of's defaults)."""
    if order is None:
        order = KernelOrder.of(act.n_tokens)
    if w.w is not None:
        n_tokens = act.x.shape[0]
        out = np.empty((n_tokens, w.w.shape[0] * w.w.shape[2]), np.float32)
        matmul_float_tiles(act.x, w.w, tinyblas_rows(order, w), w.act_format == "f16", out)
        return out[:, :w.n_rows] if out.shape[1] != w.n_rows else out
    if w.act_format == "q8_k_rows":
        out = np.empty((act.q.shape[0], w.q.shape[0] * ROW_TILE), np.float32)
        if w.type_name == "Q4_K" and w.q.dtype == np.uint8 and repacked_order(w.type_name, w.n_rows):
            matmul_q4_k_repacked(act.q, act.d, act.s, w.q, w.sub_scales, w.scale, w.minimum, order.grouped, out)
        elif w.type_name in ("Q4_K", "Q5_K"):
            matmul_q4_k(act.q, act.d, act.s, w.q, w.sub_scales, w.scale, w.minimum,
                        repacked_order(w.type_name, w.n_rows), order.tiled, order.grouped,
                        w.type_name == "Q5_K", out)
        else:   # Q2_K, Q3_K, Q6_K
            matmul_k16(act.q, act.d, act.s, w.q, w.sub_scales, w.scale, w.minimum,
                       32 if w.type_name == "Q6_K" else 0, offset_starts(act.q, w.type_name), order.tiled, out)
        return out[:, :w.n_rows] if out.shape[1] != w.n_rows else out
    out = np.empty((act.q.shape[0], w.q.shape[0] * ROW_TILE), np.float32)
    whole_blocks = repacked_order(w.type_name, w.n_rows)
    if w.type_name in ("Q4_0", "Q4_1") and w.q.ndim == 5:   # groups of 4 bytes for simd.q4_dot
        if w.type_name == "Q4_1":
            corr = np.zeros(0, np.int32)
        else:   # Q4_0's nibbles are weight + 8: minus 8 x each lane's (or block's) activations
            corr = offset_sums(act.q, 8, True, whole_blocks)
            corr = np.ascontiguousarray(corr[:, :, 0]) if whole_blocks else corr
        matmul_q4_dot(act.q, act.d, act.s, w.q, w.scale, w.minimum, corr, out)
    elif w.type_name in ("Q4_0", "Q4_1"):
        matmul_q4_lanes(act.q, act.d, act.s, w.q, w.scale, w.minimum, 8 if w.type_name == "Q4_0" else 0,
                        w.type_name == "Q4_1", whole_blocks, out)
    elif w.q.ndim == 5 and w.q.dtype == np.uint8:   # 4-byte groups, plus 128, for simd.int8_dot
        corr = offset_sums(act.q, INT8_BIAS, False, False)   # minus 128 x each lane's activations
        matmul_int8_dot(act.q, act.d, act.s, w.q, w.scale, w.minimum, w.act_format == "q8_1", corr, out)
    elif w.q.ndim == 5:   # 4-byte groups for simd.q8_lanes
        matmul_q32_simd(act.q, act.d, act.s, w.q, w.scale, w.minimum, w.act_format == "q8_1", out)
    else:
        matmul_q32_lanes(act.q, act.d, act.s, w.q, w.scale, w.minimum, w.act_format == "q8_1", out)
    return out[:, :w.n_rows] if out.shape[1] != w.n_rows else out


def repacked_order(type_name: str, n_rows: int) -> bool:
    """Whether llama.cpp multiplies this matrix with its repacked kernels rather than
    ggml_vec_dot, which changes the order of the float sums (not the integer ones). On AVX2 it
    repacks Q4_0 and Q4_K matrices whose row count is a multiple of 8 (ggml-cpu/repack.cpp,
    ggml_repack_get_optimal_repack_type), and the 8x8 kernels sum each block into one
    accumulator per row."""
    return type_name in ("Q4_0", "Q4_K") and n_rows % 8 == 0


def linear(x: np.ndarray, *weights: PackedWeight, order: KernelOrder | None = None) -> list[np.ndarray]:
    """x [T, K] times each weight; activations are prepared once per format (q, k and v share)."""
    prepared: dict = {}
    outs = []
    for w in weights:
        key = w.act_key
        if key not in prepared:
            prepared[key] = prepare(x, *key)
        outs.append(matmul(prepared[key], w, order))
    return outs
