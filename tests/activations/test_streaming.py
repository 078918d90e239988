"""Image streams as a ``--dataset``: WebDataset tar shards (the ``webdataset`` package) and HF streaming
datasets.

A stream gives, position by position, the inputs an image folder of the same images gives with shuffling off;
batches arrive in order whatever the number of workers; ``sae-vision cache`` writes a stream and resumes it.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from vision_training_helpers import TINY_MODEL, shared_tiny, synthetic_images

from sae_vision_ext.activations.cache import ActivationCacheWriter
from sae_vision_ext.activations.images import (
    FolderImages,
    PositionedImages,
    SubsetImages,
    image_batches,
    open_images,
)
from sae_vision_ext.activations.rows import CachedActivations
from sae_vision_ext.activations.source import ImageActivationSource
from sae_vision_ext.activations.store import CachedActivationStore, ImageActivationStore
from sae_vision_ext.activations.streaming import HFImageStream, TarImageStream, stream_items
from sae_vision_ext.cli import main as cli_main

HOOK = "blocks.1.hook_resid_post"
N_IMAGES = 10


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The same 10 images as a folder (sorted names), as 3 tar shards (4 + 4 + 2) and as a parquet folder."""
    root = tmp_path_factory.mktemp("photos")
    images = synthetic_images(N_IMAGES)
    (root / "folder").mkdir()
    (root / "tars").mkdir()
    for i, image in enumerate(images):
        image.save(root / "folder" / f"p{i:02d}.png")
    for shard, indices in enumerate([range(0, 4), range(4, 8), range(8, 10)]):
        with tarfile.open(root / "tars" / f"shard-{shard:03d}.tar", "w") as archive:
            for i in indices:
                _add(archive, f"p{i:02d}.png", _png(images[i]))
                _add(archive, f"p{i:02d}.cls", str(i).encode())
    (root / "parquet").mkdir()
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": list(range(N_IMAGES))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    dataset.to_parquet(str(root / "parquet" / "train.parquet"))
    return root


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def test_tar_shards_open_as_a_stream_by_pattern_folder_and_file(photos):
    by_pattern = open_images(str(photos / "tars" / "shard-{000..002}.tar"))
    by_folder = open_images(str(photos / "tars"))
    one_file = open_images(str(photos / "tars" / "shard-002.tar"))
    assert isinstance(by_pattern, TarImageStream) and by_pattern.urls == by_folder.urls
    assert len(by_pattern) == N_IMAGES and by_pattern.shard_sizes() == [4, 4, 2] and len(one_file) == 2
    folder = FolderImages(photos / "folder")
    for offset in (0, 3, 4, 9):  # resuming skips whole shards, then samples
        items = list(by_pattern.iter_from(offset))
        assert len(items) == N_IMAGES - offset
        for i, item in zip(range(offset, N_IMAGES), items):
            assert np.array_equal(_pixels(open_images([item]).load(0)), _pixels(folder.load(i)))
    with pytest.raises(FileNotFoundError, match="no tar shard"):
        open_images(str(photos / "tars" / "shard-{000..004}.tar"))


def test_positions_wrap_into_epochs_of_the_stream(photos):
    stream = TarImageStream(str(photos / "tars" / "shard-{000..002}.tar"))
    items = stream_items(stream, 7)
    keys = [bytes(next(items)["bytes"]) for _ in range(N_IMAGES + 3)]  # 7, 8, 9, then 0, 1, ... 9, 0, 1, 2
    first_pass = [bytes(item["bytes"]) for item in stream.iter_from(0)]
    assert keys == first_pass[7:] + first_pass


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_batches_equal_the_folder_without_shuffling(photos, num_workers):
    folder = PositionedImages(
        FolderImages(photos / "folder"), to_tensor, seed=1, augment="crop_flip", shuffle=False
    )
    stream = PositionedImages(open_images(str(photos / "tars")), to_tensor, seed=1, augment="crop_flip")
    assert stream.is_stream and not stream.shuffle  # a stream keeps its own order
    # positions 6..29: three passes of the stream, batches of 4, none crossing a multiple of 8
    want = list(image_batches(folder, 6, 4, end=30, boundary=8))
    got = list(image_batches(stream, 6, 4, end=30, boundary=8, num_workers=num_workers))
    assert [(b.start, b.end) for b in got] == [(b.start, b.end) for b in want]
    assert all(torch.equal(g.pixels, w.pixels) for g, w in zip(got, want))


