"""LoRA adapters: a fine-tune kept as small matrix pairs beside the model, never merged into it.

For a weight W [n_out, n_in] the adapter holds A [rank, n_in] and B [n_out, rank], and a layer
computes

    y = W x + scale * B (A x)          scale = adapter_scale * alpha / rank   (alpha 0: adapter_scale)

as llama.cpp's build_lora_mm does: W x first, then each adapter's B (A x), scaled and added in
turn. W stays as it is, so one server holds several adapters and each request picks its own
scales. The files are what convert_lora_to_gguf.py writes: general.type "adapter",
adapter.type "lora", adapter.lora.alpha, and for each adapted tensor NAME the pair
NAME.lora_a (A, stored [n_in, rank] innermost first) and NAME.lora_b (B).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf_file import ModelLoadError, read_gguf_tensors
from .quants import KernelOrder, PackedWeight, linear, pack_tensor


@dataclass(frozen=True)
class LoraWeight:
    a: PackedWeight    # [rank, n_in]
    b: PackedWeight    # [n_out, rank]

    @property
    def rank(self) -> int:
        return self.a.n_rows


class LoraAdapter:
    """One adapter file, checked against the model it adapts (its architecture, each tensor's
    shape), with its matrices packed for the kernels."""

    def __init__(self, path: str, model):
        fields, tensors, _ = read_gguf_tensors(path)
        self.path = path
        if fields.get("general.type") != "adapter":
            raise ModelLoadError(f"{path}: expect general.type to be 'adapter', but got: "
                                 f"{fields.get('general.type', '')}")
        if fields.get("general.architecture") != model.hp.arch:
            raise ModelLoadError(f"{path}: model arch and LoRA arch mismatch")
        if fields.get("adapter.type") != "lora":
            raise ModelLoadError(f"{path}: expect adapter.type to be 'lora', but got: {fields.get('adapter.type', '')}")
        if fields.get("adapter.alora.invocation_tokens") is not None:
            raise ModelLoadError(f"{path}: activated LoRA (aLoRA) adapters are not supported")
        self.alpha = np.float32(fields.get("adapter.lora.alpha", 0.0))
        self.task_name = str(fields.get("adapter.lora.task_name", ""))
        self.prompt_prefix = str(fields.get("adapter.lora.prompt_prefix", ""))
        self.weights: dict[str, LoraWeight] = {}
        for name in sorted(tensors):
            if not name.endswith(".lora_a"):
                continue
            base = name[:-len(".lora_a")]
            a, b = tensors[name], tensors.get(base + ".lora_b")
            if b is None:
                raise ModelLoadError(f"{path}: LoRA tensor pair for '{base}' is missing one component")
            target = model.gguf.tensors.get(base)
            if target is None:
                raise ModelLoadError(f"{path}: LoRA tensor '{base}' does not exist in base model")
            if base not in model.source_rows:
                raise ModelLoadError(f"{path}: numllama applies LoRA to the layers' and the output's "
                                     f"matrices, not to '{base}'")
            # A is [n_in, rank] and B [rank, n_out], innermost first; W is [n_in, n_out]
            if target.shape[0] != a.shape[0] or target.shape[1] != b.shape[1]:
                raise ModelLoadError(f"{path}: tensor '{base}' has incorrect shape (hint: maybe wrong base model?)")
            if a.shape[1] != b.shape[0]:
                raise ModelLoadError(f"{path}: lora_a tensor is not transposed (hint: adapter from "
                                     "\"finetune\" example is no longer supported)")
            self.weights[base] = LoraWeight(pack_tensor(a), pack_tensor(b))
        if any(n.endswith(".lora_b") and n[:-len(".lora_b")] not in self.weights for n in tensors):
            raise ModelLoadError(f"{path}: a lora_b tensor has no lora_a")

    def scale(self, w: LoraWeight, adapter_scale: float) -> np.float32:
        """llama_adapter_lora_weight::get_scale, in f32: adapter_scale * alpha / rank."""
        s = np.float32(adapter_scale)
        return s * self.alpha / np.float32(w.rank) if self.alpha else s

    def delta(self, name: str, x: np.ndarray, adapter_scale: float, order: KernelOrder) -> np.ndarray | None:
        """scale * B (A x) for the tensor `name`, or None when the adapter leaves it alone.
        x: [T, n_in] f32 -> [T, n_out] f32"""
        w = self.weights.get(name)
        if w is None:
            return None
        (ax,) = linear(x, w.a, order=order)              # [T, rank]
        (bax,) = linear(ax, w.b, order=order)            # [T, n_out]
        return bax * self.scale(w, adapter_scale)        # (ggml_scale)


def add_lora(outputs: list, weights: tuple, sources: dict, source_rows: dict, x: np.ndarray,
             loras: tuple, order: KernelOrder) -> None:
    """Add each active adapter's delta to the outputs of `weights` (packed matrices that may
    stack several GGUF tensors' rows: `sources`), in place, adapter after adapter.
    outputs: [T, n_rows] f32 each; loras: ((LoraAdapter, scale), ...)"""
    for w, out in zip(weights, outputs):
        at = 0
        for name in sources[id(w)]:
            n = source_rows[name]
            for adapter, adapter_scale in loras:
                d = adapter.delta(name, x, adapter_scale, order)
                if d is not None:
                    out[:, at:at + n] += d
            at += n
