"""``sae-vision train`` / ``cache`` / ``eval`` / ``quickstart``: the flags of one vocabulary, settings taken
from a cache, pretrained weights by default, and user errors as one line with exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml
from vision_training_helpers import TINY_MODEL, synthetic_images

from sae_vision_ext.cli import main as cli_main

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(synthetic_images(6)):
        image.save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("c") / "cache"
    assert (
        cli_main(
            (
                f"cache --model {TINY_MODEL} --random-init --img-size 32 --hook {HOOK} --tokens all "
                f"--dataset {photos} --workers 0 --seed 3 --quiet --output {out} --images 6 "
                "--shard-images 8"
            ).split()
        )
        == 0
    )
    return out


def train_topk(cache, out) -> int:
    """``sae-vision train`` from ``cache``: a TopK SAE (k=4, d_sae 2 x d_in), four steps of 16 rows."""
    argv = f"train --cache {cache} --architecture topk --sae k=4 --expansion 2 --rows 64 --batch-size 16"
    return cli_main([*argv.split(), "--output", str(out), "--quiet"])


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sae-vision {command}: error:"), err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            f"--model timm:not_a_model --dataset x --hook {HOOK} --tokens all".split(),
            "unknown timm model",
        ),
        (["--model", "nonsense", "--hook", HOOK, "--tokens", "all"], "must be 'timm:<name>' or 'open_clip:"),
        (["--expansion", "0"], "--expansion must be a positive integer"),
        (["--expansion", "-2"], "--expansion must be a positive integer"),
        (["--sae", "k32"], "must look like KEY=VALUE"),
        (["--tokens", "cls", "--hook", HOOK, "--weights", "w.pt", "--random-init"], "contradict"),
        (["--shard-images", "16"], "--shard-images has no effect on `sae-vision train`"),
    ],
)
def test_train_mistakes_are_one_line_and_exit_2(argv, expected, capsys, tmp_path):
    assert cli_main(["train", "--output", str(tmp_path / "out"), *argv]) == 2
    assert expected in one_error_line(capsys, "train")


def test_offline_pretrained_weights_stop_train_with_the_two_ways_out(capsys, tmp_path, photos, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli_main(
        (
            "train --model timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k --img-size 32 --hook "
            f"{HOOK} --tokens all --dataset {photos} --output {tmp_path / 'out'}"
        ).split()
    )
    assert code == 2
    line = one_error_line(capsys, "train")
    assert "no pretrained weights for timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k" in line
    assert "--weights FILE" in line and "--random-init" in line
    assert not (tmp_path / "out" / "cfg.json").exists()


def test_bad_config_files_are_one_line(capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("lr: [1, 2\n")
    (tmp_path / "types.yaml").write_text(yaml.safe_dump({"training_rows": 300.7}))
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump({"learning_rate": 1}))
    for name, expected in (
        ("broken.yaml", "is not valid YAML"),
        ("types.yaml", "training_rows must be int"),
        ("unknown.yaml", "learning_rate"),
        ("missing.yaml", "config file not found"),
    ):
        assert cli_main(["train", "--config", str(tmp_path / name)]) == 2
        assert expected in one_error_line(capsys, "train")


def test_train_from_a_cache_takes_its_settings_and_refuses_contradictions(capsys, tmp_path, cache):
    # no --model / --hook / --tokens: the cache knows them (the defaults would be CLIP ViT-L/14
    # hook_image_embed)
    assert train_topk(cache, tmp_path / "sae") == 0
    captured = capsys.readouterr()
    # what is trained, said first
    assert f"{TINY_MODEL} | hook {HOOK} | tokens all | cache {cache}" in captured.err
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["token_selection"]) == (TINY_MODEL, HOOK, "all")
    runner_cfg = json.loads((tmp_path / "sae" / "runner_cfg.json").read_text())
    assert runner_cfg["checkpoint_path"] == str(tmp_path / "sae" / "checkpoints")  # derived from --output
    assert meta["weights"] == {"source": "random-init", "seed": 3}  # the cache's model: seeded random weights

    argv = ["train", "--cache", str(cache), "--tokens", "patches", "--output", str(tmp_path / "x")]
    assert cli_main(argv) == 2
    assert "--tokens patches contradicts the cache" in one_error_line(capsys, "train")
    argv = [
        "train",
        "--cache",
        str(cache),
        "--hook",
        "blocks.5.hook_resid_post",
        "--output",
        str(tmp_path / "x"),
    ]
    assert cli_main(argv) == 2
    assert "not of ['blocks.5.hook_resid_post']" in one_error_line(capsys, "train")


def test_eval_warns_when_the_cache_comes_from_another_model(capsys, tmp_path, cache):
    assert train_topk(cache, tmp_path / "sae") == 0
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["model_name"] = "timm:vit_small_patch16_224"
    cfg["metadata"]["weights"] = {"source": "random-init", "seed": 7}
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "sae"), "--cache", str(cache), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning: the SAE was trained with model_name='timm:vit_small_patch16_224'" in captured.err
    assert "RANDOM weights (seed 7), the cache holds RANDOM weights (seed 3)" in captured.err
    assert "FVU" in captured.out


def test_eval_of_a_missing_or_unregistered_sae_is_one_line(capsys, tmp_path):
    assert cli_main(["eval", str(tmp_path / "nothing")]) == 2
    assert "is not an SAE folder (no cfg.json)" in one_error_line(capsys, "eval")
    folder = tmp_path / "alien"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"architecture": "martian", "d_in": 4, "d_sae": 8}))
    assert cli_main(["eval", str(folder)]) == 2
    assert "'martian' is not registered with SAELens; `import sae_vision_ext`" in one_error_line(
        capsys, "eval"
    )


def test_cache_needs_an_output_folder_and_a_positive_count(capsys, photos):
    assert cli_main(["cache", "--dataset", str(photos), "--images", "4"]) == 2
    assert "--output DIR" in one_error_line(capsys, "cache")
    assert cli_main(["cache", "--dataset", str(photos), "--images", "0", "--output", "x"]) == 2
    assert "--images must be a positive number" in one_error_line(capsys, "cache")
    assert cli_main(f"cache --dataset {photos} --images 4 --output x --lr 0.1".split()) == 2
    assert "--lr has no effect on `sae-vision cache`" in one_error_line(capsys, "cache")


def test_help_shows_every_default(capsys):
    for command, expected in (
        ("train", "(default: open_clip:ViT-L-14/openai)"),
        ("cache", "(default: embed)"),
        ("eval", "(default: train)"),
        ("quickstart", "(default: blocks.9.hook_resid_post)"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--help"])
        assert exit_info.value.code == 0
        out = " ".join(capsys.readouterr().out.split())  # help wraps long lines
        assert "examples:" in out and expected in out
