"""What a training run (or the cache writer) reads, built from a :class:`VisionSAERunnerConfig`: the vision
model, the training and held-out images, the activation source, the row store, and the facts an SAE's
metadata keeps.

Shared by :mod:`~sae_vision_ext.training.runner` and :mod:`~sae_vision_ext.training.caching`, so the cache
writer reads exactly the images (split, held-out images, order, views) a run from images would read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sae_vision_ext.activations.cache import CachedActivations
from sae_vision_ext.activations.images import SubsetImages, open_images
from sae_vision_ext.activations.source import ImageActivationSource, tokens_per_image
from sae_vision_ext.activations.store import CachedActivationStore, ImageActivationStore
from sae_vision_ext.training.config import VisionSAERunnerConfig
from sae_vision_ext.vision.load import load_vision_model_with_record
from sae_vision_ext.vision.tokens import layout_of


def load_model_for(cfg: VisionSAERunnerConfig) -> tuple[Any, Any, dict[str, Any]]:
    """``(hooked model, preprocess, weights record)`` for ``cfg``: its weights file, else pretrained weights
    (downloaded when needed; ``PretrainedWeightsUnavailable`` when they cannot be had), else
    (``pretrained=False``) a random init drawn from ``cfg.seed``."""
    return load_vision_model_with_record(
        cfg.model_name,
        weights=cfg.model_weights,
        pretrained=cfg.pretrained,
        seed=cfg.seed,
        device=cfg.model_device or cfg.device,
        img_size=cfg.img_size,
    )


def token_layout_dict(model: Any, hook_name: str) -> dict[str, Any] | None:
    """The token layout at ``hook_name`` as stored in SAE and cache metadata (None for a pooled hook)."""
    layout = layout_of(model, hook_name)
    if layout is None:
        return None
    return {
        "n_cls": layout.n_cls,
        "n_registers": layout.n_registers,
        "grid_size": list(layout.grid_size),
        "n_patches": layout.n_patches,
        "n_prefix": layout.n_prefix,
    }


def vision_metadata(
    cfg: VisionSAERunnerConfig, hook: str, model: Any | None, weights: Any, cache_meta: dict | None
) -> dict[str, Any]:
    """The facts stored in the SAE's ``cfg.metadata`` so a loaded SAE knows where it belongs."""
    meta: dict[str, Any] = {
        "modality": "vision",
        "model_name": cfg.model_name,
        "hook_name": hook,
        "token_selection": cfg.token_selection,
        "weights": weights,
        "dataset_path": cfg.dataset_path or None,
        "augment": cfg.augment,
    }
    if model is not None:
        meta.update(
            image_size=list(model.cfg.image_size),
            context_size=tokens_per_image(model, hook, cfg.token_selection),
            token_layout=token_layout_dict(model, hook),
        )
    if cache_meta:
        kept = (
            "model_name",
            "weights",
            "token_selection",
            "image_size",
            "token_layout",
            "dataset_path",
            "augment",
        )
        for key in kept:
            if cache_meta.get(key) is not None:
                meta[key] = cache_meta[key]
        meta["context_size"] = cache_meta.get("context_size")
        meta["cached_activations_path"] = cfg.cached_activations_path
    return meta


def training_images(
    cfg: VisionSAERunnerConfig, images: Any = None, eval_images: Any = None
) -> tuple[Any, Any]:
    """``(training images, held-out images or None)``.

    ``images`` / ``eval_images`` override ``cfg.dataset_path`` / ``cfg.eval_dataset_path``. Without held-out
    images, ``cfg.eval_holdout_images`` training images (a seeded draw) are held out.
    """
    source = images if images is not None else cfg.dataset_path
    if source is None or (isinstance(source, str) and not source):
        raise ValueError("no images: set dataset_path (a hub dataset, a dataset folder or an image folder)")
    train = open_images(source, split=cfg.dataset_split, image_column=cfg.image_column)
    if eval_images is not None or cfg.eval_dataset_path:
        target = eval_images if eval_images is not None else cfg.eval_dataset_path
        return train, open_images(target, split=cfg.eval_dataset_split, image_column=cfg.image_column)
    if cfg.eval_holdout_images <= 0:
        return train, None
    n = len(train)
    if cfg.eval_holdout_images >= n:
        raise ValueError(f"eval_holdout_images={cfg.eval_holdout_images} leaves no training images (of {n})")
    order = np.random.default_rng([cfg.seed, 3]).permutation(n)
    held = sorted(order[: cfg.eval_holdout_images].tolist())
    kept = sorted(order[cfg.eval_holdout_images :].tolist())
    return SubsetImages(train, kept), SubsetImages(train, held)


