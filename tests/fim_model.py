"""stories260K with fill-in-the-middle tokens: the same file with tokenizer.ggml.fim_*_token_id
keys added (ordinary tokens serve as the markers; a model need not have been trained for FIM
to test how /infill lays out its prompt). bench/compare_infill.py gives llama-server the same
file."""
from __future__ import annotations

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

FIM_IDS = {"pre": 300, "suf": 301, "mid": 302, "rep": 303, "sep": 304}


def write_fim_model(src: str, dst: str, ids: dict = FIM_IDS) -> str:
    reader = gguf.GGUFReader(src, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {
        f"tokenizer.ggml.fim_{name}_token_id": MetadataDetails(gguf.GGUFValueType.UINT32, value)
        for name, value in ids.items()}, [])
    return dst
