"""The plugin's SAE architectures and their registration into SAELens.

Each architecture module registers its classes at its end (as SAELens's own modules do), so importing the
module is enough; :func:`register_architectures` imports them all.
"""

from __future__ import annotations

import importlib

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sae_vision_ext._registration import resume_registration

ARCHITECTURE_MODULES = ("sae_vision_ext.saes.matryoshka_topk", "sae_vision_ext.saes.archetypal")


def register(architectures) -> None:
    """Register ``(name, inference class, inference config, training class, training config)`` entries.

    Idempotent: a name SAELens already knows is left alone.
    """
    for name, sae_cls, cfg_cls, train_cls, train_cfg_cls in architectures:
        if name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, sae_cls, cfg_cls)
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, train_cls, train_cfg_cls)
    resume_registration()


def register_architectures() -> list[str]:
    """Import (and so register) every plugin architecture; returns their names.

    A module that is still being imported (it is what imported SAELens) registers itself when it finishes.
    """
    names = []
    for module_name in ARCHITECTURE_MODULES:
        module = importlib.import_module(module_name)
        names.extend(entry[0] for entry in getattr(module, "ARCHITECTURES", []))
    return names


# SAELens may have finished importing while this package was (the registry import above): finish now.
resume_registration()
