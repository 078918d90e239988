"""The Matryoshka SAE example runs end to end at tiny size and prints FVU falling with k."""

import re

import pytest
from helpers import run_example


def run(*args, timeout=300):
    return run_example("examples/train_msae_synthetic.py", *args, timeout=timeout)


def test_help_shows_an_example():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout and "--tiny" in result.stdout


def test_tiny_run_saves_an_sae_whose_fvu_falls_with_k(tmp_path):
    """The test regenerates the example's held-out rows, loads the saved SAE and measures FVU at each k
    itself: it falls with k, and the table the example prints agrees."""
    import torch
    from sae_lens import SAE

    import sae_vision_ext  # noqa: F401
    from sae_vision_ext.evals.reconstruction import fvu
    from sae_vision_ext.evals.synthetic import sparse_dictionary_data
    from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAE

    out_dir = tmp_path / "msae"
    result = run("--tiny", "--standardize", "--offset", "2", "--scale", "10", "--save", str(out_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    sae = SAE.load_from_disk(out_dir)
    assert isinstance(sae, MatryoshkaTopKSAE) and sae.cfg.standardize_input
    # --tiny: 4000 rows of 16-d sparse codes over 32 atoms, 3 active; the last tenth held out
    rows = sparse_dictionary_data(4000, 16, 32, 3, seed=0).x * 10 + 2
    test_rows = rows[-400:]
    with torch.no_grad():
        measured = {str(k): fvu(test_rows, sae.decode(sae.encode(test_rows, k=k))) for k in (1, 4, 16, 64)}
        measured["ReLU"] = fvu(test_rows, sae.decode(sae.encode(test_rows)))
    assert measured["1"] > measured["4"] > measured["16"] >= measured["64"] - 1e-4
    assert measured["ReLU"] < 0.15
    printed = dict(re.findall(r"^\s*(\d+|ReLU)\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+", result.stdout, flags=re.M))
    for k, value in measured.items():
        assert float(printed[k]) == pytest.approx(value, abs=2e-4), (k, result.stdout)
