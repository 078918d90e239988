"""Evaluate a saved SAE folder where it belongs: on the rows its training run held out (rebuilt exactly from
the run's config), on other images through the model it was trained on (rebuilt from its metadata), or on a
cache.

Every mismatch between the SAE and what it is evaluated on (model, hook, token selection, weights) is said.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from sae_vision_ext._saelens_compat import RUNNER_CFG_FILENAME, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_vision_ext.activations.cache import CachedActivations
from sae_vision_ext.activations.images import open_images
from sae_vision_ext.activations.source import ImageActivationSource
from sae_vision_ext.errors import UserError
from sae_vision_ext.loading.checks import warn_if_not_finite
from sae_vision_ext.training.config import VisionSAERunnerConfig
from sae_vision_ext.training.data import held_out_rows, training_images
from sae_vision_ext.training.metrics import evaluate_sae
from sae_vision_ext.training.monitor import per_k_metrics
from sae_vision_ext.vision.load import _as_record, describe_weights, load_model_for_sae


def load_sae_folder(path: str | Path, device: str = "cpu") -> SAE:
    """``SAE.load_from_disk`` with errors that say what to do (missing folder, unregistered architecture)."""
    folder = Path(path)
    if not (folder / SAE_CFG_FILENAME).is_file():
        raise FileNotFoundError(
            f"{folder} is not an SAE folder (no {SAE_CFG_FILENAME}); give the folder that holds "
            f"{SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}"
        )
    try:
        sae = SAE.load_from_disk(str(folder), device=device)
    except KeyError as err:
        architecture = json.loads((folder / SAE_CFG_FILENAME).read_text()).get("architecture")
        raise UserError(
            f"{folder}: SAE architecture {architecture!r} is not registered with SAELens; "
            "`import sae_vision_ext` (or the plugin that defines it) before loading"
        ) from err
    warn_if_not_finite(sae, str(folder))
    return sae


def evaluate_rows_per_k(
    sae: Any, batches: Callable[[], Iterator[torch.Tensor]], ks: list[int] | None, progress: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of the SAE's default encode, then the per-k rows
    (:func:`~sae_vision_ext.training.monitor.per_k_metrics`) at ``ks`` (default: a Matryoshka SAE's trained
    levels and d_sae; none for other SAEs)."""
    metrics = evaluate_sae(sae, batches(), progress=progress)

    def at(encode_kwargs: dict[str, Any]) -> dict[str, Any]:
        return evaluate_sae(sae, batches(), encode_kwargs=encode_kwargs, progress=progress)

    return metrics, per_k_metrics(sae, at, ks=ks)


