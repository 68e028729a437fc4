"""Downloads for router mode's POST /models: `org/name[:tag]` from the Hugging Face hub (or the
mirror $MODEL_ENDPOINT / $HF_ENDPOINT names) into the cache the router lists, as llama.cpp's
hf-cache.cpp does it:

    GET {endpoint}api/models/{repo}/refs                      -> the commit of branch "main"
    GET {endpoint}api/models/{repo}/tree/{commit}?recursive=true -> the repository's files
    GET {endpoint}{repo}/resolve/{commit}/{path}              -> each file of the chosen model

The model file is chosen as `-hf` chooses it (engine/model_files.best_model, with every shard of
a split model) and written to models--org--name/snapshots/{commit}/{path}, with refs/main, so
that the next listing finds it. A file is written under a temporary name and renamed once whole:
a download cut short leaves nothing the router would list.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import requests

from ..engine.model_files import COMMIT_ID, best_model, repo_folder, shards, split_name

DEFAULT_ENDPOINT = "https://huggingface.co/"
TIMEOUT_S = 30                 # to connect, and between two reads of a file
CHUNK_BYTES = 1 << 20
PROGRESS_EVERY_S = 0.1         # llama.cpp's child reports progress at most every 100 ms


class DownloadError(Exception):
    pass


def endpoint() -> str:
    url = os.environ.get("MODEL_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return url if url.endswith("/") else url + "/"


@dataclass(frozen=True)
class DownloadPlan:
    repo: str
    commit: str
    files: tuple[str, ...]   # paths inside the repository


def _auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get_json(url: str, token: str | None):
    try:
        r = requests.get(url, headers=_auth(token), timeout=TIMEOUT_S)
    except requests.RequestException as e:
        raise DownloadError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise DownloadError(f"GET {url} answered {r.status_code}")
    try:
        return r.json()
    except ValueError:
        raise DownloadError(f"GET {url} did not answer JSON") from None


def plan(name: str, token: str | None = None) -> DownloadPlan:
    """What downloading `name` fetches (asks the hub, downloads nothing). name: org/name[:tag]
    whose org/name the caller has checked (model_files.valid_repo_id: it becomes a folder)."""
    repo, tag = split_name(name)
    refs = _get_json(f"{endpoint()}api/models/{repo}/refs", token)
    branches = [b for b in (refs.get("branches") if isinstance(refs, dict) else None) or []
                if isinstance(b, dict) and isinstance(b.get("name"), str)
                and isinstance(b.get("targetCommit"), str) and COMMIT_ID.fullmatch(b["targetCommit"])]
    if not branches:
        raise DownloadError(f"{repo} has no branch to download from")
    commit = next((b for b in branches if b["name"] == "main"), branches[0])["targetCommit"]
    tree = _get_json(f"{endpoint()}api/models/{repo}/tree/{commit}?recursive=true", token)
    paths = [item["path"] for item in (tree if isinstance(tree, list) else [])
             if isinstance(item, dict) and item.get("type") == "file" and isinstance(item.get("path"), str)
             and _safe_subpath(item["path"])]
    primary = best_model(paths, tag)
    if primary is None:
        raise DownloadError(f"{repo} has no GGUF model" + (f" tagged {tag}" if tag else ""))
    return DownloadPlan(repo, commit, tuple(shards(paths, primary)))


def _safe_subpath(path: str) -> bool:
    """A path from the hub becomes a file name here: no absolute path, no "..", no odd parts."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) \
        and "\\" not in path and "\0" not in path


def download(p: DownloadPlan, progress: Callable[[str, int, int], None],
             cancelled: Callable[[], bool], token: str | None = None) -> None:
    """Fetch the plan's files into the cache; `progress(url, bytes so far, total)` as they come.
    Raises DownloadError (nothing listed is left behind) or returns once every file is there."""
    folder = repo_folder(p.repo)
    snapshot = os.path.join(folder, "snapshots", p.commit)
    for path in p.files:
        url = f"{endpoint()}{p.repo}/resolve/{p.commit}/{path}"
        final = os.path.join(snapshot, *path.split("/"))
        if os.path.isfile(final):
            continue
        os.makedirs(os.path.dirname(final), exist_ok=True)
        partial = final + ".incomplete"
        try:
            with requests.get(url, headers=_auth(token), stream=True, timeout=TIMEOUT_S) as r:
                if r.status_code != 200:
                    raise DownloadError(f"GET {url} answered {r.status_code}")
                total, done, last = int(r.headers.get("Content-Length") or 0), 0, 0.0
                progress(url, 0, total)
                with open(partial, "wb") as f:
                    for chunk in r.iter_content(CHUNK_BYTES):
                        if cancelled():
                            raise DownloadError("download cancelled")
                        f.write(chunk)
                        done += len(chunk)
                        if time.monotonic() - last >= PROGRESS_EVERY_S:
                            progress(url, done, total)
                            last = time.monotonic()
                if total and done != total:
                    raise DownloadError(f"{url}: got {done} of {total} bytes")
            os.replace(partial, final)
            progress(url, done, total)
        except requests.RequestException as e:
            raise DownloadError(f"cannot download {url}: {e}") from None
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(p.commit)
