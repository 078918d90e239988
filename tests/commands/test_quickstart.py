"""The README's main command: ``python -m sae_vision_ext.quickstart`` (run tiny here; the default is the real
one)."""

from __future__ import annotations

import json

import pytest

from sae_vision_ext.quickstart import main


def test_quickstart_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--rows" in text and "--weights" in text and "--tiny" in text


def test_quickstart_tiny_trains_an_msae_and_prints_metrics(tmp_path, capsys):
    out = tmp_path / "quickstart"
    assert main(["--tiny", "--quiet", "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "RANDOM weights" in stdout  # no local DINOv2 weights on a test machine: said out loud
    assert "matryoshka_topk" in stdout and "held-out images" in stdout
    for word in ("FVU", "cosine", "L0", "dead latents", str(out)):
        assert word in stdout, word
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "matryoshka_topk" and cfg["metadata"]["modality"] == "vision"
    assert cfg["metadata"]["model_name"] == "timm:vit_small_patch14_reg4_dinov2.lvd142m"
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert 0 <= metrics["fvu"] < 1 and metrics["cosine"] > 0.5
