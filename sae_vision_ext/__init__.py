"""sae-vision-ext: vision sparse autoencoders for SAELens.

Importing this package registers the plugin's SAE architectures with SAELens (idempotently), so
``SAE.load_from_disk``, ``SAE.from_pretrained`` and SAELens's training runners resolve them. Heavy
libraries (timm, open_clip, datasets) are imported only where they are used.
"""

from sae_vision_ext.loading import register_releases
from sae_vision_ext.saes import register_architectures

register_architectures()
register_releases()

__version__ = "0.1.0"

_LAZY = {
    "load_vision_model": "sae_vision_ext.vision.load",
    "HookedVisionModel": "sae_vision_ext.vision.hooked_vision_model",
    "TokenLayout": "sae_vision_ext.vision.hooked_vision_model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_vision_ext' has no attribute {name!r}")


__all__ = ["register_architectures", "__version__", *_LAZY]
