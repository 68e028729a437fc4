"""Embeddings: a sequence's hidden states pooled into one vector, then normalized, in the order
llama.cpp computes them (llm_graph_context::build_pooling and common_embd_normalize).

The hidden states are the rows of the final norm, before the output projection (llama.cpp's
`t_embd`), one per token: [T, n_embd]. A pooling type turns a sequence's rows into one vector:

    none   every token's row, as it is
    mean   the average of the sequence's rows
    cls    the row of its first token
    last   the row of its last token
    rank   the cls or last row (last for causal models), through the file's classifier head
           when it has one: a relevance score for /rerank

Mean pooling is a matrix product in llama.cpp: the batch's rows, transposed, times a
[n_tokens, n_seqs] matrix whose column s holds 1/n_s at the tokens of sequence s and 0 elsewhere.
So its sum runs over every token of the batch (another sequence's tokens add exact zeros) in the
order of an f32 matmul: ggml_vec_dot_f32 when the batch holds one sequence, tinyBLAS when it holds
several (and the batch's length is a multiple of 8). `mean_pool` makes the same product with the
same kernel, so the bits agree.
"""
from __future__ import annotations

import numpy as np

from .float_ops import expf_array
from .quants import KernelOrder
from .quants.kernels import matmul_float

# common_embd_normalize's embd_normalize values: -1 none, 0 max-absolute (int16 range), 2 euclidean,
# p > 2 the p-norm; 2 is llama-server's default
NORM_NONE, NORM_MAX_ABS, NORM_EUCLIDEAN = -1, 0, 2
INT16_RANGE = 32760.0   # max-absolute scaling puts the largest element at this


def mean_pool(hidden: np.ndarray, seq_ids: np.ndarray, seqs: list[int]) -> np.ndarray:
    """The mean of each sequence's rows, as llama.cpp's ggml_mul_mat(transpose(hidden), inp_mean).

    hidden: [T, n_embd] f32, the whole batch; seq_ids: [T] i32; seqs: the sequences to pool, in the
    batch's order. Returns [len(seqs), n_embd] f32."""
    n_tokens = len(seq_ids)
    weights = np.zeros((len(seqs), n_tokens), np.float32)         # inp_mean, one row per sequence
    for s, seq in enumerate(seqs):
        rows = seq_ids == seq
        weights[s, rows] = np.float32(1.0) / np.float32(np.count_nonzero(rows))
    hidden_t = np.ascontiguousarray(hidden.T)                      # [n_embd, T]
    out = np.empty((len(seqs), hidden.shape[1]), np.float32)
    matmul_float(weights, hidden_t, KernelOrder.columns(len(seqs)).tinyblas, False, out)
    return out


def first_or_last_rows(positions: np.ndarray, seq_ids: np.ndarray, seqs: list[int], last: bool) -> list[int]:
    """For each sequence, the batch row of its first (cls) or last token (llm_graph_input_cls)."""
    rows = []
    for seq in seqs:
        mine = np.nonzero(seq_ids == seq)[0]
        pick = np.argmax(positions[mine]) if last else np.argmin(positions[mine])
        rows.append(int(mine[pick]))
    return rows


def normalize(v: np.ndarray, embd_norm: int) -> np.ndarray:
    """common_embd_normalize: v divided by its norm, summed in double as llama.cpp sums it.

    v: [n] f32 -> [n] f32"""
    v = np.asarray(v, np.float32)
    if embd_norm == NORM_NONE:
        total = 1.0
    elif embd_norm == NORM_MAX_ABS:
        total = float(np.max(np.abs(v))) / INT16_RANGE if len(v) else 0.0
    elif embd_norm == NORM_EUCLIDEAN:
        squares = (v * v).astype(np.float64)           # each product rounded to f32, as in C
        total = float(np.sqrt(_sum_in_order(squares)))
    else:   # p-norm with C's pow in double, which overflows to inf (or 0) where Python's raises
        with np.errstate(all="ignore"):
            powers = np.power(np.abs(v).astype(np.float64), np.float64(embd_norm))
            total = float(np.power(np.float64(_sum_in_order(powers)), np.float64(1.0) / np.float64(embd_norm)))
    with np.errstate(all="ignore"):   # (1/inf is 0, as in C)
        scale = np.float32(1.0 / total) if total > 0.0 else np.float32(0.0)
        return v * scale


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """ggml_soft_max over each row of a few classes (a reranker head's [n_seqs, n_cls_out]): f32
    exponentials (fewer than 8 classes take ggml's scalar path, libm's expf) summed in double,
    then scaled by the f32 reciprocal."""
    out = np.empty_like(x, dtype=np.float32)
    for r, row in enumerate(np.asarray(x, np.float32)):
        e = expf_array(row - row.max())
        out[r] = e * np.float32(1.0 / _sum_in_order(e.astype(np.float64)))
    return out


def _sum_in_order(values: np.ndarray) -> float:
    """A left-to-right double sum (NumPy's sum pairs terms, which rounds differently)."""
    total = 0.0
    for x in values.tolist():
        total += x
    return total
