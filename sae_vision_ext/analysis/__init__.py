"""Steering and interpretation: SAE splicing, steering hooks, concept naming, similarity search, bias probe, dashboards.

Modules (each imported on first use of one of its names here):

- ``splice``: ``SAESplicingMixin`` (``add_sae``, ``saes()``, ``run_with_saes``, ``run_with_cache_with_saes``,
  ``reset_saes``), a base class of ``HookedVisionModel``
- ``steering``: ``steer(model, sae, latents, mode, value, tokens)`` context manager, ``steer_vectors``,
  ``latent_directions``
- ``concepts``: ``name_concepts(sae, vocabulary, model=...)`` (MSAE concept naming), text-embedding cache
- ``vocabulary``: the shipped English word list
- ``retrieval``: ``concept_search`` (steered similarity search), ``embed_images``, ``nearest``
- ``bias``: ``bias_probe``, ``fit_linear_probe``, ``zero_shot_classifier``, ``load_attributes``
- ``dashboard``: ``write_dashboard`` (HTML + FVU-L0 PNG), ``plot_fvu_vs_l0``; CLI ``sae-vision dashboard``
- ``browser``: ``open_page`` (headless Chromium: DOM, console, screenshot)
- ``toy``: tiny models, SAEs and images for examples and tests
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SAESplicingMixin": "splice",
    "steer": "steering",
    "steer_vectors": "steering",
    "latent_directions": "steering",
    "name_concepts": "concepts",
    "ConceptNames": "concepts",
    "default_vocabulary": "vocabulary",
    "concept_search": "retrieval",
    "embed_images": "retrieval",
    "bias_probe": "bias",
    "fit_linear_probe": "bias",
    "zero_shot_classifier": "bias",
    "load_attributes": "bias",
    "write_dashboard": "dashboard",
    "plot_fvu_vs_l0": "dashboard",
    "open_page": "browser",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"sae_vision_ext.analysis.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'sae_vision_ext.analysis' has no attribute {name!r}")


__all__ = list(_LAZY)
