"""``eval`` and ``dashboard`` of a trained SAE rebuild the model it was trained on (seeded random init, or a
weights file) and reproduce the training run's held-out FVU: the same number on the same rows."""

from __future__ import annotations

import json
import re

import pytest
import torch
from vision_training_helpers import TINY_MODEL, synthetic_images

from sae_vision_ext.cli import main as cli_main
from sae_vision_ext.vision.load import load_vision_model

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, images in (("photos", synthetic_images(8)), ("val", synthetic_images(3, seed=1))):
        (root / name).mkdir()
        for i, image in enumerate(images):
            image.save(root / name / f"{i}.png")
    torch.manual_seed(123)
    model, _ = load_vision_model(TINY_MODEL, pretrained=False, img_size=32)
    torch.save(model.model.state_dict(), root / "tiny_weights.pth")
    return root


@pytest.mark.parametrize("weights", ["random-init", "file"])
def test_eval_and_dashboard_reproduce_the_training_fvu(folders, tmp_path, capsys, weights):
    model_flags = (
        ["--random-init", "--seed", "4"]
        if weights == "random-init"
        else ["--weights", str(folders / "tiny_weights.pth")]
    )
    out = tmp_path / "sae"
    # held-out rows: every token of the 3 validation photos, no augmentation (the dashboard reads whole
    # images)
    assert (
        cli_main(
            [
                "train",
                "--model",
                TINY_MODEL,
                *model_flags,
                "--img-size",
                "32",
                "--hook",
                HOOK,
                "--tokens",
                "all",
                "--dataset",
                str(folders / "photos"),
                "--eval-dataset",
                str(folders / "val"),
                "--eval-split",
                "train",
                "--n-eval-images",
                "3",
                "--workers",
                "0",
                "--architecture",
                "topk",
                "--sae",
                "k=8",
                "--expansion",
                "2",
                "--rows",
                "160",
                "--batch-size",
                "16",
                "--buffer-size-rows",
                "64",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    trained = json.loads((out / "eval_metrics.json").read_text())
    assert trained["n_rows"] == 3 * 5 and trained["source"] == "held-out images"
    recorded = json.loads((out / "cfg.json").read_text())["metadata"]["weights"]
    assert recorded["source"] == weights

    assert (
        cli_main(
            [
                "eval",
                str(out),
                "--dataset",
                str(folders / "val"),
                "--json",
                str(tmp_path / "e.json"),
                "--quiet",
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["n_rows"] == trained["n_rows"]
    assert evaluated["fvu"] == pytest.approx(trained["fvu"], rel=1e-5)

    capsys.readouterr()
    assert (
        cli_main(
            [
                "dashboard",
                "--sae",
                str(out),
                "--dataset",
                str(folders / "val"),
                "--output",
                str(tmp_path / "dash"),
                "--n-latents",
                "2",
                "--top-k",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    printed = re.search(r"FVU (\d\.\d{4}) \| cosine .* on (\d+) rows", capsys.readouterr().out)
    assert printed is not None and int(printed.group(2)) == trained["n_rows"]
    assert printed.group(1) == f"{trained['fvu']:.4f}"
