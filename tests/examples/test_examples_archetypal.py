"""The archetypal example and benchmark scripts run end to end at tiny sizes."""

import json

import pytest
from helpers import load_script, run_example


def test_train_ra_sae_synthetic_tiny(tmp_path):
    res = run_example(
        "examples/train_ra_sae_synthetic.py", "--tiny", "--export", tmp_path / "topk", timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "ra_sae" in out and "topk_centroids" in out and "stability across seeds" in out
    assert json.loads((tmp_path / "topk" / "cfg.json").read_text())["architecture"] == "topk"
    # the test measures the exported SAE itself on the regenerated data (--tiny: 3000 rows, d 16, 24 concepts)
    import re

    import torch
    from sae_lens import SAE

    from sae_vision_ext.evals.reconstruction import fvu
    from sae_vision_ext.evals.synthetic import sparse_dictionary_data

    x = sparse_dictionary_data(3000, 16, 24, 3, noise_std=0.02, seed=1234).x
    exported = SAE.load_from_disk(tmp_path / "topk")
    with torch.no_grad():
        measured = fvu(x, exported.decode(exported.encode(x)))
    assert measured < 0.9  # a plain TopK SAE that reconstructs the data, not a random one
    printed = float(re.search(r"seed 0 ra_sae\s+FVU ([0-9.]+)", out).group(1))
    assert printed == pytest.approx(measured, abs=2e-3)


def test_benchmark_runs_tiny(capsys):
    bench = load_script("benchmarks/archetypal_step.py")
    bench.main(["--tiny", "--skip-kmeans", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "ratio twice / once" in out and "D computed 1x per step" in out and "D computed 2x per step" in out


@pytest.mark.parametrize("script", ["examples/train_ra_sae_synthetic.py", "benchmarks/archetypal_step.py"])
def test_scripts_have_help_with_examples(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--tiny" in out
