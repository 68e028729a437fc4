import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from engine.gguf_model import ModelLoadError, load_gguf


def test_stories_hparams(stories_path):
    m = load_gguf(stories_path)
    hp = m.hparams
    assert (hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff) == \
        (512, 64, 5, 8, 4, 8, 172)
    assert hp.n_ctx_train == 2048 and m.n_params == 292800
    assert m.vocab.model == "llama" and m.vocab.add_bos and m.vocab.bos_id == 1 and m.vocab.eos_id == 2


def test_weights_stay_in_the_mmap(stories_path):
    m = load_gguf(stories_path)
    data = m.tensors["token_embd.weight"].data
    assert isinstance(data.base, np.memmap) or isinstance(data, np.memmap)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_gguf(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(str(tmp_path / "nope.gguf"))


def test_truncated(tmp_path, stories_path):
    p = tmp_path / "cut.gguf"
    data = open(stories_path, "rb").read()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_gguf(str(p))


def _write(tmp_path, arch="llama", tensor_type=None):
    p = str(tmp_path / f"{arch}.gguf")
    w = GGUFWriter(p, arch)
    w.add_context_length(16)
    w.add_embedding_length(32)
    w.add_block_count(0)
    w.add_head_count(1)
    w.add_feed_forward_length(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a"])
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    else:
        w.add_tensor("token_embd.weight", np.zeros((4, 66), np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def test_unsupported_architecture(tmp_path):
    with pytest.raises(ModelLoadError, match="unsupported model architecture 'mamba9'"):
        load_gguf(_write(tmp_path, arch="mamba9"))


def test_unsupported_tensor_type(tmp_path):
    with pytest.raises(ModelLoadError, match="unsupported tensor type IQ2_XXS"):
        load_gguf(_write(tmp_path, tensor_type=GGMLQuantizationType.IQ2_XXS))
