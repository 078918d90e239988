"""Steering with SAE latents: add / clamp / scale / ablate, on chosen tokens, plain or spliced SAEs."""

import pytest
import torch

from sae_vision_ext.analysis.steering import latent_directions, steer, steer_vectors
from sae_vision_ext.analysis.toy import (
    make_sae,
    orthonormal_directions,
    planted_sae,
    synthetic_images,
    tiny_clip,
    tiny_timm_vit,
)

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def clip():
    model, preprocess = tiny_clip(seed=0)
    images = torch.stack([preprocess(image) for image in synthetic_images(3, seed=4)])
    return model, images


def _no_hooks_left(model):
    return all(not hook.fwd_hooks for hook in model.hook_dict.values())


def test_add_moves_output_along_planted_direction(clip):
    model, images = clip
    atoms = orthonormal_directions(8, model.cfg.d_image_embed, seed=1)
    sae = planted_sae(atoms, "hook_image_embed", model_name=model.spec)
    with torch.no_grad():
        baseline = model(images)
        with steer(model, sae, latents=5, mode="add", value=3.0, tokens="cls"):
            steered = model(images)
    delta = steered - baseline
    torch.testing.assert_close(delta, 3.0 * atoms[5].expand_as(delta), atol=1e-5, rtol=1e-5)
    assert _no_hooks_left(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), baseline)


def test_add_on_cls_tokens_only_then_propagates(clip):
    model, images = clip
    atoms = orthonormal_directions(16, model.cfg.d_model, seed=2)
    sae = planted_sae(atoms, HOOK)
    names = [HOOK, "blocks.1.hook_resid_post"]
    with torch.no_grad():
        _, base = model.run_with_cache(images, names_filter=names)
        with steer(model, sae, latents=[3, 7], mode="add", value=[2.0, -1.0], tokens="cls"):
            _, cache = model.run_with_cache(images, names_filter=names)
    delta = cache[HOOK] - base[HOOK]
    torch.testing.assert_close(delta[:, 0], (2.0 * atoms[3] - atoms[7]).expand(3, -1), atol=1e-5, rtol=1e-5)
    assert delta[:, 1:].abs().max() == 0
    downstream = cache["blocks.1.hook_resid_post"] - base["blocks.1.hook_resid_post"]
    assert downstream[:, 1:].abs().max() > 1e-4  # attention carries the CLS change to the patches


def test_clamp_scale_ablate_keep_the_error_term():
    d = 24
    atoms = orthonormal_directions(6, d, seed=3)
    sae = planted_sae(atoms, "hook_image_embed")
    off_dictionary = torch.randn(d)
    off_dictionary -= atoms.T @ (atoms @ off_dictionary)  # orthogonal to every atom: pure SAE error
    x = (2.0 * atoms[1] + 1.0 * atoms[4] + off_dictionary).unsqueeze(0)
    cases = {
        ("clamp", 5.0): 5.0 * atoms[1] + atoms[4],
        ("scale", 0.5): 1.0 * atoms[1] + atoms[4],
        ("ablate", None): atoms[4],
        ("add", 1.5): 3.5 * atoms[1] + atoms[4],
    }
    for (mode, value), expected in cases.items():
        out = steer_vectors(sae, x, [1], mode=mode, value=value)
        torch.testing.assert_close(out[0], expected + off_dictionary, atol=1e-5, rtol=1e-5, msg=mode)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_ablate_on_patches_matches_manual_edit(clip, architecture):
    model, images = clip
    sae = make_sae(model.cfg.d_model, 64, HOOK, architecture=architecture, k=6, seed=11)
    with torch.no_grad():
        _, base = model.run_with_cache(images, names_filter=[HOOK])
        acts = base[HOOK]
        z = sae.encode(acts)
        latent = int((z[:, 1:] > 0).sum(dim=(0, 1)).argmax())  # a latent that fires on patches
        with steer(model, sae, latents=latent, mode="ablate", tokens="patches"):
            _, cache = model.run_with_cache(images, names_filter=[HOOK])
    delta = cache[HOOK] - acts
    expected = -z[..., latent : latent + 1] * sae.W_dec[latent]
    assert delta[:, 0].abs().max() == 0
    torch.testing.assert_close(delta[:, 1:], expected[:, 1:], atol=1e-5, rtol=1e-4)
    assert expected[:, 1:].abs().max() > 1e-3


def test_steering_a_spliced_sae_edits_its_latents(clip):
    model, images = clip
    atoms = orthonormal_directions(16, model.cfg.d_model, seed=5)
    sae = planted_sae(atoms, HOOK, token_selection="cls")
    with torch.no_grad():
        _, base = model.run_with_cache(images, names_filter=[HOOK])
        with model.saes(saes=[sae], use_error_term=True):
            out_hook = f"{HOOK}.hook_sae_output"
            with steer(model, sae, latents=2, mode="add", value=4.0, tokens="all") as handle:
                _, cache = model.run_with_cache(images, names_filter=[out_hook])
            assert handle.spliced
    delta = cache[out_hook] - base[HOOK]
    torch.testing.assert_close(delta[:, 0], 4.0 * atoms[2].expand(3, -1), atol=1e-4, rtol=1e-4)
    assert delta[:, 1:].abs().max() < 1e-5  # the SAE only sits on the CLS token
    assert _no_hooks_left(model)


