"""examples/load_from_hub.py runs end to end against a local HF cache it builds (--tiny)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "load_from_hub.py"


def run(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_and_list(capsys):
    result = run("--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "--tiny" in result.stdout
    spec = importlib.util.spec_from_file_location("load_from_hub", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert (
        "msae-clip-vit-l-14" in out
        and "ra-sae-dinov2-vitb14-reg-32k" in out
        and "ids: centered, not_centered" in out
    )


def test_tiny_loads_by_release_name_from_the_local_cache(tmp_path):
    cache = tmp_path / "cache"
    result = run(
        "--tiny",
        "--cache-dir",
        cache,
        "--img-size",
        "64",
        "--n-images",
        "2",
        "--k",
        "16",
        "--save-dir",
        tmp_path / "saved",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(RANDOM weights (seed 0))" in out  # --tiny: random weights, said in the model line
    assert "SAE msae-clip-vit-b-16/centered: matryoshka_topk d_in=512 d_sae=4096" in out
    assert "hook_image_embed" in out and "ReLU : cosine" in out and "TopK 16: cosine" in out
    assert "astronaut" in out and "top latents" in out
    assert list(cache.glob("models--WolodjaZ--MSAE/snapshots/*/ViT-B_16/centered/*_RW_*.pth"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
