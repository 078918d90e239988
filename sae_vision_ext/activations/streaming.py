"""Streaming input: images (or activation rows) read once, in order, never held whole in memory or on disk.

Sources
- WebDataset-layout tar shards, read by our own reader: a sample is the run of consecutive tar members that share
  a key (the member path up to the first ``.`` of its file name); ``000123.jpg`` + ``000123.cls`` form sample
  ``000123`` with fields ``jpg`` and ``cls``. Shards are local paths, ``pipe:<shell command>`` (WebDataset's
  convention, e.g. ``pipe:curl -s https://.../shard-000001.tar``) or any ``fsspec`` URL (``s3://``,
  ``https://``, ``hf://datasets/...``); brace ranges expand: ``shard-{000000..000099}.tar``.
- Hugging Face ``datasets`` streaming (``load_dataset(..., streaming=True)``): hub datasets, or local / remote
  parquet, arrow, imagefolder, webdataset files.

Partitioning over ranks and DataLoader workers: part ``p = rank * n_workers + worker_id`` of
``P = world_size * n_workers``. Split by shard, part p reads shards ``p, p + P, p + 2P, ...``; split by sample,
part p reads every shard and keeps samples ``j`` with ``j mod P = p`` (j counts samples in stream order). Either
way the parts are disjoint and together cover the stream. By-shard reads each byte once but needs at least P
shards (and gives equal parts only when the shards are equal); ``"auto"`` picks by-shard when there are at least P
shards.

Unreadable images are never fatal: they are yielded as ``image=None`` (so counts survive DataLoader workers) and
counted by the batcher; an unreadable or truncated shard ends that shard only and is counted.
"""

from __future__ import annotations

import glob
import io
import itertools
import os
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from sae_vision_ext.activations.images import to_rgb_image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")
SPLIT_MODES = ("auto", "shard", "sample")

__all__ = [
    "StreamPart",
    "stream_part",
    "expand_shards",
    "open_shard",
    "iter_tar_samples",
    "WebDatasetSamples",
    "WebDatasetImages",
    "WebDatasetArrays",
    "HFStreamingImages",
    "HFStreamingRows",
    "decode_image",
    "StreamedImage",
    "StreamBatch",
    "StreamingImageDataset",
    "stream_image_batches",
    "stream_activation_rows",
    "coalesce_rows",
    "shuffled_row_batches",
]


# --------------------------------------------------------------------------------------------------------------
# Parts


@dataclass(frozen=True)
class StreamPart:
    """Part ``index`` of ``count`` disjoint parts of a stream."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"part index {self.index} is not in [0, {self.count})")


def stream_part(rank: int | None = None, world_size: int | None = None) -> StreamPart:
    """This process's part: ``rank * n_workers + worker_id`` of ``world_size * n_workers``.

    ``rank`` / ``world_size`` default to the initialised process group (1 process otherwise); pass them explicitly
    inside DataLoader workers, where the process group of the parent is not available.
    """
    if rank is None or world_size is None:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialised else 0
        world_size = dist.get_world_size() if initialised else 1
    worker = torch.utils.data.get_worker_info()
    worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
    return StreamPart(rank * n_workers + worker_id, world_size * n_workers)


# --------------------------------------------------------------------------------------------------------------
# WebDataset tar shards

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list from a list, a brace pattern ``a-{000..009}.tar`` (zero padding kept) or a local glob."""
    if not isinstance(spec, (str, os.PathLike)):
        return [s for item in spec for s in expand_shards(item)]
    text = str(spec)
    match = _BRACES.search(text)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        return [
            s
            for i in range(int(lo), int(hi) + 1)
            for s in expand_shards(text[: match.start()] + str(i).zfill(width) + text[match.end() :])
        ]
    if any(c in text for c in "*?[") and "://" not in text and not text.startswith("pipe:"):
        found = sorted(glob.glob(text))
        if not found:
            raise FileNotFoundError(f"no shard matches {text}")
        return found
    return [text]


