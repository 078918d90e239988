"""The GPU check's CPU rehearsal: ``bash benchmarks/gpu_check.sh`` without a GPU runs every benchmark at tiny
sizes, says that it found no GPU, and leaves a JSON with every benchmark's seconds and ratio."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = {"msae_step", "nested_decode", "rasae_step", "capture", "cached_training"}
# per benchmark at tiny sizes: 1 shape x 2 fractions x 2 dtypes; 2 ratios x 2 dtypes; bf16 only; 2 dtypes
EXPECTED_COUNTS = {"msae_step": 4, "nested_decode": 4, "rasae_step": 4, "capture": 1, "cached_training": 2}


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU: the script runs the real check")
def test_gpu_check_rehearses_every_benchmark_on_a_cpu(tmp_path):
    out = tmp_path / "gpu-results"
    env = {**os.environ, "GPU_CHECK_OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]

    log = (out / "gpu_check.log").read_text()
    assert "no GPU found: CUDA tests not run, benchmarks at tiny size" in log
    assert "CUDA tests:" not in log  # no test run was started
    assert log == done.stdout  # everything printed is in the log

    data = json.loads((out / "gpu_results.json").read_text())
    assert data["finished"] and data["tiny"] and data["device"] == "cpu" and not data["targets_judged"]
    assert data["errors"] == [] and data["skipped"] == []
    assert data["check"]["cuda_tests_exit"] == "none"
    counts = {b: sum(r["benchmark"] == b for r in data["results"]) for b in BENCHMARKS}
    assert counts == EXPECTED_COUNTS
    assert len({r["name"] + r["dtype"] for r in data["results"]}) == len(data["results"])
    for r in data["results"]:
        assert r["benchmark"] in BENCHMARKS and r["device"] == "cpu"
        assert r["dtype"] in ("float32", "bfloat16")
        assert all(_positive(s) for s in r["seconds"].values()), r
        numerator, denominator = r["ratio_of"]
        ratio = r["seconds"][numerator] / r["seconds"][denominator]
        assert _positive(ratio) and ratio == pytest.approx(r["ratio"], rel=1e-9), r
        assert r["passed"] is None  # targets are judged on CUDA only
        assert set(r["tflops"]) == set(r["seconds"]) and all(_positive(t) for t in r["tflops"].values())
        assert _positive(r["dense"]["tflops"])
    assert data["dense_matmul"] and all(_positive(d["tflops"]) for d in data["dense_matmul"])
    rasae = [r for r in data["results"] if r["benchmark"] == "rasae_step"]
    assert all(r["notes"]["d_computations_per_step"] == {"rasae": 1, "reference_d_twice": 2} for r in rasae)
