"""Open a GGUF file: its metadata becomes `HParams` and `VocabData`, its tensors stay in the
memory map (no weight is copied into Python objects).

GGUF layout, for the reader of this code: a header ("GGUF", version, tensor count, metadata
count), the metadata key/value pairs, the tensor infos (name, shape, type, offset), padding to
`general.alignment` (32 by default), then the tensor data, each tensor aligned.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .hparams import HParams, pooling_name

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "bert")
# RoPE style per architecture (llama.cpp's llama_model_rope_type): NeoX rotates dimension i
# with i + n_rot/2, the "normal" style rotates adjacent pairs
NEOX_ROPE_ARCHS = frozenset({"qwen2", "qwen3", "gemma3", "phi3"})
# encoders (engine/encoder.py): bidirectional, LayerNorm after each block, absolute positions
ENCODER_ARCHS = frozenset({"bert"})
GEMMA3_SWA_PATTERN = 6     # gemma3's default: every 6th layer attends globally, the rest slide
GEMMA3_27B_LAYERS = 62     # the one gemma3 size whose q scale is 1/sqrt(n_embd / n_head)
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class ModelLoadError(Exception):
    """The file cannot be served by numllama; the message says why."""


@dataclass(frozen=True)
class VocabData:
    """The tokenizer as stored in GGUF metadata (`tokenizer.ggml.*`)."""
    model: str                      # "llama" (SentencePiece), "gpt2" (byte-level BPE), "gemma4" (BPE
                                    # over UTF-8 with SPM's spaces) or "bert" (WordPiece)
    pre: str                        # BPE pre-tokenizer name ("default", "llama3", "smollm", ...)
    tokens: list[str]
    scores: np.ndarray | None       # [n_vocab] f32, SPM merge priorities
    token_types: np.ndarray         # [n_vocab] i32: 1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte
    merges: list[str]               # BPE merges "left right", in rank order
    bos_id: int
    eos_id: int
    unk_id: int
    eot_id: int
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    fim: dict = field(default_factory=dict)   # fill-in-the-middle tokens: "pre", "suf", "mid", "pad",
                                    # "rep", "sep" -> id (those the file has, or llama.cpp finds by text)
    sep_id: int = -1                # WordPiece: the separator ([SEP]) that ends a tokenized text
    add_sep: bool = False           # put it between a rerank's query and document (llama.cpp's add_sep)
    lowercase: bool = False         # WordPiece: lowercase the text first
    strip_accents: bool = False     # WordPiece: drop accents (decompose, drop the marks)


@dataclass
class GGUFModel:
    path: str
    hparams: HParams
    vocab: VocabData
    tensors: dict            # name -> GGUFTensor (data is a view into the mmap)
    metadata: dict           # every scalar/string key, for /props and curious readers
    file_size: int
    n_params: int
    _mmap: object = field(default=None, repr=False)   # the file's mmap.mmap

    def tensor(self, name: str) -> "GGUFTensor":
        """The tensor `name`, or a ModelLoadError saying the file lacks it."""
        if name not in self.tensors:
            raise ModelLoadError(f"{self.path} lacks tensor {name}")
        return self.tensors[name]

    def drop_resident_pages(self) -> None:
        """Tell the kernel we are done with the pages read so far (packing copied the weights):
        they leave our RSS; anything read again (norms, embedding rows, F32 weights used in
        place) is faulted back in from the file."""
        if self._mmap is not None and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    @property
    def ftype_name(self) -> str:
        types = sorted({t.tensor_type.name for t in self.tensors.values()})
        return "all " + types[0] if len(types) == 1 else "mostly " + self._main_type()

    def _main_type(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if len(t.shape) > 1:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
        return max(counts, key=counts.get) if counts else "F32"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's info, with its bytes as a NumPy view of the memory map. `shape` is GGUF's,
    innermost dimension first ([n_cols, n_rows] for a matrix); `data` is [n_rows, n_cols] for
    float types and [n_rows, row bytes] uint8 for block-quantized (and BF16) ones."""
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


