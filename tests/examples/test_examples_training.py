"""The training examples run end to end at tiny sizes (``--tiny``)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert exit_info.value.code == 0


def test_train_vision_sae_example(tmp_path, monkeypatch, capsys):
    run_example("train_vision_sae.py", ["--tiny", "--output", str(tmp_path / "sae")], monkeypatch)
    out = capsys.readouterr().out
    assert "FVU" in out and "loaded MatryoshkaTopKSAE" in out and "k=8" in out


def test_cache_activations_example(tmp_path, monkeypatch, capsys):
    run_example("cache_activations.py", ["--tiny", "--output", str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    assert "192 rows x {'blocks.1.hook_resid_post': 192}" in out  # 48 views x 4 patches
    assert "SAELens ActivationsStore batch: (64, 192)" in out and "trained on" in out


def test_examples_have_help(monkeypatch, capsys):
    for name in ("train_vision_sae.py", "cache_activations.py"):
        run_example(name, ["--help"], monkeypatch)
        assert "examples:" in capsys.readouterr().out
