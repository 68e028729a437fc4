"""Open a GGUF file: its metadata becomes `HParams` and `VocabData`, its tensors stay in the
memory map (gguf-py's `GGUFReader` maps the file; no weight is copied into Python objects).

GGUF layout, for the reader of this code: a header ("GGUF", version, tensor count, metadata
count), the metadata key/value pairs, the tensor infos (name, shape, type, offset), padding to
`general.alignment` (32 by default), then the tensor data, each tensor aligned.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from .hparams import HParams

SUPPORTED_ARCHS = ("llama",)
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class ModelLoadError(Exception):
    """The file cannot be served by numllama; the message says why."""


@dataclass(frozen=True)
class VocabData:
    """The tokenizer as stored in GGUF metadata (`tokenizer.ggml.*`)."""
    model: str                      # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
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


@dataclass
class GGUFModel:
    path: str
    hparams: HParams
    vocab: VocabData
    tensors: dict            # name -> gguf ReaderTensor (data is a view into the mmap)
    metadata: dict           # every scalar/string key, for /props and curious readers
    file_size: int
    n_params: int
    _mmap: object = field(default=None, repr=False)   # the file's mmap.mmap

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


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_gguf(path: str) -> GGUFModel:
    """Open `path` and check that numllama can run it, raising ModelLoadError otherwise."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")

    from gguf import GGUFReader  # imported here: it is slow to import and only needed to load
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises assorted errors on damaged files
        raise ModelLoadError(f"{path} is a truncated or corrupt GGUF file: {e}") from e

    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > file_size:
            raise ModelLoadError(f"{path} is truncated: tensor {t.name} ends at byte {end}, "
                                 f"the file has {file_size}")

    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"unsupported model architecture {arch!r} in {path} "
                             f"(numllama runs: {', '.join(SUPPORTED_ARCHS)})")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(f"unsupported tensor type {t.tensor_type.name} for {t.name} in "
                                 f"{path} (numllama reads: {', '.join(SUPPORTED_TENSOR_TYPES)})")

    hparams = _read_hparams(reader, arch, tensors)
    vocab = _read_vocab(reader)
    metadata = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
            continue
        try:
            metadata[key] = f.contents()
        except Exception:
            pass
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return GGUFModel(path, hparams, vocab, tensors, metadata, file_size, n_params,
                     getattr(reader.data, "_mmap", None))


def _read_hparams(reader, arch: str, tensors: dict) -> HParams:
    def get(key, default=None):
        v = _field(reader, f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return v

    n_embd = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_head_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor")
    n_vocab = int(embd.shape[1])
    scale = 1.0
    if _field(reader, f"{arch}.rope.scaling.type", "none") == "linear":
        scale = 1.0 / float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
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
        n_rot=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        rope_freq_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_freq_scale=scale,
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
    )


def _read_vocab(reader) -> VocabData:
    model = _field(reader, "tokenizer.ggml.model")
    if model not in ("llama", "gpt2"):
        raise ModelLoadError(f"unsupported tokenizer model {model!r} (numllama reads llama/SPM and gpt2/BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    f = reader.fields.get("tokenizer.ggml.scores")
    scores = np.asarray(f.contents(), dtype=np.float32) if f is not None else None
    f = reader.fields.get("tokenizer.ggml.token_type")
    types = (np.asarray(f.contents(), dtype=np.int32) if f is not None
             else np.ones(len(tokens), dtype=np.int32))
    merges = list(_field(reader, "tokenizer.ggml.merges", []) or [])
    spm = model == "llama"

    def token_id(key, default):
        v = _field(reader, key, default)
        return -1 if v is None or int(v) >= len(tokens) else int(v)

    eos = token_id("tokenizer.ggml.eos_token_id", 2 if spm else 11)
    eot = token_id("tokenizer.ggml.eot_token_id", -1)
    if eot < 0:  # llama.cpp recognises end-of-turn markers by their text when the id is absent
        for name in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
            if name in tokens and types[tokens.index(name)] in (3, 4):
                eot = tokens.index(name)
                break
    return VocabData(
        model=model,
        pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
        tokens=tokens,
        scores=scores,
        token_types=types,
        merges=merges,
        bos_id=token_id("tokenizer.ggml.bos_token_id", 1 if spm else 11),
        eos_id=eos,
        unk_id=token_id("tokenizer.ggml.unknown_token_id", 0 if spm else -1),
        eot_id=eot,
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", spm)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", spm)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
