"""The Archetypal SAE paper's five-model study (``examples/asae_five_models.py`` and its configs).

The example runs all five models at tiny size (random-init same-family models, sample photos) and leaves
five loadable RA-SAEs and a results table; each config file is a full runner config whose d_sae is 5x the
width of the real (full-size) model's hook, checked on the meta device (shapes only, no weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import ROOT, load_script

SCRIPT = "examples/asae_five_models.py"
CONFIG_DIR = ROOT / "examples" / "configs" / "asae_five_models"
# key -> (real model, hook, tokens, hook width, rows per image at 224 px)
FULL = {
    "dinov2": ("timm:vit_base_patch14_reg4_dinov2.lvd142m", "hook_normed", "all", 768, 261),
    "siglip": ("timm:vit_base_patch16_siglip_224.webli", "hook_normed", "all", 768, 196),
    "vit": ("timm:vit_base_patch16_224.augreg2_in21k_ft_in1k", "hook_normed", "all", 768, 197),
    "convnext": ("timm:convnext_base.fb_in22k", "stages.3.hook_out", "spatial", 1024, 49),
    "resnet50": ("timm:resnet50.a1_in1k", "stages.3.hook_out", "spatial", 2048, 49),
}
TINY_WIDTHS = {"dinov2": 384, "siglip": 256, "vit": 192, "convnext": 320, "resnet50": 512}


def test_five_models_tiny(tmp_path, capsys, monkeypatch):
    from sae_lens import SAE

    import sae_vision_ext  # noqa: F401 - registers ra_sae for SAE.load_from_disk
    from sae_vision_ext.training.monitor import TrainingMonitor

    # the runner's PNG curves take ~2 s a model on a 2-core CPU and are tested with the runner: skipped here
    monkeypatch.setattr(TrainingMonitor, "write_plots", lambda self, metrics=None: [])
    script = load_script(SCRIPT)
    assert script.main(["--tiny", "--quiet", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in rows] == list(FULL)
    markdown = (tmp_path / "results.md").read_text()
    for row in rows:
        key = row["model"]
        _, hook, tokens, _, _ = FULL[key]
        tiny_model = script.TINY_MODELS[key][0]
        assert (row["hook"], row["token_selection"], row["model_name"]) == (hook, tokens, tiny_model)
        assert row["d_in"] == TINY_WIDTHS[key] and row["d_sae"] == 5 * row["d_in"]
        assert math.isfinite(row["fvu"]) and 0 < row["l0"] <= row["k"] == script.TINY_K
        assert 0 <= row["dead_fraction"] <= 1 and row["training_rows"] == 256
        assert f"| {key} | {row['d_in']:,} | {row['d_sae']:,} |" in markdown and f"| {key} |" in out
        # the candidates file the run computed, and the SAE folder the runner wrote
        assert (tmp_path / "candidates" / f"{key}.safetensors").is_file()
        assert Path(row["sae_path"]) == tmp_path / key
        sae = SAE.load_from_disk(row["sae_path"])
        assert sae.cfg.architecture() == "ra_sae"
        assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.n_candidates) == (row["d_in"], 5 * row["d_in"], 64)
        meta = sae.cfg.metadata
        assert (meta.hook_name, meta.model_name, meta.token_selection) == (hook, tiny_model, tokens)
        with torch.no_grad():
            z = sae.encode(torch.randn(3, row["d_in"]))
        assert z.shape == (3, row["d_sae"]) and int((z != 0).sum(-1).max()) <= script.TINY_K


@pytest.mark.parametrize("key", list(FULL))
def test_config_is_the_paper_setting_for_the_real_model(key):
    """Each file parses into a runner config at full size: pretrained real model, final-layer hook,
    d_sae = 5 x the real hook width, 32,000 candidates, one pass over 1.28M ImageNet images."""
    from sae_vision_ext.activations.source import tokens_per_image
    from sae_vision_ext.training.config import VisionSAERunnerConfig
    from sae_vision_ext.vision.load import load_vision_model

    model_name, hook, tokens, width, per_image = FULL[key]
    cfg = VisionSAERunnerConfig.from_file(CONFIG_DIR / f"{key}.yaml")
    assert (cfg.model_name, cfg.hook_name, cfg.token_selection, cfg.pretrained) == (
        model_name, hook, tokens, True
    )  # fmt: skip
    with torch.device("meta"):  # the real architecture, shapes only
        model, _ = load_vision_model(model_name, pretrained=False, device="meta", img_size=cfg.img_size)
    assert model.hook_width(hook) == width == cfg.sae.d_in
    assert cfg.sae.architecture() == "ra_sae" and cfg.sae.d_sae == 5 * width
    assert cfg.sae.n_candidates == 32_000 and cfg.sae.dictionary_init == "identity"
    assert cfg.sae.candidates_path.endswith(f"{key}.safetensors")
    assert tokens_per_image(model, hook, tokens) == per_image
    assert cfg.training_rows == 1_280_000 * per_image
    assert cfg.lr_warm_up_steps == int(0.05 * cfg.total_training_steps) and cfg.resolved_lr_decay_steps == 0
    assert cfg.dataset_path == cfg.eval_dataset_path == "ILSVRC/imagenet-1k"
    import timm

    assert model_name.partition(":")[2] in timm.list_pretrained(model_name.partition(":")[2])


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(SCRIPT).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--tiny" in out and "--models" in out
