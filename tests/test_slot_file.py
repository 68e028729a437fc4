"""engine/slot_file.py: llama.cpp's state-file header and token list, then numllama's K/V."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from numllama.engine.slot_file import SlotFileError, read_slot_file, write_slot_file

SHAPE = np.array([2, 1, 4, 10], np.int64)


def _file(tokens):
    k = np.arange(2 * 1 * len(tokens) * 4, dtype=np.float32).reshape(2, 1, len(tokens), 4)
    f = io.BytesIO()
    write_slot_file(f, tokens, k, -k, SHAPE)
    return f.getvalue(), k


def test_round_trip_and_llama_server_layout():
    data, k = _file([5, 6, 7])
    assert struct.unpack_from("<III", data) == (0x67677371, 3, 3 + 4)       # 'ggsq', version, words
    assert struct.unpack_from("<7I", data, 12) == (0xFFFFFFFF, 1, 3, 5, 6, 7, 0)   # packed: null, v1, [5 6 7], no media
    tokens, k2, v2, shape = read_slot_file(data)
    assert tokens == [5, 6, 7] and np.array_equal(k2, k) and np.array_equal(v2, -k) and list(shape) == list(SHAPE)


def test_a_plain_token_list_reads_too():
    """Servers before the packed format wrote the tokens alone."""
    data, _ = _file([5, 6, 7])
    plain = struct.pack("<III", 0x67677371, 3, 3) + struct.pack("<3I", 5, 6, 7) + data[12 + 7 * 4:]
    assert read_slot_file(plain)[0] == [5, 6, 7]


@pytest.mark.parametrize("mangle, said", [
    (lambda d: b"xxxx" + d[4:], "bad magic"),
    (lambda d: d[:20], "cut short"),
    (lambda d: d[:12 + 6 * 4] + struct.pack("<I", 1) + d[12 + 7 * 4:], "media"),
    (lambda d: d[:12 + 7 * 4] + b"not npz", "no K/V"),
])
def test_bad_files_are_clear_errors(mangle, said):
    data, _ = _file([5, 6, 7])
    with pytest.raises(SlotFileError, match=said):
        read_slot_file(mangle(data))
