"""Concept-based similarity search (MSAE paper): steer a query's embedding along a named latent, retrieve.

For a query embedding ``q`` (an image embedding from the model the SAE was trained on), a latent ``i`` and a
strength ``s``, the steered query is (see ``analysis.steering``)

    mode="add":    q' = q + s * a_i                     (a_i: the latent's decoder atom in embedding space)
    mode="clamp":  q' = q + decode(z') - decode(z),  z = encode(q),  z'_i = s
    mode="scale":  same with z'_i = s * z_i

(the SAE's reconstruction error stays in ``q'``), and the result is the ``top_k`` gallery items by cosine
similarity ``cos(q', g_n)``. A latent may be given by index or by its concept name (see
``analysis.concepts``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_vision_ext.analysis.steering import steer_vectors


def resolve_latent(latent: int | str, names: Any = None) -> int:
    """An index from an index or a concept name (``names``: ``ConceptNames`` or a mapping latent -> word)."""
    if isinstance(latent, int) or (isinstance(latent, str) and latent.isdigit()):
        return int(latent)
    if names is None:
        raise ValueError(f"latent {latent!r} is a name but no concept names were given")
    if hasattr(names, "latent_for"):
        return int(names.latent_for(latent))
    matches = [int(i) for i, word in dict(names).items() if word == latent]
    if not matches:
        raise KeyError(f"no latent is named {latent!r}")
    return matches[0]


def embed_images(
    model: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 64, device: str | None = None
) -> Tensor:
    """Model outputs (image embeddings) ``[N, d]`` for a preprocessed image batch ``[N, 3, H, W]``."""
    outputs = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            if device is not None:
                batch = batch.to(device)
            outputs.append(model(batch).detach().float().cpu())
    return torch.cat(outputs)


def nearest(
    queries: Tensor, gallery: Tensor, top_k: int = 10, chunk_size: int = 65536
) -> tuple[Tensor, Tensor]:
    """Cosine top-k: ``(scores [Q, k], indices [Q, k])`` of ``gallery`` rows nearest each query row."""
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    top_k = min(top_k, gallery.shape[0])
    best_scores = torch.full((queries.shape[0], 0), float("-inf"))
    best_index = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for start in range(0, gallery.shape[0], chunk_size):
        chunk = torch.nn.functional.normalize(
            gallery[start : start + chunk_size].float().to(queries.device), dim=-1
        )
        scores = (queries @ chunk.T).cpu()
        k = min(top_k, scores.shape[1])
        chunk_scores, chunk_index = scores.topk(k, dim=-1)
        best_scores = torch.cat([best_scores, chunk_scores], dim=1)
        best_index = torch.cat([best_index, chunk_index + start], dim=1)
        best_scores, order = best_scores.topk(min(top_k, best_scores.shape[1]), dim=-1)
        best_index = best_index.gather(1, order)
    return best_scores, best_index


@dataclass
class SearchResult:
    """``indices[q]`` / ``scores[q]``: the gallery items nearest the steered query ``q`` (best first)."""

    indices: Tensor
    scores: Tensor
    steered_queries: Tensor
    latent: int
    strength: float
    mode: str


def concept_search(
    sae: Any,
    query: Tensor,
    gallery: Tensor,
    latent: int | str,
    strength: float,
    mode: str = "add",
    top_k: int = 10,
    names: Mapping[int, str] | Any = None,
    model: Callable[[Tensor], Tensor] | None = None,
    exclude: Sequence[int] | None = None,
) -> SearchResult:
    """Steer ``query`` along ``latent`` with ``strength`` and return the nearest ``gallery`` embeddings.

    ``query``: an embedding ``[d]`` / ``[Q, d]``, or preprocessed images ``[3, H, W]`` / ``[Q, 3, H, W]`` when
    ``model`` is given (it is then embedded first). ``gallery``: ``[N, d]`` embeddings. ``exclude``: gallery
    indices never returned (e.g. the query image itself).
    """
    latent_index = resolve_latent(latent, names)
    if query.dim() in (3, 4):
        if model is None:
            raise ValueError("query looks like images; pass model= to embed it")
        query = embed_images(model, query.unsqueeze(0) if query.dim() == 3 else query)
    if query.dim() == 1:
        query = query.unsqueeze(0)
    if query.shape[-1] != gallery.shape[-1]:
        raise ValueError(f"query dimension {query.shape[-1]} != gallery dimension {gallery.shape[-1]}")
    steered = steer_vectors(sae, query.float(), [latent_index], mode=mode, value=strength)
    if exclude:
        keep = torch.ones(gallery.shape[0], dtype=torch.bool)
        keep[torch.as_tensor(list(exclude), dtype=torch.long)] = False
        kept = keep.nonzero().squeeze(1)
        scores, local = nearest(steered, gallery[kept], top_k=top_k)
        indices = kept[local]
    else:
        scores, indices = nearest(steered, gallery, top_k=top_k)
    return SearchResult(
        indices=indices,
        scores=scores,
        steered_queries=steered,
        latent=latent_index,
        strength=float(strength),
        mode=mode,
    )
