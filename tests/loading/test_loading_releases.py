"""Release registration into SAELens, friendly errors for unknown names, and the SAE/model width check."""

import subprocess
import sys

import pytest
import torch

from sae_vision_ext.loading import RELEASES, register_releases
from sae_vision_ext.loading.checks import check_sae_fits_model
from sae_vision_ext.loading.overcomplete import OvercompleteSAE, OvercompleteSAEConfig
from sae_vision_ext.loading.pretrained import load_pretrained
from sae_vision_ext.loading.releases import MSAE_LOADER, OVERCOMPLETE_LOADER, release_metadata


def test_registration_is_idempotent_and_survives_cache_clear():
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.loading import pretrained_saes_directory as directory_module
    from sae_lens.saes import sae as sae_module

    assert register_releases() == register_releases() == list(RELEASES)
    wrapper = directory_module.get_pretrained_saes_directory
    register_releases()
    assert directory_module.get_pretrained_saes_directory is wrapper  # not wrapped twice
    assert sae_module.get_pretrained_saes_directory is wrapper  # SAE.from_pretrained sees the releases
    assert loaders.get_pretrained_saes_directory is wrapper  # get_conversion_loader_name too
    assert {MSAE_LOADER, OVERCOMPLETE_LOADER} <= set(loaders.NAMED_PRETRAINED_SAE_LOADERS)
    assert {MSAE_LOADER, OVERCOMPLETE_LOADER} <= set(loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS)

    directory = wrapper()
    assert "gemma-scope-2b-pt-res" in directory  # SAELens's own releases are still there
    lookup = directory["msae-clip-vit-l-14"]
    assert lookup.repo_id == "WolodjaZ/MSAE" and lookup.conversion_func == MSAE_LOADER
    assert set(lookup.saes_map) == {"centered", "not_centered"}
    assert lookup.saes_map["centered"].startswith("ViT-L_14/centered/6144_768_TopKReLU_64_RW_")
    wrapper.cache_clear()
    assert "ra-sae-dinov2-vitb14-reg-32k" in wrapper()
    assert loaders.get_conversion_loader_name("ra-sae-dinov2-vitb14-reg-32k") == OVERCOMPLETE_LOADER


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_registers_releases_without_reading_the_yaml():
    out = _run(
        "import sae_vision_ext\n"
        "from sae_lens.loading import pretrained_saes_directory as d\n"
        "from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS as L\n"
        "print(d.get_pretrained_saes_directory.cache_info().currsize, 'sae_vision_ext_msae' in L)\n"
        "print('msae-clip-vit-l-14' in d.get_pretrained_saes_directory())\n"
    )
    assert out.split() == ["0", "True", "True"]


def test_release_metadata_matches_paths_and_patterns():
    l14 = RELEASES["msae-clip-vit-l-14"].saes["not_centered"]
    assert release_metadata("WolodjaZ/MSAE", l14)["model_name"] == "open_clip:ViT-L-14/openai"
    b16 = (
        "ViT-B_16/centered/4096_512_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-B~16_train_image_2905936_512.pth"
    )
    meta = release_metadata("WolodjaZ/MSAE", b16)
    assert meta["model_name"] == "open_clip:ViT-B-16/openai" and meta["hook_name"] == "hook_image_embed"
    assert release_metadata("WolodjaZ/MSAE", "elsewhere.pth") == {}


def test_unknown_release_or_sae_id_lists_the_valid_ones(hf_cache):
    from sae_lens import SAE

    with pytest.raises(ValueError) as err:
        load_pretrained("msae-clip-vit-l14", "centered")
    message = str(err.value)
    assert "Did you mean 'msae-clip-vit-l-14'" in message
    for name in RELEASES:
        assert name in message
    assert "sae ids: centered, not_centered" in message

    with pytest.raises(ValueError, match="valid ids: centered, not_centered"):
        load_pretrained("msae-clip-vit-l-14", "centred")
    with pytest.raises(
        ValueError, match=r"Valid IDs are \['centered', 'not_centered'\]"
    ):  # SAELens's own API
        SAE.from_pretrained("msae-clip-vit-b-16", "uncentered")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_pretrained("someone/not-cached", "blocks.0.hook_resid_post")
    with pytest.raises(FileNotFoundError, match=r"not found in the Hub repo WolodjaZ/MSAE \(HF_HUB_OFFLINE"):
        SAE.from_pretrained("msae-clip-vit-l-14", "centered")  # registered, but nothing cached
    with pytest.raises(FileNotFoundError, match="matching"):
        SAE.from_pretrained("msae-clip-vit-b-16", "centered")


def _sae(d_in, hook, model_name="timm:vit_tiny_patch16_224"):
    cfg = OvercompleteSAEConfig(d_in=d_in, d_sae=4 * d_in)
    cfg.metadata.hook_name, cfg.metadata.model_name = hook, model_name
    return OvercompleteSAE(cfg)


def test_check_sae_fits_model():
    from sae_vision_ext.vision.hooked_vision_model import UnknownHookError
    from sae_vision_ext.vision.load import load_vision_model

    torch.manual_seed(0)
    model, _ = load_vision_model("timm:vit_tiny_patch16_224", pretrained=False, img_size=32)
    width = model.hook_width("blocks.1.hook_resid_post")
    assert check_sae_fits_model(_sae(width, "blocks.1.hook_resid_post"), model) == "blocks.1.hook_resid_post"
    with pytest.raises(
        ValueError, match=rf"d_in=8 does not match hook 'blocks.1.hook_resid_post' .* width {width}"
    ):
        check_sae_fits_model(_sae(8, "blocks.1.hook_resid_post", "timm:vit_base_patch16_224"), model)
    with pytest.raises(UnknownHookError, match="hook_resid_post"):
        check_sae_fits_model(_sae(width, "blocks.99.hook_resid_post"), model)
    with pytest.raises(ValueError, match="names no hook"):
        check_sae_fits_model(_sae(width, None), model)
    with pytest.warns(UserWarning, match="trained on timm:vit_small"):
        check_sae_fits_model(_sae(width, "hook_pooled", "timm:vit_small_patch16_224"), model)