def test_steering_registers_on_timm_model():
    model, preprocess = tiny_timm_vit(seed=1)
    images = torch.stack([preprocess(image) for image in synthetic_images(2, seed=6)])
    atoms = orthonormal_directions(8, model.cfg.d_model, seed=6)
    sae = planted_sae(atoms, HOOK)
    with torch.no_grad():
        _, base = model.run_with_cache(images, names_filter=[HOOK])
        with steer(model, sae, latents=0, mode="add", value=1.0, tokens="registers"):
            _, cache = model.run_with_cache(images, names_filter=[HOOK])
    delta = cache[HOOK] - base[HOOK]
    layout = model.token_layout
    moved = delta.abs().amax(dim=(0, 2)) > 1e-6
    assert moved.tolist() == [False] + [True] * layout.n_registers + [False] * layout.n_patches


def test_latent_directions_undo_input_standardisation():
    """An SAE that standardises inputs (x' = (x - mu) / sigma) has raw-space atoms W_dec[i] * sigma."""
    from sae_lens import StandardSAE

    class StandardisingSAE(StandardSAE):
        def decode(self, feature_acts):
            return super().decode(feature_acts) * self.sigma + self.mu

    base = make_sae(12, 5, "hook_image_embed", seed=2)
    sae = StandardisingSAE(base.cfg)
    sae.load_state_dict(base.state_dict())
    sae.sigma = torch.linspace(0.5, 3.0, 12)
    sae.mu = torch.randn(12)
    torch.testing.assert_close(latent_directions(sae, [0, 3]), sae.W_dec[[0, 3]].detach() * sae.sigma)


def test_bad_arguments(clip):
    model, _ = clip
    sae = make_sae(model.cfg.d_model, 8, HOOK)
    with pytest.raises(ValueError, match="mode"), steer(model, sae, latents=0, mode="boost"):
        pass
    with pytest.raises(IndexError), steer(model, sae, latents=99):
        pass
    embed_sae = make_sae(model.cfg.d_image_embed, 8, "hook_image_embed")
    with pytest.raises(ValueError, match="pooled"), torch.no_grad():
        with steer(model, embed_sae, latents=0, tokens="patches"):
            model(torch.zeros(1, 3, 32, 32))
    assert _no_hooks_left(model)


def _msae(d_in, hook, seed=0):
    """The plugin's Matryoshka SAE, with input standardisation (x - mu) * s."""
    from sae_lens.saes.sae import SAEMetadata

    from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAE, MatryoshkaTopKSAEConfig

    torch.manual_seed(seed)
    cfg = MatryoshkaTopKSAEConfig(
        d_in=d_in,
        d_sae=48,
        k_levels=[4, 16, 48],
        standardize_input=True,
        metadata=SAEMetadata(hook_name=hook),
    )
    sae = MatryoshkaTopKSAE(cfg)
    sae.set_input_standardization(torch.randn(d_in) * 0.1, 0.5)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.5)
    return sae.eval()


def _ra_sae(d_in, hook, seed=0):
    """The plugin's relaxed archetypal SAE (TopK encoder, D = W C + Lambda)."""
    from sae_lens.saes.sae import SAEMetadata

    from sae_vision_ext.saes.archetypal import RASAE, RASAEConfig

    torch.manual_seed(seed)
    cfg = RASAEConfig(
        d_in=d_in, d_sae=32, k=8, n_candidates=64, delta=0.5, metadata=SAEMetadata(hook_name=hook)
    )
    return RASAE(cfg, candidates=torch.randn(64, d_in)).eval()


@pytest.mark.parametrize("build", [_msae, _ra_sae], ids=["matryoshka_topk", "ra_sae"])
def test_our_architectures_splice_and_steer(clip, build):
    model, images = clip
    sae = build(model.cfg.d_model, HOOK)
    with torch.no_grad():
        baseline, base = model.run_with_cache(images, names_filter=[HOOK])
        assert (model.run_with_saes(images, saes=[sae], use_error_term=True) - baseline).abs().max() < 1e-4
        acts = base[HOOK]
        z = sae.encode(acts)
        latent = int((z[:, 1:] > 0).sum(dim=(0, 1)).argmax())
        with steer(model, sae, latents=latent, mode="ablate", tokens="patches"):
            _, cache = model.run_with_cache(images, names_filter=[HOOK])
        direction = latent_directions(sae, [latent])[0]
    delta = cache[HOOK] - acts
    assert delta[:, 0].abs().max() == 0
    torch.testing.assert_close(delta[:, 1:], -z[:, 1:, latent : latent + 1] * direction, atol=1e-4, rtol=1e-3)
    assert z[:, 1:, latent].abs().max() > 0
    torch.testing.assert_close(direction, sae.W_dec[latent].detach() / getattr(sae, "input_scale", 1.0))


def test_steering_with_another_sae_spliced_at_the_hook(clip):
    model, images = clip
    atoms = orthonormal_directions(8, model.cfg.d_model, seed=8)
    steering_sae = planted_sae(atoms, HOOK)
    spliced = make_sae(model.cfg.d_model, 32, HOOK, seed=12)
    out_hook = f"{HOOK}.hook_sae_output"
    with torch.no_grad(), model.saes(saes=[spliced], use_error_term=True):
        _, base = model.run_with_cache(images, names_filter=[out_hook])
        with steer(model, steering_sae, latents=1, mode="add", value=2.0, tokens="cls") as handle:
            _, cache = model.run_with_cache(images, names_filter=[out_hook])
    assert not handle.spliced
    delta = cache[out_hook] - base[out_hook]
    torch.testing.assert_close(delta[:, 0], 2.0 * atoms[1].expand(3, -1), atol=1e-5, rtol=1e-5)
    assert delta[:, 1:].abs().max() == 0
