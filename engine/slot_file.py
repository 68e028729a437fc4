"""A slot's saved state (POST /slots/N?action=save|restore), in llama.cpp's sequence-state file
format, so that a file moves between numllama and llama-server both ways (same model, same
--parallel / --kv-unified: the number of KV streams is part of the file).

    u32 magic 'ggsq'  u32 version 3  u32 n_words | n_words u32: the tokens |  the KV memory

The words are llama-server's packed token state (LLAMA_TOKEN_NULL, its version, the tokens as a
length-prefixed list, an empty list of media) or, as servers before it wrote them, the plain
token list; both read back. The KV memory is llama_kv_cache::state_write's (src/llama-kv-cache.cpp),
once, or for a model with sliding-window layers twice (llama_kv_cache_iswa: the other layers,
then the sliding-window ones, whose cells are only the window's last n_swa positions):

    u32 n_stream, then per stream: u32 cell_count (0: an empty stream, nothing follows), then
      per cell:  i32 pos, u32 n_seq_id (1), i32 seq_id
      u32 v_trans, u32 n_layer
      per layer: i32 type (1: f16), u64 row bytes, cell_count rows of n_head_kv * head_dim keys
      per layer: the values, likewise (v_trans 0); with v_trans 1: i32 type, u32 element bytes,
                 u32 row length, then per element j of a row, that element of every cell

Files numllama wrote before this format (K/V as NumPy's .npz after the tokens) still read.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

STATE_SEQ_MAGIC = 0x67677371     # 'ggsq', llama.h's LLAMA_STATE_SEQ_MAGIC
STATE_SEQ_VERSION = 3            # LLAMA_STATE_SEQ_VERSION
TOKEN_NULL = 0xFFFFFFFF          # LLAMA_TOKEN_NULL as u32: marks the packed token state
TOKENS_STATE_VERSION = 1         # llama-server's SERVER_TOKENS_STATE_VERSION
GGML_TYPE_F16 = 1                # the cache's type, numllama's and llama-server's default
F16_BYTES = 2
HEADER = struct.Struct("<III")
ZIP_MAGIC = b"PK\x03\x04"        # (the .npz of files numllama wrote before)


class SlotFileError(ValueError):
    pass


@dataclass(frozen=True)
class CacheShape:
    """What a state file must agree with: the model's K/V rows and layers, and how llama-server
    would lay out the cache for the same server options."""
    n_layer: int
    n_head_kv: int
    head_dim: int
    swa_layers: tuple = ()   # the sliding-window layers (they form a memory of their own)
    n_swa: int = 0
    n_stream: int = 1        # llama-server: 1 with a unified KV cache, else one per slot
    stream: int = 0          # which stream holds the slot's cells (its id, when not unified)
    seq_id: int = 0          # the slot's sequence (its id)

    def memories(self) -> list[tuple[list[int], bool]]:
        """(layers, sliding-window?) of each KV memory, in the file's order."""
        if not self.swa_layers:
            return [(list(range(self.n_layer)), False)]
        base = [il for il in range(self.n_layer) if il not in self.swa_layers]
        return [(base, False), (sorted(self.swa_layers), True)]


def write_slot_file(f, tokens: list[int], k: np.ndarray, v: np.ndarray, shape: CacheShape) -> None:
    """k, v: [n_layer, n_head_kv, n, head_dim] uint16 (f16 bits) of cells 0 .. n - 1, which
    hold the positions 0 .. n - 1 (n = len(tokens))."""
    n = k.shape[2]
    words = np.array([TOKEN_NULL, TOKENS_STATE_VERSION, len(tokens), *tokens, 0], dtype=np.uint32)
    f.write(HEADER.pack(STATE_SEQ_MAGIC, STATE_SEQ_VERSION, len(words)))
    f.write(words.tobytes())
    for layers, swa in shape.memories():
        first = max(0, n - shape.n_swa) if swa else 0   # (llama.cpp's is_masked_swa: p1 - p0 >= n_swa)
        cells = np.arange(first, n)
        f.write(struct.pack("<I", shape.n_stream))
        for s in range(shape.n_stream):
            if s != shape.stream or len(cells) == 0:
                f.write(struct.pack("<I", 0))
                continue
            f.write(struct.pack("<I", len(cells)))
            meta = np.zeros((len(cells), 3), np.int32)   # pos, n_seq_id, seq_id
            meta[:, 0], meta[:, 1], meta[:, 2] = cells, 1, shape.seq_id
            f.write(meta.tobytes())
            f.write(struct.pack("<II", 0, len(layers)))   # (V not transposed: flash attention's cache)
            row_bytes = shape.n_head_kv * shape.head_dim * F16_BYTES
            for part in (k, v):
                for il in layers:
                    rows = part[il, :, first:n].transpose(1, 0, 2)   # [cells, n_head_kv, head_dim]
                    f.write(struct.pack("<iQ", GGML_TYPE_F16, row_bytes))
                    f.write(np.ascontiguousarray(rows, np.uint16).tobytes())


