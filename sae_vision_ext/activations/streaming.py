"""Image streams: a ``--dataset`` read in order, never held whole, for collections too large to keep on disk.

Two kinds, both opened by :func:`~sae_vision_ext.activations.images.open_images` from the ``--dataset`` text:

- WebDataset tar shards, read with the ``webdataset`` package: ``'shards-{000000..000099}.tar'`` (brace
  ranges), one ``.tar`` file, a folder of ``.tar`` files (sorted by name), or any URL webdataset opens
  (``pipe:curl -s https://.../shard-{000..099}.tar``, ``https://...``). A sample is the run of members sharing
  a key (``000123.jpg`` + ``000123.cls``); its image is the first of :data:`IMAGE_FIELDS` it holds.
- A Hugging Face streaming dataset: ``hf-stream:NAME`` or ``hf-stream:NAME:SPLIT``, read with
  ``datasets.load_dataset(NAME, split=SPLIT, streaming=True)``; NAME is a hub dataset or a local folder of
  parquet / image files.

Position ``g`` is the stream's image ``g mod n`` in stream order (``n`` images; epoch ``g // n`` reads the
stream again), so a stream gives the inputs a random-access collection gives with ``shuffle_images`` off: the
stream's own order is kept (shuffle when you write the shards; a cache still permutes rows within each shard,
and training mixes rows in SAELens's buffer). Resuming at position ``g`` skips to it: tar shards by whole
shards (their sizes are known), then sample by sample without decoding; HF streams with
``IterableDataset.skip``.

``len()`` is found once per stream object: for tar shards by one pass that reads the members but decodes no
image, for an HF stream from the split's ``num_examples`` when the dataset card gives it, else by the same
kind of pass. Random access (``--holdout``) is not available on a stream: hold images out with
``--eval-dataset``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import datasets
import webdataset as wds

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")
HF_STREAM_PREFIX = "hf-stream:"

__all__ = [
    "HF_STREAM_PREFIX",
    "IMAGE_FIELDS",
    "HFImageStream",
    "TarImageStream",
    "is_image_stream",
    "open_image_stream",
    "stream_items",
]


class MissingImage(ValueError):
    """A stream sample without a readable image field (yielded in its place, raised when it is read)."""


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


class TarImageStream:
    """The images of WebDataset tar shards, in shard order then member order."""

    def __init__(self, shards: str | Sequence[str], image_fields: Sequence[str] = IMAGE_FIELDS):
        patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        self.urls = [url for pattern in patterns for url in braceexpand.braceexpand(str(pattern))]
        if not self.urls:
            raise ValueError("no tar shards given")
        missing = [url for url in self.urls if not _is_remote(url) and not Path(url).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no tar shard at {missing[0]}" + (f" (and {len(missing) - 1} more)" * (len(missing) > 1))
            )
        self.image_fields = tuple(image_fields)
        self.name = f"{self.urls[0]} ({len(self.urls)} tar shards)" if len(self.urls) > 1 else self.urls[0]
        self._counts: list[int] | None = None

    def _samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        """Samples ``{"__key__", field: bytes, ...}`` of ``urls`` in order; a damaged shard ends early."""
        return iter(
            wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue))
        )

    def shard_sizes(self) -> list[int]:
        """Samples per shard (one pass over the shards, no image decoded; kept)."""
        if self._counts is None:
            self._counts = [sum(1 for _ in self._samples([url])) for url in self.urls]
        return self._counts

    def __len__(self) -> int:
        return sum(self.shard_sizes())

    def _image(self, sample: dict[str, Any]) -> Any:
        for field in self.image_fields:
            if sample.get(field) is not None:
                return {"bytes": sample[field]}
        fields = sorted(k for k in sample if not k.startswith("__"))
        return MissingImage(
            f"sample {sample.get('__key__')} has no image ({', '.join(fields) or 'no fields'})"
        )

    def iter_from(self, offset: int = 0) -> Iterator[Any]:
        """The images from position ``offset`` of one pass, as raw items (``{"bytes": ...}``)."""
        first, before = 0, 0
        for size in self.shard_sizes():
            if before + size > offset:
                break
            before += size
            first += 1
        samples = self._samples(self.urls[first:])
        for sample in itertools.islice(samples, offset - before, None):
            yield self._image(sample)


class HFImageStream:
    """The images of ``datasets.load_dataset(path, split=split, streaming=True)``, in stream order."""

    def __init__(self, path: str, split: str = "train", image_column: str | None = None):
        self.path, self.split = path, split
        self.name = f"{HF_STREAM_PREFIX}{path}:{split}"
        stream = datasets.load_dataset(path, split=split, streaming=True)
        features = stream.features or {}
        if image_column is None:
            found = [k for k, f in features.items() if isinstance(f, datasets.Image)]
            found += [k for k in ("image", "img", "jpg", "png") if k in features]
            if not found:
                raise ValueError(
                    f"no image column in {self.name} (columns: {list(features)}): pass --image-column"
                )
            image_column = found[0]
        if features and image_column not in features:
            raise ValueError(f"image column {image_column!r} not in {self.name} (columns: {list(features)})")
        self.image_column = image_column
        splits = stream.info.splits or {}
        known = getattr(splits.get(split), "num_examples", None)
        self._length: int | None = int(known) if known else None

    def _stream(self) -> Any:
        stream = datasets.load_dataset(self.path, split=self.split, streaming=True)
        if isinstance((stream.features or {}).get(self.image_column), datasets.Image):
            # workers decode, and a corrupt file fails one item instead of the whole read
            stream = stream.cast_column(self.image_column, datasets.Image(decode=False))
        return stream.select_columns([self.image_column])

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(1 for _ in self._stream())
        return self._length

    def iter_from(self, offset: int = 0) -> Iterator[Any]:
        """The images from position ``offset`` of one pass, as raw items for ``to_rgb_image``."""
        for example in self._stream().skip(offset):
            yield example[self.image_column]


def is_image_stream(source: Any) -> bool:
    """True for a stream (images read in order from a position), False for a random-access collection."""
    return isinstance(source, (TarImageStream, HFImageStream))


def open_image_stream(text: str, split: str = "train", image_column: str | None = None) -> Any:
    """The stream ``text`` names: ``hf-stream:NAME[:SPLIT]``, a folder of ``.tar`` files, or tar shards."""
    if text.startswith(HF_STREAM_PREFIX):
        rest = text[len(HF_STREAM_PREFIX) :]
        name, colon, named_split = rest.rpartition(":")
        if not colon or not name or "/" in named_split:
            name, named_split = rest, split
        if not name:
            raise ValueError(
                f"{text}: give a dataset after {HF_STREAM_PREFIX} (hf-stream:NAME or NAME:SPLIT)"
            )
        return HFImageStream(name, named_split, image_column)
    path = Path(text).expanduser()
    if path.is_dir():
        return TarImageStream([str(p) for p in sorted(path.glob("*.tar"))])
    return TarImageStream(text)


def stream_items(stream: Any, start: int) -> Iterator[Any]:
    """Raw items of positions ``start, start + 1, ...`` of ``stream``, epoch after epoch (see the module
    docstring).

    A stream that gives another number of images than it held when counted is an error (it changed meanwhile).
    """
    n = len(stream)
    if n == 0:
        raise ValueError(f"{stream.name} holds no images")
    offset = start % n
    while True:
        count = 0
        for item in stream.iter_from(offset):
            yield item
            count += 1
        if offset + count != n:
            raise RuntimeError(
                f"{stream.name} gave {offset + count:,} images in a pass, not the {n:,} it held when "
                "counted: it changed while being read"
            )
        offset = 0
