"""Make the plugin's named releases (``releases.py``) loadable through SAELens's own API.

How SAELens 6.54 resolves a release: ``get_pretrained_saes_directory()`` (a cached parse of the
``pretrained_saes.yaml`` shipped in SAELens) maps release -> repo id, sae id -> path in the repo and a
``conversion_func`` name, which ``NAMED_PRETRAINED_SAE_LOADERS`` maps to a loader returning
``(cfg_dict, state_dict, log_sparsity)``. :func:`register_releases` adds the plugin's loaders to that
dict and wraps ``get_pretrained_saes_directory`` so the directory also holds the plugin's releases. The
wrapper does not parse the YAML at import time (parsing takes ~1.7 s); it adds the entries whenever
SAELens asks for the directory, so even ``get_pretrained_saes_directory.cache_clear()`` keeps them.

:func:`register_releases` runs inside the hook that fires when SAELens finishes importing (see
``sae_vision_ext/__init__.py``), which may be in the middle of importing one of the converters. So the
loaders are registered as functions that import their converter when SAELens first calls them, and this
module is one of the self-registering modules that complete a deferred registration at their end.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.loading import pretrained_saes_directory as directory_module
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

from sae_vision_ext._registration import resume_registration
from sae_vision_ext.loading.releases import (
    MSAE_LOADER,
    OVERCOMPLETE_LOADER,
    PRISMA_LOADER,
    RELEASES,
    VisionRelease,
)


def _lookup(release: VisionRelease) -> PretrainedSAELookup:
    hook = {"hook_name": release.hook_name} if release.hook_name else {}  # empty: per SAE, from its config
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
        config_overrides={"model_name": release.model, **hook, **release.metadata},
    )


def _imported_on_call(module: str, name: str):
    """``module.name``, imported when first called (the converter may be half-imported right now).

    The module is imported by name at call time, not at the top of this file: see the module docstring.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


def _loaders() -> dict[str, tuple[Any, Any]]:
    """{conversion_func name: (SAELens loader, SAELens config getter)}."""
    msae, overcomplete = "sae_vision_ext.loading.msae", "sae_vision_ext.loading.overcomplete"
    prisma = "sae_vision_ext.loading.prisma"
    return {
        MSAE_LOADER: (
            _imported_on_call(msae, "msae_huggingface_loader"),
            _imported_on_call(msae, "get_msae_config_from_hf"),
        ),
        OVERCOMPLETE_LOADER: (
            _imported_on_call(overcomplete, "overcomplete_huggingface_loader"),
            _imported_on_call(overcomplete, "get_overcomplete_config_from_hf"),
        ),
        PRISMA_LOADER: (
            _imported_on_call(prisma, "prisma_huggingface_loader"),
            _imported_on_call(prisma, "get_prisma_config_from_hf"),
        ),
    }


def register_releases() -> list[str]:
    """Make the plugin's releases loadable by name through SAELens; safe to call any number of times."""
    # import-order: runs inside SAELens's import hook, maybe while overcomplete.py is half-imported (then
    # sys.modules already holds it); importing it registers the inference architecture ``overcomplete``
    importlib.import_module("sae_vision_ext.loading.overcomplete")
    for name, (loader, config_getter) in _loaders().items():
        loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault(name, loader)
        loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault(name, config_getter)
    _wrap_directory()
    return list(RELEASES)


def _wrap_directory() -> None:
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


resume_registration()
