"""Unpack GGUF quantized blocks into one common form the kernels read:

    q      [n_rows, n_cols]    int8   the integer quant of every weight
    scale  [n_rows, n_groups]  f32    one scale per group of `group` consecutive weights
    minimum[n_rows, n_groups]  f32    one offset per group, or None for symmetric types

so that  weight = scale * q + minimum.  Every GGUF type, legacy or K-quant, fits this form:
a K-quant super-block of 256 weights is 8 groups of 32 (Q4_K, Q5_K) or 16 groups of 16 (Q2_K,
Q3_K, Q6_K) whose scales are the super-block scale times a small integer sub-scale.

These are plain NumPy, written to be read next to ggml's block structs; the tests compare
`scale * q + minimum` with gguf-py's `quants.dequantize` for every type.
"""
from __future__ import annotations

import numpy as np

QK_K = 256

# bytes per block and weights per block, as in ggml
BLOCK_SIZES = {
    "Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q5_1": (24, 32), "Q8_0": (34, 32),
    "Q2_K": (84, 256), "Q3_K": (110, 256), "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256),
}


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The f16 stored at byte `at` of every block, as f32 [n_blocks, 1]."""
    return np.ascontiguousarray(raw[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles are weights 0..15, high nibbles weights 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(raw: np.ndarray, at: int) -> np.ndarray:
    """Q5_0/Q5_1: a little-endian u32 whose bit j is the 5th bit of weight j -> [n, 32]."""
    qh = np.ascontiguousarray(raw[:, at:at + 4]).view("<u4")
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def unpack_q4_0(raw):
    """Q4_0 = f16 scale d + 16 bytes of nibbles per 32 weights; w = d * (nibble - 8)."""
    q = _nibbles(raw[:, 2:18]).astype(np.int8) - 8
    return q, _f16(raw, 0), None, 32


def unpack_q4_1(raw):
    """Q4_1 = f16 scale d, f16 min m, 16 bytes of nibbles per 32 weights; w = d * nibble + m."""
    return _nibbles(raw[:, 4:20]).astype(np.int8), _f16(raw, 0), _f16(raw, 2), 32


def unpack_q5_0(raw):
    """Q5_0 = f16 d, u32 of 5th bits, 16 bytes of nibbles per 32 weights; w = d * (q5 - 16)."""
    q = _nibbles(raw[:, 6:22]) | (_high_bits(raw, 2) << 4)
    return q.astype(np.int8) - 16, _f16(raw, 0), None, 32


def unpack_q5_1(raw):
    """Q5_1 = f16 d, f16 m, u32 of 5th bits, 16 bytes of nibbles per 32 weights; w = d * q5 + m."""
    q = _nibbles(raw[:, 8:24]) | (_high_bits(raw, 4) << 4)
    return q.astype(np.int8), _f16(raw, 0), _f16(raw, 2), 32


def unpack_q8_0(raw):
    """Q8_0 = f16 d + 32 int8 per 32 weights; w = d * q."""
    return np.ascontiguousarray(raw[:, 2:34]).view(np.int8), _f16(raw, 0), None, 32


def unpack_q2_k(raw):
    """Q2_K (84 bytes / 256 weights) = 16 bytes of 4-bit (scale | min << 4) per group of 16,
    64 bytes of 2-bit quants, f16 d, f16 dmin; w = d*scale*q - dmin*min.
    The quants of 128 weights share 32 bytes: 4 bit-planes (shift 0,2,4,6) of 32 values."""
    sc = raw[:, 0:16]
    qs = raw[:, 16:80]
    d, dmin = _f16(raw, 80), _f16(raw, 82)
    q = np.concatenate([(qs[:, 32 * h:32 * h + 32] >> (2 * j)) & 3
                        for h in range(2) for j in range(4)], axis=1).astype(np.int8)
    return q, d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32)), 16


def _q3_k_scales(sc12: np.ndarray) -> np.ndarray:
    """Q3_K packs 16 six-bit scales into 12 bytes: low 4 bits in bytes 0..7, high 2 bits in
    bytes 8..11. Returns [n, 16] int scales in -32..31."""
    a = np.ascontiguousarray(sc12).view("<u4")            # [n, 3]
    m1, m2 = np.uint32(0x03030303), np.uint32(0x0F0F0F0F)
    tmp = a[:, 2]
    out = np.stack([
        (a[:, 0] & m2) | (((tmp >> 0) & m1) << 4),
        (a[:, 1] & m2) | (((tmp >> 2) & m1) << 4),
        ((a[:, 0] >> 4) & m2) | (((tmp >> 4) & m1) << 4),
        ((a[:, 1] >> 4) & m2) | (((tmp >> 6) & m1) << 4),
    ], axis=1).astype("<u4")
    return out.view(np.int8).astype(np.int32) - 32


def unpack_q3_k(raw):
    """Q3_K (110 bytes / 256 weights) = 32 bytes of high-bit masks, 64 bytes of 2-bit quants,
    12 bytes of 6-bit scales (one per group of 16), f16 d; w = d*scale*(q2 - 4*(1 - hbit))."""
    hm = raw[:, 0:32]
    qs = raw[:, 32:96]
    scales = _q3_k_scales(raw[:, 96:108])
    d = _f16(raw, 108)
    q = np.concatenate([((qs[:, 32 * h:32 * h + 32] >> (2 * j)) & 3).astype(np.int8)
                        - np.where(hm & (1 << (4 * h + j)), 0, 4).astype(np.int8)
                        for h in range(2) for j in range(4)], axis=1)
    return q, d * scales.astype(np.float32), None, 16


def _k4_scales_mins(sc12: np.ndarray):
    """Q4_K/Q5_K pack 8 six-bit scales and 8 six-bit mins into 12 bytes -> two [n, 8]."""
    s = sc12.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def unpack_q4_k(raw):
    """Q4_K (144 bytes / 256 weights) = f16 d, f16 dmin, 12 bytes of 6-bit scales and mins (one
    pair per group of 32), 128 bytes of nibbles; w = d*scale*q - dmin*min.
    Each 32 bytes of nibbles hold 64 weights: low nibbles first, then high nibbles."""
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _k4_scales_mins(raw[:, 4:16])
    qs = raw[:, 16:144]
    q = np.concatenate([part for c in range(4)
                        for part in (qs[:, 32 * c:32 * c + 32] & 0x0F, qs[:, 32 * c:32 * c + 32] >> 4)],
                       axis=1).astype(np.int8)
    return q, d * sc, -(dmin * mn), 32


def unpack_q5_k(raw):
    """Q5_K (176 bytes / 256 weights) = Q4_K plus 32 bytes whose bit c of byte l is the 5th bit
    of weight l of group c."""
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _k4_scales_mins(raw[:, 4:16])
    qh = raw[:, 16:48]
    qs = raw[:, 48:176]
    parts = []
    for c in range(4):
        lo = qs[:, 32 * c:32 * c + 32]
        parts.append((lo & 0x0F) | (((qh >> (2 * c)) & 1) << 4))
        parts.append((lo >> 4) | (((qh >> (2 * c + 1)) & 1) << 4))
    return np.concatenate(parts, axis=1).astype(np.int8), d * sc, -(dmin * mn), 32


def unpack_q6_k(raw):
    """Q6_K (210 bytes / 256 weights) = 128 bytes of low nibbles, 64 bytes of 2-bit highs,
    16 int8 scales (one per group of 16), f16 d; w = d*scale*(q6 - 32)."""
    ql = raw[:, 0:128]
    qh = raw[:, 128:192]
    scales = np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(raw, 208)
    parts = []
    for n in range(2):
        l = ql[:, 64 * n:64 * n + 64]
        h = qh[:, 32 * n:32 * n + 32]
        parts += [(l[:, :32] & 0x0F) | (((h >> 0) & 3) << 4),
                  (l[:, 32:] & 0x0F) | (((h >> 2) & 3) << 4),
                  (l[:, :32] >> 4) | (((h >> 4) & 3) << 4),
                  (l[:, 32:] >> 4) | (((h >> 6) & 3) << 4)]
    q = np.concatenate(parts, axis=1).astype(np.int8) - 32
    return q, d * scales, None, 16


UNPACKERS = {
    "Q4_0": unpack_q4_0, "Q4_1": unpack_q4_1, "Q5_0": unpack_q5_0, "Q5_1": unpack_q5_1,
    "Q8_0": unpack_q8_0, "Q2_K": unpack_q2_k, "Q3_K": unpack_q3_k, "Q4_K": unpack_q4_k,
    "Q5_K": unpack_q5_k, "Q6_K": unpack_q6_k,
}


def unpack(type_name: str, data: np.ndarray, n_rows: int, n_cols: int):
    """Unpack a tensor's raw bytes (uint8, any shape) into (q, scale, minimum, group) with
    q [n_rows, n_cols] and scale/minimum [n_rows, n_cols // group]."""
    block_bytes, block_weights = BLOCK_SIZES[type_name]
    n_blocks = n_rows * n_cols // block_weights
    raw = np.asarray(data, dtype=np.uint8).reshape(n_blocks, block_bytes)
    q, scale, minimum, group = UNPACKERS[type_name](raw)
    n_groups = n_cols // group
    q = np.ascontiguousarray(q).reshape(n_rows, n_cols)
    scale = np.ascontiguousarray(scale, dtype=np.float32).reshape(n_rows, n_groups)
    if minimum is not None:
        minimum = np.ascontiguousarray(minimum, dtype=np.float32).reshape(n_rows, n_groups)
    return q, scale, minimum, group


def dequantize(type_name: str, data: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """weight = scale * q + minimum, as f32 [n_rows, n_cols] (the plain-NumPy twin of the kernels)."""
    q, scale, minimum, group = unpack(type_name, data, n_rows, n_cols)
    w = q.reshape(n_rows, -1, group).astype(np.float32) * scale[:, :, None]
    if minimum is not None:
        w += minimum[:, :, None]
    return w.reshape(n_rows, n_cols)
