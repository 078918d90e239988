"""HookedVisionModel against the bare libraries, for every supported family (random-init real architectures).

Each family is built once (module-scoped fixture, small images) and checked for: exact output equality,
resid_post == the library's own intermediates, identity / replacing hooks, stop_at_layer, readable
errors, token layout and hook widths, and an untouched wrapped model.
"""

from __future__ import annotations

import gc

import pytest
import torch

from sae_vision_ext.activations.sample_images import sample_images
from sae_vision_ext.activations.source import ImageActivationSource
from sae_vision_ext.vision.hooked_vision_model import UnknownHookError
from sae_vision_ext.vision.load import load_vision_model, wrap_model

# The wrapper hooks the visual tower only; a small text tower keeps the open_clip builds cheap (the full
# models, text towers included, are built in test_vision_load.py and, on the meta device, below).
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
SLOW = pytest.mark.slow



def _flip_to_sequence_first(bare):
    """open_clip towers built with transformer.batch_first=False run their blocks on [T, B, d] tensors."""
    bare.visual.transformer.batch_first = False
    for block in bare.visual.transformer.resblocks:
        block.attn.batch_first = False
    return bare


def _build_seq_first(img_size):
    import open_clip

    bare = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=img_size, text_cfg=TINY_TEXT)
    return wrap_model(_flip_to_sequence_first(bare.eval()), spec="open_clip:ViT-B-32 (sequence-first)")


# id -> (spec, img_size (H, W): non-square where the grid order matters, extra kwargs for load_vision_model)
FAMILIES = {
    "open_clip-ViT-B-32": ("open_clip:ViT-B-32/laion2b_s34b_b79k", (64, 96), {"text_cfg": TINY_TEXT}),
    "open_clip-ViT-B-16": ("open_clip:ViT-B-16/openai", (48, 48), {"text_cfg": TINY_TEXT}),
    "open_clip-ViT-L-14": ("open_clip:ViT-L-14/openai", (42, 42), {"text_cfg": TINY_TEXT}),
    "open_clip-SigLIP": ("open_clip:ViT-B-16-SigLIP/webli", (32, 48), {"text_cfg": TINY_TEXT}),
    "open_clip-SigLIP2": ("open_clip:ViT-B-16-SigLIP2/webli", (48, 32), {"text_cfg": TINY_TEXT}),
    "open_clip-seq-first": (None, (64, 64), {}),
    "timm-CLIP": ("timm:vit_base_patch16_clip_224.openai", (32, 48), {}),
    "timm-SigLIP": ("timm:vit_base_patch16_siglip_224", (48, 48), {}),
    "timm-DINOv2": ("timm:vit_small_patch14_dinov2.lvd142m", (42, 42), {}),
    "timm-DINOv2-reg4": ("timm:vit_small_patch14_reg4_dinov2.lvd142m", (28, 42), {}),
    "timm-ViT": ("timm:vit_tiny_patch16_224", (48, 32), {}),
    "timm-ViT-avgpool": ("timm:vit_tiny_patch16_224", (32, 32), {"global_pool": "avg"}),
    "timm-DeiT3": ("timm:deit3_small_patch16_224", (32, 48), {}),
}
# ViT-L-14 reads 1.2 GB of weights per forward: its full check is slow; test_full_resolution_shapes_on_meta
# covers its hook names and shapes at 224 px in the default run
FAMILY_PARAMS = [pytest.param(name, marks=SLOW) if "ViT-L" in name else name for name in FAMILIES]


@pytest.fixture(scope="module", params=FAMILY_PARAMS)
def family(request):
    """(name, hooked model, images, bare output, full cache): one build and one clean run per family."""
    spec, img_size, kwargs = FAMILIES[request.param]
    torch.manual_seed(0)
    if spec is None:
        model = _build_seq_first(img_size)
    else:
        model, _ = load_vision_model(spec, pretrained=False, img_size=img_size, **kwargs)
    model.eval()
    images = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bare_out = bare_forward(model, images)
        out, cache = model.run_with_cache(images)
    yield request.param, model, images, bare_out, out, cache
    del model, cache
    gc.collect()