# GGUF metadata value types: id -> (struct format, NumPy dtype) for the fixed-size ones
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads GGUF's little-endian header fields from the mapped file. Numeric arrays come out
    as NumPy arrays in one step; only string arrays (the vocabulary, the merges) loop."""

    def __init__(self, buf):
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.at + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        raw = self.buf[self.at:self.at + n]
        self.at += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind][0])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item][1]).newbyteorder("<")
                if self.at + count * dtype.itemsize > len(self.buf):
                    raise ValueError("array runs past the end of the file")
                arr = np.frombuffer(self.buf, dtype, count, self.at).copy()
                self.at += count * dtype.itemsize
                return arr
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")


def _parse(buf) -> tuple[dict, dict]:
    """The metadata {key: value} of a mapped GGUF file, and its tensor infos
    {name: (type, dims, n_elements, n_bytes, absolute offset, NumPy dtype, NumPy shape)}."""
    cur = _Cursor(buf)
    cur.at = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (numllama reads versions 2 and 3, little-endian)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = cur.string()
        fields[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    alignment = int(fields.get("general.alignment", 32))
    data_start = -(-cur.at // alignment) * alignment
    tensors = {}
    for name, dims, type_id, offset in infos:
        try:
            ttype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"tensor {name} has unknown type id {type_id}") from None
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block, type_size = GGML_QUANT_SIZES[ttype]
        n_bytes = n_elements * type_size // block
        rows = tuple(reversed(dims))
        if ttype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype, shape = (np.float32 if ttype == GGMLQuantizationType.F32 else np.float16), rows
        else:
            dtype, shape = np.uint8, rows[:-1] + (rows[-1] // block * type_size,)
        tensors[name] = (ttype, dims, n_elements, n_bytes, data_start + offset, dtype, shape)
    return fields, tensors


def read_gguf_tensors(path: str) -> tuple[dict, dict, mmap.mmap]:
    """Any GGUF file's metadata and tensors (name -> GGUFTensor over the memory map), checked
    for truncation and tensor types, and the map itself (a model, or a LoRA adapter)."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        fields, infos = _parse(mapped)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is a truncated or corrupt GGUF file: {e}") from e

    tensors = {}
    for name, (ttype, dims, n_elements, n_bytes, offset, dtype, shape) in infos.items():
        if offset + n_bytes > file_size:
            raise ModelLoadError(f"{path} is truncated: tensor {name} ends at byte {offset + n_bytes}, "
                                 f"the file has {file_size}")
        data = np.frombuffer(mapped, dtype, n_bytes // np.dtype(dtype).itemsize, offset).reshape(shape)
        tensors[name] = GGUFTensor(name, ttype, dims, n_elements, n_bytes, offset, data)
    for t in tensors.values():
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(f"unsupported tensor type {t.tensor_type.name} for {t.name} in "
                                 f"{path} (numllama reads: {', '.join(SUPPORTED_TENSOR_TYPES)})")
    return fields, tensors, mapped


def load_gguf(path: str) -> GGUFModel:
    """Open `path` and check that numllama can run it, raising ModelLoadError otherwise."""
    fields, tensors, mapped = read_gguf_tensors(path)
    file_size = os.path.getsize(path)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"unsupported model architecture {arch!r} in {path} "
                             f"(numllama runs: {', '.join(SUPPORTED_ARCHS)})")

    hparams = _read_hparams(fields, arch, tensors)
    vocab = _read_vocab(fields)
    metadata = {key: (value.tolist() if isinstance(value, np.ndarray) else value)
                for key, value in fields.items()
                if not key.startswith("tokenizer.ggml.") or key == "tokenizer.ggml.model"}
    n_params = sum(t.n_elements for t in tensors.values())
    return GGUFModel(path, hparams, vocab, tensors, metadata, file_size, n_params, mapped)