def evaluate_sae_folder(
    sae_path: str | Path,
    dataset: Any = None,
    cache: str | None = None,
    n_images: int | None = None,
    split: str = "train",
    model_name: str | None = None,
    weights: str | None = None,
    ks: list[int] | None = None,
    device: str = "cpu",
    workers: int = 0,
    say: Callable[[str], Any] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of a saved SAE (``fvu``, ``cosine``, ``l0``, ... and ``per_k`` for Matryoshka SAEs, at ``ks``
    or every trained level).

    Evaluated on ``cache`` (``n_images`` x tokens-per-image rows), on ``dataset`` images (through the model
    its metadata names, rebuilt by :func:`load_model_for_sae`; ``model_name`` / ``weights`` override it), or,
    with neither, on the held-out rows of the run that trained it (its ``runner_cfg.json``): the same rows, so
    the same numbers as the run's own summary.
    """
    sae = load_sae_folder(sae_path, device=device)
    meta = sae.cfg.metadata
    hook = meta.get("hook_name")
    if hook is None:
        raise UserError(f"{sae_path} has no hook_name in its metadata; it was not trained by sae_vision_ext")
    if cache:
        rows_of, source = _cache_rows(cache, sae, hook, n_images, say), f"cache {cache}"
    elif dataset is not None:
        rows_of, source = _image_rows(
            sae, hook, dataset, split, n_images, model_name, weights, device, workers, say
        )
    else:
        rows_of, source = _held_out_rows(sae, sae_path, hook, model_name, weights, device)
    metrics, per_k = evaluate_rows_per_k(sae, rows_of, ks, progress=progress)
    return {**metrics, "per_k": per_k, "source": source}


def _cache_rows(cache: str, sae: Any, hook: str, n_images: int | None, say: Callable) -> Callable:
    cached = CachedActivations(cache)
    if hook not in cached.hook_widths:
        raise UserError(
            f"cache {cache} has no activations of {hook!r} (the SAE's hook); it holds {cached.hook_names}"
        )
    meta = sae.cfg.metadata
    for key in ("model_name", "token_selection", "img_size"):
        ours, theirs = meta.get(key), cached.metadata.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            say(f"warning: the SAE was trained with {key}={ours!r}, the cache {cache} holds {key}={theirs!r}")
    ours, theirs = _as_record(meta.get("weights")), _as_record(cached.metadata.get("weights"))
    if ours and theirs and ours != theirs:
        say(
            f"warning: the SAE was trained on {describe_weights(ours)}, the cache holds "
            f"{describe_weights(theirs)}"
        )
    limit = None if n_images is None else n_images * (cached.context_size or 1)

    def batches() -> Iterator[torch.Tensor]:
        have = 0
        for block in cached.iter_rows(hook, block_rows=4096):
            if limit is not None:
                block = block[: limit - have]
            have += block.shape[0]
            yield torch.from_numpy(block.astype("float32"))
            if limit is not None and have >= limit:
                return

    return batches


def _image_rows(sae, hook, dataset, split, n_images, model_name, weights, device, workers, say):
    model, preprocess, _ = load_model_for_sae(
        sae, device=device, model_name=model_name, weights=weights, say=say
    )
    images = open_images(dataset, split=split) if isinstance(dataset, (str, Path)) else dataset
    selection = sae.cfg.metadata.get("token_selection") or "patches"
    source = ImageActivationSource(
        model, preprocess, images, hook, token_selection=selection, num_workers=workers, shuffle=False
    )
    count = source.n_images if n_images is None else min(n_images, source.n_images)
    rows = torch.cat([chunk.rows[hook] for chunk in source.iter_chunks(0, count)]).float()
    if rows.shape[0] == 0:
        raise UserError(f"none of the images in {dataset} could be read")
    name = dataset if isinstance(dataset, (str, Path)) else "in-memory images"
    return (lambda: iter(rows.split(4096))), f"images {name} ({source.n_ok} read, {source.n_failed} skipped)"


def _held_out_rows(sae, sae_path, hook, model_name, weights, device):
    folder = Path(sae_path)
    cfg_file = next(
        (p / RUNNER_CFG_FILENAME for p in (folder, folder.parent) if (p / RUNNER_CFG_FILENAME).is_file()),
        None,
    )
    if cfg_file is None:
        raise UserError(
            f"{sae_path} has no {RUNNER_CFG_FILENAME} (not trained by sae-vision train): give --dataset "
            "IMAGES or --cache DIR to evaluate on"
        )
    data = json.loads(cfg_file.read_text())
    data.update(device=device, model_device=None, num_workers=0, verbose=False)
    if model_name:
        data["model_name"] = model_name
    if weights:
        data.update(model_weights=weights, pretrained=False)
    cfg = VisionSAERunnerConfig.from_dict(data)
    if not cfg.use_cached_activations and not cfg.dataset_path:
        raise UserError(
            f"the run that trained {sae_path} read images passed in memory, which cannot be reopened: "
            "give --dataset IMAGES or --cache DIR"
        )
    if cfg.use_cached_activations:
        rows, source = held_out_rows(cfg)
    else:  # the images, order and views the run held out, through the model the SAE was trained on
        model, preprocess, _ = load_model_for_sae(sae, device=device, model_name=model_name, weights=weights)
        _, eval_images = training_images(cfg)
        rows, source = held_out_rows(cfg, model, preprocess or model.preprocess, eval_images)
    if rows is None:
        raise UserError(
            f"the run that trained {sae_path} held nothing out (no eval_dataset_path or "
            "eval_holdout_images): give --dataset IMAGES or --cache DIR"
        )
    return (lambda: iter(rows[hook].split(4096))), f"{source} of the training run"
