"""Activation source and streaming store: token selection, mixing, exact resume, bad images, image sources."""

from __future__ import annotations

import pytest
import torch
from vision_training_helpers import REG_MODEL, TINY_MODEL, load_tiny, synthetic_images

from sae_vision_ext.activations.images import ConsecutiveBatches, FolderImages, open_images
from sae_vision_ext.activations.source import (
    Chunk,
    ImageActivationSource,
    resolve_hooks,
    select_rows,
    stop_layer_for,
)
from sae_vision_ext.activations.store import ImageActivationStore


@pytest.fixture(scope="module")
def reg_model():
    return load_tiny(REG_MODEL, img_size=28)


@pytest.fixture(scope="module")
def tiny_model():
    return load_tiny(TINY_MODEL, img_size=32)


# ----------------------------------------------------------------------------------------------- token
# selection


def test_token_selection_keeps_the_right_tokens(reg_model):
    model, preprocess = reg_model
    pixels = torch.stack([preprocess(im) for im in synthetic_images(3)])
    hook = "blocks.2.hook_resid_post"
    _, cache = model.run_with_cache(pixels, names_filter=[hook])
    acts = cache[hook]  # [3, 1 + 4 + 4, 384]
    assert acts.shape[:2] == (3, 9)
    expected = {
        "cls": acts[:, :1],
        "registers": acts[:, 1:5],
        "prefix": acts[:, :5],
        "patches": acts[:, 5:],
        "all": acts,
    }
    for selection, want in expected.items():
        rows = select_rows(model, acts, hook, selection)
        assert torch.equal(rows, want.reshape(-1, 384)), selection
    # one source forward gives the same rows, image-major, and says how many per image
    source = ImageActivationSource(model, preprocess, synthetic_images(3), hook, "registers", shuffle=False)
    assert source.tokens_per_image == 4 and source.stop_at_layer == 3
    rows = source.activations(pixels)[hook]
    assert torch.allclose(rows, acts[:, 1:5].reshape(-1, 384), atol=1e-6)


def test_pooled_selection_and_errors(tiny_model):
    model, preprocess = tiny_model
    assert resolve_hooks(None, "pooled") == ["hook_pooled"]
    source = ImageActivationSource(model, preprocess, synthetic_images(2), None, "pooled")
    assert source.tokens_per_image == 1 and source.stop_at_layer is None
    pixels = torch.stack([preprocess(im) for im in synthetic_images(2)])
    assert source.activations(pixels)["hook_pooled"].shape == (2, 192)
    with pytest.raises(ValueError, match="token_selection"):
        resolve_hooks("blocks.0.hook_resid_post", "everything")
    with pytest.raises(ValueError, match="hook_pooled"):
        resolve_hooks("blocks.0.hook_resid_post", "pooled")
    with pytest.raises(ValueError, match="no register tokens"):
        ImageActivationSource(model, preprocess, synthetic_images(2), "blocks.0.hook_resid_post", "registers")
    with pytest.raises(
        KeyError, match="blocks.0.hook_resid_postt"
    ):  # unknown hook: the model lists valid ones
        ImageActivationSource(model, preprocess, synthetic_images(2), "blocks.0.hook_resid_postt", "all")


def test_stop_layer_is_one_past_the_deepest_block():
    assert stop_layer_for(["blocks.3.hook_resid_post"]) == 4
    assert stop_layer_for(["blocks.1.hook_mlp_out", "blocks.7.hook_resid_pre"]) == 8
    assert stop_layer_for(["hook_embed"]) == 0
    assert stop_layer_for(["hook_embed", "blocks.2.hook_resid_post"]) == 3
    assert stop_layer_for(["blocks.2.hook_resid_post", "hook_pooled"]) is None


def test_batches_never_cross_boundaries():
    batches = list(ConsecutiveBatches(start=6, batch_size=4, end=21, boundary=8))
    assert batches == [[6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19], [20]]


# ----------------------------------------------------------------------------------------------- mixing,
# resume


class FakeImageActivationSource:
    """Rows ``[position, token]``: each served row says where it came from; ``fail`` positions are skipped."""

    hook_names = ["h"]
    hook_widths = {"h": 2}
    model_batch_size = 4
    tokens_per_image = 8

    def __init__(self, fail=()):
        self.fail = set(fail)

    def iter_chunks(self, start=0, end=None, boundary=None):
        for positions in ConsecutiveBatches(start, self.model_batch_size, end, boundary):
            ok = [g for g in positions if g not in self.fail]
            rows = torch.tensor(
                [[g, t] for g in ok for t in range(self.tokens_per_image)], dtype=torch.float32
            )
            yield Chunk(
                positions[0], positions[-1] + 1, {"h": rows.reshape(-1, 2)}, len(ok), len(positions) - len(ok)
            )


def take(store, n):
    return [next(store) for _ in range(n)]


def test_store_mixes_rows_and_serves_each_row_once_per_segment():
    store = ImageActivationStore(
        FakeImageActivationSource(), batch_size=16, buffer_rows=64, images_per_segment=32, seed=1, prefetch=0
    )
    batches = take(store, 32)  # segment 0: 32 images x 8 tokens = 256 rows = 16 batches; then segment 1
    rows = torch.cat(batches)
    first = rows[:256]
    assert sorted(map(tuple, first.tolist())) == [(g, t) for g in range(32) for t in range(8)]
    assert (rows[256:, 0] >= 32).all() and (rows[256:, 0] < 64).all()
    # mixed: a batch holds tokens of many images, none of the batches is a run of one image's tokens
    assert all(len(set(b[:, 0].tolist())) >= 6 for b in batches)
    assert store.state_dict()["segment"] == 1 and store.counters["images_ok"] == 64


