"""Steering and interpretation: SAE splicing, steering hooks, concept naming, similarity search, bias probe,
dashboards.

Modules (each imported on first use of one of its names here):

- ``steering``: ``steer(model, sae, latents, mode, value, tokens)`` context manager, ``steer_vectors``,
  ``latent_directions``
- ``concepts``: ``name_concepts(sae, vocabulary, model=...)`` (MSAE concept naming), text-embedding cache
- ``vocabulary``: the shipped English word list
- ``retrieval``: ``concept_search`` (steered similarity search), ``embed_images``, ``nearest``
- ``bias``: ``bias_probe``, ``load_attributes``; ``fit_linear_probe``, ``zero_shot_head`` (from
  ``evals.representation``)
- ``dashboard``: ``write_dashboard`` (HTML page, FVU-L0 PNG), ``collect_dashboard_data``; the page is
  ``dashboard_page`` (a jinja2 template), the plot ``evals.plots.plot_fvu_vs_l0``; the CLI
  ``commands.dashboard``
- ``browser``: ``open_page`` (headless Chromium: DOM, console, screenshot)
- ``toy``: tiny models, SAEs and images for examples and tests
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
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
    "zero_shot_head": "bias",
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
