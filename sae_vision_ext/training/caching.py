"""Write a training config's activations to an on-disk cache (``sae-vision cache``), for training without the
vision model.

The images, their order and views are those a run from images with the same config reads
(:mod:`~sae_vision_ext.training.data`); shards are written by :class:`ActivationCacheWriter`, so an
interrupted cache resumes, and under torchrun each rank writes its share of the shards.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from sae_lens.training.prefetch import PrefetchingIterator
from tqdm.auto import tqdm

from sae_vision_ext.activations.cache import (
    ActivationCacheWriter,
    CachedActivations,
    cache_metadata,
    check_replaceable,
    nothing_readable_error,
)
from sae_vision_ext.activations.distributed_cache import claim_shards, commit_distributed
from sae_vision_ext.activations.process_group import current_context
from sae_vision_ext.training.checkpoints import check_writable
from sae_vision_ext.training.config import VisionSAERunnerConfig
from sae_vision_ext.training.data import image_source, load_model_for, token_layout_dict, training_images


def cache_activations(
    cfg: VisionSAERunnerConfig,
    path: str | os.PathLike,
    n_images: int,
    images: Any = None,
    model: Any = None,
    preprocess: Any = None,
    overwrite: bool = False,
    say=None,
    progress: bool = True,
    allow_repeat: bool = False,
    weights: dict[str, Any] | None = None,
) -> CachedActivations:
    """Write the activations of ``n_images`` image positions (views) at ``cfg``'s hooks to an on-disk cache.

    Settings come from ``cfg`` (model, hooks, token selection, dataset, augmentation, seed,
    ``images_per_shard``, ``cache_dtype``); ``weights`` is the ``weights_record`` of a ``model`` passed in
    (else it is loaded from ``cfg`` and recorded). Running it again after an interruption reuses the finished
    shards. Returns :class:`~sae_vision_ext.activations.cache.CachedActivations`.

    More positions than the dataset holds images cycle through it: with ``augment="none"`` that caches the
    same views again and is refused unless ``allow_repeat``; either way the number of passes is said.
    """
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_writable(Path(path).parent, "cache folder")
    if Path(path).exists() or Path(path).is_symlink():  # refuse a folder that is not ours before any work
        check_replaceable(Path(path), overwrite=True)  # our complete cache: compared with this one below
    train_images, _ = training_images(cfg, images)
    n_dataset = len(train_images)
    passes = f"{n_images / n_dataset:.1f} passes over the same images"
    if n_images > n_dataset and cfg.augment == "none" and not allow_repeat:
        raise ValueError(
            f"cache_activations asks for {n_images:,} image positions but the dataset holds {n_dataset:,} "
            f"images: that is {passes}; pass allow_repeat (--allow-repeat) to cache repeated views, "
            "augment='crop_flip' (--augment crop_flip) for new random views, or ask for at most "
            f"{n_dataset:,}"
        )
    if model is None:
        model, preprocess, weights = load_model_for(cfg)
    elif preprocess is None:
        preprocess = model.preprocess
    source = image_source(cfg, model, preprocess, train_images, seed=cfg.seed, augment=cfg.augment)
    settings = {
        "model_name": cfg.model_name,
        "weights": weights,
        "img_size": cfg.img_size,
        "hook_names": source.hook_names,
        "token_selection": cfg.token_selection,
        "dataset_path": cfg.dataset_path if images is None else getattr(train_images, "name", "in-memory"),
        "dataset_split": cfg.dataset_split,
        "image_column": cfg.image_column,
        "n_dataset_images": source.n_images,
        "augment": cfg.augment,
        "crop_scale": list(cfg.crop_scale),
        "shuffle_images": cfg.shuffle_images,
        "eval_holdout_images": cfg.eval_holdout_images,
    }
    metadata = {
        **settings,
        "modality": "vision",
        "image_size": list(model.cfg.image_size),
        "token_layout": token_layout_dict(model, source.hook_names[0]),  # hooks give equal row counts
    }
    shard_images = max(
        cfg.model_batch_size, cfg.images_per_shard // cfg.model_batch_size * cfg.model_batch_size
    )
    writer = ActivationCacheWriter(
        path,
        n_images,
        shard_images,
        settings,
        metadata=metadata,
        dtype=cfg.cache_dtype,
        seed=cfg.seed,
        overwrite=overwrite,
    )
    if (Path(path) / "state.json").exists() and not overwrite:  # the same command again on a finished cache
        _check_same_cache(path, writer, n_images)
        say(f"{path} already holds this cache, complete (same settings): nothing to do")
        return CachedActivations(path)

    context = current_context()
    if shard_images != cfg.images_per_shard and context.is_main:
        say(
            f"images per shard: {shard_images:,} instead of {cfg.images_per_shard:,} (--shard-images): a "
            f"shard holds whole model batches of {cfg.model_batch_size:,} (--model-batch-size)"
        )
    if n_images > n_dataset and context.is_main:
        views = (
            "the same views (allow_repeat)" if cfg.augment == "none" else f"new random views ({cfg.augment})"
        )
        say(f"caching {n_images:,} image positions from {n_dataset:,} images: {passes}, {views}")
    if context.is_distributed:  # torchrun: rank 0 lists the missing shards, each rank writes its share
        todo = claim_shards(writer, context)
        if not context.is_main:
            say, progress = (lambda msg: None), False
        desc, total, done = (
            f"caching activations (rank 0 of {context.world_size})",
            _images_in(writer, todo),
            0,
        )
    else:
        todo = writer.prepare()
        if writer.n_shards > len(todo):
            n_written = writer.n_shards - len(todo)
            say(
                f"resuming the cache in {writer.work}: {n_written} of {writer.n_shards} shards already "
                "written"
            )
        written = [i for i in range(writer.n_shards) if i not in todo]
        desc, total, done = "caching activations", n_images, _images_in(writer, written)
    bar = tqdm(total=total, initial=done, unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        _write_shards(cfg, source, writer, todo, shard_images, bar)
    except RuntimeError:  # the source gives up when none of the first images can be read
        if source.n_ok or not source.n_failed or not writer.discard_if_empty():
            raise
        error = nothing_readable_error(settings["dataset_path"], source.n_failed, n_dataset, source.failures)
        raise error from None
    finally:
        bar.close()
    if not context.is_distributed and not source.n_ok and source.n_failed and writer.discard_if_empty():
        raise nothing_readable_error(settings["dataset_path"], source.n_failed, n_dataset, source.failures)
    cache = commit_distributed(writer, context) if context.is_distributed else writer.commit()
    meta = cache.metadata
    say(
        f"cache written: {cache.path} ({meta['n_rows']:,} rows of {meta['hook_widths']}, "
        f"{meta['n_images_ok']:,} images read, {meta['n_images_failed']:,} skipped)"
    )
    return cache


def _images_in(writer: ActivationCacheWriter, shards: list[int]) -> int:
    return sum(writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in shards)


def _check_same_cache(path: str | os.PathLike, writer: ActivationCacheWriter, n_images: int) -> None:
    """A complete cache at ``path`` must have been made with this call's settings (``FileExistsError``)."""
    stored = json.loads(json.dumps(cache_metadata(path), default=str))
    wanted = json.loads(json.dumps({**writer.settings, "n_images": n_images}, default=str))
    differs = sorted(key for key, value in wanted.items() if stored.get(key) != value)
    if differs:
        raise FileExistsError(
            f"{path} already holds a complete cache made with other settings (differs in: "
            f"{', '.join(differs)}); pass overwrite (--overwrite) to replace it, or choose another output "
            "folder"
        )