def load_vocab(path: str) -> VocabData:
    """Only the tokenizer of a GGUF file: enough for a vocabulary-only file (llama.cpp's
    models/ggml-vocab-*.gguf), which has metadata and no weights."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        try:
            fields, _ = _parse(mapped)
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path} is a truncated or corrupt GGUF file: {e}") from e
    return _read_vocab(fields)


def _read_hparams(fields: dict, arch: str, tensors: dict) -> HParams:
    def get(key, default=None):
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return v

    n_embd = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_head_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(fields.get(f"{arch}.attention.key_length", n_embd // n_head))
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor")
    n_vocab = int(embd.shape[1])
    scale = 1.0
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        scale = 1.0 / float(fields.get(f"{arch}.rope.scaling.factor", 1.0))
    elif scaling not in ("none", ""):
        raise ModelLoadError(f"RoPE scaling {scaling!r} is not supported yet (numllama applies none, "
                             f"linear, yarn and Llama 3's rope_freqs)")
    if float(fields.get(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0)) != 0.0:
        raise ModelLoadError("YaRN with a log multiplier (DeepSeek's mscale_all_dim) is not supported yet")
    return HParams(
        arch=arch,
        n_vocab=n_vocab,
        n_ctx_train=int(get("context_length")),
        n_embd=n_embd,
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=int(get("feed_forward_length")),
        head_dim=head_dim,
        n_rot=int(fields.get(f"{arch}.rope.dimension_count", head_dim)),
        rope_freq_base=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_freq_scale=scale,
        rms_eps=float(get("attention.layer_norm_epsilon" if arch in ENCODER_ARCHS else "attention.layer_norm_rms_epsilon")),
        causal=bool(fields.get(f"{arch}.attention.causal", arch not in ENCODER_ARCHS)),
        rope_freq_factors=_rope_freq_factors(tensors),
        rope_factors_short=_rope_freq_factors(tensors, "rope_factors_short.weight"),
        rope_factors_long=_rope_freq_factors(tensors, "rope_factors_long.weight"),
        n_ctx_orig=int(fields.get(f"{arch}.rope.scaling.original_context_length", 0)),
        rope_attn_factor=float(fields.get(f"{arch}.rope.scaling.attn_factor", 1.0)),
        rope_ext_factor=1.0 if scaling == "yarn" else 0.0,
        yarn_beta_fast=float(fields.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
        yarn_beta_slow=float(fields.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
        rope_neox=arch in NEOX_ROPE_ARCHS,
        pooling=pooling_name(fields.get(f"{arch}.pooling_type")),
        **_family_traits(fields, arch, n_embd, n_head, head_dim, int(get("block_count"))),
    )


def _family_traits(fields: dict, arch: str, n_embd: int, n_head: int, head_dim: int, n_layer: int) -> dict:
    """The HParams fields in which an architecture departs from llama, as llama.cpp's
    src/models/<arch>.cpp sets them (the f32 arithmetic of its constants included)."""
    f32 = np.float32
    if arch == "qwen3":
        return dict(qk_norm=True)
    if arch == "phi3":
        # llama.cpp reads phi3's sliding_window but turns it off ("Phi SWA is currently disabled")
        return dict(q_scale=float(f32(1.0) / np.sqrt(f32(head_dim))))
    if arch != "gemma3":
        # llama-arch files (Mistral's included) may declare a sliding_window: llama.cpp does
        # not apply it to them, so neither do we
        return {}
    q_norm_dim = n_embd // n_head if n_layer == GEMMA3_27B_LAYERS else head_dim
    traits = dict(qk_norm=True, post_norms=True, ffn_act="gelu_tanh",
                  embd_scale=float(np.sqrt(f32(n_embd))),
                  q_scale=float(f32(1.0) / np.sqrt(f32(q_norm_dim))),
                  logit_softcap=float(fields.get("gemma3.final_logit_softcapping", 0.0)))
    n_swa = int(fields.get("gemma3.attention.sliding_window", 0))
    if n_swa > 0:
        pattern = fields.get("gemma3.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
        if isinstance(pattern, (list, tuple, np.ndarray)):
            swa = tuple(bool(x) for x in pattern)[:n_layer]
        else:   # llama_hparams::set_swa_pattern: the last layer of every `pattern` is global
            n = int(pattern)
            swa = tuple(n == 0 or il % n < n - 1 for il in range(n_layer))
        traits.update(n_swa=n_swa, swa_layers=swa,
                      rope_freq_base_swa=float(fields.get("gemma3.rope.freq_base_swa", 10000.0)))
    return traits


def _rope_freq_factors(tensors: dict, name: str = "rope_freqs.weight") -> tuple:
    """Llama 3 files carry their RoPE scaling as a tensor of per-pair divisors (rope_freqs),
    LongRoPE files two of them (rope_factors_short/long)."""
    t = tensors.get(name)
    if t is None:
        return ()
    if t.tensor_type.name != "F32":
        raise ModelLoadError(f"{name} is {t.tensor_type.name}; llama.cpp and numllama read it as F32")
    return tuple(float(f) for f in np.asarray(t.data, np.float32).ravel())


WPM_SEP_ID = 102   # llama.cpp's default [SEP] of WordPiece vocabularies

# tokenizer models numllama reads, with llama.cpp's default (BOS, EOS, UNK) ids for files that do
# not name them (llama_vocab::impl::load)
TOKENIZER_DEFAULT_IDS = {"llama": (1, 2, 0), "gpt2": (11, 11, -1), "gemma4": (-1, -1, -1), "bert": (101, -1, 100)}


# llama.cpp's llama_vocab::impl::load: each FIM token's metadata keys, then the texts it looks for
FIM_TOKENS = {
    "pre": (("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
            ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
             "<|code_prefix|>", "<|prefix|>")),
    "suf": (("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
            ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
             "<|code_suffix|>", "<|suffix|>")),
    "mid": (("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
            ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
             "<|code_middle|>", "<|middle|>")),
    "pad": (("tokenizer.ggml.fim_pad_token_id",), ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    "rep": (("tokenizer.ggml.fim_rep_token_id",), ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
                                                  "<reponame>")),
    "sep": (("tokenizer.ggml.fim_sep_token_id",), ("<|file_sep|>",)),
}
CONTROL_TYPE = 3
# the texts llama.cpp takes for end-of-generation tokens, whatever their type (it makes them
# control tokens): llama_vocab::impl::load, "special_eog_ids"
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")


def _fim_tokens(fields: dict, index: dict, types: np.ndarray, token_id) -> dict:
    """The file's FIM token ids, or those llama.cpp finds by their text (index: text -> id);
    a found one becomes a control token, as llama.cpp makes it. (A vocabulary with two texts of
    one kind: llama.cpp takes whichever its hash map yields first, here the first of the list.)"""
    out = {}
    for name, (keys, texts) in FIM_TOKENS.items():
        found = next((token_id(k, None) for k in keys if fields.get(k) is not None), -1)
        if found < 0:
            found = next((index[t] for t in texts if t in index), -1)
            if found >= 0:
                types[found] = CONTROL_TYPE
        if found >= 0:
            out[name] = found
    return out


def _read_vocab(fields: dict) -> VocabData:
    model = fields.get("tokenizer.ggml.model")
    if model not in TOKENIZER_DEFAULT_IDS:
        raise ModelLoadError(f"unsupported tokenizer model {model!r} (numllama reads "
                             f"{', '.join(TOKENIZER_DEFAULT_IDS)})")
    tokens = list(fields.get("tokenizer.ggml.tokens", []))
    if not tokens:
        raise ModelLoadError("GGUF metadata lacks tokenizer.ggml.tokens")
    scores = fields.get("tokenizer.ggml.scores")
    scores = np.asarray(scores, dtype=np.float32) if scores is not None else None
    types = fields.get("tokenizer.ggml.token_type")
    types = np.asarray(types, dtype=np.int32) if types is not None else np.ones(len(tokens), dtype=np.int32)
    merges = list(fields.get("tokenizer.ggml.merges", []))
    spm = model == "llama"
    default_bos, default_eos, default_unk = TOKENIZER_DEFAULT_IDS[model]

    def token_id(key, default):
        v = fields.get(key, default)
        return -1 if v is None or int(v) >= len(tokens) else int(v)

    index = {t: i for i, t in enumerate(tokens)}   # (a text given twice: its last id, as llama.cpp's map)
    fim = _fim_tokens(fields, index, types, token_id)
    for text in EOG_TEXTS:   # (llama.cpp: a "control-looking token" becomes one)
        if text in index:
            types[index[text]] = CONTROL_TYPE
    eos = token_id("tokenizer.ggml.eos_token_id", default_eos)
    eot = token_id("tokenizer.ggml.eot_token_id", -1)
    if eot < 0:  # llama.cpp recognises end-of-turn markers by their text when the id is absent
        for name in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
            if name in tokens and types[tokens.index(name)] in (3, 4):
                eot = tokens.index(name)
                break
    return VocabData(
        model=model,
        # gemma4's pre-tokenizer is implied by its model (llama.cpp sets it)
        pre="gemma4" if model == "gemma4" else str(fields.get("tokenizer.ggml.pre", "default")),
        tokens=tokens,
        scores=scores,
        token_types=types,
        merges=merges,
        bos_id=token_id("tokenizer.ggml.bos_token_id", default_bos),
        eos_id=eos,
        unk_id=token_id("tokenizer.ggml.unknown_token_id", default_unk),
        eot_id=eot,
        # (Gemma 4 files say false, and llama.cpp overrides it: PR 21500)
        add_bos=model == "gemma4" or bool(fields.get("tokenizer.ggml.add_bos_token", spm or model == "bert")),
        add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", spm)),
        chat_template=fields.get("tokenizer.chat_template"),
        fim=fim,
        sep_id=token_id("tokenizer.ggml.seperator_token_id", WPM_SEP_ID if model == "bert" else -1),
        add_sep=bool(fields.get("tokenizer.ggml.add_sep_token", model == "bert")),
        # BertNormalizer options, on unless the file says (llama.cpp: strip_accents follows lowercase)
        lowercase=bool(fields.get("tokenizer.ggml.normalizer.lowercase", True)),
        strip_accents=bool(fields.get("tokenizer.ggml.normalizer.strip_accents",
                                      fields.get("tokenizer.ggml.normalizer.lowercase", True))),
    )
