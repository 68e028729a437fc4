import pytest

from numllama.engine.tokenizer import utf8_complete_prefix


@pytest.mark.parametrize("which", ["stories", "smollm"])
def test_tokenize_equals_llama_cpp(which, request):
    engine = request.getfixturevalue(which)
    golden = request.getfixturevalue(which + "_golden")
    tok = engine.tokenizer
    for row in golden["tokenize"]:
        assert tok.encode(row["text"], add_special=True) == row["tokens_add_special"], row["text"]
        assert tok.encode(row["text"], add_special=False) == row["tokens_no_special"], row["text"]
        assert tok.decode(row["tokens_no_special"]) == row["detokenized"], row["text"]


def test_special_tokens_only_with_parse_special(stories):
    tok = stories.tokenizer
    assert tok.encode("<s>", add_special=False, parse_special=True) == [1]
    assert 1 not in tok.encode("<s>", add_special=False, parse_special=False)


def test_control_tokens_hidden_unless_special(stories):
    tok = stories.tokenizer
    assert tok.token_bytes(2, special=True) == b"</s>"
    assert tok.token_bytes(2, special=False) == b""


def test_byte_fallback_pieces_are_bytes(stories):
    tok = stories.tokenizer
    ids = tok.encode("日", add_special=False)
    raw = b"".join(tok.token_bytes(i) for i in ids)
    assert raw.decode("utf-8").strip() == "日"
    assert any(len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80 for i in ids)


@pytest.mark.parametrize("text", ["a", "é", "日本", "🎉x", "a🎉"])
def test_utf8_complete_prefix_never_splits(text):
    data = text.encode()
    for cut in range(len(data) + 1):
        n = utf8_complete_prefix(data[:cut])
        data[:n].decode("utf-8")  # must not raise
        assert n >= cut - 3


@pytest.mark.parametrize("data, n", [(b"\xe6a", 0), (b"x\xf0ab", 1), (b"\xf0abc", 4), (b"\xc3a", 2),
                                     (b"a\xff", 2), (b"\xe6\x97\xa5", 3)])
def test_utf8_complete_prefix_holds_as_llama_server(data, n):
    """llama-server's validate_utf8 holds back from a lead byte among the last four whose
    character would be longer, even when invalid bytes follow it; the stream breaks there too."""
    assert utf8_complete_prefix(data) == n


def test_unknown_token_renders_as_llama_server(stories):
    """<unk> is its own text with special tokens shown (/detokenize), and nothing in generated
    text, as llama.cpp's token_to_piece does (an AVX2 llama-server answered "<unk> ha<unk>" for
    [0, 300, 0]; older llama.cpp printed U+2585)."""
    tok = stories.tokenizer
    assert tok.decode([0, 300, 0]) == "<unk> ha<unk>"
    assert tok.token_bytes(0, special=False) == b""


# llama.cpp's tokenizer test files (models/ggml-vocab-<name>.gguf with .inp/.out), every
# vocabulary that has them: each pre-tokenizer and tokenizer model they cover
LLAMA_CPP_VOCABS = ("bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
                    "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder")


@pytest.mark.parametrize("name", LLAMA_CPP_VOCABS)
def test_llama_cpp_vocab_cases(name):
    """Every case of the file, read as test-tokenizer-0 reads it: no BOS, no special tokens.
    (The files come from the llama-cpp-python sdist: tox fetches them with tests/llama_tree.py.)"""
    import os
    from llama_tree import VOCAB_TESTS, read_vocab_cases, tree_root
    from numllama.engine.gguf_file import load_vocab
    from numllama.engine.tokenizer import Tokenizer
    path = os.path.join(tree_root(), VOCAB_TESTS + name + ".gguf")
    if not os.path.exists(path + ".inp"):
        pytest.fail(f"{path}.inp not found: run `python tests/llama_tree.py` first (tox does)")
    tok = Tokenizer(load_vocab(path))
    misses = [(text, want, got) for text, want in read_vocab_cases(path)
              if (got := tok.encode(text, add_special=False, parse_special=False)) != want]
    assert not misses, f"{len(misses)} cases differ, the first: {misses[0]}"


@pytest.mark.parametrize("name, eog", [
    ("qwen2", {"<|endoftext|>", "<|im_end|>", "</s>"}),
    ("gemma-4", {"<eos>", "<turn|>", "<|tool_response>", "</s>"}),
    ("phi-3", {"<|endoftext|>", "<|end|>", "</s>"}),
])
def test_end_of_generation_tokens_as_llama_cpp_finds_them(name, eog):
    """llama.cpp ends generation at tokens it knows by their text, whatever type the file gives
    them (and makes them control tokens): llama_vocab::impl::load's special_eog_ids."""
    import os
    from llama_tree import VOCAB_TESTS, tree_root
    from numllama.engine.gguf_file import load_vocab
    from numllama.engine.tokenizer import Tokenizer
    path = os.path.join(tree_root(), VOCAB_TESTS + name + ".gguf")
    if not os.path.exists(path):
        pytest.fail(f"{path} not found: run `python tests/llama_tree.py` first (tox does)")
    vocab = load_vocab(path)
    tok = Tokenizer(vocab)
    assert {vocab.tokens[i] for i in tok.eog_ids} == eog
    assert all(vocab.token_types[i] == 3 for i in tok.eog_ids)


def test_detokenize_as_llama_vocab_detokenize(stories_path):
    """llama_vocab::detokenize: SPM drops the space it put before the text; byte-level BPE files
    clean up spaces (llama.cpp's three passes) unless their pre-tokenizer is exempt."""
    from numllama.engine.gguf_file import load_gguf
    from numllama.engine.tokenizer import Tokenizer, _clean_spaces
    tok = Tokenizer(load_gguf(stories_path).vocab)
    ids = tok.encode("Once upon a time", add_special=False)
    assert tok.decode(ids).startswith(" ") and tok.detokenize(ids) == b"Once upon a time"
    assert not tok.clean_spaces
    assert _clean_spaces(b"Hi , you ! It ' s what 's he 'll 're 've 'd n't .") == \
        b"Hi, you! It's what's he 'll're've 'd n't."