def read_slot_file(data: bytes, shape: CacheShape) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(tokens, K, V) of a state file, K and V as write_slot_file takes them (a sliding-window
    layer's cells before its window are zeros: no later token can see them)."""
    if len(data) < HEADER.size:
        raise SlotFileError("not a slot state file")
    magic, version, n_words = HEADER.unpack_from(data)
    if magic != STATE_SEQ_MAGIC:
        raise SlotFileError("not a slot state file (bad magic)")
    if version != STATE_SEQ_VERSION:
        raise SlotFileError(f"unsupported state file version {version}")
    end = HEADER.size + 4 * n_words
    if end > len(data):
        raise SlotFileError("the slot state file is cut short")
    tokens = _tokens(np.frombuffer(data, np.uint32, n_words, HEADER.size))
    if data[end:end + 4] == ZIP_MAGIC:
        return tokens, *_numllama_npz(data[end:], shape, len(tokens))
    reader = _Reader(data, end)
    n = len(tokens)
    k = np.zeros((shape.n_layer, shape.n_head_kv, n, shape.head_dim), np.uint16)
    v = np.zeros_like(k)
    for layers, swa in shape.memories():
        _read_memory(reader, shape, layers, swa, n, k, v)
    if reader.at != len(data):
        raise SlotFileError("the slot state file has bytes after its K/V cells")
    return tokens, k, v


class _Reader:
    def __init__(self, data: bytes, at: int):
        self.data, self.at = data, at

    def take(self, fmt: str):
        s = struct.Struct("<" + fmt)
        if self.at + s.size > len(self.data):
            raise SlotFileError("the slot state file is cut short")
        out = s.unpack_from(self.data, self.at)
        self.at += s.size
        return out if len(out) > 1 else out[0]

    def array(self, dtype, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.at + size > len(self.data):
            raise SlotFileError("the slot state file is cut short")
        out = np.frombuffer(self.data, dtype, count, self.at)
        self.at += size
        return out


def _read_memory(r: _Reader, shape: CacheShape, layers: list[int], swa: bool, n: int,
                 k: np.ndarray, v: np.ndarray) -> None:
    """One KV memory's streams into k, v (the one stream that holds cells)."""
    n_stream = r.take("I")
    if n_stream != shape.n_stream:
        raise SlotFileError(f"the state file has {n_stream} KV streams, this server {shape.n_stream} "
                            f"(llama-server: one per slot, or 1 with --kv-unified or without -np)")
    seen = False
    for _ in range(n_stream):
        count = r.take("I")
        if count == 0:
            continue
        if seen:
            raise SlotFileError("the state file holds cells of several slots")
        seen = True
        meta = r.array(np.int32, 3 * count).reshape(count, 3)
        first = n - count
        if np.any(meta[:, 1] != 1) or not np.array_equal(meta[:, 0], np.arange(first, n)) or \
                (first != 0 and not swa):
            raise SlotFileError("the state file's cells are not the positions of its tokens")
        v_trans, n_layer = r.take("II")
        if n_layer != len(layers):
            raise SlotFileError(f"the state file has {n_layer} layers, the model {len(layers)}: "
                                f"it was saved from a different model")
        row = shape.n_head_kv * shape.head_dim
        for part, transposed in ((k, False), (v, bool(v_trans))):
            for il in layers:
                if transposed:
                    kind, el_bytes, n_row = r.take("iII")
                    ok = el_bytes == F16_BYTES and n_row == row
                else:
                    kind, row_bytes = r.take("iQ")
                    ok = row_bytes == row * F16_BYTES
                if kind != GGML_TYPE_F16:
                    raise SlotFileError(f"the state file's cache type is {kind}, numllama's f16 ({GGML_TYPE_F16})")
                if not ok:
                    raise SlotFileError("the state file's K/V rows do not fit this model: it was saved from a "
                                        "different model")
                cells = r.array(np.uint16, count * row)
                cells = cells.reshape(row, count).T if transposed else cells.reshape(count, row)
                part[il, :, first:n] = cells.reshape(count, shape.n_head_kv, shape.head_dim).transpose(1, 0, 2)
    if not seen and n:
        raise SlotFileError("the state file holds tokens but no K/V cells")


def _numllama_npz(blob: bytes, shape: CacheShape, n: int) -> tuple[np.ndarray, np.ndarray]:
    """K/V of a file numllama wrote before it wrote llama.cpp's layout."""
    try:
        with np.load(io.BytesIO(blob)) as kv:
            k, v, saved = kv["k"], kv["v"], kv["shape"]
    except (ValueError, KeyError, OSError) as e:
        raise SlotFileError(f"the slot state file holds no K/V numllama can read: {e}") from None
    if list(saved[:3]) != [shape.n_layer, shape.n_head_kv, shape.head_dim]:
        raise SlotFileError("the state file was saved from a different model")
    if k.ndim != 4 or k.shape[2] != n or v.shape != k.shape:
        raise SlotFileError("the state file's tokens and K/V cells disagree")
    return k, v


def _tokens(words: np.ndarray) -> list[int]:
    if len(words) == 0 or words[0] != TOKEN_NULL:   # a plain token list (older servers)
        return words.astype(np.int64).tolist()
    if len(words) < 4 or words[1] != TOKENS_STATE_VERSION:
        raise SlotFileError("unsupported token state version")
    n = int(words[2])
    if 3 + n + 1 > len(words):
        raise SlotFileError("the token state is cut short")
    if words[3 + n] != 0:
        raise SlotFileError("the slot holds media, which numllama cannot restore")
    return words[3:3 + n].astype(np.int64).tolist()
