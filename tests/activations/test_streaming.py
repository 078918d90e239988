"""Streaming input: WebDataset tar shards (our reader) and HF `datasets` streaming, partitioned over ranks/workers."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from sae_vision_ext.activations.streaming import (
    HFStreamingImages,
    HFStreamingRows,
    StreamPart,
    WebDatasetArrays,
    WebDatasetImages,
    WebDatasetSamples,
    expand_shards,
    shuffled_row_batches,
    stream_image_batches,
)


def _png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _write_shards(root, n_shards=4, per_shard=6, corrupt=("s1/0003",), no_image=("s2/0001",)):
    """Shards shard-000..: sample s{i}/{j:04d} = png of value 10*i + j plus a .cls member."""
    paths = []
    for i in range(n_shards):
        path = root / f"shard-{i:03d}.tar"
        with tarfile.open(path, "w") as archive:
            for j in range(per_shard):
                key = f"s{i}/{j:04d}"
                if key not in no_image:
                    data = b"not a png at all" if key in corrupt else _png(10 * i + j)
                    _add(archive, f"{key}.png", data)
                _add(archive, f"{key}.cls", str(j).encode())
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("wds"))


def test_brace_expansion_keeps_padding(tmp_path):
    assert expand_shards("s3://b/shard-{008..011}.tar") == [f"s3://b/shard-{i:03d}.tar" for i in range(8, 12)]
    for i in range(3):
        (tmp_path / f"x{i}.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path / "x*.tar")) == [str(tmp_path / f"x{i}.tar") for i in range(3)]


def test_tar_samples_group_members_by_key_and_images_decode(shards):
    samples = list(WebDatasetSamples(shards[:1]).iter_part(StreamPart()))
    assert [s["__key__"] for s in samples] == [f"s0/{j:04d}" for j in range(6)]
    assert set(samples[2]) == {"__key__", "__url__", "png", "cls"} and samples[2]["cls"] == b"2"

    items = list(WebDatasetImages(shards).iter_part(StreamPart()))
    assert len(items) == 24
    failed = {it.key for it in items if it.image is None}
    assert failed == {"s1/0003", "s2/0001"}  # corrupt bytes, and a sample with no image field
    by_key = {it.key: it.image for it in items}
    assert np.asarray(by_key["s3/0005"])[0, 0].tolist() == [35, 35, 35]


@pytest.mark.parametrize("split_by", ["shard", "sample"])
@pytest.mark.parametrize("n_parts", [2, 3, 4])
def test_parts_are_disjoint_and_cover_the_stream(shards, split_by, n_parts):
    everything = [it.key for it in WebDatasetImages(shards).iter_part(StreamPart())]
    parts = [
        [it.key for it in WebDatasetImages(shards, split_by=split_by).iter_part(StreamPart(p, n_parts))]
        for p in range(n_parts)
    ]
    flat = [k for part in parts for k in part]
    assert len(flat) == len(set(flat)) == len(everything)
    assert set(flat) == set(everything)
    assert all(parts)


def test_truncated_and_missing_shards_are_counted_not_fatal(shards, tmp_path):
    data = open(shards[0], "rb").read()
    with tarfile.open(shards[0]) as archive:
        cut = archive.getmembers()[7].offset_data + 10  # inside a member's data: an interrupted download
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:cut])
    source = WebDatasetSamples([str(truncated), str(tmp_path / "missing.tar"), shards[1]])
    keys = [s["__key__"] for s in source.iter_part(StreamPart())]
    assert keys[-6:] == [f"s1/{j:04d}" for j in range(6)]  # the good shard is read in full
    assert 0 < len(keys) - 6 < 6  # part of the truncated shard was read
    assert source.n_corrupt_shards == 2


def test_repeat_and_shard_shuffle_are_the_same_in_every_part(shards):
    source = WebDatasetSamples(shards, shuffle_shards_seed=3, repeat=True)
    assert source.shard_order(0) != source.shard_order(1)
    stream = source.iter_part(StreamPart())
    first_two_epochs = [next(stream)["__key__"] for _ in range(48)]
    assert sorted(first_two_epochs[:24]) == sorted(first_two_epochs[24:])


def test_dataloader_workers_times_ranks_partition_the_stream(shards):
    """2 simulated ranks x 2 DataLoader workers: 4 disjoint parts; failures counted by the batcher."""
    to_tensor = lambda image: torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # noqa: E731
    keys, failed = [], 0
    for rank in range(2):
        for batch in stream_image_batches(WebDatasetImages(shards), to_tensor, batch_size=4, num_workers=2,
                                          rank=rank, world_size=2):
            keys += batch.keys
            failed += batch.n_failed
            assert batch.pixels is None or batch.pixels.shape[1:] == (3, 8, 8)
    assert failed == 2
    assert len(keys) == len(set(keys)) == 22


def test_hf_streaming_parquet_images_partitioned(tmp_path):
    import datasets

    files = []
    for f in range(2):
        rows = {"image": [{"bytes": _png(f * 50 + i), "path": None} for i in range(5)], "id": [f"{f}-{i}" for i in range(5)]}
        rows["image"][1] = {"bytes": b"garbage", "path": None} if f == 1 else rows["image"][1]
        ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
            {"image": datasets.Image(), "id": datasets.Value("string")}))
        path = tmp_path / f"part-{f}.parquet"
        ds.to_parquet(str(path))
        files.append(str(path))
    source = HFStreamingImages("parquet", data_files=files, key_column="id")
    whole = list(source.iter_part(StreamPart()))
    assert len(whole) == 10 and [it.key for it in whole if it.image is None] == ["1-1"]
    assert np.asarray(whole[3].image)[0, 0, 0] == 3
    for n_parts in (2, 3):  # by file (2 | 2), by example (3 does not divide 2 files)
        parts = [[it.key for it in source.iter_part(StreamPart(p, n_parts))] for p in range(n_parts)]
        flat = [k for part in parts for k in part]
        assert sorted(flat) == sorted(it.key for it in whole) and len(set(flat)) == 10


def test_activation_rows_from_tar_and_parquet_feed_fixed_size_batches(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((16, 4)).astype(np.float32) for _ in range(6)]
    with tarfile.open(tmp_path / "rows.tar", "w") as archive:
        for i, block in enumerate(blocks):
            buffer = io.BytesIO()
            np.save(buffer, block)
            _add(archive, f"{i:05d}.npy", buffer.getvalue())
    from_tar = torch.cat(list(WebDatasetArrays(str(tmp_path / "rows.tar")).iter_part(StreamPart())))
    assert torch.equal(from_tar, torch.from_numpy(np.concatenate(blocks)))

    features = datasets.Features({"hook": datasets.Array2D(shape=(8, 4), dtype="float32")})
    ds = datasets.Dataset.from_dict({"hook": np.concatenate(blocks).reshape(12, 8, 4)}, features=features)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    from_parquet = torch.cat(list(HFStreamingRows("parquet", "hook", data_files=str(tmp_path / "rows.parquet"))
                                  .iter_part(StreamPart())))
    assert torch.equal(from_parquet, from_tar)

    batches = list(shuffled_row_batches([from_tar[i : i + 16] for i in range(0, 96, 16)], batch_size=8,
                                        buffer_rows=32, seed=0))
    assert all(b.shape == (8, 4) for b in batches) and len(batches) == 12
    got = torch.cat(batches)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, from_tar.tolist()))  # each row exactly once
    assert not torch.equal(got, from_tar)  # and mixed


def test_streamed_images_become_activation_rows_for_training(shards):
    from sae_vision_ext.activations.streaming import stream_activation_rows
    from sae_vision_ext.vision.load import load_vision_model

    torch.manual_seed(0)
    model, preprocess = load_vision_model("timm:vit_tiny_patch16_224", pretrained=False, img_size=32)
    images = stream_image_batches(WebDatasetImages(shards), preprocess, batch_size=5, rank=0, world_size=1)
    blocks = list(stream_activation_rows(model.eval(), images, "blocks.0.hook_resid_post", "patches"))
    n_patches = model.token_layout.n_patches
    assert sum(b.shape[0] for b in blocks) == 22 * n_patches  # 24 samples, 2 unreadable
    assert all(b.shape[1] == model.hook_width("blocks.0.hook_resid_post") for b in blocks)
    batches = list(shuffled_row_batches(blocks, batch_size=16, buffer_rows=32, seed=0))
    assert len(batches) == 22 * n_patches // 16
