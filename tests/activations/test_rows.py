"""Row readers (``activations/rows.py``): a cache's rows in order, at random, and as re-iterable chunks."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from sae_vision_ext.activations.cache import ActivationCacheWriter
from sae_vision_ext.activations.rows import (
    CachedActivationRows,
    CachedActivations,
    open_row_source,
    rows_from_array,
)

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def two_hook_cache(tmp_path_factory):
    """10 images x 3 tokens, 4 images per shard (3 shards), float16, two hooks of widths 5 and 2."""
    path = tmp_path_factory.mktemp("rows") / "cache"
    writer = ActivationCacheWriter(
        path, n_images=10, images_per_shard=4, settings={}, dtype="float16", seed=1
    )
    rng = np.random.default_rng(0)
    for index in writer.prepare():
        start, end = writer.shard_range(index)
        rows = {
            hook: torch.from_numpy(rng.standard_normal(((end - start) * 3, d), dtype=np.float32))
            for hook, d in zip(HOOKS, (5, 2))
        }
        writer.write_shard(index, rows, 3, {"n_images_ok": end - start})
    return writer.commit()


def test_random_access_equals_the_rows_in_stored_order(two_hook_cache):
    cache = CachedActivations(two_hook_cache.path)
    stored = np.concatenate(list(cache.iter_rows(HOOKS[0], block_rows=7)))
    rows = CachedActivationRows(cache, HOOKS[0])
    assert len(rows) == 30 == stored.shape[0] and rows.d_in == 5 and rows.context_size == 3
    assert rows[0:0].shape == (0, 5) and rows[3:3].dtype == torch.float16
    assert torch.equal(rows[10:14], torch.from_numpy(stored[10:14]))  # across the first shard boundary (12)
    assert torch.equal(rows[::7], torch.from_numpy(stored[::7]))
    index = torch.tensor([29, 0, 12, 11, 12, 24, 23])
    assert torch.equal(rows[index], torch.from_numpy(stored[index.numpy()]))
    rows[5:9][0, 0] = 1000  # a new tensor: the memory-mapped cache is untouched
    assert torch.equal(rows[5:9], torch.from_numpy(stored[5:9]))
    with pytest.raises(IndexError):
        rows[torch.tensor([30])]
    with pytest.raises(ValueError, match="choose one with --hook"):
        CachedActivationRows(two_hook_cache.path)
    with pytest.raises(ValueError, match="no column 'blocks.2"):
        CachedActivationRows(two_hook_cache.path, "blocks.2.hook_resid_post")


def test_row_sources_restart_and_read_caches_arrays_and_dataset_dicts(two_hook_cache, tmp_path):
    source = open_row_source(two_hook_cache.path, HOOKS[1], chunk_rows=4)
    first, again = np.concatenate(list(source)), np.concatenate(list(source))
    assert source.n_rows == 30 and source.d == 2 and first.dtype == np.float32
    assert np.array_equal(first, again)  # re-iterable: each iter() starts over
    want = np.concatenate(list(CachedActivations(two_hook_cache.path).iter_rows(HOOKS[1]))).astype(np.float32)
    assert np.array_equal(first, want)
    x = torch.arange(12.0).reshape(6, 2)
    assert [c.shape[0] for c in rows_from_array(x, chunk_rows=4)] == [4, 2]
    flat = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3)
    features = datasets.Features({"h": datasets.Array2D(shape=(2, 3), dtype="float32")})
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"h": flat}, features=features)})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert np.array_equal(np.concatenate(list(open_row_source(tmp_path / "dict"))), flat.reshape(-1, 3))
