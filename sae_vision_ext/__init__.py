"""sae-vision-ext: vision sparse autoencoders for SAELens.

``import sae_vision_ext`` makes the plugin's SAE architectures and named Hub releases known to SAELens, so
``SAE.load_from_disk``, ``SAE.from_pretrained``, ``TrainingSAEConfig.from_dict`` and SAELens's runners resolve
them. Importing SAELens costs 5-8 s, so the package does not import it itself: if SAELens is already imported
the registration happens now, otherwise the moment SAELens finishes importing (a one-shot import hook). That
keeps ``import sae_vision_ext`` and ``sae-vision --help`` instant.

The public API (``MatryoshkaTopKSAE``, ``RASAE``, ``VisionSAERunnerConfig``, ``load_vision_model``, ...) is
resolved on first access (PEP 562).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from sae_vision_ext._registration import defer, resume_registration

__version__ = "0.1.0"

_SAES = "sae_vision_ext.saes"
_LAZY = {
    **dict.fromkeys(
        ["MatryoshkaTopKSAE", "MatryoshkaTopKSAEConfig", "MatryoshkaTopKTrainingSAE",
         "MatryoshkaTopKTrainingSAEConfig", "default_k_levels"], f"{_SAES}.matryoshka_topk"),
    **dict.fromkeys(
        ["RASAE", "RASAEConfig", "RASAETrainingSAE", "RASAETrainingSAEConfig", "ASAE", "ASAEConfig",
         "ASAETrainingSAE", "ASAETrainingSAEConfig", "ArchetypalMatryoshkaTopKSAE",
         "ArchetypalMatryoshkaTopKSAEConfig", "ArchetypalMatryoshkaTopKTrainingSAE",
         "ArchetypalMatryoshkaTopKTrainingSAEConfig", "ArchetypalDictionary"], f"{_SAES}.archetypal"),
    "VisionSAERunnerConfig": "sae_vision_ext.training.config",
    "VisionSAETrainingRunner": "sae_vision_ext.training.runner",
    "TrainingResult": "sae_vision_ext.training.runner",
    "cache_activations": "sae_vision_ext.training.caching",
    "load_vision_model": "sae_vision_ext.vision.load",
    "load_vision_model_or_random": "sae_vision_ext.vision.load",
    "load_model_for_sae": "sae_vision_ext.vision.load",
    "HookedVisionModel": "sae_vision_ext.vision.hooked_vision_model",
    "TokenLayout": "sae_vision_ext.vision.hooked_vision_model",
}  # fmt: skip


def register_architectures() -> list[str]:
    """Register the plugin's architectures and releases with SAELens now (idempotent); returns the names."""
    from sae_vision_ext.loading.registration import register_releases
    from sae_vision_ext.saes import register_architectures as register

    names = register()
    register_releases()
    return names


# Modules that register their own classes when they finish importing (SAELens's own pattern).
_SELF_REGISTERING = (
    "sae_vision_ext._saelens_compat",
    "sae_vision_ext.saes",
    "sae_vision_ext.saes.matryoshka_topk",
    "sae_vision_ext.saes.archetypal",
    "sae_vision_ext.loading.overcomplete",
    "sae_vision_ext.loading.registration",
)


def _importing(module_name: str) -> bool:
    # importlib marks a module's spec while its code runs (CPython since 3.4)
    module = sys.modules.get(module_name)
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register_after_sae_lens_import() -> None:
    """When one of our self-registering modules is what imported SAELens, its classes do not exist yet: that
    module finishes first and calls :func:`resume_registration` at its end."""
    if any(_importing(name) for name in _SELF_REGISTERING):
        defer()
    else:
        register_architectures()


class _RegisterAfterSaeLens(importlib.abc.MetaPathFinder):
    """Import hook: once ``sae_lens`` has finished importing, register the plugin with it, then step aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sae_lens":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_after_sae_lens_import()

        spec.loader.exec_module = exec_then_register
        return spec


if "sae_lens" in sys.modules:
    _register_after_sae_lens_import()
elif not any(isinstance(finder, _RegisterAfterSaeLens) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterSaeLens())


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_vision_ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["register_architectures", "resume_registration", "__version__", *_LAZY]
