"""On-disk activation cache: SAELens format, shuffled shards, atomic commit, resume, model-free reading."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from vision_training_helpers import load_tiny, synthetic_images, tiny_config

from sae_vision_ext.activations.rows import CACHE_METADATA_FILENAME, INCOMPLETE_SUFFIX, CachedActivations
from sae_vision_ext.activations.source import ImageActivationSource
from sae_vision_ext.activations.store import CachedActivationStore
from sae_vision_ext.training.caching import cache_activations

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_model():
    return load_tiny()


def _cfg(tmp_path, **overrides):
    fields = dict(
        sae=None, hook_name=HOOK, token_selection="patches", images_per_shard=8, augment="crop_flip"
    )
    fields.update(overrides)
    return tiny_config(tmp_path / "unused", **fields)


def _write(cfg, path, tiny_model, n_images=20, images=None, **kw):
    model, preprocess = tiny_model
    return cache_activations(
        cfg,
        path,
        n_images,
        images=images or synthetic_images(6),
        model=model,
        preprocess=preprocess,
        progress=False,
        say=lambda m: None,
        **kw,
    )


def _all_rows(cache, hook=HOOK):
    return np.concatenate(list(cache.iter_rows(hook)))


def test_cache_is_saelens_format_shuffled_and_readable_without_a_model(tmp_path, tiny_model):
    import datasets
    from sae_lens.training.activations_store import ActivationsStore

    cfg = _cfg(tmp_path)
    cache = _write(cfg, tmp_path / "cache", tiny_model)
    meta = cache.metadata
    assert meta["model_name"] == cfg.model_name and meta["hook_names"] == [HOOK]
    assert (
        meta["weights"] is None and meta["token_selection"] == "patches"
    )  # a model passed without a record and meta["modality"] == "vision"
    assert meta["n_images"] == 20 and meta["n_images_ok"] == 20 and meta["n_images_failed"] == 0
    assert meta["context_size"] == 4 and meta["n_rows"] == 80 and meta["n_shards"] == 3
    assert meta["image_size"] == [32, 32] and meta["hook_widths"] == {HOOK: 192}

    # the same rows the source produces, but token-shuffled within each shard
    model, preprocess = tiny_model
    source = ImageActivationSource(
        model,
        preprocess,
        synthetic_images(6),
        HOOK,
        "patches",
        model_batch_size=4,
        seed=cfg.seed,
        augment="crop_flip",
        crop_scale=cfg.crop_scale,
    )
    direct = torch.cat([c.rows[HOOK] for c in source.iter_chunks(0, 20, boundary=8)]).numpy()
    cached = _all_rows(cache)
    assert cached.shape == direct.shape and not np.array_equal(cached, direct)
    assert np.array_equal(cached[np.lexsort(cached.T[:3])], direct[np.lexsort(direct.T[:3])])

    # HF datasets and SAELens's ActivationsStore read it as is, with no model
    ds = datasets.load_from_disk(str(cache.path))
    assert ds.column_names == [HOOK] and len(ds) == 20
    assert ds.features[HOOK].shape == (4, 192)
    store = ActivationsStore(
        model=None,
        dataset=None,
        streaming=False,
        hook_name=HOOK,
        hook_head_index=None,
        context_size=4,
        d_in=192,
        n_batches_in_buffer=8,
        total_training_tokens=80,
        store_batch_size_prompts=4,
        train_batch_size_tokens=16,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        cached_activations_path=str(cache.path),
    )
    assert next(store).shape == (16, 192)
    # the same cache again: nothing to do; other settings: refused, the finished cache untouched
    before = (tmp_path / "cache" / "state.json").stat().st_mtime_ns
    again = _write(cfg, tmp_path / "cache", tiny_model)
    assert again.n_rows == cache.n_rows and (tmp_path / "cache" / "state.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="made with other settings .differs in: seed"):
        _write(dataclasses.replace(cfg, seed=cfg.seed + 1), tmp_path / "cache", tiny_model)


def test_interrupted_cache_is_never_complete_and_resumes(tmp_path, tiny_model, monkeypatch):
    import datasets

    cfg = _cfg(tmp_path)
    path = tmp_path / "cache"
    calls = {"n": 0}
    original = ImageActivationSource.activations

    def crashing(self, pixels):
        calls["n"] += 1
        if calls["n"] == 4:  # shard 0 = 2 forward passes, shard 1 dies in its 2nd
            raise KeyboardInterrupt
        return original(self, pixels)

    monkeypatch.setattr(ImageActivationSource, "activations", crashing)
    with pytest.raises(KeyboardInterrupt):
        _write(cfg, path, tiny_model, n_images=24)
    assert not path.exists() and (tmp_path / f"cache{INCOMPLETE_SUFFIX}").is_dir()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        CachedActivations(path)
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(path))
    with pytest.raises((FileNotFoundError, ValueError)):  # the work folder is not a dataset either
        datasets.load_from_disk(str(tmp_path / f"cache{INCOMPLETE_SUFFIX}"))

    def counting(self, pixels):
        calls["n"] += 1
        return original(self, pixels)

    calls["n"] = 0
    monkeypatch.setattr(ImageActivationSource, "activations", counting)
    resumed = _write(cfg, path, tiny_model, n_images=24)
    assert calls["n"] == 4  # shards 1 and 2 only: shard 0 was kept
    assert not (tmp_path / f"cache{INCOMPLETE_SUFFIX}").exists()
    fresh = _write(cfg, tmp_path / "fresh", tiny_model, n_images=24)
    assert np.array_equal(_all_rows(resumed), _all_rows(fresh))
    assert (path / CACHE_METADATA_FILENAME).exists()


def test_resuming_with_other_settings_is_refused(tmp_path, tiny_model, monkeypatch):
    cfg = _cfg(tmp_path)
    original = ImageActivationSource.activations
    calls = {"n": 0}

    def crashing(self, pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, pixels)

    monkeypatch.setattr(ImageActivationSource, "activations", crashing)
    with pytest.raises(KeyboardInterrupt):
        _write(cfg, tmp_path / "cache", tiny_model)
    monkeypatch.setattr(ImageActivationSource, "activations", original)
    with pytest.raises(ValueError, match="token_selection"):
        _write(_cfg(tmp_path, token_selection="all"), tmp_path / "cache", tiny_model)


def test_cached_store_order_epochs_and_exact_resume(tmp_path, tiny_model):
    cache = _write(_cfg(tmp_path), tmp_path / "cache", tiny_model, n_images=24)  # 96 rows, 3 shards
    rows = _all_rows(cache)
    store = CachedActivationStore(cache, batch_size=16, seed=1)
    epoch0 = torch.cat([next(store) for _ in range(6)]).numpy()
    epoch1 = torch.cat([next(store) for _ in range(6)]).numpy()
    assert np.array_equal(epoch0, rows)  # written shuffled: the first pass streams it in order
    assert not np.array_equal(epoch1, rows)  # later passes: shard order and rows within shards permuted
    assert np.allclose(np.sort(epoch1, axis=0), np.sort(rows, axis=0))
    full = CachedActivationStore(cache, batch_size=16, seed=1)
    reference = [next(full) for _ in range(15)]
    for cut in (3, 7, 13):
        first = CachedActivationStore(cache, batch_size=16, seed=1)
        head = [next(first) for _ in range(cut)]
        second = CachedActivationStore(cache, batch_size=16, seed=1, position=first.state_dict())
        tail = [next(second) for _ in range(15 - cut)]
        assert all(torch.equal(a, b) for a, b in zip(reference, head + tail)), cut
    with pytest.raises(ValueError, match="no column"):
        CachedActivationStore(cache, batch_size=16, hook_names="blocks.9.hook_resid_post")
