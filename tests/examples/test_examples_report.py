import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "compare_saes.py"


def _run(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def test_compare_saes_help_has_an_example(capsys):
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("compare_saes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # in-process: the subprocess import of SAELens alone takes seconds
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--tiny" in out and "--data" in out


def test_compare_saes_tiny_writes_a_report(tmp_path):
    result = _run("--output", str(tmp_path), "--tiny", "--families", "topk", "msae_rw", "--topk-ks", "4",
                  "--stability-seeds", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| method |" in result.stdout and "msae_rw" in result.stdout
    text = (tmp_path / "results.md").read_text()
    assert "## Data" in text and "## Weights" in text and "Stability" not in text
    assert (tmp_path / "fvu_vs_l0.png").exists() and (tmp_path / "saes" / "msae_rw" / "cfg.json").exists()
