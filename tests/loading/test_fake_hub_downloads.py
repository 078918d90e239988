"""Pretrained weights come from the Hugging Face Hub: a local server stands in for it (``fake_hub``,
HF_ENDPOINT).

The served weights are a seeded random init of the real architecture; equality after loading proves that the
loader asked the hub (at ``HF_ENDPOINT``) for them and loaded what it got.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from fake_hub import serve_random_weights

from sae_vision_ext.vision.load import load_vision_model

REG_MODEL = "timm:vit_small_patch14_reg4_dinov2.lvd142m"
CLIP_MODEL = "open_clip:ViT-B-32/laion2b_s34b_b79k"
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def test_fake_hub_answers_like_the_hub(fake_hub, tmp_path):
    from huggingface_hub import hf_hub_download, model_info, snapshot_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 1000)
    fake_hub.serve("org/repo", "config.json", tmp_path / "config.json")
    fake_hub.serve("org/repo", "sub/w.safetensors", tmp_path / "w.safetensors")

    # a regular file (200) and an LFS file (302 to the "CDN" origin), both into the cache set by the fixture
    config = hf_hub_download("org/repo", "config.json")
    weights = hf_hub_download("org/repo", "sub/w.safetensors")
    assert open(config).read() == '{"a": 1}' and open(weights, "rb").read() == b"\x00" * 1000
    assert str(tmp_path / "hf-home" / "hub") in weights
    assert fake_hub.downloaded() == [("org/repo", "config.json"), ("org/repo", "sub/w.safetensors")]
    assert ("org/repo", "sub/w.safetensors", 302) in fake_hub.file_requests("HEAD")
    # cached now: asked again, the hub gets a HEAD only
    hf_hub_download("org/repo", "config.json")
    assert len(fake_hub.downloaded()) == 2

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/repo", "missing.bin")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/nothing", "config.json")

    assert sorted(s.rfilename for s in model_info("org/repo").siblings) == [
        "config.json",
        "sub/w.safetensors",
    ]
    folder = snapshot_download("org/repo", cache_dir=tmp_path / "snapshots")
    assert open(f"{folder}/sub/w.safetensors", "rb").read() == b"\x00" * 1000


def test_fake_hub_reaches_subprocesses(fake_hub, tmp_path):
    """CLI tests run ``sae-vision`` in a subprocess: the fixture's environment variables are enough there."""
    (tmp_path / "config.json").write_text("{}")
    fake_hub.serve("org/repo", "config.json", tmp_path / "config.json")
    code = "from huggingface_hub import hf_hub_download; print(hf_hub_download('org/repo', 'config.json'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().startswith(str(tmp_path / "hf-home" / "hub"))
    assert fake_hub.downloaded() == [("org/repo", "config.json")]


def test_timm_pretrained_weights_are_downloaded_from_the_hub(fake_hub):
    served = serve_random_weights(fake_hub, REG_MODEL, seed=1)
    assert (served.repo_id, served.filename) == (
        "timm/vit_small_patch14_reg4_dinov2.lvd142m",
        "model.safetensors",
    )

    model, _ = load_vision_model(REG_MODEL, pretrained=True, img_size=56)

    assert fake_hub.downloaded() == [(served.repo_id, "model.safetensors")]
    loaded = model.model.state_dict()
    assert loaded.keys() == served.state_dict.keys()
    # served at the pretrained 518 px; timm resamples the position embeddings to 56 px, the rest is as served
    assert served.state_dict["pos_embed"].shape[1] == 37 * 37 and loaded["pos_embed"].shape[1] == 4 * 4
    for key, value in served.state_dict.items():
        if key != "pos_embed":
            assert torch.equal(loaded[key], value), key


def _check_open_clip_download(fake_hub, **library_kwargs):
    served = serve_random_weights(fake_hub, CLIP_MODEL, seed=2, **library_kwargs)
    assert (served.repo_id, served.filename) == (
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "open_clip_model.safetensors",
    )

    model, _ = load_vision_model(CLIP_MODEL, pretrained=True, **library_kwargs)

    assert fake_hub.downloaded() == [(served.repo_id, "open_clip_model.safetensors")]
    loaded = model.model.state_dict()
    assert loaded.keys() == served.state_dict.keys()
    for key, value in served.state_dict.items():
        assert torch.equal(loaded[key], value), key


def test_open_clip_pretrained_weights_are_downloaded_from_the_hub(fake_hub):
    # the real ViT-B-32 image tower; a small text tower (not under test) halves the bytes to build and move
    _check_open_clip_download(fake_hub, text_cfg=TINY_TEXT)


@pytest.mark.slow
def test_open_clip_full_size_pretrained_weights_are_downloaded_from_the_hub(fake_hub):
    _check_open_clip_download(fake_hub)  # the whole CLIP checkpoint, 605 MB


@pytest.mark.parametrize("spec", [REG_MODEL, CLIP_MODEL])
@pytest.mark.parametrize("repo_exists", [True, False], ids=["missing-file", "missing-repo"])
def test_weights_missing_on_the_hub_raise_a_clear_error(fake_hub, spec, repo_exists):
    from fake_hub import hub_weights_location

    repo_id, filename = hub_weights_location(spec)
    if repo_exists:
        fake_hub.add_repo(repo_id)

    with pytest.raises(RuntimeError, match="pretrained weights for " + re.escape(spec)):
        load_vision_model(spec, pretrained=True, img_size=56)

    # the hub was asked (online), for the safetensors file first, and answered 404 to everything
    asked = fake_hub.file_requests("HEAD")
    assert asked[0] == (repo_id, filename, 404) and all(status == 404 for _, _, status in asked)
    assert fake_hub.downloaded() == []
