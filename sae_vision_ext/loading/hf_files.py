"""One file of a Hub repo (online or from the local cache), with errors that name what is missing."""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from sae_vision_ext.loading.releases import release_metadata


def _offline_note() -> str:
    if constants.is_offline_mode():
        return f" (HF_HUB_OFFLINE is set and the file is not in the local cache {constants.HF_HUB_CACHE})"
    return ""


def resolve_pattern(repo_id: str, pattern: str, force_download: bool = False) -> str:
    """The one file of ``repo_id`` matching the glob ``pattern`` (``*`` stays inside a folder)."""
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[pattern], force_download=force_download))
    except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(
            f"cannot list {repo_id} to find a file matching {pattern!r}{_offline_note()}: {err}"
        ) from err
    matches = sorted(p.relative_to(folder).as_posix() for p in folder.glob(pattern) if p.is_file())
    if len(matches) != 1:
        found = f"found {matches}" if matches else "found none"
        raise FileNotFoundError(
            f"expected exactly one file matching {pattern!r} in {repo_id}, {found}"
            f"{_offline_note() if not matches else ''}"
        )
    return matches[0]


def download_file(repo_id: str, path_in_repo: str, force_download: bool = False) -> Path:
    """``hf_hub_download`` of one file (a glob pattern is resolved first); FileNotFoundError if absent."""
    if glob.has_magic(path_in_repo):
        path_in_repo = resolve_pattern(repo_id, path_in_repo, force_download)
    try:
        return Path(hf_hub_download(repo_id, path_in_repo, force_download=force_download))
    except (EntryNotFoundError, HfHubHTTPError) as err:
        raise FileNotFoundError(
            f"{path_in_repo!r} not found in the Hub repo {repo_id}{_offline_note()}"
        ) from err


def split_overrides(
    cfg_overrides: dict[str, Any] | None, cfg_cls: type
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split SAELens's ``cfg_overrides`` into config fields of ``cfg_cls`` and metadata (None values go)."""
    names = {f.name for f in dataclasses.fields(cfg_cls)} - {"metadata"}
    overrides, metadata = {}, {}
    for key, value in (cfg_overrides or {}).items():
        if value is None:
            continue
        (overrides if key in names else metadata)[key] = value
    return overrides, metadata


@dataclasses.dataclass
class HubCheckpoint:
    """A foreign checkpoint fetched for conversion, with SAELens's ``cfg_overrides`` sorted out."""

    repo_id: str
    path_in_repo: str
    local_path: Path
    overrides: dict[str, Any]  # config fields of the target class (device and dtype removed)
    metadata: dict[str, Any]  # release metadata, then source, then the caller's metadata overrides
    device: str
    dtype: str


def fetch_checkpoint(
    repo_id: str,
    folder_name: str,
    device: str,
    force_download: bool,
    cfg_overrides: dict[str, Any] | None,
    cfg_cls: type,
) -> HubCheckpoint:
    """Resolve ``folder_name`` (a file path or glob in the repo), download it, split the overrides."""
    path_in_repo = (
        resolve_pattern(repo_id, folder_name, force_download) if glob.has_magic(folder_name) else folder_name
    )
    local_path = download_file(repo_id, path_in_repo, force_download)
    overrides, metadata = split_overrides(cfg_overrides, cfg_cls)
    return HubCheckpoint(
        repo_id=repo_id,
        path_in_repo=path_in_repo,
        local_path=local_path,
        overrides=overrides,
        metadata={
            **release_metadata(repo_id, path_in_repo),
            "source": f"hf://{repo_id}/{path_in_repo}",
            **metadata,
        },
        device=overrides.pop("device", device),
        dtype=overrides.pop("dtype", "float32"),
    )


def cast_state(state: dict[str, Any], device: str, dtype: str) -> dict[str, Any]:
    """Move a converted state dict to the device and dtype SAELens asked for (``"float32"``, ...)."""
    # torch's own names, not sae_lens.util.str_to_dtype: this module must not import SAELens (it is
    # imported while SAELens's import hook registers the releases, see loading/registration.py)
    torch_dtype = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype name such as 'float32' or 'bfloat16'")
    return {name: value.to(device=device, dtype=torch_dtype) for name, value in state.items()}