def test_store_resume_is_exact_mid_segment_and_across_segments():
    def make(position=None, prefetch=0):
        return ImageActivationStore(
            FakeImageActivationSource(),
            batch_size=16,
            buffer_rows=64,
            images_per_segment=32,
            seed=3,
            prefetch=prefetch,
            position=position,
        )

    full = make()
    reference = take(full, 40)
    for cut in (5, 16, 23):
        first = make(prefetch=2)
        head = take(first, cut)
        state = first.state_dict()
        first.close()
        second = make(position=state, prefetch=1)
        tail = take(second, 40 - cut)
        assert all(torch.equal(a, b) for a, b in zip(reference, head + tail)), cut
        assert second.counters == full.counters and full.counters["rows_served"] == 40 * 16
    other_seed = ImageActivationStore(
        FakeImageActivationSource(), batch_size=16, buffer_rows=64, images_per_segment=32, seed=4
    )
    assert not torch.equal(torch.cat(take(other_seed, 4)), torch.cat(reference[:4]))


def test_real_model_store_resume_is_exact(tiny_model):
    model, preprocess = tiny_model

    def make(position=None, prefetch=2):
        source = ImageActivationSource(
            model,
            preprocess,
            synthetic_images(6),
            "blocks.1.hook_resid_post",
            "all",
            model_batch_size=4,
            num_workers=1,
            seed=2,
            augment="crop_flip",
        )
        return ImageActivationStore(
            source, batch_size=32, buffer_rows=64, seed=2, prefetch=prefetch, position=position
        )

    first = make()
    reference = take(first, 9)
    first.close()
    second = make(prefetch=0)
    head = take(second, 4)
    state = second.state_dict()
    second.close()
    resumed = make(position=state)
    tail = take(resumed, 5)
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(reference, head + tail))


def test_multi_hook_batches_stay_aligned(tiny_model):
    model, preprocess = tiny_model
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"]
    source = ImageActivationSource(
        model, preprocess, synthetic_images(4), hooks, "patches", model_batch_size=4
    )
    assert source.stop_at_layer == 2
    store = ImageActivationStore(source, batch_size=16, buffer_rows=32, seed=0, prefetch=1)
    batches = take(store, 3)
    store.close()
    for batch in batches:
        assert set(batch) == set(hooks) and batch[hooks[0]].shape == (16, 192)
        # resid_post of block 0 IS resid_pre of block 1: equal rows prove one shared shuffle
        assert torch.equal(batch[hooks[0]], batch[hooks[1]])
        assert not torch.equal(batch[hooks[0]], batch[hooks[2]])


# ----------------------------------------------------------------------------------------------- bad images


def test_unreadable_images_are_skipped_and_counted(tiny_model, tmp_path):
    model, preprocess = tiny_model
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    images = synthetic_images(6) + [str(corrupt), str(tmp_path / "missing.jpg")]
    source = ImageActivationSource(
        model,
        preprocess,
        images,
        "blocks.0.hook_resid_post",
        "patches",
        model_batch_size=4,
        num_workers=1,
        seed=0,
    )
    store = ImageActivationStore(
        source, batch_size=16, buffer_rows=32, images_per_segment=8, seed=0, prefetch=1
    )
    take(store, 6)  # 6 readable images x 4 patches = 24 rows per epoch of 8 positions
    store.close()
    assert store.counters["images_failed"] >= 2 and store.counters["images_failed"] % 2 == 0
    assert store.counters["images_ok"] == 3 * store.counters["images_failed"]
    assert any("corrupt.png" in f or "UnidentifiedImageError" in f for f in source.failures)
    assert any("missing.jpg" in f or "FileNotFoundError" in f for f in source.failures)


def test_nothing_readable_is_an_error(tiny_model, tmp_path):
    model, preprocess = tiny_model
    source = ImageActivationSource(
        model,
        preprocess,
        [str(tmp_path / f"gone{i}.png") for i in range(3)],
        "blocks.0.hook_resid_post",
        "patches",
        model_batch_size=8,
    )
    with pytest.raises(RuntimeError, match="none of the first"):
        list(source.iter_chunks(0, 40))


# ----------------------------------------------------------------------------------------------- image
# sources


def test_image_folder_and_saved_hf_dataset(tmp_path):
    import datasets

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(synthetic_images(3)):
        im.save(folder / ("sub" if i else "") / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    images = open_images(str(folder))
    assert isinstance(images, FolderImages) and len(images) == 3
    assert images.load(0).mode == "RGB"

    grey = [im.convert("L") for im in synthetic_images(4)]
    ds = datasets.Dataset.from_dict(
        {"picture": grey, "label": [0, 1, 2, 3]},
        features=datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    loaded = open_images(str(tmp_path / "ds"))
    assert len(loaded) == 4 and loaded.image_column == "picture"
    assert loaded.load(2).mode == "RGB" and loaded.load(2).size == grey[2].size
    with pytest.raises(FileNotFoundError):
        open_images(str(tmp_path / "empty_dir_that_does_not_exist"))
