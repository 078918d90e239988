"""SAE splicing into hooked vision models: add_sae / saes() / run_with_saes / run_with_cache_with_saes."""

import pytest
import torch
from transformer_lens.hook_points import HookPoint

from sae_vision_ext.analysis.toy import make_sae, synthetic_images, tiny_clip, tiny_timm_vit
from sae_vision_ext.vision.splice import SAESplicingMixin

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def clip():
    model, preprocess = tiny_clip(seed=0)
    images = torch.stack([preprocess(image) for image in synthetic_images(3, seed=1)])
    return model, images


def _acts_at(model, images, hook):
    _, cache = model.run_with_cache(images, names_filter=[hook])
    return cache[hook]


def _run_replacing(model, images, hook, fn):
    """Model output with the activation at ``hook`` replaced by ``fn(activation)`` (reference computation)."""
    return model.run_with_hooks(images, fwd_hooks=[(hook, lambda acts, hook: fn(acts))])


def test_error_term_keeps_output_and_exposes_sae_hooks(clip):
    model, images = clip
    sae = make_sae(model.cfg.d_model, 96, HOOK, model_name=model.spec)
    original_hook = model.hook_dict[HOOK]
    with torch.no_grad():
        baseline = model(images)
        model.add_sae(sae, use_error_term=True)
        try:
            assert model.acts_to_saes == {HOOK: sae}
            assert HOOK not in model.hook_dict
            names = {
                f"{HOOK}.{n}"
                for n in ("hook_sae_input", "hook_sae_acts_post", "hook_sae_error", "hook_sae_output")
            }
            assert names <= set(model.hook_dict)
            out, cache = model.run_with_cache(images)
            torch.testing.assert_close(out, baseline, atol=1e-5, rtol=1e-5)
            assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (3, model.token_layout.n_tokens, 96)
            # error = input - clean reconstruction, output = reconstruction + error
            recon = cache[f"{HOOK}.hook_sae_recons"]
            torch.testing.assert_close(
                cache[f"{HOOK}.hook_sae_error"], cache[f"{HOOK}.hook_sae_input"] - recon
            )
        finally:
            model.reset_saes()
    assert model.hook_dict[HOOK] is original_hook
    assert model.acts_to_saes == {}
    with torch.no_grad():
        torch.testing.assert_close(model(images), baseline)


def test_reconstruction_replaces_activation_without_error_term(clip):
    model, images = clip
    sae = make_sae(model.cfg.d_model, 96, HOOK, model_name=model.spec, seed=3)
    with torch.no_grad():
        expected = _run_replacing(model, images, HOOK, lambda acts: sae.decode(sae.encode(acts)))
        out = model.run_with_saes(images, saes=[sae], use_error_term=False)
        baseline = model(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - baseline).abs().max() > 1e-3
    assert model.acts_to_saes == {}  # run_with_saes removed it


def test_cls_only_sae_leaves_other_tokens_unchanged(clip):
    model, images = clip
    sae = make_sae(model.cfg.d_model, 96, HOOK, token_selection="cls", model_name=model.spec, seed=4)
    with torch.no_grad():
        acts = _acts_at(model, images, HOOK)
        _, cache = model.run_with_cache_with_saes(images, saes=[sae], use_error_term=False)
    assert cache[f"{HOOK}.hook_sae_input"].shape == (3, 1, model.cfg.d_model)
    out = cache[f"{HOOK}.hook_sae_output"]
    torch.testing.assert_close(out[:, 1:], acts[:, 1:], atol=0, rtol=0)
    torch.testing.assert_close(out[:, :1], sae.decode(sae.encode(acts[:, :1])), atol=1e-5, rtol=1e-5)
    assert (out[:, 0] - acts[:, 0]).abs().max() > 1e-3


def test_patch_only_sae_on_register_model_and_tokens_override():
    model, preprocess = tiny_timm_vit(seed=0)
    layout = model.token_layout
    assert layout.n_registers == 4
    images = torch.stack([preprocess(image) for image in synthetic_images(2, seed=2)])
    sae = make_sae(model.cfg.d_model, 32, HOOK, token_selection="patches", model_name=model.spec, seed=5)
    with torch.no_grad():
        acts = _acts_at(model, images, HOOK)
        _, cache = model.run_with_cache_with_saes(images, saes=[sae])
        out = cache[f"{HOOK}.hook_sae_output"]
        torch.testing.assert_close(out[:, : layout.n_prefix], acts[:, : layout.n_prefix], atol=0, rtol=0)
        assert (out[:, layout.n_prefix :] - acts[:, layout.n_prefix :]).abs().max() > 1e-3
        # tokens= overrides the metadata: registers only
        _, cache = model.run_with_cache_with_saes(images, saes=[sae], tokens="registers")
        out = cache[f"{HOOK}.hook_sae_output"]
    regs = slice(layout.n_cls, layout.n_prefix)
    torch.testing.assert_close(out[:, layout.n_prefix :], acts[:, layout.n_prefix :], atol=0, rtol=0)
    torch.testing.assert_close(out[:, regs], sae.decode(sae.encode(acts[:, regs])), atol=1e-5, rtol=1e-5)


