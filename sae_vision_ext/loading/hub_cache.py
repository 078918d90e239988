"""Seed the local Hugging Face cache with files you already have (air-gapped machines, tests).

The layout is the one documented at https://huggingface.co/docs/hub/local-cache and read by
``huggingface_hub.hf_hub_download`` when ``HF_HUB_OFFLINE=1``:

    <cache>/models--<org>--<name>/
        blobs/<etag>                      file contents (sha256 for LFS files, git blob sha1 otherwise)
        snapshots/<commit>/<path>         relative symlink to ../../blobs/<etag> (a copy if symlinks fail)
        refs/<revision>                   the commit hash the revision points to

After ``seed_hf_cache("WolodjaZ/MSAE", {"ViT-L_14/centered/x.pth": local_file})`` the call
``hf_hub_download("WolodjaZ/MSAE", "ViT-L_14/centered/x.pth")`` works offline, and so do
``SAE.from_pretrained`` and the plugin's named releases.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import constants

# Extensions the Hub stores with Git LFS by default (the blob is then named by its sha256).
_LFS_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".npy", ".npz", ".pkl", ".h5", ".zip"}


def hf_cache_dir() -> Path:
    """The cache ``huggingface_hub`` uses right now (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    return Path(constants.HF_HUB_CACHE)


def _etag(path_in_repo: str, data: bytes) -> str:
    if Path(path_in_repo).suffix in _LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def seed_hf_cache(
    repo_id: str,
    files: Mapping[str, bytes | str | os.PathLike],
    cache_dir: str | os.PathLike | None = None,
    revision: str = "main",
    repo_type: str = "model",
) -> Path:
    """Add ``files`` ({path in repo: bytes or local file}) to ``repo_id`` at ``revision``; return the snapshot
    folder.

    Files already cached at ``revision`` are kept (a new commit holds old and new files). The commit
    hash is derived from the contents, so seeding the same files twice changes nothing.
    """
    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    cache = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    repo_dir = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    blobs = repo_dir / "blobs"
    etags = dict(_cached_etags(repo_dir, revision))
    for path_in_repo, src in files.items():
        if path_in_repo.startswith("/") or ".." in Path(path_in_repo).parts:
            raise ValueError(f"invalid path in repo: {path_in_repo!r}")
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        etags[path_in_repo] = _etag(path_in_repo, data)
        blob = blobs / etags[path_in_repo]
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
    commit = hashlib.sha1("\n".join(f"{p} {etags[p]}" for p in sorted(etags)).encode()).hexdigest()

    snapshot = repo_dir / "snapshots" / commit
    for path_in_repo, etag in etags.items():
        pointer = snapshot / path_in_repo
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            continue
        try:
            pointer.symlink_to(os.path.relpath(blobs / etag, pointer.parent))
        except OSError:  # file systems without symlinks: huggingface_hub then copies, so do we
            shutil.copyfile(blobs / etag, pointer)
    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / revision).write_text(commit)
    return snapshot


def _cached_etags(repo_dir: Path, revision: str):
    """(path in repo, etag) of every file in the snapshot ``revision`` points to, if any."""
    ref = repo_dir / "refs" / revision
    if not ref.is_file():
        return
    snapshot = repo_dir / "snapshots" / ref.read_text().strip()
    for pointer in sorted(snapshot.rglob("*")):
        if pointer.is_dir():
            continue
        path_in_repo = pointer.relative_to(snapshot).as_posix()
        etag = (
            Path(os.readlink(pointer)).name
            if pointer.is_symlink()
            else _etag(path_in_repo, pointer.read_bytes())
        )
        yield path_in_repo, etag