# ---------------------------------------------------------------------------------------------- references
def bare_forward(model, images):
    """The wrapped model's own forward (encode_image for open_clip, the timm model's forward)."""
    bare = model.model
    return bare.encode_image(images) if hasattr(bare, "encode_image") else bare(images)


def timm_trunk(model):
    bare = model.model
    if model.cfg.library == "timm":
        return bare
    visual = bare.visual
    return visual.trunk if hasattr(visual, "trunk") else None


def library_intermediates(model, images):
    """Each block's output [B, T, d] from the library's own forward_intermediates."""
    trunk = timm_trunk(model)
    if trunk is not None:
        outs = trunk.forward_intermediates(
            images, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        # (patches, prefix) pairs when the model has prefix tokens, bare patch tokens otherwise
        return [torch.cat([item[1], item[0]], dim=1) if isinstance(item, tuple) else item for item in outs]
    out = model.model.visual.forward_intermediates(
        images, output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
    )
    return [
        torch.cat([p, x], dim=1)
        for p, x in zip(out["image_intermediates_prefix"], out["image_intermediates"])
    ]


def library_blocks(model):
    trunk = timm_trunk(model)
    return trunk.blocks if trunk is not None else model.model.visual.transformer.resblocks


def library_tail(model, resid, start):
    """The library's own computation from block ``start`` on, given the batch-first residual before it."""
    trunk = timm_trunk(model)
    blocks = library_blocks(model)
    if trunk is not None:
        for j in range(start, len(blocks)):
            resid = blocks[j](resid)
        out = trunk.forward_head(trunk.norm(resid))
        return out if model.cfg.library == "timm" else model.model.visual.head(out)
    visual = model.model.visual
    seq_first = not visual.transformer.batch_first
    x = resid.transpose(0, 1) if seq_first else resid
    for j in range(start, len(blocks)):
        x = blocks[j](x)
    x = x.transpose(0, 1) if seq_first else x
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj


# ---------------------------------------------------------------------------------------------- tests
def test_wrapped_model_is_untouched(family):
    name, model, *_ = family
    bare = model.model
    # the wrapper owns no parameters or buffers: its state dict is the bare model's, prefixed
    assert list(model.state_dict()) == ["model." + k for k in bare.state_dict()]
    # the library model has no hooks or patched forwards
    for module in bare.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in module.__dict__
    # keys and shapes equal those of an independent build of the same architecture (on the meta device)
    spec, img_size, kwargs = FAMILIES[name]
    if spec is not None:
        with torch.device("meta"):
            reference, _ = load_vision_model(
                spec, pretrained=False, img_size=img_size, device="meta", **kwargs
            )
        expected = {k: tuple(v.shape) for k, v in reference.model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in bare.state_dict().items()} == expected


def test_output_equals_bare_model(family):
    _, model, images, bare_out, out, cache = family
    with torch.no_grad():
        assert torch.equal(model(images), bare_out)
    assert torch.equal(out, bare_out)  # run_with_cache, every hook cached
    if model.has_image_embed:
        assert torch.equal(cache["hook_image_embed"], bare_out)
    assert set(cache.cache_dict) == set(model.hook_dict)


def test_resid_post_equals_library_intermediates(family):
    _, model, images, _, _, cache = family
    with torch.no_grad():
        reference = library_intermediates(model, images)
        assert len(reference) == model.n_layers
        for i in range(model.n_layers):
            post = cache[f"blocks.{i}.hook_resid_post"]
            assert torch.equal(post, reference[i]), f"block {i}"
            pre, mid = cache[f"blocks.{i}.hook_resid_pre"], cache[f"blocks.{i}.hook_resid_mid"]
            assert torch.equal(mid, pre + cache[f"blocks.{i}.hook_attn_out"])
            assert torch.equal(post, mid + cache[f"blocks.{i}.hook_mlp_out"])
            if i + 1 < model.n_layers:
                assert torch.equal(cache[f"blocks.{i + 1}.hook_resid_pre"], post)
        # block 0 sees the pre-normed embedding; the whole library block maps resid_pre to resid_post
        pre0 = cache["blocks.0.hook_resid_pre"]
        assert torch.equal(model._pre_norm(cache["hook_embed"]), pre0)
        seq_first = not model.batch_first
        x = pre0.transpose(0, 1).contiguous() if seq_first else pre0
        y = library_blocks(model)[0](x)
        torch.testing.assert_close(y.transpose(0, 1) if seq_first else y, cache["blocks.0.hook_resid_post"])


def test_identity_hooks_leave_output_identical(family):
    _, model, images, bare_out, *_ = family
    calls = []

    def identity(acts, hook):
        calls.append(hook.name)
        return acts

    with torch.no_grad():
        out = model.run_with_hooks(images, fwd_hooks=[(lambda name: True, identity)])
    assert torch.equal(out, bare_out)
    assert sorted(calls) == sorted(model.hook_dict)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())  # removed afterwards


