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
PRISMA_LOADER = "sae_vision_ext_prisma"


@dataclass(frozen=True)
class VisionRelease:
    """One release: ``saes`` maps each sae id to its path in the repo.

    A path may be a glob pattern (``*``) when the exact published file name could not be established;
    the loader then picks the single matching file of the repo.

    ``repo_id`` may be a Hub namespace (no ``/``) when every SAE is its own repo (ViT-Prisma): each path
    then starts with the repo name, ``<repo name>[/<file>]``. An empty ``hook_name`` means each SAE's
    hook is read from its own config (it differs per sae id).
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


# ViT-Prisma (arXiv:2504.19475): one Hub repo per SAE under the namespace Prisma-Multimodal; the names are
# those of ViT-Prisma's docs/sae_table.md. Each path is a repo name; the loader reads its config.json and
# weights (weights.pt or n_images_2600058.pt), see loading/prisma.py and docs/notes/issue-18-prisma.md.
# ViT-Prisma's open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K (the same open_clip weights)
_PRISMA_CLIP = "open_clip:ViT-B-32/datacomp_xl_s13b_b90k"
_PRISMA_DINO = "timm:vit_base_patch16_224.dino"  # ViT-Prisma's facebook/dino-vitb16
_PRISMA_L1_5E5 = {(2, "hook_resid_post"), (11, "hook_mlp_out")}  # the table's two non-1e-05 L1 coefficients
PRISMA_CLIP_VANILLA = {
    f"blocks.{layer}.{hook}": (
        f"sparse-autoencoder-clip-b-32-sae-vanilla-x64-layer-{layer}-{hook}-l1-"
        + ("5e-05" if (layer, hook) in _PRISMA_L1_5E5 else "1e-05")
    )
    for layer in range(12)
    for hook in ("hook_mlp_out", "hook_resid_post")
}
_PRISMA_CLS_VANILLA = (
    "0-hook_resid_post-936.799987792969-82",
    "1-hook_resid_post-314.175018310547-85",
    "2-hook_resid_post-711.121887207031-96",
    "3-hook_resid_post-686.334411621094-95",
    "4-hook_resid_post-682.543762207031-95",
    "5-hook_resid_post-510.356262207031-94",
    "6-hook_resid_post-430.556243896484-92",
    "7-hook_resid_post-492.959381103516-88",
    "8-hook_resid_post-635.018737792969-76",
    "9-hook_resid_post-518.621887207031-74",
    "10-hook_resid_post-552.512512207031-74",
    "11-hook_resid_post-383.75-65",
)
_PRISMA_SPATIAL_VANILLA = (
    "0-hook_resid_post-989.203430175781-99",
    "1-hook_resid_post-757.82958984375-99",
    "2-hook_resid_post-1007.89801025391-99",
    "3-hook_resid_post-935.601989746094-99",
    "4-hook_resid_post-965.410095214844-99",
    "5-hook_resid_post-964.674072265625-99",
    "6-hook_resid_post-1006.57165527344-99",
    "7-hook_resid_post-984.1376953125-99",
    "8-hook_resid_post-965.125-99",
    "9-hook_resid_post-854.891540527344-99",
    "11-hook_resid_post-829.0498046875-99",  # the table lists no layer 10
)
_PRISMA_DINO_VANILLA = (
    "0-resid_post-507-98",
    "1-resid_post-549-95",
    "2-resid_post-661-95",
    "3-resid_post-989-95",
    "4-resid_post-876-99",
    "5-resid_post-1001-98",
    "6-resid_post-962-99",
    "7-resid_post-1086-98",
    "8-resid_post-530-90",
    "9-resid_post-1105-99",
    "10-resid_post-835-99",
    "11-resid_post-1085-99",
)


def _by_layer(prefix: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    """{``blocks.<layer>.hook_resid_post``: ``<prefix><suffix>``}, the layer read from each suffix."""
    return {f"blocks.{suffix.split('-')[0]}.hook_resid_post": prefix + suffix for suffix in suffixes}


def _prisma(release: str, model: str, saes: dict[str, str], token_selection: str) -> VisionRelease:
    return VisionRelease(
        release=release,
        repo_id="Prisma-Multimodal",
        model=model,
        hook_name="",  # per SAE, from its config.json (the sae id names it too)
        conversion_func=PRISMA_LOADER,
        saes=saes,
        metadata={"dataset_path": "imagenet1k", "token_selection": token_selection},
        paper="arXiv:2504.19475",
    )


_PRISMA_RELEASES = (
    _prisma("prisma-clip-vit-b-32-x64-all", _PRISMA_CLIP, PRISMA_CLIP_VANILLA, "all"),
    _prisma(
        "prisma-clip-vit-b-32-x64-cls",
        _PRISMA_CLIP,
        _by_layer("imagenet-sweep-vanilla-x64-CLS_", _PRISMA_CLS_VANILLA),
        "cls",
    ),
    _prisma(
        "prisma-clip-vit-b-32-topk64-cls",
        _PRISMA_CLIP,
        {
            f"blocks.{layer}.hook_resid_post": f"sae-top_k-64-cls_only-layer_{layer}-hook_resid_post"
            for layer in range(12)
        },
        "cls",
    ),
    _prisma(
        "prisma-clip-vit-b-32-x64-patches",
        _PRISMA_CLIP,
        _by_layer("imagenet-sweep-vanilla-x64-Spatial_max_", _PRISMA_SPATIAL_VANILLA),
        "patches",
    ),
    _prisma(
        "prisma-dino-vit-b-16-x64-all",
        _PRISMA_DINO,
        _by_layer("DINO-vanilla-x64-all_patches_", _PRISMA_DINO_VANILLA),
        "all",
    ),
)

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
        *_PRISMA_RELEASES,
    )
}


def release_metadata(repo_id: str, path_in_repo: str) -> dict[str, Any]:
    """Metadata (model, hook, ...) of the registered SAE stored at ``repo_id/path_in_repo``, else {}."""
    for release in RELEASES.values():
        if release.repo_id != repo_id:
            continue
        for pattern in release.saes.values():
            if path_in_repo == pattern or fnmatch.fnmatchcase(path_in_repo, pattern):
                hook = {"hook_name": release.hook_name} if release.hook_name else {}
                return {"model_name": release.model, **hook, **release.metadata}
    return {}
