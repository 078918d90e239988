"""The archetypal example and benchmark scripts run end to end at tiny sizes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(relpath):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_ra_sae_synthetic_tiny(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "examples/train_ra_sae_synthetic.py", "--tiny", "--export",
                          str(tmp_path / "topk")], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "ra_sae" in out and "topk_centroids" in out and "stability across seeds" in out
    assert json.loads((tmp_path / "topk" / "cfg.json").read_text())["architecture"] == "topk"


def test_benchmark_runs_tiny(capsys):
    bench = _load("benchmarks/archetypal_step.py")
    bench.main(["--tiny", "--skip-kmeans", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "ratio twice / once" in out and "D computed 1x per step" in out and "D computed 2x per step" in out


@pytest.mark.parametrize("script", ["examples/train_ra_sae_synthetic.py", "benchmarks/archetypal_step.py"])
def test_scripts_have_help_with_examples(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load(script).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--tiny" in out
