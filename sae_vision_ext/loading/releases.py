"""The named releases of published vision SAEs: which repo, file, model and hook each one is.

    import sae_vision_ext                      # registers the releases (no file is read or downloaded)
    from sae_lens import SAE
    sae = SAE.from_pretrained("msae-clip-vit-l-14", "centered")

This module is the table only (plain data, no SAELens import); ``loading/registration.py`` makes SAELens
see it, and the converters (``msae.py``, ``overcomplete.py``) read the metadata of the file they convert
from it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

MSAE_LOADER = "sae_vision_ext_msae"
OVERCOMPLETE_LOADER = "sae_vision_ext_overcomplete"


@dataclass(frozen=True)
class VisionRelease:
    """One release: ``saes`` maps each sae id to its path in the repo.

    A path may be a glob pattern (``*``) when the exact published file name could not be established;
    the loader then picks the single matching file of the repo.
    """

    release: str
    repo_id: str
    model: str
    hook_name: str
    conversion_func: str
    saes: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)
    paper: str = ""


_MSAE_L14 = "6144_768_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-L~14_train_image_2905936_768.pth"

RELEASES: dict[str, VisionRelease] = {
    r.release: r
    for r in (
        VisionRelease(
            release="msae-clip-vit-l-14",
            repo_id="WolodjaZ/MSAE",
            model="open_clip:ViT-L-14/openai",
            hook_name="hook_image_embed",
            conversion_func=MSAE_LOADER,
            saes={
                "centered": f"ViT-L_14/centered/{_MSAE_L14}",
                "not_centered": f"ViT-L_14/not_centered/{_MSAE_L14}",
            },
            metadata={"dataset_path": "cc3m", "token_selection": "pooled"},
            paper="arXiv:2502.20578",
        ),
        VisionRelease(
            release="msae-clip-vit-b-16",
            repo_id="WolodjaZ/MSAE",
            model="open_clip:ViT-B-16/openai",
            hook_name="hook_image_embed",
            conversion_func=MSAE_LOADER,
            saes={
                "centered": "ViT-B_16/centered/*_TopKReLU_64_RW_*_cc3m_ViT-B~16_train_image_*.pth",
                "not_centered": "ViT-B_16/not_centered/*_TopKReLU_64_RW_*_cc3m_ViT-B~16_train_image_*.pth",
            },
            metadata={"dataset_path": "cc3m", "token_selection": "pooled"},
            paper="arXiv:2502.20578",
        ),
        VisionRelease(
            release="ra-sae-dinov2-vitb14-reg-32k",
            repo_id="matybohacek/RA-SAE-DINOv2-32k",
            model="timm:vit_base_patch14_reg4_dinov2.lvd142m",
            hook_name="hook_normed",  # DINOv2 tokens after the final LayerNorm, as the release was trained
            conversion_func=OVERCOMPLETE_LOADER,
            saes={"32k": "RA-SAE-DINOv2-32k.pth"},
            metadata={"token_selection": "all"},
            paper="arXiv:2502.12892",
        ),
    )
}


def release_metadata(repo_id: str, path_in_repo: str) -> dict[str, Any]:
    """Metadata (model, hook, ...) of the registered SAE stored at ``repo_id/path_in_repo``, else {}."""
    for release in RELEASES.values():
        if release.repo_id != repo_id:
            continue
        for pattern in release.saes.values():
            if path_in_repo == pattern or fnmatch.fnmatchcase(path_in_repo, pattern):
                return {"model_name": release.model, "hook_name": release.hook_name, **release.metadata}
    return {}
