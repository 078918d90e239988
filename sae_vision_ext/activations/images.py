"""Where images come from, and how they become model inputs in DataLoader workers.

An image collection is anything with ``len()`` and ``load(i) -> PIL.Image`` (RGB): an in-memory list, a folder
of image files, or a Hugging Face ``datasets`` dataset (by hub name, ``save_to_disk`` folder or data folder).
An image stream (WebDataset tar shards, an HF streaming dataset; see
:mod:`~sae_vision_ext.activations.streaming`) has ``len()`` but is read in order from a position; it takes the
collection's place wherever positions are read in order (caching, training), in its own order.

The stream of model inputs is indexed by a *position* ``g = 0, 1, 2, ...`` that never wraps: epoch
``e = g // n`` visits the collection in the order of a permutation seeded by ``(seed, e)``, and position ``g``
is augmented with a random generator seeded by ``(seed, g)``. Every input is therefore a pure function of
``(seed, g)``, whatever the number of DataLoader workers, which is what lets a resumed run skip to a position
and see the same data.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from sae_vision_ext.activations.options import AUGMENTATIONS
from sae_vision_ext.activations.streaming import (
    HF_STREAM_PREFIX,
    is_image_stream,
    open_image_stream,
    stream_items,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def _float_to_uint8(array: np.ndarray) -> np.ndarray:
    """Floats to 0-255: ``[0, 1]`` x 255, ``[0, 255]`` kept, others min-max scaled; NaN -> 0; rounded."""
    array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(array.min(initial=0.0)), float(array.max(initial=0.0))
    if lo >= 0.0 and hi <= 1.0:
        array = array * 255.0
    elif (lo < 0.0 or hi > 255.0) and hi > lo:
        array = (array - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(array, 0.0, 255.0)).astype(np.uint8)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values of any dtype to uint8: 16-bit integers / 257, bool x 255, other numbers as floats."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return np.rint(array / 257.0).astype(np.uint8)
    return _float_to_uint8(array)


def _composite(rgb: np.ndarray, alpha: np.ndarray):
    """``rgb`` over :data:`BACKGROUND` with ``alpha`` (uint8): ``round(rgb a + background (1 - a))``."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    out = rgb.astype(np.float64) * a + np.asarray(BACKGROUND, dtype=np.float64) * (1.0 - a)
    return Image.fromarray(np.rint(out).astype(np.uint8))


def _array_image(array: np.ndarray):
    """``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (C = 1, 2, 3, 4) of any numeric dtype -> PIL RGB."""
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first (torch's layout)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ValueError(
            f"an image array must be [H, W], [H, W, C] or [C, H, W] with C in 1-4, got {array.shape}"
        )
    pixels = np.ascontiguousarray(_to_uint8(array))
    if pixels.ndim == 2:
        return Image.fromarray(pixels).convert("RGB")
    if pixels.shape[-1] == 3:
        return Image.fromarray(pixels)
    color = pixels[..., :-1] if pixels.shape[-1] == 4 else np.repeat(pixels[..., :1], 3, axis=-1)
    return _composite(color, pixels[..., -1])