def test_replacing_hooks_change_output_as_expected(family):
    _, model, images, bare_out, _, cache = family
    k = model.n_layers // 2
    with torch.no_grad():
        # steering: scale one block's residual output; the library's own tail computes the expected output
        out = model.run_with_hooks(
            images, fwd_hooks=[(f"blocks.{k}.hook_resid_post", lambda a, hook: a * 0.5)]
        )
        expected = library_tail(model, cache[f"blocks.{k}.hook_resid_post"] * 0.5, k + 1)
        torch.testing.assert_close(out, expected)
        assert not torch.allclose(out, bare_out)
        # ablation: zeroing a block's MLP output means the next block starts from resid_mid
        with model.hooks(fwd_hooks=[(f"blocks.{k}.hook_mlp_out", lambda a, hook: torch.zeros_like(a))]):
            out_ablated = model(images)
        expected = library_tail(model, cache[f"blocks.{k}.hook_resid_mid"], k + 1)
        torch.testing.assert_close(out_ablated, expected)
        if model.has_image_embed:
            out = model.run_with_hooks(images, fwd_hooks=[("hook_image_embed", lambda a, hook: a + 1.0)])
            assert torch.equal(out, bare_out + 1.0)


def test_stop_at_layer_really_stops(family):
    _, model, images, _, _, full = family
    stop = 2
    blocks = library_blocks(model)
    counts = [0] * len(blocks)
    # the wrapper calls each block's submodules; every block kind has an `mlp`
    handles = [
        b.mlp.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, b in enumerate(blocks)
    ]
    names = [
        "hook_embed",
        *(f"blocks.{i}.{h}" for i in range(stop) for h in ("hook_resid_pre", "hook_resid_post")),
    ]
    try:
        with torch.no_grad():
            out, cache = model.run_with_cache(images, names_filter=names, stop_at_layer=stop)
    finally:
        for handle in handles:
            handle.remove()
    assert out is None
    assert counts == [1] * stop + [0] * (len(blocks) - stop)
    assert set(cache.cache_dict) == set(names)
    for name in names:
        assert torch.equal(cache[name], full[name]), name
    with pytest.raises(ValueError, match="stop_at_layer"):
        model.run_with_cache(images, names_filter=f"blocks.{stop}.hook_resid_pre", stop_at_layer=stop)
    with pytest.raises(ValueError, match="stop_at_layer"):
        model.run_with_cache(images, names_filter="hook_pooled", stop_at_layer=stop)
    with pytest.raises(ValueError, match="out of range"):
        model(images, stop_at_layer=model.n_layers + 1)
    with torch.no_grad():  # negative: counted from the end, as in TransformerLens
        _, first = model.run_with_cache(
            images, names_filter="blocks.0.hook_resid_post", stop_at_layer=-(model.n_layers - 1)
        )
    assert torch.equal(first["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])


def test_unknown_hook_name_lists_valid_names(family):
    _, model, images, *_ = family
    last = model.n_layers - 1
    bad = f"blocks.{model.n_layers}.hook_resid_post"
    for call in (
        lambda: model.run_with_cache(images, names_filter=bad),
        lambda: model.run_with_cache(images, names_filter=["hook_embed", "hook_resid_post"]),
        lambda: model.run_with_hooks(images, fwd_hooks=[(bad, lambda a, hook: a)]),
        lambda: model.hook_width("blocks.0.resid_post"),
    ):
        with pytest.raises(UnknownHookError) as info:
            call()
        message = str(info.value)
        assert f"blocks.{{0..{last}}}.hook_resid_post" in message
        assert "hook_embed" in message and "hook_pooled" in message
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_bad_images_give_clear_errors(family):
    _, model, images, *_ = family
    h, w = model.cfg.image_size
    expected_shape = f"[B, 3, {h}, {w}]"
    for bad, exc, hint in (
        (images[:, :1], ValueError, "3 channels"),
        (images.permute(0, 2, 3, 1), ValueError, "channels-last" if w != 3 else "3 channels"),
        (images[0], ValueError, "batch dimension"),
        (torch.randn(1, 3, h + 16, w), ValueError, f"{h}x{w}"),
        ((images * 255).to(torch.uint8), TypeError, "dtype"),
        (images.tolist(), TypeError, "list"),
    ):
        with pytest.raises(exc) as info:
            model(bad)
        assert expected_shape in str(info.value) and hint in str(info.value)


def test_token_layout_and_hook_widths(family):
    name, model, images, _, _, cache = family
    layout = model.token_layout
    for hook, acts in cache.cache_dict.items():
        assert acts.shape[-1] == model.hook_width(hook), hook
        if model.is_token_hook(hook):
            assert acts.shape[:2] == (images.shape[0], layout.n_tokens), hook
        else:
            assert acts.dim() == 2, hook
    (h, w), (ph, pw) = model.cfg.image_size, model.cfg.patch_size
    assert layout.grid_size == (h // ph, w // pw) and layout.n_patches == (h // ph) * (w // pw)
    resid = cache[f"blocks.{model.n_layers - 1}.hook_resid_post"]
    patches = layout.select(resid, "patches")
    assert patches.shape[1] == layout.n_patches
    grid = layout.to_grid(patches)  # row-major: grid[:, r, c] is token n_prefix + r * gw + c
    gw = layout.grid_size[1]
    assert torch.equal(grid[:, 1, 0], resid[:, layout.n_prefix + gw])
    assert model.cfg.d_model == resid.shape[-1] and model.cfg.n_layers == model.n_layers
    if "reg4" in name:
        assert (layout.n_cls, layout.n_registers) == (1, 4)
        assert layout.select(resid, "registers").shape[1] == 4
    if "SigLIP" in name:
        assert layout.n_cls == 0 and layout.n_prefix == 0
        with pytest.raises(ValueError, match="no CLS"):
            layout.select(resid, "cls")
    elif layout.n_cls:
        assert torch.equal(layout.select(resid, "cls")[:, 0], resid[:, 0])


# ---------------------------------------------------------------------------------------------- big models
@pytest.mark.parametrize(
    "spec, n_layers, d_model, d_embed, n_tokens",
    [
        ("open_clip:ViT-L-14/openai", 24, 1024, 768, 257),
        ("open_clip:ViT-B-16-SigLIP2/webli", 12, 768, 768, 196),
        ("timm:vit_large_patch14_reg4_dinov2.lvd142m", 24, 1024, None, 1374),
        ("timm:vit_base_patch16_siglip_224", 12, 768, 768, 196),
    ],
)
def test_full_resolution_shapes_on_meta(spec, n_layers, d_model, d_embed, n_tokens):
    """Real architectures at their own resolution, full text towers included, built and run on the meta
    device (shapes only, no compute): hook names, widths and token counts."""
    with torch.device("meta"):
        model, _ = load_vision_model(spec, pretrained=False, device="meta")
        h, w = model.cfg.image_size
        with torch.no_grad():
            out, cache = model.run_with_cache(torch.empty(2, 3, h, w))
    assert model.n_layers == n_layers and model.cfg.d_model == d_model
    assert set(cache.cache_dict) == set(model.hook_dict)
    # hook_embed, 5 per block, hook_normed, hook_pooled (+ hook_image_embed)
    assert len(model.hook_dict) == 5 * n_layers + 3 + (d_embed is not None)
    assert cache[f"blocks.{n_layers - 1}.hook_resid_post"].shape == (2, n_tokens, d_model)
    assert cache["hook_normed"].shape == (2, n_tokens, d_model)
    assert model.token_layout.n_tokens == n_tokens
    for name, acts in cache.cache_dict.items():
        assert acts.shape[-1] == model.hook_width(name)
    if d_embed is not None:
        assert out.shape == (2, d_embed) == cache["hook_image_embed"].shape


@SLOW
def test_siglip2_full_text_tower():
    torch.manual_seed(0)
    model, preprocess = load_vision_model("open_clip:ViT-B-16-SigLIP2/webli", pretrained=False)
    images = torch.stack([preprocess(photo) for photo in sample_images(2)])
    with torch.no_grad():
        out, cache = model.run_with_cache(
            images, names_filter=["blocks.11.hook_resid_post", "hook_image_embed"]
        )
        assert torch.equal(out, model.model.encode_image(images))
        text = model.encode_text(torch.randint(0, 1000, (2, 64)))
    assert text.shape == out.shape == (2, 768)


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("spec", ["timm:vit_tiny_patch16_224", "open_clip:ViT-B-32/laion2b_s34b_b79k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_the_device_in_its_dtype_the_output_is_the_bare_models_and_rows_arrive_in_float32(
    device, spec, dtype
):
    kwargs = {"text_cfg": TINY_TEXT} if spec.startswith("open_clip") else {}
    torch.manual_seed(0)
    model, preprocess = load_vision_model(spec, pretrained=False, img_size=32, device=str(device), **kwargs)
    model = model.to(device, dtype).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad():
        bare_out = bare_forward(model, images)
        out, cache = model.run_with_cache(images)
    assert torch.equal(out, bare_out) and out.device.type == device.type
    hook = "blocks.1.hook_resid_post" if spec.startswith("timm") else "blocks.5.hook_resid_post"
    assert cache[hook].dtype == dtype  # captured in the model's dtype, on its device

    source = ImageActivationSource(
        model, preprocess, sample_images(2), hook, token_selection="all", shuffle=False
    )
    rows = source.activations(images)[hook]
    assert rows.dtype == torch.float32 and rows.device.type == "cpu"  # handed over in the SAE's dtype
    assert torch.equal(rows, cache[hook].reshape(-1, cache[hook].shape[-1]).float().cpu())


def test_hook_normed_is_the_final_norm_of_the_last_residual(family):
    name, model, images, bare_out, out, cache = family
    if not model.has_normed:
        assert "hook_normed" not in model.hook_dict
        return
    last = cache[f"blocks.{model.n_layers - 1}.hook_resid_post"]
    trunk = timm_trunk(model)
    final_norm = trunk.norm if trunk is not None else model.model.visual.ln_post
    with torch.no_grad():
        assert torch.equal(cache["hook_normed"], final_norm(last))
    assert cache["hook_normed"].shape == last.shape and model.is_token_hook("hook_normed")
    with pytest.raises(ValueError, match="hook_normed"):
        model.run_with_cache(images, names_filter="hook_normed", stop_at_layer=1)