class _PipeReader(io.RawIOBase):
    """stdout of a shell command as a readable stream; the command is reaped on close."""

    def __init__(self, command: str):
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.process.stdout.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self.process.stdout.close()
            self.process.wait()
        super().close()


def open_shard(url: str):
    """A binary stream for a local path, ``pipe:<command>`` or an fsspec URL."""
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeReader(url[len("pipe:") :]), buffer_size=1 << 20)
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _split_key(name: str) -> tuple[str, str]:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``): WebDataset's key / field rule."""
    directory, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, suffix.lower() if dot else ""


def iter_tar_samples(stream, url: str = "") -> Iterator[dict[str, Any]]:
    """Samples ``{"__key__", "__url__", field: bytes, ...}`` of one tar stream, in order (constant memory).

    Runs of consecutive members with the same key form one sample. Read in tarfile's streaming mode; the member
    list tarfile keeps is cleared as we go, so a shard with millions of members does not grow memory.
    """
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        sample: dict[str, Any] | None = None
        for member in archive:
            archive.members = []  # streaming mode never seeks back; keep tarfile's index from growing
            if not member.isfile():
                continue
            key, suffix = _split_key(member.name)
            if not suffix or os.path.basename(key).startswith("."):
                continue
            data = archive.extractfile(member).read()
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": url}
            sample[suffix] = data
        if sample is not None:
            yield sample


class WebDatasetSamples:
    """The samples of a list of WebDataset tar shards, for one part of the stream (see module docstring).

    ``shuffle_shards_seed``: visit shards in a permutation seeded by ``(seed, epoch)`` (the same in every part).
    ``repeat``: start over (next epoch) after the last shard. ``n_corrupt_shards`` counts shards that could not be
    opened or ended early (in this process).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        split_by: str = "auto",
        shuffle_shards_seed: int | None = None,
        repeat: bool = False,
    ):
        if split_by not in SPLIT_MODES:
            raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {split_by!r}")
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError("no shards given")
        self.split_by = split_by
        self.shuffle_shards_seed = shuffle_shards_seed
        self.repeat = repeat
        self.n_corrupt_shards = 0
        self.corrupt_shards: list[str] = []

    def _by_shard(self, part: StreamPart) -> bool:
        if self.split_by == "auto":
            return len(self.shards) >= part.count
        if self.split_by == "shard" and len(self.shards) < part.count:
            raise ValueError(f"{len(self.shards)} shards cannot be split by shard into {part.count} parts")
        return self.split_by == "shard"

    def shard_order(self, epoch: int) -> list[str]:
        if self.shuffle_shards_seed is None:
            return list(self.shards)
        order = np.random.default_rng([self.shuffle_shards_seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order]

    def _samples_of(self, url: str) -> Iterator[dict[str, Any]]:
        try:
            with open_shard(url) as stream:
                yield from iter_tar_samples(stream, url)
        except (tarfile.TarError, OSError, EOFError):
            self.n_corrupt_shards += 1
            self.corrupt_shards.append(url)

    def iter_part(self, part: StreamPart | None = None) -> Iterator[dict[str, Any]]:
        part = part or stream_part()
        by_shard = self._by_shard(part)
        for epoch in itertools.count():
            shards = self.shard_order(epoch)
            if by_shard:
                for url in shards[part.index :: part.count]:
                    yield from self._samples_of(url)
            else:
                samples = (s for url in shards for s in self._samples_of(url))
                yield from itertools.islice(samples, part.index, None, part.count)
            if not self.repeat:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_part()


class StreamedImage(NamedTuple):
    """One streamed image; ``image`` is a PIL RGB image, or None when it could not be read."""

    key: str
    image: Any


def decode_image(data: bytes):
    """PIL RGB image from encoded bytes (fully decoded here, so corruption surfaces here)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        return to_rgb_image(opened)  # every mode by its stated rule (16-bit, float, alpha on white)


