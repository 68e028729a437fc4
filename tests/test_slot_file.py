"""engine/slot_file.py: slot state files in llama.cpp's sequence-state layout. The units build
files by hand; the server tests replay files llama-server wrote (bench/compare_slot_files.py
--record): numllama writes the same bytes for the same request, and goes on from llama-server's
file as llama-server goes on from it."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct

import numpy as np
import pytest

from numllama.engine.slot_file import CacheShape, SlotFileError, read_slot_file, write_slot_file

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SHAPE = CacheShape(n_layer=2, n_head_kv=1, head_dim=4, n_stream=2, stream=1, seq_id=1)


def _kv(n, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 1 << 15, (shape.n_layer, shape.n_head_kv, n, shape.head_dim), dtype=np.uint16)
    return k, (k ^ np.uint16(0x1234))


def _file(tokens, shape=SHAPE):
    k, v = _kv(len(tokens), shape)
    f = io.BytesIO()
    write_slot_file(f, tokens, k, v, shape)
    return f.getvalue(), k, v


def test_round_trip_and_llama_cpp_layout():
    data, k, v = _file([5, 6, 7])
    assert struct.unpack_from("<III", data) == (0x67677371, 3, 3 + 4)       # 'ggsq', version, words
    assert struct.unpack_from("<7I", data, 12) == (0xFFFFFFFF, 1, 3, 5, 6, 7, 0)   # packed: null, v1, [5 6 7], no media
    at = 12 + 7 * 4
    # two streams (one per slot): the first empty, the second with the three cells
    assert struct.unpack_from("<III", data, at) == (2, 0, 3)
    assert struct.unpack_from("<9i", data, at + 12) == (0, 1, 1, 1, 1, 1, 2, 1, 1)   # (pos, n_seq_id, seq_id) x 3
    at += 12 + 36
    assert struct.unpack_from("<II", data, at) == (0, 2)                     # V not transposed, 2 layers
    assert struct.unpack_from("<iQ", data, at + 8) == (1, 8)                 # f16 rows of 1 x 4 values
    assert np.array_equal(np.frombuffer(data, np.uint16, 12, at + 20).reshape(3, 4), k[0, 0])
    tokens, k2, v2 = read_slot_file(data, SHAPE)
    assert tokens == [5, 6, 7] and np.array_equal(k2, k) and np.array_equal(v2, v)


def test_sliding_window_layers_are_a_second_memory_of_the_window_alone():
    shape = CacheShape(n_layer=3, n_head_kv=2, head_dim=2, swa_layers=(0, 2), n_swa=2)
    data, k, v = _file([1, 2, 3, 4, 5], shape)
    tokens, k2, v2 = read_slot_file(data, shape)
    assert np.array_equal(k2[1], k[1]) and np.array_equal(v2[1], v[1])            # the other layer: all cells
    assert np.array_equal(k2[[0, 2], :, 3:], k[[0, 2], :, 3:])                  # the window: the last 2 cells
    assert not k2[[0, 2], :, :3].any()                                          # (before it: nothing)
    at = 12 + 9 * 4 + 8 + 5 * 12
    n_base = 8 + 2 * (12 + 5 * 8)
    assert struct.unpack_from("<II", data, at + n_base) == (1, 2)               # second memory: 1 stream, 2 cells


def test_transposed_values_read_too():
    """llama-server without flash attention writes V transposed (element j of every cell)."""
    shape = CacheShape(n_layer=1, n_head_kv=1, head_dim=2)
    k, v = _kv(3, shape)
    words = np.array([0xFFFFFFFF, 1, 3, 7, 8, 9, 0], np.uint32)
    data = struct.pack("<III", 0x67677371, 3, len(words)) + words.tobytes()
    data += struct.pack("<II", 1, 3) + np.array([[0, 1, 0], [1, 1, 0], [2, 1, 0]], np.int32).tobytes()
    data += struct.pack("<II", 1, 1) + struct.pack("<iQ", 1, 4) + k[0, 0].tobytes()
    data += struct.pack("<iII", 1, 2, 2) + np.ascontiguousarray(v[0, 0].T).tobytes()
    tokens, k2, v2 = read_slot_file(data, shape)
    assert tokens == [7, 8, 9] and np.array_equal(k2, k) and np.array_equal(v2, v)


def test_a_plain_token_list_reads_too():
    """Servers before the packed format wrote the tokens alone."""
    data, k, _ = _file([5, 6, 7])
    plain = struct.pack("<III", 0x67677371, 3, 3) + struct.pack("<3I", 5, 6, 7) + data[12 + 7 * 4:]
    tokens, k2, _ = read_slot_file(plain, SHAPE)
    assert tokens == [5, 6, 7] and np.array_equal(k2, k)


def test_numllamas_earlier_npz_files_still_read():
    k, v = _kv(3)
    words = np.array([0xFFFFFFFF, 1, 3, 5, 6, 7, 0], np.uint32)
    f = io.BytesIO()
    f.write(struct.pack("<III", 0x67677371, 3, len(words)) + words.tobytes())
    np.savez(f, k=k, v=v, shape=np.array([2, 1, 4, 10], np.int64))
    tokens, k2, v2 = read_slot_file(f.getvalue(), SHAPE)
    assert tokens == [5, 6, 7] and np.array_equal(k2, k) and np.array_equal(v2, v)


def _at_kv(data):
    return 12 + 4 * struct.unpack_from("<III", data)[2]


@pytest.mark.parametrize("mangle, said", [
    (lambda d: b"xxxx" + d[4:], "bad magic"),
    (lambda d: d[:4] + struct.pack("<I", 2) + d[8:], "version 2"),
    (lambda d: d[:20], "cut short"),
    (lambda d: d[:-3], "cut short"),
    (lambda d: d + b"\0", "bytes after"),
    (lambda d: d[:12 + 6 * 4] + struct.pack("<I", 1) + d[12 + 7 * 4:], "media"),
    (lambda d: d[:_at_kv(d)] + struct.pack("<I", 4) + d[_at_kv(d) + 4:], "4 KV streams, this server 2"),
    (lambda d: d[:_at_kv(d) + 12] + struct.pack("<i", 9) + d[_at_kv(d) + 16:], "not the positions"),
    (lambda d: d[:_at_kv(d) + 48 + 4] + struct.pack("<I", 3) + d[_at_kv(d) + 56:], "3 layers, the model 2"),
    (lambda d: d[:_at_kv(d) + 56] + struct.pack("<i", 0) + d[_at_kv(d) + 60:], "cache type is 0"),
    (lambda d: d[:_at_kv(d) + 60] + struct.pack("<Q", 16) + d[_at_kv(d) + 68:], "different model"),
])
def test_bad_files_are_clear_errors(mangle, said):
    data, _, _ = _file([5, 6, 7])
    with pytest.raises(SlotFileError, match=said):
        read_slot_file(mangle(data), SHAPE)


@pytest.mark.parametrize("name, model", [("stories260K", "stories260K.gguf"), ("gemma3-tiny", "gemma3-tiny.gguf")])
def test_slot_files_move_between_llama_server_and_numllama(name, model, tmp_path):
    """The same request in slot 1 saves the bytes llama-server saved; llama-server's file
    restored into slot 0 goes on as llama-server went on from it (gemma3: sliding-window layers,
    whose cache llama-server cannot resume from a restored window: it reads the prompt again)."""
    from server_util import Server
    golden = json.load(open(os.path.join(DATA, f"slot-{name}.json")))
    theirs = open(os.path.join(DATA, f"slot-{name}.bin"), "rb").read()
    shutil.copy(os.path.join(DATA, f"slot-{name}.bin"), tmp_path / "theirs.bin")
    s = Server(["-c", "512", "-np", "2", "--slot-save-path", str(tmp_path), *golden["flags"]],
               model=os.path.join(DATA, model))
    try:
        first = s.post("/completion", {"prompt": golden["prompt"], "n_predict": golden["n_first"], "id_slot": 1,
                                       "temperature": 0, "cache_prompt": True}).json()
        assert first["content"] == golden["first"]
        saved = s.post("/slots/1?action=save", {"filename": "ours.bin"}).json()
        assert saved["n_saved"] == golden["saved"]
        assert (tmp_path / "ours.bin").read_bytes() == theirs
        r = s.post("/slots/0?action=restore", {"filename": "theirs.bin"}).json()
        assert r["n_restored"] == golden["saved"]
        more = s.post("/completion", {"prompt": golden["prompt"] + first["content"], "n_predict": golden["n_more"],
                                      "id_slot": 0, "temperature": 0, "cache_prompt": True}).json()
        assert (more["content"], more["timings"]["cache_n"]) == (golden["more"], golden["cache_n"])
        # a file for another layout is refused, and the server goes on
        r = s.post("/slots/0?action=restore", {"filename": "theirs.bin"})
        assert r.status_code == 200
        data = bytearray(theirs)
        struct.pack_into("<I", data, _at_kv(theirs), 1)
        (tmp_path / "one-stream.bin").write_bytes(bytes(data))
        r = s.post("/slots/0?action=restore", {"filename": "one-stream.bin"})
        assert r.status_code == 400 and "1 KV streams, this server 2" in r.json()["error"]["message"]
        assert s.get("/health").status_code == 200
    finally:
        s.stop()