def test_pooled_hook_sae(clip):
    model, images = clip
    sae = make_sae(model.cfg.d_image_embed, 64, "hook_image_embed", model_name=model.spec, seed=6)
    with torch.no_grad():
        embed = model(images)
        out = model.run_with_saes(images, saes=sae)
    torch.testing.assert_close(out, sae.decode(sae.encode(embed)), atol=1e-5, rtol=1e-5)
    patch_sae = make_sae(model.cfg.d_image_embed, 64, "hook_image_embed", token_selection="patches", seed=6)
    with pytest.raises(ValueError, match="pooled"), torch.no_grad():
        model.run_with_saes(images, saes=patch_sae)
    assert model.acts_to_saes == {}


def test_saes_context_restores_previous_sae(clip):
    model, images = clip
    first = make_sae(model.cfg.d_model, 96, HOOK, seed=7)
    second = make_sae(model.cfg.d_model, 96, HOOK, seed=8)
    model.add_sae(first)
    try:
        with model.saes(saes=[second]):
            assert model.acts_to_saes[HOOK] is second
        assert model.acts_to_saes[HOOK] is first
        with model.saes(saes=[second], reset_saes_end=False):
            pass
        assert model.acts_to_saes[HOOK] is second
    finally:
        model.reset_saes()
    assert isinstance(model.hook_dict[HOOK], HookPoint)


def test_intervention_on_latents_passes_through_error_term(clip):
    model, images = clip
    sae = make_sae(model.cfg.d_model, 96, HOOK, seed=9)
    with torch.no_grad(), model.saes(saes=[sae], use_error_term=True):
        baseline = model(images)
        ablate_all = [(f"{HOOK}.hook_sae_acts_post", lambda acts, hook: torch.zeros_like(acts))]
        out = model.run_with_hooks(images, fwd_hooks=ablate_all)
        acts = model.run_with_cache(images, names_filter=[f"{HOOK}.hook_sae_input"])[1][
            f"{HOOK}.hook_sae_input"
        ]
        expected = _run_reference_ablation(model, sae, images, acts)
    assert (out - baseline).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def _run_reference_ablation(model, sae, images, acts):
    # With every latent zeroed, the spliced output is decode(0) + (x - decode(encode(x))).
    replaced = sae.decode(torch.zeros(*acts.shape[:-1], sae.cfg.d_sae)) + acts - sae.decode(sae.encode(acts))
    model.reset_saes()
    try:
        return _run_replacing(model, images, HOOK, lambda _: replaced)
    finally:
        model.add_sae(sae, use_error_term=True)


def test_readable_errors(clip):
    model, _ = clip
    with pytest.raises(KeyError, match="valid hook names"):
        model.add_sae(make_sae(model.cfg.d_model, 8, "blocks.9.hook_resid_post"))
    with pytest.raises(ValueError, match=r"d_in=48 does not match the width 64"):
        model.add_sae(make_sae(48, 8, HOOK))
    missing = make_sae(model.cfg.d_model, 8, HOOK)
    missing.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="hook_name"):
        model.add_sae(missing)
    transcoder = make_sae(model.cfg.d_model, 8, HOOK)
    transcoder.cfg.metadata.hook_name_out = "blocks.1.hook_resid_post"
    with pytest.raises(NotImplementedError, match="transcoders"):
        model.add_sae(transcoder)
    assert model.acts_to_saes == {}


def test_hooked_vision_model_splices_natively():
    base, preprocess = tiny_clip(seed=1)
    assert isinstance(base, SAESplicingMixin)
    images = torch.stack([preprocess(image) for image in synthetic_images(2, seed=3)])
    sae = make_sae(base.cfg.d_model, 16, HOOK, seed=10)
    with torch.no_grad():
        plain = base(images)
        spliced = base.run_with_saes(images, saes=[sae])
        kept = base.run_with_saes(images, saes=[sae], use_error_term=True)
    assert not torch.allclose(spliced, plain)  # the reconstruction flows downstream
    torch.testing.assert_close(kept, plain)  # the error term restores the output
    assert base.acts_to_saes == {}  # run_with_saes leaves no SAE behind


def test_sae_on_the_final_norm_output_splices_at_hook_normed(clip):
    """The RA-SAE DINOv2 release reads tokens after the final norm: ``hook_normed`` is where it splices."""
    model, images = clip
    sae = make_sae(model.cfg.d_model, 96, "hook_normed", model_name=model.spec, seed=4)
    with torch.no_grad():
        expected = _run_replacing(model, images, "hook_normed", lambda acts: sae.decode(sae.encode(acts)))
        out = model.run_with_saes(images, saes=[sae], use_error_term=False)
        kept = model.run_with_saes(images, saes=[sae], use_error_term=True)
        baseline = model(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - baseline).abs().max() > 1e-3
    torch.testing.assert_close(kept, baseline, atol=1e-5, rtol=1e-5)