def _pil_to_rgb(image):
    """Any PIL mode -> RGB (see :func:`to_rgb_image` for the rules)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image)
        if image.mode == "I":  # 32-bit integers: read as 16-bit values (what 16-bit PNG / TIFF files give)
            array = np.clip(array, 0, 65535).astype(np.uint16)
        elif image.mode.startswith("I;16"):
            array = array.astype(np.uint16)  # native byte order ("I;16B" is big-endian)
        return _array_image(array)
    if image.mode in ("P", "PA"):
        has_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif image.mode in ("LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        array = np.asarray(image)
        return _composite(array[..., :3], array[..., 3])
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's own conversions


def _loaded_rgb(opened):
    """RGB pixels of an opened file, in memory (the file may be closed afterwards)."""
    image = _pil_to_rgb(opened)
    return image.copy() if image is opened else image


def to_rgb_image(item: Any):
    """A PIL RGB image from a PIL image, an array / tensor, a path, or HF's ``{"bytes"|"path"}``.

    Conversion rules, the same for files, PIL images and arrays:

    - 16-bit integers (PIL ``I;16*``, ``uint16`` arrays) are divided by 257 (65535 -> 255), rounded; PIL ``I``
      (32-bit, what some 16-bit files open as) is read as 16-bit values, clipped to [0, 65535];
    - floats (PIL ``F``, float16/32/64 arrays or tensors, other integer arrays): values in [0, 1] are scaled
      by 255, values in [0, 255] are kept, any other range is min-max scaled to [0, 255]; NaN / inf become 0;
      the range is that of the whole image, and values are rounded;
    - transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour, 2- and 4-channel arrays) is
      composited on a white background (:data:`BACKGROUND`): ``round(c a + 255 (1 - a))`` with ``a = alpha /
      255``;
    - grayscale (``L``, ``1``, 1-channel arrays) is repeated over R, G, B; palette, ``CMYK``, ``YCbCr`` and
      the other modes use Pillow's conversion;
    - arrays may be ``[H, W]``, ``[H, W, C]`` or channels-first ``[C, H, W]`` (C = 1, 2, 3, 4); bool is 0 /
      255.
    """
    if isinstance(item, Image.Image):
        return _pil_to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as opened:
            return _loaded_rgb(opened)
    if isinstance(item, dict) and (item.get("bytes") is not None or item.get("path")):
        source = io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"]
        with Image.open(source) as opened:
            return _loaded_rgb(opened)
    if isinstance(item, torch.Tensor):
        tensor = item.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()  # numpy has no bfloat16
        return _array_image(tensor.numpy())
    if isinstance(item, np.ndarray):
        return _array_image(item)
    raise TypeError(f"cannot read an image from {type(item).__name__}")


class ListImages:
    """An in-memory list of images (PIL images, arrays or paths)."""

    def __init__(self, images: Sequence[Any], name: str = "in-memory"):
        self.images = list(images)
        self.name = f"{name}[{len(self.images)}]"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int):
        return to_rgb_image(self.images[index])


class FolderImages:
    """Every image file under ``root`` (recursive), in sorted path order."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.paths = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.name = str(self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int):
        return to_rgb_image(self.paths[index])


class HFImages:
    """A map-style Hugging Face dataset; ``image_column`` is found from the features when not given."""

    def __init__(self, dataset: Any, image_column: str | None = None, name: str = "hf-dataset"):
        if image_column is None:
            candidates = [k for k, f in dataset.features.items() if isinstance(f, datasets.Image)]
            candidates += [k for k in ("image", "img", "jpg", "png") if k in dataset.column_names]
            if not candidates:
                raise ValueError(
                    f"no image column in dataset {name}; columns are {dataset.column_names}: "
                    "pass image_column"
                )
            image_column = candidates[0]
        if image_column not in dataset.column_names:
            raise ValueError(f"image column {image_column!r} not in dataset columns {dataset.column_names}")
        # decode=False: workers decode, and a corrupt file fails one item instead of the whole fetch.
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int):
        return to_rgb_image(self.dataset[int(index)][self.image_column])


class SubsetImages:
    """The images of ``base`` at ``indices`` (used to hold images out for evaluation)."""

    def __init__(self, base: Any, indices: Sequence[int]):
        if is_image_stream(base):
            raise ValueError(
                f"{base.name} is a stream, read in order: images cannot be held out of it "
                "(--holdout); give held-out images with --eval-dataset"
            )
        self.base = base
        self.indices = [int(i) for i in indices]
        self.name = f"{getattr(base, 'name', 'images')}[{len(self.indices)} selected]"

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.base.load(self.indices[index])


