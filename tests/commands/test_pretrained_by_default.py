"""Pretrained weights are the default: ``sae-vision train`` and the quickstart request them from the Hub (a
local server stands in for it), record which weights they used, and ``eval`` rebuilds exactly that model.
Without the Hub the quickstart says it uses random weights, at the start and in the summary."""

from __future__ import annotations

import json

import pytest
import torch
from fake_hub import serve_random_weights
from vision_training_helpers import synthetic_images

from sae_vision_ext.cli import main as cli_main
from sae_vision_ext.vision.load import load_model_for_sae, load_vision_model, weights_record

DINO = "timm:vit_small_patch14_reg4_dinov2.lvd142m"
HOOK = "blocks.1.hook_resid_post"
BANNER = "!! The vision model had RANDOM weights"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(synthetic_images(6)):
        image.save(folder / f"p{i}.png")
    return folder


def test_train_downloads_pretrained_weights_by_default_and_eval_rebuilds_them(
    fake_hub, photos, tmp_path, capsys
):
    served = serve_random_weights(fake_hub, DINO, seed=11)
    out = tmp_path / "sae"
    assert (
        cli_main(
            (
                f"train --model {DINO} --img-size 28 --hook {HOOK} --tokens patches --dataset {photos} "
                "--workers 0 --augment crop_flip --holdout 2 --n-eval-images 4 --architecture topk "
                "--sae k=8 --expansion 1 --rows 64 --batch-size 16 --buffer-size-rows 64 "
                f"--model-batch-size 4 --output {out} --quiet"
            ).split()
        )
        == 0
    )
    assert (
        served.repo_id,
        served.filename,
    ) in fake_hub.downloaded()  # no flag needed to get the real weights
    captured = capsys.readouterr()
    assert "pretrained weights (lvd142m)" in captured.err and BANNER not in captured.out
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["weights"] == {"source": "pretrained", "spec": DINO, "tag": "lvd142m"}

    # the rebuilt model is the pretrained one, not a random init
    model, _, record = load_model_for_sae(meta, say=print)
    assert record == meta["weights"]
    assert torch.equal(model.model.blocks[0].attn.qkv.weight, served.state_dict["blocks.0.attn.qkv.weight"])
    trained = json.loads((out / "eval_metrics.json").read_text())
    assert cli_main(["eval", str(out), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["n_rows"] == trained["n_rows"] and again["fvu"] == pytest.approx(trained["fvu"], rel=1e-6)


def test_quickstart_downloads_pretrained_weights_by_default(fake_hub, tmp_path, capsys):
    served = serve_random_weights(fake_hub, DINO, seed=2)
    assert (
        cli_main(["quickstart", "--tiny", "--rows", "512", "--output", str(tmp_path / "qs"), "--quiet"]) == 0
    )
    assert (served.repo_id, served.filename) in fake_hub.downloaded()
    out = capsys.readouterr().out
    assert BANNER not in out and "pretrained weights (lvd142m)" in out


def test_offline_quickstart_says_random_weights_at_the_start_and_in_the_summary(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        cli_main(["quickstart", "--tiny", "--rows", "512", "--output", str(tmp_path / "qs"), "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    assert out.count(BANNER) == 2
    assert out.index(BANNER) < out.index("SAE: matryoshka_topk") < out.rindex(BANNER)  # first and last word
    assert "768 (ReLU) |" in out  # the per-k table of the Matryoshka summary (d_sae 768 is the ReLU row)
    meta = json.loads((tmp_path / "qs" / "cfg.json").read_text())["metadata"]
    assert meta["weights"] == {"source": "random-init", "seed": 0}


def test_a_weights_file_is_recorded_with_its_hash_and_checked_when_rebuilt(tmp_path):
    torch.manual_seed(0)
    model, _ = load_vision_model("timm:vit_tiny_patch16_224", pretrained=False, img_size=32)
    path = tmp_path / "tiny.pth"
    torch.save(model.model.state_dict(), path)

    meta = {
        "model_name": "timm:vit_tiny_patch16_224",
        "image_size": [32, 32],
        "weights": weights_record("timm:vit_tiny_patch16_224", weights=path),
    }
    said: list[str] = []
    rebuilt, _, _ = load_model_for_sae(meta, say=said.append)
    assert not said and torch.equal(
        rebuilt.model.patch_embed.proj.weight, model.model.patch_embed.proj.weight
    )

    changed = dict(model.model.state_dict())
    changed["cls_token"] = changed["cls_token"] + 1
    torch.save(changed, path)
    load_model_for_sae(meta, say=said.append)
    assert said == [f"warning: {path.resolve()} changed since the SAE was trained (other sha256)"]
    path.unlink()
    with pytest.raises(FileNotFoundError, match="pass it with --weights FILE"):
        load_model_for_sae(meta, say=said.append)