def _write_shards(
    cfg, source, writer: ActivationCacheWriter, todo: list[int], shard_images: int, bar
) -> None:
    """Write shards ``todo``: each run of consecutive shards is one pass of the source (the model runs ahead
    by ``cfg.prefetch_batches`` chunks)."""
    runs: list[list[int]] = []
    for index in todo:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    for run in runs:
        start, end = writer.shard_range(run[0])[0], writer.shard_range(run[-1])[1]
        chunks = PrefetchingIterator(
            source.iter_chunks(start, end, boundary=shard_images), prefetch=max(1, cfg.prefetch_batches)
        )
        try:
            pending: dict[str, list[torch.Tensor]] = {h: [] for h in source.hook_names}
            ok = failed = 0
            for chunk in chunks:
                for h in source.hook_names:
                    pending[h].append(chunk.rows[h])
                ok, failed = ok + chunk.n_images_ok, failed + chunk.n_images_failed
                bar.update(chunk.end - chunk.start)
                bar.set_postfix(skipped=source.n_failed, refresh=False)
                index = chunk.start // shard_images
                if chunk.end == writer.shard_range(index)[1]:
                    rows = {h: torch.cat(p) for h, p in pending.items()}
                    counts = {"n_images_ok": ok, "n_images_failed": failed}
                    writer.write_shard(index, rows, source.tokens_per_image, counts)
                    pending = {h: [] for h in source.hook_names}
                    ok = failed = 0
        finally:
            chunks.close()