def open_images(
    source: Any, split: str = "train", image_column: str | None = None
) -> ListImages | FolderImages | HFImages | Any:
    """An image collection from a list of images, an image folder, a ``save_to_disk`` folder or a hub dataset
    name; an image stream from ``hf-stream:NAME[:SPLIT]``, tar shards (``shards-{000..009}.tar``) or a folder
    of them.

    Objects that already have ``__len__`` and ``load`` (or are streams) pass through unchanged.
    """
    if (hasattr(source, "load") and hasattr(source, "__len__")) or is_image_stream(source):
        return source
    if isinstance(source, (list, tuple)):
        return ListImages(source)
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "features") and hasattr(source, "column_names"):
            return HFImages(source, image_column)
        raise TypeError(f"cannot read images from {type(source).__name__}")
    text = str(source)
    if text.startswith(HF_STREAM_PREFIX) or text.endswith(".tar"):
        return open_image_stream(text, split, image_column)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
            return HFImages(loaded, image_column, name=text)
        has_files = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file())
        if has_files:
            return FolderImages(path)
        if any(path.glob("*.tar")):
            return open_image_stream(text, split, image_column)
        raise FileNotFoundError(
            f"{path} holds neither image files, .tar shards nor a saved Hugging Face dataset"
        )
    if path.exists():
        raise ValueError(f"{path} is a file; give an image folder, a dataset folder or a hub dataset name")
    if text.startswith(("/", "./", "../", "~")) or os.sep + os.sep in text:
        raise FileNotFoundError(f"no image folder or dataset at {path}")
    loaded = datasets.load_dataset(text, split=split)
    return HFImages(loaded, image_column, name=text)


# ----------------------------------------------------------------------------------------------- augmentation


def random_resized_crop_flip(
    image: Any, rng: np.random.Generator, scale: tuple[float, float] = (0.35, 1.0), ratio=(3 / 4, 4 / 3)
):
    """Crop an area fraction ``a ~ U(scale)`` of aspect ``r ~ logU(ratio)`` at a uniform place, flip with
    p=1/2.

    The crop keeps its own resolution; the model's preprocessing then resizes it. Uses only ``rng``.
    """
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            break
    else:
        w, h = min(width, height), min(width, height)
        left, top = (width - w) // 2, (height - h) // 2
    crop = image.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop


# ----------------------------------------------------------------------------------------------- positions


class PositionedImages(torch.utils.data.Dataset):
    """Position ``g`` -> ``(g, preprocessed tensor [3, H, W] or None if the image could not be read)``.

    ``g`` maps to image ``perm_e[g % n]`` with ``e = g // n`` (see the module docstring); for a stream, to
    image ``g % n`` in stream order (``shuffle`` does not apply), read by :func:`image_batches`, not indexed.
    Failures are returned as ``None`` and counted by the collate function, so one bad file never stops a run.
    """

    def __init__(
        self,
        images: Any,
        preprocess: Callable[[Any], torch.Tensor],
        seed: int = 0,
        augment: str = "none",
        crop_scale: tuple[float, float] = (0.35, 1.0),
        shuffle: bool = True,
    ):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        if len(images) == 0:
            raise ValueError("the image collection is empty")
        self.images = images
        self.preprocess = preprocess
        self.seed = int(seed)
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.is_stream = is_image_stream(images)
        self.shuffle = shuffle and not self.is_stream
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:  # positions are unbounded; len() is one epoch
        return len(self.images)

    def image_index(self, position: int) -> int:
        n = len(self.images)
        epoch, offset = divmod(int(position), n)
        if not self.shuffle:
            return offset
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, 7, epoch]).permutation(n)
            self._orders = {epoch: order}  # one epoch at a time: positions arrive in order
        return int(order[offset])

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        return self.view(position, lambda: self.images.load(self.image_index(position)))

    def view(self, position: int, read: Callable[[], Any]) -> tuple[int, torch.Tensor | None, str | None]:
        """``(position, tensor or None, error or None)`` for the image ``read()`` returns at ``position``."""
        try:
            image = read()
            if self.augment == "crop_flip":
                rng = np.random.default_rng([self.seed, 11, int(position)])
                image = random_resized_crop_flip(image, rng, scale=self.crop_scale)
            tensor = self.preprocess(image)
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
                raise ValueError("preprocess must return a [3, H, W] tensor")
            return int(position), tensor, None
        except Exception as err:  # noqa: BLE001 - any unreadable / corrupt image is skipped and counted
            return int(position), None, f"{type(err).__name__}: {err}"[:300]


