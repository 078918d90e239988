"""examples/capture.py runs end to end on real photos at a small scale."""

from __future__ import annotations

from helpers import load_script, run_example

SCRIPT = "examples/capture.py"


def run(*args, timeout=600):
    return run_example(SCRIPT, *args, timeout=timeout)


def test_help_has_examples():
    result = run("--help", timeout=120)
    assert result.returncode == 0
    assert "--model" in result.stdout and "--hooks" in result.stdout and "examples:" in result.stdout


def test_capture_default_dinov2_reg4_on_photos():
    result = run("--img-size", "56", "--n-images", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "vit_base_patch14_reg4_dinov2" in out
    if "RANDOM weights" in out:  # no weights to be had offline: the script must say so clearly
        assert "note: no pretrained weights for timm:vit_base_patch14_reg4_dinov2.lvd142m" in out
    assert "1 CLS + 4 registers + 16 patches (grid 4x4) = 21 tokens" in out
    assert "astronaut, coffee, chelsea" in out
    shapes = {
        line.split()[0]: line.split("]")[0].split("[")[1]
        for line in out.splitlines()
        if line.startswith("  ")
    }
    assert shapes["blocks.11.hook_resid_post"] == "3, 21, 768" and shapes["hook_pooled"] == "3, 768"
    assert "registers=[3, 4, 768]" in out and "hook_pooled" in out


def test_capture_open_clip_with_chosen_hooks_and_stop(capsys):
    # in-process (the subprocess run above covers start-up): an open_clip model, chosen hooks, early stop
    module = load_script(SCRIPT)
    code = module.main(
        [
            "--model",
            "open_clip:ViT-B-32/laion2b_s34b_b79k",
            "--random-init",
            "--img-size",
            "64",
            "--n-images",
            "2",
            "--hooks",
            "hook_embed,blocks.2.hook_mlp_out",
            "--stop-at-layer",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [line[0] for line in lines] == ["hook_embed", "blocks.2.hook_mlp_out"]
    assert "[2, 5, 768]" in out and "model output" not in out and "(RANDOM weights (seed 0))" in out


def test_capture_a_cnn_prints_each_feature_map_grid(capsys):
    module = load_script(SCRIPT)
    code = module.main(["--model", "timm:resnet18", "--random-init", "--img-size", "64", "--n-images", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "4 stages" in out and "token layout" not in out  # a CNN has one grid per map
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert list(lines) == ["hook_stem", "stages.2.hook_out", "stages.3.hook_out", "hook_pooled"]
    assert "[2, 256, 64]   feature map 16x16 as 256 spatial tokens" in lines["hook_stem"]
    assert "[2, 4, 512]" in lines["stages.3.hook_out"] and "[2, 512]" in lines["hook_pooled"]
