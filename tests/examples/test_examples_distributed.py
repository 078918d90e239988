"""examples/train_distributed.py under a real `torchrun --standalone --nproc_per_node 2` (gloo, loopback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_distributed.py"


def test_torchrun_two_processes_match_single_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLE), "--tiny", "--check", "--output", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["steps"] == 20 and summary["samples"] == 64 * 20
    assert summary["max_abs_weight_difference_vs_single_process"] < 1e-5
    assert any(name.startswith("final_") for name in summary["checkpoints"]) and len(summary["checkpoints"]) == 3


def test_help_has_an_example():
    done = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "torchrun --standalone" in done.stdout