@dataclass
class ImageBatch:
    """One DataLoader batch: positions ``[start, end)``; ``pixels`` holds the readable ones, ``n_failed`` the
    rest (``errors``: why, one line each)."""

    start: int
    end: int
    pixels: torch.Tensor | None
    n_failed: int
    errors: list[str]


def collate_positioned(items: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    ok = [t for _, t, _ in items if t is not None]
    return ImageBatch(
        start=items[0][0],
        end=items[-1][0] + 1,
        pixels=torch.stack(ok) if ok else None,
        n_failed=len(items) - len(ok),
        errors=[f"position {g}: {e}" for g, _, e in items if e is not None],
    )


class ConsecutiveBatches(torch.utils.data.Sampler):
    """Batches of consecutive positions ``[start, start + b), ...`` up to ``end`` (or forever when ``end`` is
    None).

    With ``boundary`` set, no batch crosses a multiple of ``boundary`` (segment and shard edges).
    """

    def __init__(self, start: int, batch_size: int, end: int | None = None, boundary: int | None = None):
        self.start, self.batch_size, self.end, self.boundary = int(start), int(batch_size), end, boundary

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while self.end is None or position < self.end:
            stop = position + self.batch_size
            if self.boundary:
                stop = min(stop, (position // self.boundary + 1) * self.boundary)
            if self.end is not None:
                stop = min(stop, self.end)
            yield list(range(position, stop))
            position = stop

    def __len__(self) -> int:
        if self.end is None:
            raise TypeError("an unbounded sampler has no length")
        return sum(1 for _ in iter(self))


def _read_streamed(item: Any) -> Any:
    if isinstance(item, Exception):
        raise item
    return to_rgb_image(item)


class StreamedBatches(torch.utils.data.IterableDataset):
    """The batches of ``sampler`` (consecutive positions) read from a stream, delivered in position order.

    Every worker reads the stream from the first position (bytes only); worker ``w`` of ``W`` decodes and
    preprocesses batches ``j`` with ``j mod W = w``, and the DataLoader takes one batch from each worker in
    turn, so the batches arrive in position order whatever ``W``.
    """

    def __init__(self, dataset: PositionedImages, sampler: ConsecutiveBatches):
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Iterator[ImageBatch]:
        worker = torch.utils.data.get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        items = stream_items(self.dataset.images, self.sampler.start)
        for j, positions in enumerate(self.sampler):
            raw = list(itertools.islice(items, len(positions)))
            if j % n_workers == worker_id:
                views = [
                    self.dataset.view(g, partial(_read_streamed, item)) for g, item in zip(positions, raw)
                ]
                yield collate_positioned(views)


def image_batches(
    dataset: PositionedImages,
    start: int,
    batch_size: int,
    end: int | None = None,
    boundary: int | None = None,
    num_workers: int = 0,
) -> Iterator[ImageBatch]:
    """Decoded, augmented, preprocessed batches of positions from ``start``, in order (workers decode)."""
    sampler = ConsecutiveBatches(start, batch_size, end, boundary)
    if dataset.is_stream:
        streamed = StreamedBatches(dataset, sampler)
        prefetch = 2 if num_workers > 0 else None
        return iter(
            torch.utils.data.DataLoader(
                streamed, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch
            )
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_positioned,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # keeps the loader off the global RNG
    )
    return iter(loader)
