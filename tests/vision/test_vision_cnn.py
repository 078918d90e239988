"""Hooked timm CNNs (ResNet, ConvNeXt): bit-identical outputs, hooks at real attribute paths, feature maps as
spatial tokens, stop_at_layer, SAE splicing and steering on a map, heatmaps in the dashboard."""

from __future__ import annotations

import functools
import re

import pytest
import timm
import torch
from vision_training_helpers import synthetic_images

from sae_vision_ext.analysis.steering import steer
from sae_vision_ext.analysis.toy import make_sae, orthonormal_directions, planted_sae
from sae_vision_ext.vision.hooked_vision_model import UnknownHookError
from sae_vision_ext.vision.load import load_vision_model, wrap_model

SIZE = 64  # px: the last stage keeps a 2x2 grid
# the paper's two CNNs (their real architectures, random weights) and the smallest size of each family
SPECS = ["timm:resnet50.a1_in1k", "timm:convnext_base.fb_in22k", "timm:resnet18", "timm:convnext_atto"]


@functools.cache
def hooked(spec: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, preprocess = load_vision_model(spec, pretrained=False, img_size=SIZE)
    return model, preprocess


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def timm_stage_maps(bare, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's own per-stage feature maps (``forward_intermediates``; a ResNet's list starts with its stem
    activation), the reference for the hooks."""
    return bare.forward_intermediates(x, intermediates_only=True)[-4:]


@pytest.mark.parametrize("spec", SPECS)
def test_outputs_and_maps_equal_timm_to_the_bit(spec):
    model, _ = hooked(spec)
    bare, x = model.model, images()
    with torch.no_grad():
        reference = bare(x)
        out, cache = model.run_with_cache(x)
        maps = timm_stage_maps(bare, x)
        pre_logits = bare.forward_head(bare.forward_features(x), pre_logits=True)
    assert torch.equal(out, reference)
    for s, expected in enumerate(maps):
        tokens = cache[f"stages.{s}.hook_out"]
        b, c, h, w = expected.shape
        assert tokens.shape == (b, h * w, c)  # spatial tokens, row-major over the grid
        assert torch.equal(tokens, expected.flatten(2).transpose(1, 2))
        last_block = len(model.stages[s].blocks) - 1
        assert torch.equal(cache[f"stages.{s}.blocks.{last_block}.hook_out"], tokens)
        assert model.layout_at(f"stages.{s}.hook_out").grid_size == (h, w)
        assert model.hook_width(f"stages.{s}.hook_out") == c
    assert torch.equal(cache["hook_pooled"], pre_logits)
    assert model.cfg.d_pooled == pre_logits.shape[1] and model.cfg.d_model == maps[-1].shape[1]


def test_hook_names_are_attribute_paths_and_documented_layout():
    model, _ = hooked("timm:resnet50.a1_in1k")
    assert model.family == "resnet" and model.n_layers == 4 and model.cfg.extra["depths"] == [3, 4, 6, 3]
    for name, hook in model.hook_dict.items():
        obj = model
        for part in name.split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        assert obj is hook, name
    assert model.hook_stem is model.hook_dict["hook_stem"]
    assert model.stages[2].blocks[5].hook_out is model.hook_dict["stages.2.blocks.5.hook_out"]
    assert model.token_layout is None  # maps differ per stage: layout_at(hook) gives each grid
    assert [model.layout_at(f"stages.{s}.hook_out").grid_size for s in range(4)] == [
        (16, 16),
        (8, 8),
        (4, 4),
        (2, 2),
    ]
    assert model.layout_at("hook_stem").grid_size == (16, 16) and model.hook_width("hook_stem") == 64
    assert model.cfg.patch_size == (32, 32)  # input pixels per position of the last map
    with pytest.raises(ValueError, match="pooled"):
        model.layout_at("hook_pooled")
    with pytest.raises(UnknownHookError, match=r"Did you mean 'stages.3.hook_out'.*stages.2.blocks.\{0..5\}"):
        model.run_with_cache(images(1), names_filter="stages.9.hook_out")


def test_stop_at_layer_runs_only_the_stages_asked_for():
    model, _ = hooked("timm:convnext_atto")
    x = images()
    with torch.no_grad():
        out, cache = model.run_with_cache(x, names_filter=["hook_stem", "stages.1.hook_out"], stop_at_layer=2)
        _, full = model.run_with_cache(x, names_filter="stages.1.hook_out")
    assert out is None and torch.equal(cache["stages.1.hook_out"], full["stages.1.hook_out"])
    with pytest.raises(ValueError, match="not computed with stop_at_layer=2"):
        model.run_with_cache(x, names_filter="stages.2.hook_out", stop_at_layer=2)
    with pytest.raises(ValueError, match="out of range for 4 stages"):
        model(x, stop_at_layer=5)


def test_a_hook_that_edits_a_map_changes_what_follows_exactly():
    model, _ = hooked("timm:resnet18")
    bare, x = model.model, images()
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter="stages.2.hook_out")
        edited = model.run_with_hooks(x, fwd_hooks=[("stages.2.hook_out", lambda a, hook: a * 0.5)])
        b, hw, c = cache["stages.2.hook_out"].shape
        half_map = (cache["stages.2.hook_out"] * 0.5).transpose(1, 2).reshape(b, c, 4, 4)
        expected = bare.forward_head(bare.layer4(half_map))
    assert torch.equal(edited, expected)
    with torch.no_grad():
        assert torch.equal(model(x), bare(x))  # the hook was removed


def test_wrapping_never_changes_the_model():
    """Layouts come from a pass on the meta device: BatchNorm statistics of a train-mode model stay put."""
    torch.manual_seed(0)
    bare = timm.create_model("resnet18", pretrained=False)  # train mode
    before = {k: v.clone() for k, v in bare.state_dict().items()}
    model = wrap_model(bare)
    assert model.hook_width("stages.3.hook_out") == 512
    assert model.layout_at("stages.3.hook_out").n_tokens == 49  # 224 px: a 7x7 map
    assert all(torch.equal(before[k], v) for k, v in bare.state_dict().items())


def test_unsupported_cnn_variants_are_refused():
    with torch.device("meta"):
        head_norm_first = timm.create_model("convnext_atto", head_norm_first=True)
        no_pool = timm.create_model("resnet18", global_pool="")
    with pytest.raises(NotImplementedError, match="head_norm_first"):
        wrap_model(head_norm_first)
    with pytest.raises(NotImplementedError, match="global pooling"):
        wrap_model(no_pool)


def test_spatial_rows_feed_an_sae_spliced_on_a_map():
    model, _ = hooked("timm:convnext_atto")
    hook = "stages.2.hook_out"
    x = images(3)
    d = model.hook_width(hook)
    sae = make_sae(d, 64, hook, token_selection="spatial", model_name=model.spec)
    with torch.no_grad():
        baseline = model(x)
        model.add_sae(sae, use_error_term=True)
        try:
            out, cache = model.run_with_cache(x)
        finally:
            model.reset_saes()
    torch.testing.assert_close(out, baseline, rtol=1e-5, atol=1e-5)  # the error term restores the map
    assert cache[f"{hook}.hook_sae_acts_post"].shape == (3, 16, 64)  # 4x4 positions of the stage-2 map


def test_steering_edits_the_map_at_the_chosen_positions_only():
    model, _ = hooked("timm:convnext_atto")
    hook, after = "stages.2.hook_out", "stages.3.hook_out"
    atoms = orthonormal_directions(8, model.hook_width(hook), seed=1)
    sae = planted_sae(atoms, hook, model_name=model.spec)
    x = images(2)
    with torch.no_grad():
        _, base = model.run_with_cache(x, names_filter=[hook, after])
        with steer(model, sae, latents=3, mode="add", value=2.0, tokens=[0, 5]):
            _, cache = model.run_with_cache(x, names_filter=[hook, after])
    delta = cache[hook] - base[hook]
    torch.testing.assert_close(delta[:, [0, 5]], 2.0 * atoms[3].expand(2, 2, -1), atol=1e-5, rtol=1e-5)
    untouched = [p for p in range(16) if p not in (0, 5)]
    assert delta[:, untouched].abs().max() == 0
    assert (cache[after] - base[after]).abs().max() > 1e-4  # the next stage sees the edited map


def test_the_activation_source_reads_spatial_rows():
    from sae_vision_ext.activations.source import ImageActivationSource, stop_layer_for

    model, preprocess = hooked("timm:resnet18")
    assert stop_layer_for(["hook_stem", "stages.1.blocks.0.hook_out"], model) == 2
    assert stop_layer_for(["stages.1.hook_out", "hook_pooled"], model) is None
    source = ImageActivationSource(
        model, preprocess, synthetic_images(4), "stages.2.hook_out", token_selection="spatial", shuffle=False
    )
    assert source.tokens_per_image == 16 and source.stop_at_layer == 3
    chunk = next(source.iter_chunks(0, 4))
    rows = chunk.rows["stages.2.hook_out"]
    assert rows.shape == (chunk.n_images_ok * 16, 256)
    with torch.no_grad():
        pixels = torch.stack([preprocess(image) for image in synthetic_images(4)[: chunk.n_images_ok]])
        maps = timm_stage_maps(model.model, pixels)[2]
    torch.testing.assert_close(rows, maps.flatten(2).transpose(1, 2).reshape(-1, 256))


def test_an_sae_trained_on_a_convnext_stage_shows_spatial_heatmaps_in_chromium(tmp_path, capsys):
    """The whole path on a CNN: the runner trains on a ConvNeXt stage's spatial tokens, `sae-vision
    dashboard` rebuilds the model from the saved SAE's metadata and draws heatmaps on the stage's 4x4 grid."""
    from sae_lens import SAE
    from vision_training_helpers import tiny_config

    from sae_vision_ext.analysis.browser import find_chromium, open_page
    from sae_vision_ext.commands.dashboard import main as dashboard_main
    from sae_vision_ext.training.runner import VisionSAETrainingRunner

    hook = "stages.2.hook_out"
    cfg = tiny_config(
        tmp_path / "run",
        model_name="timm:convnext_atto",
        img_size=SIZE,
        hook_name=hook,
        token_selection="spatial",
        sae={"architecture": "topk", "d_in": 160, "d_sae": 320, "k": 8},
        seed=0,
    )
    VisionSAETrainingRunner(cfg, images=synthetic_images(), say=lambda m: None).run()  # builds the model
    sae = SAE.load_from_disk(tmp_path / "run")
    meta = sae.cfg.metadata
    assert (meta.hook_name, meta.token_selection, meta.context_size) == (hook, "spatial", 16)
    assert meta.token_layout["grid_size"] == [4, 4] and meta.image_size == [SIZE, SIZE]

    out = tmp_path / "dashboard"
    argv = ["--sae", str(tmp_path / "run"), "--synthetic", "12", "--output", str(out)]
    assert dashboard_main([*argv, "--n-latents", "4", "--top-k", "3", "--batch-size", "4", "--quiet"]) == 0
    assert "RANDOM weights (seed 0)" in capsys.readouterr().err  # rebuilt from the metadata
    report = open_page(out / "dashboard.html", window_size=(1200, 1000), chromium=find_chromium())
    assert report.returncode == 0 and report.console == [], report.console
    assert report.body_attribute("data-status") == "ok" and report.count("latent-card") == 4
    grids = re.findall(r'data-grid="([^"]*)"', report.dom)
    assert report.count("heatmap") == len(grids) > 0 and set(grids) == {"4x4"}


@pytest.mark.parametrize("spec", ["timm:resnet18", "timm:convnext_atto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_the_device_in_its_dtype_maps_are_captured_and_rows_arrive_in_float32(device, spec, dtype):
    from sae_vision_ext.activations.source import ImageActivationSource

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, preprocess = load_vision_model(spec, pretrained=False, img_size=SIZE, device=str(device))
    model = model.to(device, dtype).eval()
    x = images().to(device, dtype)
    hook = "stages.3.hook_out"
    with torch.no_grad():
        bare_out = model.model(x)
        out, cache = model.run_with_cache(x)
    assert torch.equal(out, bare_out) and out.device.type == device.type
    assert cache[hook].dtype == dtype and cache[hook].shape == (2, 4, model.hook_width(hook))
    for selection, name in (("spatial", hook), ("pooled", "hook_pooled")):
        source = ImageActivationSource(model, preprocess, synthetic_images(2), name, selection)
        rows = source.activations(x)[name]
        assert rows.dtype == torch.float32 and rows.device.type == "cpu"
        flat = cache[name].reshape(-1, cache[name].shape[-1])
        assert torch.equal(rows, flat.float().cpu())  # [B * H * W, C] spatial rows, [B, d] pooled
