"""Caching over 2 gloo processes (loopback) gives the cache one process writes: same rows, one commit."""

import os

import numpy as np
import pytest
import torch

from sae_vision_ext.activations.cache import ActivationCacheWriter
from sae_vision_ext.activations.distributed_cache import (
    assign_shards,
    cache_activations_distributed,
    source_shard_writer,
    write_cache_distributed,
)
from sae_vision_ext.activations.process_group import DistributedContext, spawn_local
from sae_vision_ext.activations.rows import CachedActivations

HOOK = "blocks.1.hook_resid_post"
N_IMAGES, PER_SHARD = 22, 4  # 6 shards, the last one partial


def _images():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(N_IMAGES)]
    images[5] = "/nonexistent/broken.png"  # unreadable: skipped and counted, never fatal
    return images


def _source():
    from sae_vision_ext.activations.source import ImageActivationSource
    from sae_vision_ext.vision.load import load_vision_model

    torch.manual_seed(0)
    model, preprocess = load_vision_model("timm:vit_tiny_patch16_224", pretrained=False, img_size=32)
    return ImageActivationSource(
        model.eval(), preprocess, _images(), HOOK, token_selection="all", model_batch_size=3, seed=0
    )


def _settings(source):
    return {
        "hook_names": [HOOK],
        "token_selection": "all",
        "tokens_per_image": source.tokens_per_image,
        "n_images": N_IMAGES,
        "model": "tiny",
    }


def _cache(path, context=None):
    return cache_activations_distributed(
        _source(), path, images_per_shard=PER_SHARD, settings={"model": "tiny"}, seed=1, context=context
    )


def _worker(context: DistributedContext, out: str) -> None:
    torch.set_num_threads(1)
    source = _source()
    writer = ActivationCacheWriter(os.path.join(out, "ddp"), N_IMAGES, PER_SHARD, _settings(source), seed=1)
    write_one = source_shard_writer(source, writer)

    def write_and_record(index):
        with open(os.path.join(out, f"shards-by-rank{context.rank}.txt"), "a") as f:
            f.write(f"{index}\n")
        write_one(index)

    write_cache_distributed(writer, write_and_record, context)
    context.barrier()
    # resume: a cache that one process started (shard 0 done) is finished by both ranks
    _cache(os.path.join(out, "resumed"), context)


def _rows(cache: CachedActivations) -> np.ndarray:
    rows = np.concatenate(list(cache.iter_rows(HOOK)))
    return rows[np.lexsort(rows.T[::-1])]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    torch.set_num_threads(1)
    # start the cache that the ranks will resume: only shard 0 written, then "interrupted"
    source = _source()
    writer = ActivationCacheWriter(out / "resumed", N_IMAGES, PER_SHARD, _settings(source), seed=1)
    assert writer.prepare() == list(range(6))
    source_shard_writer(source, writer)(0)
    shard0 = writer.work / writer.shard_name(0)
    shard0_mtime = shard0.stat().st_mtime_ns

    spawn_local(_worker, 2, (str(out),), backend="gloo", start_method="fork")
    single = _cache(out / "single")
    return {
        "out": out,
        "single": single,
        "ddp": CachedActivations(out / "ddp"),
        "resumed": CachedActivations(out / "resumed"),
        "shard0_mtime": shard0_mtime,
    }


def test_two_ranks_write_the_same_rows_as_one_process(caches):
    single, ddp = caches["single"], caches["ddp"]
    assert ddp.n_rows == single.n_rows == (N_IMAGES - 1) * single.context_size
    np.testing.assert_allclose(_rows(ddp), _rows(single), rtol=1e-5, atol=1e-5)
    for key in ("n_images", "n_images_ok", "n_images_failed", "n_shards", "n_rows", "hook_widths"):
        assert ddp.metadata[key] == single.metadata[key], key
    assert ddp.metadata["n_images_failed"] == 1
    # each rank computed its own shards
    by_rank = [(caches["out"] / f"shards-by-rank{r}.txt").read_text().split() for r in range(2)]
    assert by_rank == [["0", "2", "4"], ["1", "3", "5"]]


def test_the_cache_is_committed_once_and_reads_like_a_single_process_cache(caches):
    out = caches["out"]
    assert not (out / "ddp.incomplete").exists()
    assert sorted(os.listdir(out / "ddp")) == sorted(os.listdir(out / "single"))
    import datasets

    dataset = datasets.load_from_disk(str(out / "ddp"))  # what SAELens's ActivationsStore reads
    assert dataset.column_names == [HOOK] and len(dataset) == caches["single"].metadata["n_contexts"]


def test_ranks_resume_an_interrupted_cache_keeping_finished_shards(caches):
    resumed, single = caches["resumed"], caches["single"]
    shard0 = resumed.path / "data-00000.arrow"
    assert shard0.stat().st_mtime_ns == caches["shard0_mtime"]  # not recomputed
    np.testing.assert_allclose(_rows(resumed), _rows(single), rtol=1e-5, atol=1e-5)


def test_shard_assignment_is_disjoint_and_covering():
    todo = [1, 2, 4, 5, 6, 9, 11]
    for world in (1, 2, 3, 8):
        parts = [assign_shards(todo, r, world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == todo


@pytest.mark.slow  # ~50 s under torchrun; the default run keeps one torchrun test (training)
def test_sae_vision_cache_under_torchrun_equals_a_single_process_run(tmp_path):
    """``torchrun --nproc_per_node 2 -m sae_vision_ext.cli cache ...`` writes the single-process cache."""
    import subprocess
    import sys

    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    args = [
        "cache",
        "--dataset",
        str(folder),
        "--model",
        "timm:vit_tiny_patch16_224",
        "--random-init",
        "--img-size",
        "32",
        "--hook",
        HOOK,
        "--tokens",
        "all",
        "--model-batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--images",
        "14",
        "--allow-repeat",
        "--shard-images",
        "4",
        "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for command in (
        [*launch, "-m", "sae_vision_ext.cli", *args, "--output", str(tmp_path / "ddp")],
        [sys.executable, "-m", "sae_vision_ext.cli", *args, "--output", str(tmp_path / "single")],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("cache: ") == 1  # the summary is printed by rank 0 only
    ddp, single = CachedActivations(tmp_path / "ddp"), CachedActivations(tmp_path / "single")
    assert not (tmp_path / "ddp.incomplete").exists()
    assert ddp.n_rows == single.n_rows == 14 * single.context_size
    assert sorted(os.listdir(ddp.path)) == sorted(os.listdir(single.path))
    for key in ("n_images", "n_images_ok", "n_images_failed", "n_shards", "n_rows", "hook_widths"):
        assert ddp.metadata[key] == single.metadata[key], key
    np.testing.assert_allclose(_rows(ddp), _rows(single), rtol=1e-5, atol=1e-5)
