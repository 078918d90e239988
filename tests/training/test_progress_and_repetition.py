"""Long library calls draw tqdm bars with rates on stderr (off with progress=False), and repetition is
announced: caching more positions than images, training for more rows than a cache or one pass of images."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from vision_training_helpers import shared_tiny, synthetic_images, tiny_config

from sae_vision_ext.activations.rows import rows_from_array
from sae_vision_ext.activations.store import CachedActivationStore
from sae_vision_ext.analysis.concepts import name_concepts
from sae_vision_ext.analysis.dashboard import write_dashboard
from sae_vision_ext.analysis.toy import make_sae, planted_sae, tiny_clip
from sae_vision_ext.analysis.toy import synthetic_images as shape_images
from sae_vision_ext.evals.reconstruction import evaluate_sae
from sae_vision_ext.evals.report import ReportConfig, report_steps, run_report
from sae_vision_ext.training.caching import cache_activations
from sae_vision_ext.training.candidates import compute_candidates
from sae_vision_ext.training.runner import VisionSAETrainingRunner

HOOK = "blocks.1.hook_resid_post"


def _rate(unit: str) -> re.Pattern:
    """A measured rate such as ``41.8krows/s`` or ``12.3words/s`` (not tqdm's placeholder ``?rows/s``)."""
    return re.compile(r"\d[\d.]*[kMG]?" + unit + "/s")


# ----------------------------------------------------------------------------------------------- progress


def test_evaluate_sae_shows_rows_per_second_unless_progress_is_off(capsys):
    sae = planted_sae(torch.eye(8), "hook_image_embed")
    batches = list(torch.rand(300, 8).split(64))
    evaluate_sae(sae, batches)
    err = capsys.readouterr().err
    assert "evaluating SAE" in err and "300/300" in err and _rate("rows").search(err), err
    quiet = evaluate_sae(sae, batches, progress=False)
    assert capsys.readouterr().err == "" and quiet["n_rows"] == 300


def test_compute_candidates_bars_every_pass_over_the_rows(capsys):
    rows = np.random.default_rng(0).standard_normal((600, 6)).astype(np.float32)
    compute_candidates(rows_from_array(rows, chunk_rows=100), 4, sample_rows=200, refine_passes=1, seed=0)
    err = capsys.readouterr().err
    assert "statistics and sample (pass 1/2)" in err and "Lloyd refinement (pass 2/2)" in err
    assert "600/600" in err and _rate("rows").search(err) and "k-means of 200 sampled rows" in err
    compute_candidates(
        rows_from_array(rows, chunk_rows=100), 4, sample_rows=200, refine_passes=1, seed=0, progress=False
    )
    assert capsys.readouterr().err == ""


def test_name_concepts_shows_words_per_second_while_embedding(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAE_VISION_CACHE", str(tmp_path / "cache"))
    model, _ = tiny_clip(seed=2)
    vocabulary = tmp_path / "words.txt"
    vocabulary.write_text("dog\ncat\nocean\nguitar\nforest\npizza\nred\ntree\n")
    sae = make_sae(model.cfg.d_image_embed, 4, "hook_image_embed", model_name=model.spec)
    names = name_concepts(sae, vocabulary, model=model, batch_size=3, use_cache=False)
    err = capsys.readouterr().err
    assert len(names) == 4 and "embedding vocabulary" in err and "8/8" in err
    assert _rate("words").search(err), err
    name_concepts(sae, vocabulary, model=model, batch_size=3, use_cache=False, progress=False)
    assert capsys.readouterr().err == ""


def test_write_dashboard_shows_images_per_second(tmp_path, capsys):
    model, preprocess = tiny_clip(seed=0)
    sae = make_sae(model.cfg.d_model, 16, HOOK, token_selection="cls", model_name=model.spec)
    images = shape_images(6, size=32, seed=1)
    write_dashboard(
        model, sae, images, tmp_path / "on", preprocess=preprocess, n_latents=2, top_k=2, batch_size=4
    )
    err = capsys.readouterr().err
    assert "dashboard: latent statistics" in err and "6/6" in err and _rate("img").search(err), err
    assert "evaluating SAE" in err
    write_dashboard(
        model, sae, images, tmp_path / "off", preprocess=preprocess, n_latents=2, top_k=2, progress=False
    )
    assert capsys.readouterr().err == ""


def test_run_report_has_a_bar_over_its_steps(tmp_path, capsys):
    cfg = ReportConfig.tiny(
        out=str(tmp_path / "report"),
        families=["topk"],
        topk_ks=[2],
        stability=False,
        n_train_rows=256,
        max_rows=1024,
        seeds=1,
    )
    assert report_steps(cfg) == 3  # data and probe, one method, tables and plots
    run_report(cfg)
    err = capsys.readouterr().err
    assert "report:" in err and "3/3" in err and "training topk_k2" in err and "[report]" not in err, err
    run_report(ReportConfig(**{**cfg.__dict__, "out": str(tmp_path / "quiet")}), progress=False)
    err = capsys.readouterr().err
    assert "3/3" not in err and "[report] training topk_k2" in err


# ----------------------------------------------------------------------------------------------- repetition


def _cache(tmp_path, name, n_images, augment="none", **kw):
    model, preprocess = shared_tiny(5)
    cfg = tiny_config(
        tmp_path / "unused", sae=None, token_selection="patches", images_per_shard=8, augment=augment
    )
    said: list[str] = []
    cache = cache_activations(
        cfg,
        tmp_path / name,
        n_images,
        images=synthetic_images(6),
        model=model,
        preprocess=preprocess,
        progress=False,
        say=said.append,
        **kw,
    )
    return cache, said


def test_caching_more_positions_than_images_is_refused_without_allow_repeat(tmp_path):
    refusal = (
        r"asks for 8 image positions but the dataset holds 6 images: that is 1\.3 passes over the "
        r"same images; pass allow_repeat \(--allow-repeat\)"
    )
    with pytest.raises(ValueError, match=refusal):
        _cache(tmp_path, "refused", 8)
    assert not (tmp_path / "refused").exists()
    cache, said = _cache(tmp_path, "one_pass", 6)
    assert cache.metadata["n_images"] == 6 and not any("passes" in line for line in said)


def test_allow_repeat_and_augmentation_say_how_many_passes(tmp_path):
    cache, said = _cache(tmp_path, "repeated", 12, allow_repeat=True)
    assert cache.n_rows == 12 * 4
    expected = "caching 12 image positions from 6 images: 2.0 passes over the same images, the same views"
    assert expected in said[0], said
    rows = np.concatenate(list(cache.iter_rows(HOOK)))
    assert len({r.tobytes() for r in rows}) == 6 * 4  # the second pass repeats the first, row for row
    cache, said = _cache(tmp_path, "augmented", 12, augment="crop_flip")
    assert "2.0 passes over the same images, new random views (crop_flip)" in said[0]


def test_training_past_the_end_of_a_cache_says_the_epochs(tmp_path):
    cache, _ = _cache(tmp_path, "cache", 24, augment="crop_flip")  # 96 rows
    assert CachedActivationStore(cache, 32).repetition_message(96) is None
    cfg = tiny_config(
        tmp_path / "run",
        token_selection="patches",
        use_cached_activations=True,
        cached_activations_path=str(cache.path),
        training_rows=320,
        train_batch_size_rows=32,
    )
    said: list[str] = []
    result = VisionSAETrainingRunner(cfg, say=said.append).run()
    assert result.n_training_rows == 320
    assert "training on 320 rows from a cache of 96 rows: 3.3 epochs" in said


def test_training_from_images_without_augmentation_says_the_passes(tmp_path):
    model, preprocess = shared_tiny(5)
    # 12 images x 5 rows (CLS + 2x2 patches) = 60 rows per pass
    cfg = tiny_config(tmp_path / "run", augment="none", training_rows=64 * 3)
    said: list[str] = []
    VisionSAETrainingRunner(
        cfg, images=synthetic_images(), model=model, preprocess=preprocess, say=said.append
    ).run()
    expected = (
        "training on 192 rows from 12 images x 5 rows per image: 3.2 passes over the images, "
        "the same views each pass"
    )
    assert any(line.startswith(expected) for line in said), said
