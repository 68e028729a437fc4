"""A slot's saved state (POST /slots/N?action=save|restore): llama.cpp's state-file header and
token list, then the slot's K/V cells in numllama's own layout.

    u32 magic 'ggsq'  u32 version  u32 n_words  | n_words u32 words: the tokens |  K/V (.npz)

The words are llama-server's packed token state (LLAMA_TOKEN_NULL, its version, the tokens as a
length-prefixed list, an empty list of media) or, as servers before it wrote them, the plain
token list; both read back. The K/V that follows is NumPy's .npz of numllama's cells (K, V and
the model's shape), not llama.cpp's tensor layout: a file moves between numllama servers of the
same model, not between numllama and llama-server.
"""
from __future__ import annotations

import io
import struct

import numpy as np

STATE_SEQ_MAGIC = 0x67677371     # 'ggsq', llama.h's LLAMA_STATE_SEQ_MAGIC
STATE_SEQ_VERSION = 3            # LLAMA_STATE_SEQ_VERSION
TOKEN_NULL = 0xFFFFFFFF          # LLAMA_TOKEN_NULL as u32: marks the packed token state
TOKENS_STATE_VERSION = 1         # llama-server's SERVER_TOKENS_STATE_VERSION
HEADER = struct.Struct("<III")


class SlotFileError(ValueError):
    pass


def write_slot_file(f, tokens: list[int], k: np.ndarray, v: np.ndarray, shape: np.ndarray) -> None:
    words = np.array([TOKEN_NULL, TOKENS_STATE_VERSION, len(tokens), *tokens, 0], dtype=np.uint32)
    f.write(HEADER.pack(STATE_SEQ_MAGIC, STATE_SEQ_VERSION, len(words)))
    f.write(words.tobytes())
    np.savez(f, k=k, v=v, shape=shape)


def read_slot_file(data: bytes) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, K, V, model shape) of a slot file."""
    if len(data) < HEADER.size:
        raise SlotFileError("not a slot state file")
    magic, version, n_words = HEADER.unpack_from(data)
    if magic != STATE_SEQ_MAGIC:
        raise SlotFileError("not a slot state file (bad magic)")
    end = HEADER.size + 4 * n_words
    if end > len(data):
        raise SlotFileError("the slot state file is cut short")
    words = np.frombuffer(data, np.uint32, n_words, HEADER.size)
    tokens = _tokens(words)
    try:
        with np.load(io.BytesIO(data[end:])) as kv:
            return tokens, kv["k"], kv["v"], kv["shape"]
    except (ValueError, KeyError, OSError) as e:
        raise SlotFileError(f"the slot state file holds no K/V numllama can read: {e}") from None


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
