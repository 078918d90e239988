"""The analysis examples run end to end at tiny scale (subprocesses, as a user would run them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script, *args, env_extra=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.parametrize("script", ["steer.py", "name_concepts.py", "dashboard.py"])
def test_help_has_an_example(script):
    out = _run(script, "--help")
    assert "examples:" in out and f"examples/{script}" in out


def test_steer_example_tiny():
    out = _run("steer.py", "--tiny", "--strengths", "0,1")
    assert "changes the output by at most" in out
    lines = [line for line in out.splitlines() if line.strip().startswith(("0.00", "1.00"))]
    assert len(lines) == 2
    p_dog = [float(line.split("|")[1]) for line in lines]
    assert p_dog[1] > p_dog[0]  # adding the 'dog' text direction raises p(dog)


def test_name_concepts_example_tiny(tmp_path):
    out = _run("name_concepts.py", "--tiny", "--n-latents", "6", env_extra={"SAE_VISION_CACHE": str(tmp_path)})
    assert "concept naming recovered 6/6 planted words" in out
    assert list(tmp_path.glob("text_embeddings/*.safetensors"))


def test_dashboard_example_tiny(tmp_path):
    out = _run("dashboard.py", "--tiny", "--out", str(tmp_path), "--check")
    assert "status=ok, cards=12, console messages=0" in out
    assert (tmp_path / "dashboard.html").exists() and (tmp_path / "fvu_vs_l0.png").exists()
    assert (tmp_path / "dashboard.png").exists()
