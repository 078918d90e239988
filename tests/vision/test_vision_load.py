"""load_vision_model, SAELens add_sae splicing, fallback blocks, TokenLayout and sample_images."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformer_lens.hook_points import HookPoint

from sae_vision_ext.activations.sample_images import sample_images
from sae_vision_ext.vision.hooked_vision_model import (
    TokenLayout,
    UnknownHookError,
    describe_hook_names,
)
from sae_vision_ext.vision.load import (
    file_sha256,
    load_vision_model,
    load_vision_model_or_random,
    parse_spec,
    wrap_model,
)

TINY = "timm:vit_tiny_patch16_224"
# open_clip builds below use a small text tower where the text tower is not under test (cheaper init)
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}



@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, preprocess = load_vision_model(TINY, pretrained=False, img_size=64)
    return model, preprocess


def images_for(model, n=2, seed=1):
    h, w = model.cfg.image_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- loader
def test_load_matches_a_plain_library_build():
    import open_clip
    import timm

    torch.manual_seed(0)
    bare = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    torch.manual_seed(0)
    hooked, _ = load_vision_model(TINY, pretrained=False, img_size=64)
    for (k1, v1), (k2, v2) in zip(bare.state_dict().items(), hooked.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = images_for(hooked)
    with torch.no_grad():
        assert torch.equal(hooked(x), bare(x))
    assert not hooked.training

    # the openai tag was trained with QuickGELU: the random-init architecture must use it too
    torch.manual_seed(0)
    bare = open_clip.create_model(
        "ViT-B-32", pretrained=None, force_quick_gelu=True, force_image_size=64, text_cfg=TINY_TEXT
    ).eval()
    torch.manual_seed(0)
    hooked, _ = load_vision_model(
        "open_clip:ViT-B-32/openai", pretrained=False, img_size=64, text_cfg=TINY_TEXT
    )
    assert type(hooked.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert all(
        torch.equal(a, b) for a, b in zip(bare.state_dict().values(), hooked.model.state_dict().values())
    )
    x = images_for(hooked)
    with torch.no_grad():
        assert torch.equal(hooked(x), bare.encode_image(x))


def test_local_weights_are_loaded(tmp_path, tiny):
    model, _ = tiny
    path = tmp_path / "tiny.pth"
    torch.save(model.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init: equality below proves the file was loaded
    loaded, _ = load_vision_model(TINY, img_size=64, weights=path)
    for (k1, v1), (k2, v2) in zip(model.model.state_dict().items(), loaded.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    x = images_for(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError):
        load_vision_model(TINY, weights=tmp_path / "missing.pth")


def test_load_or_random_falls_back_loudly_and_reproducibly(tmp_path, monkeypatch):
    said = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # "pretrained" with no local weights: a random init drawn from the seed, and a note that says so
    a, _, described = load_vision_model_or_random(TINY, img_size=64, seed=3, say=said.append)
    assert described == {"source": "random-init", "seed": 3} and "RANDOM weights (seed 3)" in said[0]
    b, _, _ = load_vision_model_or_random(TINY, img_size=64, pretrained=False, seed=3, say=said.append)
    assert len(said) == 1  # asked-for random weights need no note
    for v1, v2 in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(v1, v2)  # same seed, same weights (what `sae-vision eval` rebuilds)
    # a weights file wins
    path = tmp_path / "tiny.pth"
    torch.save(a.model.state_dict(), path)
    c, _, described = load_vision_model_or_random(TINY, img_size=64, weights=path, seed=4)
    assert described == {"source": "file", "path": str(path.resolve()), "sha256": file_sha256(path)}
    assert torch.equal(next(iter(c.model.state_dict().values())), next(iter(a.model.state_dict().values())))


def test_local_weights_open_clip(tmp_path):
    torch.manual_seed(0)
    spec = "open_clip:ViT-B-32/laion2b_s34b_b79k"
    source, _ = load_vision_model(spec, pretrained=False, img_size=64, text_cfg=TINY_TEXT)
    path = tmp_path / "clip.pt"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(7)
    loaded, _ = load_vision_model(spec, img_size=64, weights=path, text_cfg=TINY_TEXT)
    x = images_for(source)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_pretrained_weights_missing_offline_is_explained():
    try:
        load_vision_model(TINY, pretrained=True, img_size=64)
    except RuntimeError as err:
        assert "pretrained=False" in str(err) and "weights=" in str(err)
    else:
        pytest.skip("weights are in the local cache")


def test_bad_specs():
    assert parse_spec("timm:vit_tiny_patch16_224") == ("timm", "vit_tiny_patch16_224")
    assert parse_spec("open_clip:ViT-B-32/openai") == ("open_clip", "ViT-B-32/openai")
    for spec in ("vit_tiny_patch16_224", "torchvision:vit_b_16", "timm:"):
        with pytest.raises(ValueError, match="open_clip:ViT-B-32"):
            parse_spec(spec)
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_vision_model("open_clip:ViT-Q-99/openai", pretrained=False)
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        load_vision_model("open_clip:ViT-B-32/not_a_tag", pretrained=False)
    with pytest.raises(ValueError, match="pretrained tag"):
        load_vision_model("open_clip:ViT-B-32", pretrained=True)


def test_wrap_rejects_unsupported_models():
    import open_clip
    import timm

    with pytest.raises(TypeError, match="timm VisionTransformer"):
        wrap_model(torch.nn.Linear(3, 3))
    with torch.device("meta"):
        efficientnet = timm.create_model("efficientnet_b0")
        rn50 = open_clip.create_model("RN50", device="meta")
    with pytest.raises(TypeError, match="VisionTransformer, ResNet or ConvNeXt"):
        wrap_model(efficientnet)
    with pytest.raises(NotImplementedError, match="ModifiedResNet"):
        wrap_model(rn50)


def test_preprocess_gives_model_sized_tensors(tiny):
    model, preprocess = tiny
    photo = sample_images(1)[0]
    x = preprocess(photo)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, *model.cfg.image_size)
    with torch.no_grad():
        assert model(x.unsqueeze(0)).shape == (1, 1000)


def test_open_clip_text_tower_and_tokenizer():
    torch.manual_seed(0)
    model, preprocess = load_vision_model(
        "open_clip:ViT-B-32/laion2b_s34b_b79k", pretrained=False, img_size=64
    )
    assert tuple(preprocess(sample_images(1)[0]).shape) == (3, 64, 64)
    tokens = model.tokenizer(["a photo of a cat", "a rocket"])
    with torch.no_grad():
        text = model.encode_text(tokens)
        image = model(images_for(model))
    assert text.shape == (2, model.hook_width("hook_image_embed")) == image.shape
    # SigLIP tokenizers come from the HF Hub: offline and uncached this must say so (built on meta: cheap)
    with torch.device("meta"):
        siglip, _ = load_vision_model("open_clip:ViT-B-16-SigLIP/webli", pretrained=False, device="meta")
    assert siglip.cfg.token_layout.n_cls == 0 and siglip.family == "siglip"
    try:
        tokenizer = siglip.tokenizer
    except RuntimeError as err:
        assert "Hugging Face" in str(err)
    else:
        assert callable(tokenizer)  # the tokenizer was in the local HF cache


# --------------------------------------------------------------------------------------------- SAELens splice
def test_saelens_add_sae_splices_into_the_forward(tiny):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer
    from sae_lens.saes.sae import SAEMetadata

    model, _ = tiny
    hook = "blocks.1.hook_resid_post"
    d = model.hook_width(hook)
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=4 * d, metadata=SAEMetadata(hook_name=hook)))
    x = images_for(model)
    # HookedSAETransformer's own methods, run on the vision model (issue 7 adds them as methods)
    model._acts_to_saes, model._transcoder_output_hooks = {}, {}
    model._reset_sae = types.MethodType(HookedSAETransformer._reset_sae, model)
    try:
        with torch.no_grad():
            clean, clean_cache = model.run_with_cache(x, names_filter=hook)
            HookedSAETransformer.add_sae(model, sae, use_error_term=False)
            assert hook not in model.hook_dict and f"{hook}.hook_sae_acts_post" in model.hook_dict
            spliced, cache = model.run_with_cache(
                x, names_filter=[f"{hook}.hook_sae_acts_post", f"{hook}.hook_sae_output"]
            )
            recon = sae.decode(sae.encode(clean_cache[hook]))
            torch.testing.assert_close(cache[f"{hook}.hook_sae_output"], recon)
            expected = model.model.forward_head(model.model.norm(model.model.blocks[2:](recon)))
            torch.testing.assert_close(spliced, expected)
            assert not torch.allclose(spliced, clean)
            HookedSAETransformer.add_sae(model, sae, use_error_term=True)  # error term: output restored
            torch.testing.assert_close(model(x), clean, rtol=1e-4, atol=1e-4)
            HookedSAETransformer.reset_saes(model)
            assert isinstance(model.blocks[1].hook_resid_post, HookPoint) and hook in model.hook_dict
            assert torch.equal(model(x), clean)
    finally:
        del model._acts_to_saes, model._transcoder_output_hooks, model._reset_sae
        model.reset_hooks(including_permanent=True)
    # any module set at the hook path is what the forward calls (set_deep_attr semantics)
    model.blocks[1].hook_resid_post = torch.nn.Identity()
    model.setup()
    try:
        assert hook not in model.hook_dict
        with torch.no_grad():
            assert torch.equal(model(x), clean)
    finally:
        model.blocks[1].hook_resid_post = HookPoint()
        model.setup()


def test_hooks_context_manager_steers_and_cleans_up(tiny):
    model, _ = tiny
    x = images_for(model)
    with torch.no_grad():
        clean = model(x)
        with model.hooks(fwd_hooks=[("hook_pooled", lambda a, hook: torch.zeros_like(a))]):
            steered = model(x)
        after = model(x)
    head = model.model.head
    torch.testing.assert_close(steered, head.bias.expand_as(steered))
    assert torch.equal(after, clean)


def test_unknown_blocks_run_whole_with_coarse_hooks():
    import timm
    from timm.models.vision_transformer import ResPostBlock

    torch.manual_seed(0)
    bare = timm.create_model("vit_tiny_patch16_224", block_fn=ResPostBlock, img_size=64).eval()
    model = wrap_model(bare, spec="timm:vit_tiny_patch16_224 (ResPostBlock)")
    assert "blocks.0.hook_resid_post" in model.hook_dict and "blocks.0.hook_attn_out" not in model.hook_dict
    x = images_for(model)
    with torch.no_grad():
        out, cache = model.run_with_cache(x)
        reference = bare.forward_intermediates(
            x, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        assert torch.equal(out, bare(x))
    for i, (patches, prefix) in enumerate(reference):
        assert torch.equal(cache[f"blocks.{i}.hook_resid_post"], torch.cat([prefix, patches], dim=1))
    with pytest.raises(UnknownHookError, match="hook_resid_pre"):
        model.run_with_cache(x, names_filter="blocks.0.hook_mlp_out")


# ---------------------------------------------------------------------------------------------- helpers
def test_token_layout_select_and_errors():
    layout = TokenLayout(n_cls=1, n_registers=4, grid_size=(2, 3), n_patches=6, n_prefix=5)
    acts = torch.arange(2 * 11 * 2).reshape(2, 11, 2)
    assert layout.n_tokens == 11
    assert torch.equal(layout.select(acts, "cls"), acts[:, :1])
    assert torch.equal(layout.select(acts, "registers"), acts[:, 1:5])
    assert torch.equal(layout.select(acts, "prefix"), acts[:, :5])
    assert torch.equal(layout.select(acts, "patches"), acts[:, 5:])
    assert torch.equal(layout.select(acts, "all"), acts)
    grid = layout.to_grid(layout.select(acts, "patches"))
    assert grid.shape == (2, 2, 3, 2) and torch.equal(grid[:, 1, 0], acts[:, 8])
    with pytest.raises(ValueError, match="11"):
        layout.select(acts[:, :10], "cls")
    with pytest.raises(ValueError, match="cls, registers"):
        layout.select(acts, "pooled")
    no_prefix = TokenLayout(n_cls=0, n_registers=0, grid_size=(2, 3), n_patches=6, n_prefix=0)
    with pytest.raises(ValueError, match="no register tokens"):
        no_prefix.select(acts[:, 5:], "registers")


def test_describe_hook_names_is_compact():
    names = ["hook_embed", *(f"blocks.{i}.hook_resid_post" for i in range(12)), "hook_pooled"]
    assert describe_hook_names(names) == "hook_embed, blocks.{0..11}.hook_resid_post, hook_pooled"
    assert (
        describe_hook_names(["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"])
        == "blocks.{3,5}.hook_resid_post"
    )


# ---------------------------------------------------------------------------------------------- sample images
def test_sample_images_are_distinct_real_photos():
    photos = sample_images(3)
    assert [p.info["name"] for p in photos] == ["astronaut", "coffee", "chelsea"]
    assert all(p.mode == "RGB" and min(p.size) >= 100 for p in photos)
    everything = sample_images()
    assert len(everything) == 16
    many = sample_images(40)
    names = [p.info["name"] for p in many]
    assert len(set(names)) == 40 and "astronaut_mirrored" in names
    assert list(many[16].getdata())[:5] != list(many[0].getdata())[:5]


def test_sample_images_fallbacks(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    photos = sample_images(2)
    assert [p.info["name"] for p in photos] == ["grace_hopper", "grace_hopper_mirrored"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="scikit-image"):
        sample_images(1)
