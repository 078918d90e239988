"""The plugin's SAE architectures and their registration into SAELens."""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)


def _architectures():
    """(name, inference class, inference config, training class, training config) for each architecture."""
    entries = []
    try:
        from sae_vision_ext.saes import matryoshka_topk as m
    except ImportError:  # pragma: no cover - module under construction
        m = None
    if m is not None:
        entries.extend(m.ARCHITECTURES)
    try:
        from sae_vision_ext.saes import archetypal as a
    except ImportError:  # pragma: no cover - module under construction
        a = None
    if a is not None:
        entries.extend(a.ARCHITECTURES)
    return entries


def register_architectures() -> list[str]:
    """Register every plugin architecture with SAELens; safe to call any number of times."""
    names = []
    for name, sae_cls, cfg_cls, train_cls, train_cfg_cls in _architectures():
        if name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, sae_cls, cfg_cls)
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, train_cls, train_cfg_cls)
        names.append(name)
    return names