class WebDatasetImages:
    """Images of WebDataset tar shards: the first field of ``image_fields`` present in each sample.

    A sample whose image cannot be decoded, or that has none of ``image_fields``, is yielded with ``image=None``.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        image_fields: Sequence[str] = IMAGE_FIELDS,
        split_by: str = "auto",
        shuffle_shards_seed: int | None = None,
        repeat: bool = False,
    ):
        self.samples = WebDatasetSamples(shards, split_by, shuffle_shards_seed, repeat)
        self.image_fields = tuple(image_fields)
        self.name = f"webdataset[{len(self.samples.shards)} shards]"

    def iter_part(self, part: StreamPart | None = None) -> Iterator[StreamedImage]:
        for sample in self.samples.iter_part(part):
            field_name = next((f for f in self.image_fields if f in sample), None)
            image = None
            if field_name is not None:
                try:
                    image = decode_image(sample[field_name])
                except Exception:  # noqa: BLE001 - a corrupt image is skipped and counted, never fatal
                    image = None
            yield StreamedImage(sample["__key__"], image)

    def __iter__(self) -> Iterator[StreamedImage]:
        return self.iter_part()


class WebDatasetArrays:
    """Activation rows stored in tar shards: field ``field`` of each sample is a ``.npy`` array ``[n, d]``."""

    def __init__(self, shards: str | Sequence[str], field: str = "npy", split_by: str = "auto", repeat: bool = False):
        self.samples = WebDatasetSamples(shards, split_by, None, repeat)
        self.field = field

    def iter_part(self, part: StreamPart | None = None) -> Iterator[torch.Tensor]:
        for sample in self.samples.iter_part(part):
            if self.field in sample:
                array = np.load(io.BytesIO(sample[self.field]), allow_pickle=False)
                yield torch.from_numpy(np.ascontiguousarray(array)).reshape(-1, array.shape[-1])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_part()


# --------------------------------------------------------------------------------------------------------------
# Hugging Face datasets streaming


def _hf_stream(path: str, split: str, load_kwargs: dict[str, Any], part: StreamPart, seed: int | None, epoch: int):
    import datasets
    from datasets.distributed import split_dataset_by_node

    stream = datasets.load_dataset(path, split=split, streaming=True, **load_kwargs)
    if seed is not None:
        stream = stream.shuffle(seed=seed, buffer_size=1000)
        stream.set_epoch(epoch)
    if part.count > 1:
        stream = split_dataset_by_node(stream, rank=part.index, world_size=part.count)
    return stream


class HFStreamingImages:
    """Images from ``datasets.load_dataset(path, split=split, streaming=True, **load_kwargs)``, one part of it.

    E.g. ``HFStreamingImages("parquet", data_files=[...])``, ``HFStreamingImages("imagefolder", data_dir=...)``, or a
    hub name. Parts use ``datasets.distributed.split_dataset_by_node`` (by shard when the number of files is a
    multiple of the parts, else by example), iterated with ``.iter(batch_size)``, which, unlike ``__iter__``, does
    not split again across DataLoader workers. ``key_column`` (e.g. ``"__key__"``) names the yielded keys; without
    it keys are ``"<part>/<i>"``.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str | None = None,
        key_column: str | None = None,
        shuffle_seed: int | None = None,
        repeat: bool = False,
        read_batch_size: int = 64,
        **load_kwargs: Any,
    ):
        self.path, self.split, self.load_kwargs = path, split, load_kwargs
        self.image_column, self.key_column = image_column, key_column
        self.shuffle_seed, self.repeat, self.read_batch_size = shuffle_seed, repeat, read_batch_size
        self.name = f"hf-stream:{path}"

    def _image_column(self, stream) -> str:
        from datasets import Image as ImageFeature

        if self.image_column is not None:
            return self.image_column
        features = stream.features or {}
        found = [k for k, f in features.items() if isinstance(f, ImageFeature)]
        found += [k for k in ("image", "img", "jpg", "png") if k in features]
        if not found:
            raise ValueError(f"no image column in {self.path} (features: {list(features)}); pass image_column=")
        return found[0]

    def iter_part(self, part: StreamPart | None = None) -> Iterator[StreamedImage]:
        from datasets import Image as ImageFeature

        part = part or stream_part()
        for epoch in itertools.count():
            stream = _hf_stream(self.path, self.split, self.load_kwargs, part, self.shuffle_seed, epoch)
            column = self._image_column(stream)
            if isinstance((stream.features or {}).get(column), ImageFeature):
                stream = stream.cast_column(column, ImageFeature(decode=False))
            keep = [column] + ([self.key_column] if self.key_column else [])
            stream = stream.select_columns(keep)
            index = 0
            for batch in stream.iter(batch_size=self.read_batch_size):
                for j, item in enumerate(batch[column]):
                    key = str(batch[self.key_column][j]) if self.key_column else f"{part.index}/{index}"
                    index += 1
                    yield StreamedImage(key, _decode_hf_image(item))
            if not self.repeat:
                return

    def __iter__(self) -> Iterator[StreamedImage]:
        return self.iter_part()


