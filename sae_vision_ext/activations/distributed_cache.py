"""Activation caching in parallel over the ranks of a torchrun job, into one ordinary cache.

The single-process writer (:class:`~sae_vision_ext.activations.cache.ActivationCacheWriter`) already cuts the
work into shards: shard i holds image positions ``[i M, (i + 1) M)``, its content is a function of ``(seed,
i)`` and the model only, and it is written under its global name ``data-<i>.arrow`` (temporary name, fsync,
rename) into ``<path>.incomplete/``. Parallel caching therefore needs no new file format, only a schedule:

1. rank 0 runs ``prepare()`` (creates or validates the work folder, lists the shards still missing) and
   broadcasts that list, so every rank works from the same list;
2. rank r writes shards ``todo[r], todo[r + W], ...``: disjoint, and together all of them;
3. barrier; rank 0 runs ``commit()`` (dataset files, metadata, one atomic rename); barrier.

The result is byte-for-byte the cache one process would have written (same shards, same names), readable by
the single-process reader and by SAELens. An interrupted job is resumed by running it again (with any number
of ranks): finished shards are kept. All ranks must see the same filesystem (one node, or a shared one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from sae_vision_ext.activations.cache import ActivationCacheWriter
from sae_vision_ext.activations.process_group import DistributedContext, current_context
from sae_vision_ext.activations.rows import CachedActivations

__all__ = [
    "assign_shards",
    "claim_shards",
    "commit_distributed",
    "write_cache_distributed",
    "source_shard_writer",
    "cache_activations_distributed",
]


def assign_shards(todo: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s shards: ``todo[rank::world_size]`` (round robin keeps the ranks within one shard)."""
    return list(todo[rank::world_size])


def _broadcast_object(value: Any, context: DistributedContext) -> Any:
    if not context.is_distributed:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def claim_shards(writer: ActivationCacheWriter, context: DistributedContext | None = None) -> list[int]:
    """This rank's share of the shards still missing: rank 0 runs ``writer.prepare()`` and broadcasts the
    list.

    Errors raised by ``prepare()`` on rank 0 (settings changed, cache exists) are raised on every rank. With
    one process this is ``writer.prepare()``.
    """
    context = context or current_context()
    outcome: tuple[str, Any]
    if context.is_main:
        try:
            outcome = ("ok", writer.prepare())
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            outcome = ("error", error)
    else:
        outcome = ("ok", None)
    outcome = _broadcast_object(outcome, context)
    if outcome[0] == "error":
        raise outcome[1]
    return assign_shards(outcome[1], context.rank, context.world_size)


def commit_distributed(
    writer: ActivationCacheWriter, context: DistributedContext | None = None
) -> CachedActivations:
    """Barrier (every rank's shards on disk), ``writer.commit()`` on rank 0, barrier; the cache, on all."""
    context = context or current_context()
    context.barrier()
    if context.is_main:
        writer.commit()
    context.barrier()
    return CachedActivations(writer.path)


def write_cache_distributed(
    writer: ActivationCacheWriter,
    write_shard: Callable[[int], None],
    context: DistributedContext | None = None,
) -> CachedActivations:
    """Write the missing shards of ``writer``'s cache over all ranks, then commit once (rank 0).

    ``write_shard(i)`` computes shard i and stores it with ``writer.write_shard``. Returns the committed cache
    on every rank.
    """
    for index in claim_shards(writer, context):
        write_shard(index)
    return commit_distributed(writer, context)


def source_shard_writer(source: Any, writer: ActivationCacheWriter) -> Callable[[int], None]:
    """``write_shard(i)`` for an :class:`~sae_vision_ext.activations.source.ImageActivationSource`.

    Runs the model on image positions ``writer.shard_range(i)`` and stores one context row per image
    (``context_size = source.tokens_per_image``), with the readable / unreadable image counts.
    """

    def write_shard(index: int) -> None:
        start, end = writer.shard_range(index)
        parts: dict[str, list[torch.Tensor]] = {hook: [] for hook in source.hook_names}
        n_ok = n_failed = 0
        for chunk in source.iter_chunks(start, end):
            for hook in parts:
                parts[hook].append(chunk.rows[hook])
            n_ok += chunk.n_images_ok
            n_failed += chunk.n_images_failed
        rows = {hook: torch.cat(blocks) for hook, blocks in parts.items()}
        writer.write_shard(
            index, rows, source.tokens_per_image, {"n_images_ok": n_ok, "n_images_failed": n_failed}
        )

    return write_shard


def cache_activations_distributed(
    source: Any,
    path: str | os.PathLike,
    n_images: int | None = None,
    images_per_shard: int = 1024,
    settings: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    context: DistributedContext | None = None,
) -> CachedActivations:
    """Cache ``n_images`` positions (default: one epoch) of ``source`` at ``path``, shards split over the
    ranks.

    ``settings`` must describe everything that determines the content (model, weights, hooks, selection,
    images, augmentation); they are checked when an interrupted cache is resumed.
    """
    n_images = int(n_images if n_images is not None else source.n_images)
    base_settings = {
        "hook_names": list(source.hook_names),
        "token_selection": source.token_selection,
        "tokens_per_image": source.tokens_per_image,
        "n_images": n_images,
    }
    writer = ActivationCacheWriter(
        path,
        n_images,
        images_per_shard,
        {**base_settings, **(settings or {})},
        metadata,
        dtype,
        seed,
        overwrite,
    )
    return write_cache_distributed(writer, source_shard_writer(source, writer), context)
