"""``load_pretrained``: SAELens's ``SAE.from_pretrained`` with errors that list what exists, and MSAE's k."""

from __future__ import annotations

import difflib
from typing import Any

from huggingface_hub.errors import EntryNotFoundError
from sae_lens import SAE
from sae_lens.loading import pretrained_saes_directory

from sae_vision_ext.loading.msae import INFERENCE_K_FIELD
from sae_vision_ext.loading.registration import register_releases
from sae_vision_ext.loading.releases import RELEASES


def vision_releases() -> dict[str, list[str]]:
    """{release name: sae ids} for the releases the plugin registers."""
    return {name: list(release.saes) for name, release in RELEASES.items()}


def _unknown_release_message(release: str, directory: dict[str, Any]) -> str:
    close = difflib.get_close_matches(release, list(directory), n=3)
    lines = [f"unknown release {release!r}."]
    if close:
        lines.append(f"Did you mean {', '.join(map(repr, close))}?")
    lines.append(
        "Vision releases (sae-vision-ext): "
        + "; ".join(f"{name} (sae ids: {', '.join(ids)})" for name, ids in vision_releases().items())
    )
    lines.append(
        f"SAELens knows {len(directory)} releases in all (sae_lens.loading.pretrained_saes_directory."
        "get_pretrained_saes_directory()); a Hugging Face repo id 'org/name' also works."
    )
    return " ".join(lines)


def load_pretrained(
    release: str,
    sae_id: str,
    device: str = "cpu",
    dtype: str = "float32",
    k: int | None = None,
    force_download: bool = False,
):
    """``SAE.from_pretrained(release, sae_id)`` that lists valid releases / ids on a typo.

    ``release`` is a registered release name or a Hub repo id; ``k`` sets an MSAE's inference TopK
    (default ReLU, the authors' inference mode).
    """
    register_releases()
    directory = pretrained_saes_directory.get_pretrained_saes_directory()  # after the wrapping
    if release not in directory:
        if "/" not in release:
            raise ValueError(_unknown_release_message(release, directory))
    elif sae_id not in directory[release].saes_map:
        valid = list(directory[release].saes_map)
        raise ValueError(f"unknown SAE id {sae_id!r} in release {release!r}; valid ids: {', '.join(valid)}")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype, force_download=force_download)
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"no SAELens SAE found at {release}/{sae_id} (missing {sae_id}/cfg.json or its weights); "
            f"check the repo id and the SAE folder name. ({err})"
        ) from err
    if k is not None:
        set_inference_k(sae, k)
    return sae


def set_inference_k(sae: Any, k: int | None) -> None:
    """Make an MSAE keep the top ``k`` latents at inference (None: ReLU only)."""
    if not hasattr(sae.cfg, INFERENCE_K_FIELD):
        raise ValueError(
            f"k applies to MSAE SAEs only; this SAE's architecture is {sae.cfg.architecture()!r}"
        )
    if k is not None and not 0 < k <= sae.cfg.d_sae:
        raise ValueError(f"k must be in 1..d_sae={sae.cfg.d_sae}, got {k}")
    setattr(sae.cfg, INFERENCE_K_FIELD, k)
