"""The Matryoshka SAE example runs end to end at tiny size and prints FVU falling with k."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_msae_synthetic.py"


def run(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_help_shows_an_example():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout and "--tiny" in result.stdout


def test_tiny_run_prints_fvu_per_k_and_saves_a_loadable_sae(tmp_path):
    out_dir = tmp_path / "msae"
    result = run("--tiny", "--standardize", "--offset", "2", "--scale", "10", "--save", str(out_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = dict(re.findall(r"^\s*(\d+|ReLU)\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+", result.stdout, flags=re.M))
    fvu = {k: float(v) for k, v in rows.items()}
    assert {"1", "4", "16", "64", "ReLU"} <= set(fvu), result.stdout
    assert fvu["1"] > fvu["4"] > fvu["16"] >= fvu["64"] - 1e-4
    assert fvu["ReLU"] < 0.15, result.stdout

    import torch
    from sae_lens import SAE

    import sae_vision_ext  # noqa: F401
    from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAE

    sae = SAE.load_from_disk(out_dir)
    assert isinstance(sae, MatryoshkaTopKSAE) and sae.cfg.standardize_input
    x = torch.randn(4, 16) * 10 + 2
    assert sae(x).shape == x.shape
