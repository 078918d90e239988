"""examples/train_distributed.py under a real `torchrun --standalone --nproc_per_node 2` (gloo, loopback): the
SAE it writes is compared with one this test trains in a single process on the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from sae_vision_ext.activations.rows import CachedActivationRows
from sae_vision_ext.training.distributed import RankBatches, trainer_progress_bar_off

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_distributed.py"
# the example's --tiny run: d_in 16, d_sae 64, k 4, global batch 64, 20 steps, lr 1e-3, data order seed 0
D_SAE, K, BATCH, STEPS = 64, 4, 64, 20


def _single_process_sae(cache: Path) -> TrainingSAE:
    """The same SAE trained alone on the same global batches (the example's settings, not its code)."""
    rows = CachedActivationRows(cache)
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(dict(architecture="topk", d_in=rows.d_in, d_sae=D_SAE, k=K, device="cpu"))
    cfg = SAETrainerConfig(
        total_training_samples=BATCH * STEPS,
        train_batch_size_samples=BATCH,
        lr=1e-3,
        lr_end=1e-3,
        device="cpu",
        dead_feature_window=50,
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
    )
    with trainer_progress_bar_off():
        return SAETrainer(cfg, sae, RankBatches(rows, BATCH, shuffle_seed=0)).fit()


@pytest.mark.slow  # ~50 s under torchrun; the default run keeps one torchrun test (training)
def test_torchrun_two_processes_match_single_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(EXAMPLE),
        "--tiny",
        "--output",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"

    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    final = tmp_path / "checkpoints" / f"final_{BATCH * STEPS}"
    assert final.name in checkpoints and len(checkpoints) == 3  # two intermediate ones and the final one
    state = torch.load(final / "trainer_state.pt", weights_only=False)
    assert state["n_training_samples"] == BATCH * STEPS and state["n_training_steps"] == STEPS

    distributed = TrainingSAE.from_dict(dict(architecture="topk", d_in=16, d_sae=D_SAE, k=K, device="cpu"))
    distributed.load_weights_from_checkpoint(final)
    single = _single_process_sae(tmp_path / "cache").state_dict()
    assert single.keys() == distributed.state_dict().keys()
    for name, value in distributed.state_dict().items():
        assert not torch.equal(value, _untrained(name)), f"{name} was not trained"
        torch.testing.assert_close(value, single[name], rtol=0, atol=1e-5, msg=name)


def _untrained(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    return TrainingSAE.from_dict(
        dict(architecture="topk", d_in=16, d_sae=D_SAE, k=K, device="cpu")
    ).state_dict()[name]


def test_help_has_an_example():
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "torchrun --standalone" in done.stdout