def test_an_unreadable_or_missing_image_is_counted_not_fatal(tmp_path):
    good = _png(synthetic_images(1)[0])
    with tarfile.open(tmp_path / "bad.tar", "w") as archive:
        _add(archive, "a.png", good)
        _add(archive, "b.png", b"not a png")
        _add(archive, "c.txt", b"no image here")
        _add(archive, "d.png", good)
    stream = PositionedImages(open_images(str(tmp_path / "bad.tar")), to_tensor)
    (batch,) = list(image_batches(stream, 0, 4, end=4))
    assert batch.pixels.shape[0] == 2 and batch.n_failed == 2
    assert "position 2: MissingImage: sample c has no image (txt)" in batch.errors


def test_hf_stream_from_local_parquet_equals_the_folder(photos, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stream = open_images(f"hf-stream:{photos / 'parquet'}:train")
    assert isinstance(stream, HFImageStream) and stream.image_column == "image" and len(stream) == N_IMAGES
    folder = FolderImages(photos / "folder")
    items = list(stream.iter_from(6))
    assert len(items) == 4
    for i, item in zip(range(6, N_IMAGES), items):
        assert np.array_equal(_pixels(open_images([item]).load(0)), _pixels(folder.load(i)))


def test_a_stream_cannot_hold_images_out(photos):
    with pytest.raises(ValueError, match="--eval-dataset"):
        SubsetImages(open_images(str(photos / "tars")), [0, 1])


# ----------------------------------------------------------------------------------------------- sae-vision
# cache


def cache_argv(dataset: str, out: Path, *extra: str) -> list[str]:
    return [
        "cache",
        "--model",
        TINY_MODEL,
        "--random-init",
        "--img-size",
        "32",
        "--hook",
        HOOK,
        "--tokens",
        "all",
        "--dataset",
        dataset,
        "--workers",
        "0",
        "--model-batch-size",
        "4",
        "--seed",
        "3",
        "--quiet",
        "--augment",
        "crop_flip",
        "--images",
        "24",
        "--shard-images",
        "8",
        "--output",
        str(out),
        *extra,
    ]


def _rows(path: Path) -> np.ndarray:
    return np.concatenate(list(CachedActivations(path).iter_rows(HOOK)))


@pytest.fixture(scope="module")
def folder_cache(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "cache"
    assert cli_main(cache_argv(str(photos / "folder"), out, "--shuffle-images", "false")) == 0
    return _rows(out)


@pytest.mark.parametrize("dataset", ["tars/shard-{000..002}.tar", "hf-stream:parquet"])
def test_cache_command_writes_a_stream_and_resumes_it(photos, folder_cache, tmp_path, monkeypatch, dataset):
    """Interrupted after its first shard, the same command finishes the cache: the folder's rows, in order."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = ActivationCacheWriter.write_shard

    def write_then_stop(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 0:
            raise KeyboardInterrupt

    out = tmp_path / "cache"
    argv = cache_argv(
        str(photos / dataset) if dataset.startswith("tars") else f"hf-stream:{photos / 'parquet'}", out
    )
    monkeypatch.setattr(ActivationCacheWriter, "write_shard", write_then_stop)
    assert cli_main(argv) == 130
    monkeypatch.setattr(ActivationCacheWriter, "write_shard", original)
    assert cli_main(argv) == 0
    assert np.array_equal(_rows(out), folder_cache)
    cache = CachedActivations(out)
    assert cache.metadata["n_dataset_images"] == N_IMAGES and cache.metadata["n_images_ok"] == 24
    batch = next(CachedActivationStore(cache, batch_size=16))  # what `sae-vision train --cache` reads
    assert batch.shape == (16, 192)


# ----------------------------------------------------------------------------------------------- training


def test_training_reads_a_stream_as_the_folder_and_resumes_exactly(photos):
    """`sae-vision train --dataset STREAM`: the store reads positions in order only, so it streams."""
    model, preprocess = shared_tiny()

    def make(images, position=None, shuffle=False):
        source = ImageActivationSource(
            model,
            preprocess,
            images,
            HOOK,
            "all",
            model_batch_size=4,
            seed=2,
            augment="crop_flip",
            shuffle=shuffle,
        )
        return ImageActivationStore(
            source, batch_size=16, buffer_rows=32, images_per_segment=8, seed=1, prefetch=0, position=position
        )

    folder = make(FolderImages(photos / "folder"))
    reference = [next(folder) for _ in range(12)]  # 12 x 16 rows = 192 rows = 38 images: about 4 passes
    head_store = make(open_images(str(photos / "tars")), shuffle=True)
    head = [next(head_store) for _ in range(5)]
    resumed = make(open_images(str(photos / "tars")), position=head_store.state_dict())
    tail = [next(resumed) for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(reference, head + tail))
