import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from numllama.engine.gguf_file import ModelLoadError, load_gguf


def test_stories_hparams(stories_path):
    m = load_gguf(stories_path)
    hp = m.hparams
    assert (hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff) == \
        (512, 64, 5, 8, 4, 8, 172)
    assert hp.n_ctx_train == 2048 and m.n_params == 292800
    assert m.vocab.model == "llama" and m.vocab.add_bos and m.vocab.bos_id == 1 and m.vocab.eos_id == 2


def test_weights_stay_in_the_mmap(stories_path):
    import mmap
    m = load_gguf(stories_path)
    data = m.tensors["token_embd.weight"].data
    owner = data
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    assert isinstance(owner, mmap.mmap) and not data.flags.writeable


@pytest.mark.parametrize("which", ["stories", "smollm"])
def test_parser_agrees_with_gguf_py(which, request):
    """Our GGUF parser against gguf-py's GGUFReader: every metadata value, every tensor's
    type, shape, offset and bytes."""
    from gguf import GGUFReader
    path = request.getfixturevalue(f"{which}_path")
    ours = load_gguf(path)
    ref = GGUFReader(path, "r")
    for key, f in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = f.contents()
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
            continue   # checked through VocabData below
        assert ours.metadata[key] == want, key
    assert ours.vocab.tokens == ref.fields["tokenizer.ggml.tokens"].contents()
    np.testing.assert_array_equal(ours.vocab.token_types, ref.fields["tokenizer.ggml.token_type"].contents())
    if "tokenizer.ggml.merges" in ref.fields:
        assert ours.vocab.merges == ref.fields["tokenizer.ggml.merges"].contents()
    assert sorted(ours.tensors) == sorted(t.name for t in ref.tensors)
    for t in ref.tensors:
        o = ours.tensors[t.name]
        assert (o.tensor_type, list(o.shape), o.n_elements, o.n_bytes, o.data_offset) == \
            (t.tensor_type, t.shape.tolist(), t.n_elements, t.n_bytes, t.data_offset), t.name
        assert o.data.dtype == t.data.dtype and o.data.shape == t.data.shape
        np.testing.assert_array_equal(o.data, t.data)


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


def _write(tmp_path, arch="llama", tensor_type=None, rope_scaling=None):
    p = str(tmp_path / f"{arch}.gguf")
    w = GGUFWriter(p, arch)
    w.add_context_length(16)
    if rope_scaling:
        w.add_string(f"{arch}.rope.scaling.type", rope_scaling)
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


def test_unknown_rope_scaling_is_refused(tmp_path):
    """A scaling numllama does not apply changes every angle: refused, not run wrong."""
    with pytest.raises(ModelLoadError, match="RoPE scaling 'dynamic'"):
        load_gguf(_write(tmp_path, rope_scaling="dynamic"))
    yarn = load_gguf(os.path.join(os.path.dirname(__file__), "data", "qwen2-yarn-tiny.gguf")).hparams
    assert (yarn.rope_ext_factor, yarn.rope_freq_scale, yarn.n_ctx_orig) == (1.0, 0.25, 512)


def test_longrope_factors_follow_the_context():
    """LongRoPE (phi3 128k): the short factors for sequences up to the original context, the
    long ones beyond it, as llama_model::get_rope_factors; cos and sin scaled by attn_factor."""
    import os
    hp = load_gguf(os.path.join(os.path.dirname(__file__), "data", "phi3-longrope-tiny.gguf")).hparams
    assert hp.n_ctx_orig == 1024 and abs(hp.rope_attn_factor - 1.1902381) < 1e-6
    assert (hp.rope_factors(1024) == np.asarray(hp.rope_factors_short, np.float32)).all()
    assert (hp.rope_factors(1025) == np.asarray(hp.rope_factors_long, np.float32)).all()


def test_unsupported_tensor_type(tmp_path):
    with pytest.raises(ModelLoadError, match="unsupported tensor type IQ2_XXS"):
        load_gguf(_write(tmp_path, tensor_type=GGMLQuantizationType.IQ2_XXS))


def test_llama3_rope_factors_are_read():
    """rope_freqs.weight (Llama 3) becomes hparams.rope_freq_factors, one per rotated pair; a
    file without it has none, which RoPE takes as all ones."""
    import os
    import numpy as np
    from numllama.engine.gguf_file import load_gguf
    data = os.path.join(os.path.dirname(__file__), "data")
    hp = load_gguf(os.path.join(data, "llama3-rope-tiny.gguf")).hparams
    assert len(hp.rope_freq_factors) == hp.n_rot // 2 and max(hp.rope_freq_factors) == 8.0
    assert hp.rope_factors().dtype == np.float32
    plain = load_gguf(os.path.join(data, "stories260K.gguf")).hparams
    assert plain.rope_freq_factors == () and (plain.rope_factors() == 1).all()


def test_rope_style_follows_the_architecture():
    import os
    data = os.path.join(os.path.dirname(__file__), "data")
    assert load_gguf(os.path.join(data, "qwen2-tiny.gguf")).hparams.rope_neox
    assert not load_gguf(os.path.join(data, "stories260K.gguf")).hparams.rope_neox