def _decode_hf_image(item: Any):
    try:
        if isinstance(item, dict):
            if item.get("bytes") is not None:
                return decode_image(item["bytes"])
            from PIL import Image

            with Image.open(item["path"]) as opened:
                opened.load()
                return to_rgb_image(opened)
        if isinstance(item, (bytes, bytearray)):
            return decode_image(bytes(item))
        return to_rgb_image(item)
    except Exception:  # noqa: BLE001 - corrupt or missing image: skipped and counted by the batcher
        return None


class HFStreamingRows:
    """Activation rows ``[n, d]`` streamed from files in SAELens's cached-activation layout (parquet or arrow).

    Each example's ``hook_name`` column is ``Array2D(context_size, d)`` (or a flat ``d`` vector); rows are yielded
    in blocks of ``read_batch_size`` examples, flattened to ``[examples * context_size, d]``.
    """

    def __init__(
        self,
        path: str,
        hook_name: str,
        split: str = "train",
        repeat: bool = False,
        read_batch_size: int = 16,
        **load_kwargs: Any,
    ):
        self.path, self.hook_name, self.split, self.load_kwargs = path, hook_name, split, load_kwargs
        self.repeat, self.read_batch_size = repeat, read_batch_size

    def iter_part(self, part: StreamPart | None = None) -> Iterator[torch.Tensor]:
        part = part or stream_part()
        for epoch in itertools.count():
            stream = _hf_stream(self.path, self.split, self.load_kwargs, part, None, epoch)
            stream = stream.select_columns([self.hook_name]).with_format("numpy")
            for batch in stream.iter(batch_size=self.read_batch_size):
                block = np.asarray(batch[self.hook_name])
                if block.dtype == object:  # ragged fallback: stack per example
                    block = np.stack([np.asarray(x) for x in block])
                yield torch.from_numpy(block.reshape(-1, block.shape[-1]))
            if not self.repeat:
                return

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_part()


# --------------------------------------------------------------------------------------------------------------
# Batching for a model


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """``(key, preprocessed [3, H, W] tensor or None)`` for this rank's part, split again across DataLoader workers.

    ``rank`` / ``world_size`` are captured here, in the main process (workers have no process group).
    """

    def __init__(self, source: Any, preprocess: Callable[[Any], torch.Tensor], rank: int | None = None,
                 world_size: int | None = None):
        if rank is None or world_size is None:
            from sae_vision_ext.activations.process_group import current_context

            context = current_context()
            rank, world_size = context.rank, context.world_size
        self.source, self.preprocess, self.rank, self.world_size = source, preprocess, rank, world_size

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        for item in self.source.iter_part(stream_part(self.rank, self.world_size)):
            tensor = None
            if item.image is not None:
                try:
                    tensor = self.preprocess(item.image)
                except Exception:  # noqa: BLE001 - a preprocessing failure counts as an unreadable image
                    tensor = None
            yield item.key, tensor