def image_source(
    cfg: VisionSAERunnerConfig,
    model: Any,
    preprocess: Any,
    images: Any,
    *,
    seed: int,
    augment: str,
    num_workers: int | None = None,
) -> ImageActivationSource:
    """Rows of ``cfg``'s hooks and token selection from ``images`` through ``model``."""
    return ImageActivationSource(
        model,
        preprocess,
        images,
        cfg.hook_names,
        token_selection=cfg.token_selection,
        model_batch_size=cfg.model_batch_size,
        num_workers=cfg.num_workers if num_workers is None else num_workers,
        seed=seed,
        augment=augment,
        crop_scale=cfg.crop_scale,
        shuffle=cfg.shuffle_images,
        dtype=getattr(torch, cfg.dtype),
        autocast=cfg.autocast_model,
    )


def held_out_rows(
    cfg: VisionSAERunnerConfig, model: Any = None, preprocess: Any = None, eval_images: Any = None
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """``({hook: rows}, source)`` of the held-out data: the first ``cfg.n_eval_images`` images (or their rows
    in a held-out cache); ``(None, "")`` when nothing is held out."""
    if cfg.use_cached_activations:
        if not cfg.eval_dataset_path:
            return None, ""
        cache = CachedActivations(cfg.eval_dataset_path)
        limit = cfg.n_eval_images * (cache.context_size or 1)
        rows = {}
        for hook in cfg.hook_names:
            pieces, have = [], 0
            for block in cache.iter_rows(hook):
                pieces.append(torch.from_numpy(block[: limit - have].astype("float32")))
                have += pieces[-1].shape[0]
                if have >= limit:
                    break
            rows[hook] = torch.cat(pieces)
        return rows, "held-out cache"
    if eval_images is None:
        return None, ""
    augment = cfg.eval_augment or cfg.augment
    source = image_source(cfg, model, preprocess, eval_images, seed=cfg.seed + 1, augment=augment)
    pieces: dict[str, list[torch.Tensor]] = {h: [] for h in cfg.hook_names}
    for chunk in source.iter_chunks(0, cfg.n_eval_images):
        for h in cfg.hook_names:
            pieces[h].append(chunk.rows[h])
    rows = {h: torch.cat(p).float() for h, p in pieces.items()}
    if next(iter(rows.values())).shape[0] == 0:
        raise RuntimeError("none of the evaluation images could be read")
    return rows, "held-out images"


def buffer_rows(cfg: VisionSAERunnerConfig) -> int:
    """The mixing buffer, capped at the run's length: a larger one would only delay the first step."""
    return max(cfg.train_batch_size_rows, min(cfg.buffer_size_rows, cfg.training_rows))


def row_store(
    cfg: VisionSAERunnerConfig,
    position: dict | None,
    *,
    cache: CachedActivations | None = None,
    source: ImageActivationSource | None = None,
) -> CachedActivationStore | ImageActivationStore:
    """The training batches: from ``cache`` (no model), else from ``source`` through the mixing buffer;
    ``position`` (a store's ``state_dict``) continues where a checkpoint stopped."""
    if cfg.use_cached_activations:
        return CachedActivationStore(
            cache,
            cfg.train_batch_size_rows,
            cfg.hook_names,
            seed=cfg.seed,
            position=position,
            dtype=getattr(torch, cfg.dtype),
        )
    return ImageActivationStore(
        source,
        cfg.train_batch_size_rows,
        buffer_rows=buffer_rows(cfg),
        mix_fraction=cfg.activations_mixing_fraction,
        images_per_segment=cfg.images_per_segment,
        seed=cfg.seed,
        prefetch=cfg.prefetch_batches,
        position=position,
    )
