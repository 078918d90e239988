"""VisionSAERunnerConfig (files, overrides, any registered architecture) and the cache / train / eval
commands."""

from __future__ import annotations

import json

import pytest
import yaml
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from vision_training_helpers import TINY_MODEL, synthetic_images

import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)
from sae_vision_ext.cli import main as cli_main
from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKTrainingSAEConfig
from sae_vision_ext.training.config import VisionSAERunnerConfig, apply_overrides, parse_value


def test_config_takes_any_registered_architecture_and_round_trips(tmp_path):
    msae = VisionSAERunnerConfig(
        sae={"architecture": "matryoshka_topk", "d_in": 768, "d_sae": 6144}, dataset_path="pixparse/cc3m"
    )
    assert isinstance(msae.sae, MatryoshkaTopKTrainingSAEConfig)
    assert msae.sae.k_levels == [64, 128, 256, 512, 1024, 2048, 4096, 6144]
    # the paper's defaults: CLIP ViT-L/14 embedding, batch 4096, lr 1e-4, decay over the last 20%
    assert (msae.model_name, msae.hook_name, msae.token_selection) == (
        "open_clip:ViT-L-14/openai",
        "hook_image_embed",
        "embed",
    )
    trainer_cfg = msae.to_sae_trainer_config()
    assert trainer_cfg.train_batch_size_samples == 4096 and trainer_cfg.lr == 1e-4
    assert trainer_cfg.lr_decay_steps == int(0.2 * (msae.training_rows // 4096))
    assert trainer_cfg.logger.log_to_wandb is False
    assert msae.checkpoint_path == "runs/vision_sae/checkpoints"
    again = VisionSAERunnerConfig.from_dict(json.loads(json.dumps(msae.to_dict())))
    assert again.to_dict() == msae.to_dict()

    topk = VisionSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=384, d_sae=3072, k=32),
        hook_name="blocks.9.hook_resid_post",
        token_selection="patches",
    )
    assert topk.sae.architecture() == "topk" and topk.hook_names == ["blocks.9.hook_resid_post"]
    with pytest.raises(ValueError, match="unknown SAE architecture 'nope'.*matryoshka_topk"):
        VisionSAERunnerConfig(sae={"architecture": "nope", "d_in": 1, "d_sae": 2})
    with pytest.raises(ValueError, match="unknown field.*'kk'"):
        VisionSAERunnerConfig(sae={"architecture": "topk", "d_in": 1, "d_sae": 2, "kk": 3})
    with pytest.raises(ValueError, match="unknown config field.*'learning_rate'"):
        VisionSAERunnerConfig.from_dict(
            {"sae": {"architecture": "topk", "d_in": 1, "d_sae": 2}, "learning_rate": 1}
        )
    with pytest.raises(ValueError, match="hook_image_embed"):
        VisionSAERunnerConfig(sae=None, hook_name="blocks.0.hook_resid_post", token_selection="embed")


def test_config_files_and_overrides(tmp_path):
    data = {
        "sae": {"architecture": "topk", "d_in": 192, "d_sae": 768, "k": 16},
        "model_name": TINY_MODEL,
        "hook_name": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        "token_selection": "patches",
        "training_rows": 100000,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "run.json").write_text(json.dumps(data))
    from_yaml = VisionSAERunnerConfig.from_file(
        tmp_path / "run.yaml", ["sae.k=32", "lr=3e-4", "img_size=none"]
    )
    from_json = VisionSAERunnerConfig.from_file(tmp_path / "run.json", ["sae.k=32", "lr=3e-4"])
    assert from_yaml.to_dict() == from_json.to_dict()
    assert from_yaml.sae.k == 32 and from_yaml.lr == 3e-4 and from_yaml.lr_end == pytest.approx(3e-5)
    assert from_yaml.hook_names == data["hook_name"]
    assert parse_value("1e-4") == 1e-4 and parse_value("[1, 2]") == [1, 2] and parse_value("abc") == "abc"
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["lr"])


def test_cli_cache_train_eval(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(synthetic_images(6)):
        image.save(photos / f"p{i}.png")
    common = (
        f"--model {TINY_MODEL} --random-init --img-size 32 --hook blocks.1.hook_resid_post "
        f"--tokens all --dataset {photos} --workers 0 --seed 3 --quiet"
    ).split()
    assert (
        cli_main(
            [
                "cache",
                *common,
                "--output",
                str(tmp_path / "cache"),
                "--images",
                "24",
                "--allow-repeat",
                "--shard-images",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "rows: 120 (5 per image)" in out and "skipped: 0" in out

    # hook, token selection and model come from the cache itself
    assert (
        cli_main(
            (
                f"train --cache {tmp_path / 'cache'} --architecture topk --sae k=8 --expansion 2 "
                f"--rows 256 --batch-size 32 --output {tmp_path / 'sae'} --quiet"
            ).split()
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "trained on 256 rows" in out and "FVU" in out and str(tmp_path / "sae") in out
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 192 and cfg["d_sae"] == 384 and cfg["k"] == 8  # d_in read off the cache

    assert (
        cli_main(
            [
                "train",
                *common,
                "--architecture",
                "matryoshka_topk",
                "--sae",
                "d_sae=256",
                "k_levels=[8,256]",
                "--rows",
                "192",
                "--batch-size",
                "32",
                "--holdout",
                "1",
                "--n-eval-images",
                "4",
                "--output",
                str(tmp_path / "msae"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "held-out images (20 rows)" in out
    assert (
        json.loads((tmp_path / "msae" / "cfg.json").read_text())["d_in"] == 192
    )  # read off the model's hook
    trained = json.loads((tmp_path / "msae" / "eval_metrics.json").read_text())

    # eval with no data rebuilds the run's held-out rows and its random-init model: the training-time numbers
    assert cli_main(["eval", str(tmp_path / "msae"), "--json", str(tmp_path / "again.json"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["n_rows"] == trained["n_rows"] == 20
    assert again["fvu"] == pytest.approx(trained["fvu"], rel=1e-6)
    assert again["cosine"] == pytest.approx(trained["cosine"], rel=1e-6)
    assert [row["k"] for row in again["per_k"]] == [8, 256]
    assert f"FVU {trained['fvu']:.4f}" in capsys.readouterr().out

    assert (
        cli_main(["eval", str(tmp_path / "sae"), "--cache", str(tmp_path / "cache"), "--n-eval-images", "4"])
        == 0
    )
    assert "cosine" in capsys.readouterr().out


def test_cli_help_has_examples(capsys):
    for command in ("train", "cache", "eval"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_cli_reports_mistakes_in_one_line(tmp_path, capsys):
    code = cli_main(
        (f"train --cache {tmp_path / 'missing'} --hook blocks.1.hook_resid_post --tokens all --quiet").split()
    )
    assert code == 2
    assert "sae-vision train: error:" in capsys.readouterr().err
