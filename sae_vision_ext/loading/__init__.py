"""Loading vision SAEs: the plugin's named releases, converters for published checkpoints, Hub upload.

``register_releases()`` (called by ``import sae_vision_ext``) is cheap: it adds loaders and directory
entries to SAELens without reading or downloading anything. Everything else is imported on first use.
"""

import importlib

from sae_vision_ext.loading.releases import RELEASES

_LAZY = {
    "register_releases": "sae_vision_ext.loading.registration",
    "load_pretrained": "sae_vision_ext.loading.pretrained",
    "vision_releases": "sae_vision_ext.loading.pretrained",
    "set_inference_k": "sae_vision_ext.loading.pretrained",
    "check_sae_fits_model": "sae_vision_ext.loading.checks",
    "convert_checkpoint": "sae_vision_ext.loading.convert",
    "convert_file": "sae_vision_ext.loading.convert",
    "safe_torch_load": "sae_vision_ext.loading.safe_load",
    "UnsafeCheckpointError": "sae_vision_ext.loading.safe_load",
    "save_hub_folder": "sae_vision_ext.loading.hub",
    "push_to_hub": "sae_vision_ext.loading.hub",
    "model_card": "sae_vision_ext.loading.hub",
    "seed_hf_cache": "sae_vision_ext.loading.hub_cache",
    "msae_huggingface_loader": "sae_vision_ext.loading.msae",
    "overcomplete_huggingface_loader": "sae_vision_ext.loading.overcomplete",
    "prisma_huggingface_loader": "sae_vision_ext.loading.prisma",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_vision_ext.loading' has no attribute {name!r}")


__all__ = ["RELEASES", *_LAZY]