@dataclass
class StreamBatch:
    """A batch of streamed images: ``pixels`` of the readable ones (None if none were), ``n_failed`` the rest."""

    keys: list[str]
    pixels: torch.Tensor | None
    n_failed: int
    failed_keys: list[str] = field(default_factory=list)


def _collate_stream(items: list[tuple[str, torch.Tensor | None]]) -> StreamBatch:
    ok = [(k, t) for k, t in items if t is not None]
    return StreamBatch(
        keys=[k for k, _ in ok],
        pixels=torch.stack([t for _, t in ok]) if ok else None,
        n_failed=len(items) - len(ok),
        failed_keys=[k for k, t in items if t is None],
    )


def stream_image_batches(
    source: Any,
    preprocess: Callable[[Any], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> Iterator[StreamBatch]:
    """Batches of this rank's part of ``source``, decoded and preprocessed in ``num_workers`` processes."""
    dataset = StreamingImageDataset(source, preprocess, rank, world_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_stream,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return iter(loader)


def stream_activation_rows(
    model: Any,
    batches: Iterable[StreamBatch],
    hook_name: str,
    token_selection: str = "patches",
    dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor]:
    """Activation rows ``[B * n_selected, d]`` of ``hook_name`` for each streamed image batch (no disk).

    Uses the token selection of :mod:`sae_vision_ext.activations.source` (``cls`` | ``patches`` | ... |
    ``pooled``); the forward pass stops after the hook's block.
    """
    from sae_vision_ext.activations.source import forward_lock, resolve_hooks, select_rows, stop_layer_for

    hooks = resolve_hooks(hook_name, token_selection)
    stop_at_layer = stop_layer_for(hooks)
    parameter = next(model.parameters())
    for batch in batches:
        if batch.pixels is None:
            continue
        with torch.inference_mode(), forward_lock(model):
            _, cache = model.run_with_cache(
                batch.pixels.to(parameter.device, parameter.dtype), names_filter=hooks, stop_at_layer=stop_at_layer
            )
            yield select_rows(model, cache[hooks[0]], hooks[0], token_selection).to("cpu", dtype)


def coalesce_rows(row_blocks: Iterable[torch.Tensor], min_rows: int) -> Iterator[torch.Tensor]:
    """Concatenate consecutive small blocks into blocks of at least ``min_rows`` rows (the last may be smaller)."""
    pending: list[torch.Tensor] = []
    count = 0
    for block in row_blocks:
        pending.append(block)
        count += block.shape[0]
        if count >= min_rows:
            yield pending[0] if len(pending) == 1 else torch.cat(pending)
            pending, count = [], 0
    if pending:
        yield torch.cat(pending)


def shuffled_row_batches(
    row_blocks: Iterable[torch.Tensor],
    batch_size: int,
    buffer_rows: int = 1 << 16,
    mix_fraction: float = 0.5,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Batches ``[batch_size, d]`` from a stream of row blocks through SAELens's mixing buffer (bounded memory).

    Small blocks (one image, one stored sample) are first coalesced into chunks of ``max(batch_size,
    buffer_rows / 4)`` rows, since the mixing buffer copies itself once per incoming chunk. At most about
    ``buffer_rows`` plus one chunk of rows are held at once: memory does not grow with the stream. ``seed`` seeds
    the global torch generator the mixing buffer draws its permutations from.
    """
    from sae_lens.training.mixing_buffer import mixing_buffer

    if seed is not None:
        torch.manual_seed(seed)
    chunks = coalesce_rows(row_blocks, max(batch_size, buffer_rows // 4))
    yield from mixing_buffer(buffer_rows, batch_size, chunks, mix_fraction)
