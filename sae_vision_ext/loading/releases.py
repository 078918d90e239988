"""Named releases of published vision SAEs, loadable with SAELens's own API.

    import sae_vision_ext                      # registers the releases (no file is read or downloaded)
    from sae_lens import SAE
    sae = SAE.from_pretrained("msae-clip-vit-l-14", "centered")

How SAELens 6.54 resolves a release: ``get_pretrained_saes_directory()`` (a cached parse of the
``pretrained_saes.yaml`` shipped in SAELens) maps release -> repo id, sae id -> path in the repo and a
``conversion_func`` name, which ``NAMED_PRETRAINED_SAE_LOADERS`` maps to a loader returning
``(cfg_dict, state_dict, log_sparsity)``. :func:`register_releases` adds the plugin's loaders to that
dict and wraps ``get_pretrained_saes_directory`` so the directory also holds the plugin's releases. The
wrapper does not parse the YAML at import time (parsing takes ~1.7 s); it adds the entries whenever
SAELens asks for the directory, so even ``get_pretrained_saes_directory.cache_clear()`` keeps them.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import sys
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
            hook_name="blocks.11.hook_resid_post",
            conversion_func=OVERCOMPLETE_LOADER,
            saes={"32k": "RA-SAE-DINOv2-32k.pth"},
            metadata={"token_selection": "all", "input_transform": "final_layer_norm"},
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


def _lookup(release: VisionRelease):
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

    return PretrainedSAELookup(
        release=release.release,
        repo_id=release.repo_id,
        model=release.model,
        conversion_func=release.conversion_func,
        saes_map=dict(release.saes),
        expected_var_explained={sae_id: 1.0 for sae_id in release.saes},
        expected_l0={sae_id: 0.0 for sae_id in release.saes},
        neuronpedia_id={},
        norm_scaling_factor={},
        config_overrides={"model_name": release.model, "hook_name": release.hook_name, **release.metadata},
    )


def _deferred(module: str, name: str):
    """A function that imports ``module.name`` on first call: registering must not import half-loaded modules."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


def _loaders() -> dict[str, tuple[Any, Any]]:
    """{conversion_func name: (SAELens loader, SAELens config getter)}."""
    msae, overcomplete = "sae_vision_ext.loading.msae", "sae_vision_ext.loading.overcomplete"
    return {
        MSAE_LOADER: (_deferred(msae, "msae_huggingface_loader"), _deferred(msae, "get_msae_config_from_hf")),
        OVERCOMPLETE_LOADER: (
            _deferred(overcomplete, "overcomplete_huggingface_loader"),
            _deferred(overcomplete, "get_overcomplete_config_from_hf"),
        ),
    }


def register_releases() -> list[str]:
    """Make the plugin's releases loadable by name through SAELens; safe to call any number of times."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    importlib.import_module("sae_vision_ext.loading.overcomplete")  # registers the `overcomplete` architecture
    for name, (loader, config_getter) in _loaders().items():
        loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault(name, loader)
        loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault(name, config_getter)
    _wrap_directory()
    return list(RELEASES)


def _wrap_directory() -> None:
    from sae_lens.loading import pretrained_saes_directory as directory_module

    original = directory_module.get_pretrained_saes_directory
    if getattr(original, "_adds_sae_vision_ext_releases", False):
        return

    @functools.wraps(original)
    def get_pretrained_saes_directory():
        directory = original()
        for name, release in RELEASES.items():
            if name not in directory:
                directory[name] = _lookup(release)
        return directory

    get_pretrained_saes_directory.cache_clear = original.cache_clear
    get_pretrained_saes_directory.cache_info = original.cache_info
    get_pretrained_saes_directory._adds_sae_vision_ext_releases = True
    # Every SAELens module that imported the function by name holds its own reference; modules imported
    # later pick up the wrapper from pretrained_saes_directory itself.
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("sae_lens") and (
            getattr(module, "get_pretrained_saes_directory", None) is original
        ):
            module.get_pretrained_saes_directory = get_pretrained_saes_directory
