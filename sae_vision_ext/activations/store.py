"""Data providers for ``SAETrainer``: iterators of ``(batch, d_in)`` tensors (or ``{hook: tensor}`` for
several hooks) whose position can be saved and restored exactly.

``ImageActivationStore`` streams from images. The chunk producer (DataLoader workers decode, a background
thread runs the model) feeds SAELens's ``mixing_buffer``. The stream is cut into *segments* of ``M`` image
positions; each segment gets a fresh mixing buffer whose permutations draw from a generator seeded by ``(seed,
segment)`` (SAELens's buffer uses the global torch RNG, so its state is swapped in around each call and
swapped out again), and the rows it flushes unmixed at the segment's end are permuted too. The position is
therefore ``(segment, batches served in it)``: resuming re-runs at most one segment of forward passes and
hands out exactly the batches an uninterrupted run would have.

``CachedActivationStore`` streams an on-disk cache. Its position is the number of rows served: epoch ``e``
visits the shards in an order seeded by ``(seed, e)`` and, except for the first pass over a cache that was
shuffled when written, permutes the rows inside each shard with a generator seeded by ``(seed, e, shard)``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from sae_lens.training.mixing_buffer import mixing_buffer
from sae_lens.training.prefetch import PrefetchingIterator

from sae_vision_ext.activations.cache import mix_seed
from sae_vision_ext.activations.rows import CachedActivations


class TrainingInterrupted(Exception):
    """Raised by a data provider when a stop was requested (SIGINT / SIGTERM), between two training steps."""


def _pack(rows: dict[str, torch.Tensor], hooks: list[str]) -> torch.Tensor:
    return rows[hooks[0]] if len(hooks) == 1 else torch.cat([rows[h] for h in hooks], dim=1)


def _unpack(
    batch: torch.Tensor, hooks: list[str], widths: dict[str, int]
) -> torch.Tensor | dict[str, torch.Tensor]:
    if len(hooks) == 1:
        return batch
    out, offset = {}, 0
    for h in hooks:
        out[h] = batch[:, offset : offset + widths[h]]
        offset += widths[h]
    return out


@contextmanager
def _swapped_global_rng(box: list[torch.Tensor]):
    """Run the block on the CPU generator state ``box[0]``; store its new state back; restore the global."""
    saved = torch.random.get_rng_state()
    torch.random.set_rng_state(box[0])
    try:
        yield
    finally:
        box[0] = torch.random.get_rng_state()
        torch.random.set_rng_state(saved)


class ImageActivationStore:
    """Shuffled activation batches streamed from images (see the module docstring for the position).

    ``source``: an :class:`~sae_vision_ext.activations.source.ImageActivationSource`. ``batch_size``: rows per
    batch; ``buffer_rows`` / ``mix_fraction``: SAELens mixing-buffer size and kept fraction; ``prefetch``:
    chunks the background producer may run ahead (0 runs the model in the consumer's thread).
    """

    kind = "images"

    def __init__(
        self,
        source: Any,
        batch_size: int,
        buffer_rows: int = 65536,
        mix_fraction: float = 0.5,
        images_per_segment: int | None = None,
        seed: int = 0,
        prefetch: int = 2,
        position: dict[str, Any] | None = None,
        dict_batches: bool | None = None,
    ):
        self.source = source
        self.hooks = list(source.hook_names)
        self.widths = dict(source.hook_widths)
        self.batch_size = int(batch_size)
        self.buffer_rows = max(int(buffer_rows), self.batch_size)
        self.mix_fraction = float(mix_fraction)
        self.seed = int(seed)
        self.dict_batches = len(self.hooks) > 1 if dict_batches is None else dict_batches
        b = source.model_batch_size
        if images_per_segment is None:
            wanted_rows = max(4 * self.buffer_rows, 8 * self.batch_size)
            images_per_segment = -(-wanted_rows // source.tokens_per_image)
        self.images_per_segment = max(b, -(-int(images_per_segment) // b) * b)
        position = dict(position or {})
        if position and position.get("kind", self.kind) != self.kind:
            raise ValueError(f"cannot resume an image stream from a {position.get('kind')} position")
        if (
            position
            and position.get("images_per_segment", self.images_per_segment) != self.images_per_segment
        ):
            raise ValueError(
                "the checkpoint's images_per_segment differs from this run's; resume with the same config"
            )
        segment = int(position.get("segment", 0))
        skip = int(position.get("batches_in_segment", 0))
        self.counters = {"images_ok": 0, "images_failed": 0, "rows_served": 0, "batches_served": 0}
        self.counters.update(position.get("counters_at_segment_start", {}))
        first_start = dict(self.counters)
        self.counters["rows_served"] += (
            skip * self.batch_size
        )  # the skipped batches were served before the stop
        self.counters["batches_served"] += skip
        self._position = {
            "segment": segment,
            "batches_in_segment": skip,
            "counters_at_segment_start": first_start,
        }
        chunks = source.iter_chunks(start=segment * self.images_per_segment, boundary=self.images_per_segment)
        if prefetch and prefetch > 0:
            chunks = PrefetchingIterator(chunks, prefetch=int(prefetch))
        self._chunks = chunks
        self._batches = self._generate(segment, skip, first_start)
        # a producer thread still running torch at interpreter exit aborts the process: stop it first
        self._finalizer = weakref.finalize(self, _close_quietly, chunks)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> ImageActivationStore:
        return self

    def __next__(self) -> torch.Tensor | dict[str, torch.Tensor]:
        batch = next(self._batches)
        self.counters["rows_served"] += self.batch_size
        self.counters["batches_served"] += 1
        if self.dict_batches:
            return _unpack(batch, self.hooks, self.widths) if len(self.hooks) > 1 else {self.hooks[0]: batch}
        return batch

    def _segment_loader(self, segment: int, state: dict[str, bool]) -> Iterator[torch.Tensor]:
        """The segment's rows, fed in pieces of at least ``buffer_rows / 8`` rows.

        SAELens's buffer concatenates its whole storage with every piece it is fed, so feeding it one small
        model batch at a time would copy the buffer O(buffer / batch) times per refill.
        """
        end = (segment + 1) * self.images_per_segment
        feed_rows = max(self.batch_size, self.buffer_rows // 8)
        pending: list[torch.Tensor] = []
        pending_rows = 0
        while True:
            chunk = next(self._chunks)
            self.counters["images_ok"] += chunk.n_images_ok
            self.counters["images_failed"] += chunk.n_images_failed
            if chunk.n_images_ok:
                pending.append(_pack(chunk.rows, self.hooks))
                pending_rows += pending[-1].shape[0]
            last = chunk.end >= end
            if pending and (pending_rows >= feed_rows or last):
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, pending_rows = [], 0
            if last:
                break
        state["exhausted"] = True

    def _segment_batches(self, segment: int) -> Iterator[torch.Tensor]:
        state = {"exhausted": False}
        rng = [torch.Generator().manual_seed(mix_seed(self.seed, 41, segment)).get_state()]
        mixed = mixing_buffer(
            buffer_size=self.buffer_rows,
            batch_size=self.batch_size,
            activations_loader=self._segment_loader(segment, state),
            mix_fraction=self.mix_fraction,
        )
        tail: list[torch.Tensor] = []
        while True:
            with _swapped_global_rng(rng):
                batch = next(mixed, None)
            if batch is None:
                break
            if state["exhausted"]:
                tail.append(batch)  # flushed after the last chunk: not yet permuted as a whole
            else:
                yield batch
        if tail:
            rows = torch.cat(tail)
            generator = torch.Generator().manual_seed(mix_seed(self.seed, 43, segment))
            rows = rows[torch.randperm(rows.shape[0], generator=generator)]
            for start in range(0, rows.shape[0] - self.batch_size + 1, self.batch_size):
                yield rows[start : start + self.batch_size]

    def _generate(self, segment: int, skip: int, first_start: dict[str, int]) -> Iterator[torch.Tensor]:
        at_start = first_start
        while True:
            served = 0
            for batch in self._segment_batches(segment):
                served += 1
                if served <= skip:
                    continue
                self._position = {
                    "segment": segment,
                    "batches_in_segment": served,
                    "counters_at_segment_start": at_start,
                }
                yield batch
            skip = 0
            segment += 1
            at_start = dict(self.counters)
            self._position = {
                "segment": segment,
                "batches_in_segment": 0,
                "counters_at_segment_start": at_start,
            }

    # ------------------------------------------------------------------ repetition
    def epochs_for(self, rows: int) -> float:
        """Passes over the image collection that ``rows`` training rows take (unreadable images aside)."""
        return rows / max(1, self.source.n_images * self.source.tokens_per_image)

    def repetition_message(self, rows: int) -> str | None:
        """What training on ``rows`` rows repeats (None when one pass over the images covers them)."""
        n_images, per_image = self.source.n_images, self.source.tokens_per_image
        if rows <= n_images * per_image:
            return None
        augment = getattr(getattr(self.source, "dataset", None), "augment", "none")
        head = (
            f"training on {rows:,} rows from {n_images:,} images x {per_image:,} rows per image: "
            f"{self.epochs_for(rows):.1f} passes over the images"
        )
        if augment == "none":
            return f"{head}, the same views each pass (no augmentation)"
        return f"{head}, each pass new random views (augment={augment!r})"

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: enough to resume and hand out exactly the next batch."""
        return {"kind": self.kind, "images_per_segment": self.images_per_segment, **self._position}

    def close(self) -> None:
        self._finalizer()


def _close_quietly(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


class CachedActivationStore:
    """Batches of rows from an on-disk cache, in an order that is a function of ``(seed, rows served)``."""

    kind = "cache"

    def __init__(
        self,
        cache: CachedActivations | str,
        batch_size: int,
        hook_names: list[str] | str | None = None,
        seed: int = 0,
        position: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        shuffle: str = "auto",
        dict_batches: bool | None = None,
    ):
        self.cache = cache if isinstance(cache, CachedActivations) else CachedActivations(cache)
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names or self.cache.hook_names)
        missing = [h for h in names if h not in self.cache.hook_widths]
        if missing:
            raise ValueError(
                f"cache {self.cache.path} has no column for {missing}; it holds {self.cache.hook_names}"
            )
        self.hooks = names
        self.widths = {h: self.cache.hook_widths[h] for h in names}
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.dtype = dtype
        if shuffle not in ("auto", "always", "never"):
            raise ValueError("shuffle must be 'auto', 'always' or 'never'")
        self.shuffle = shuffle
        self.dict_batches = len(self.hooks) > 1 if dict_batches is None else dict_batches
        self.total_rows = self.cache.n_rows
        if self.total_rows < self.batch_size:
            raise ValueError(
                f"cache {self.cache.path} has {self.total_rows} rows, fewer than one batch ({batch_size})"
            )
        position = dict(position or {})
        if position and position.get("kind", self.kind) != self.kind:
            raise ValueError(f"cannot resume a cache stream from a {position.get('kind')} position")
        self.rows_served = int(position.get("rows_served", 0))
        self.counters = {
            "rows_served": self.rows_served,
            "batches_served": self.rows_served // self.batch_size,
        }
        self._blocks = self._row_blocks(self.rows_served)
        self._pending: dict[str, np.ndarray] | None = None

    def _shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.cache.shards)
        if epoch == 0 and self.cache.shuffled:
            return np.arange(n)
        return np.random.default_rng([self.seed, 47, epoch]).permutation(n)

    def _permutes(self, epoch: int) -> bool:
        if self.shuffle == "never":
            return False
        if self.shuffle == "always":
            return True
        return not (epoch == 0 and self.cache.shuffled)

    def _row_blocks(self, start_row: int, block_rows: int = 1 << 16) -> Iterator[dict[str, np.ndarray]]:
        epoch, offset = divmod(start_row, self.total_rows)
        while True:
            for shard_index in self._shard_order(epoch):
                shard = self.cache.shards[int(shard_index)]
                if offset >= shard.n_rows:
                    offset -= shard.n_rows
                    continue
                position, offset = offset, 0
                permutation = None
                if self._permutes(epoch):
                    rng = np.random.default_rng([self.seed, 53, epoch, int(shard_index)])
                    permutation = rng.permutation(shard.n_rows)
                    # copying the shard once and gathering from memory beats gathering from the mapped file
                    full = {h: shard.all_rows(h) for h in self.hooks}
                while position < shard.n_rows:
                    stop = min(position + block_rows, shard.n_rows)
                    if permutation is None:
                        yield {h: shard.rows(h, position, stop) for h in self.hooks}
                    else:
                        index = permutation[position:stop]
                        yield {h: full[h][index] for h in self.hooks}
                    position = stop
            epoch += 1

    def __iter__(self) -> CachedActivationStore:
        return self

    def __next__(self) -> torch.Tensor | dict[str, torch.Tensor]:
        pieces: dict[str, list[np.ndarray]] = {h: [] for h in self.hooks}
        need = self.batch_size
        while need > 0:
            if self._pending is None or next(iter(self._pending.values())).shape[0] == 0:
                self._pending = next(self._blocks)
            available = next(iter(self._pending.values())).shape[0]
            take = min(need, available)
            for h in self.hooks:
                pieces[h].append(self._pending[h][:take])
            self._pending = {h: v[take:] for h, v in self._pending.items()}
            need -= take
        out = {}
        for h in self.hooks:
            rows = pieces[h][0] if len(pieces[h]) == 1 else np.concatenate(pieces[h])
            out[h] = torch.from_numpy(np.array(rows, copy=True)).to(self.dtype)
        self.rows_served += self.batch_size
        self.counters["rows_served"] = self.rows_served
        self.counters["batches_served"] += 1
        if self.dict_batches:
            return out
        return out[self.hooks[0]]

    def epochs_for(self, rows: int) -> float:
        """Epochs over the cache that ``rows`` training rows take."""
        return rows / self.total_rows

    def repetition_message(self, rows: int) -> str | None:
        """``"training on R rows from a cache of C rows: E epochs"`` when ``rows`` exceeds the cache."""
        if rows <= self.total_rows:
            return None
        epochs = self.epochs_for(rows)
        return f"training on {rows:,} rows from a cache of {self.total_rows:,} rows: {epochs:.1f} epochs"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows_served": self.rows_served}

    def close(self) -> None:
        self._blocks = iter(())


class StoppableProvider:
    """Wraps a provider; raises :class:`TrainingInterrupted` at the next batch once ``stop`` is set.

    ``SAETrainer.fit`` asks for a batch only between steps, so the trainer state is consistent when it raises.
    """

    def __init__(self, provider: Any, stop: threading.Event):
        self.provider = provider
        self.stop = stop

    def __iter__(self) -> StoppableProvider:
        return self

    def __next__(self):
        if self.stop.is_set():
            raise TrainingInterrupted("stop requested")
        return next(self.provider)
