"""Resume is bit-exact (issue 14): a run interrupted at step N and resumed ends at exactly the same SAE (every
tensor ``torch.equal``) as the uninterrupted run, for TopK, Matryoshka TopK and RA-SAE."""

from __future__ import annotations

import os
import signal

import pytest
import sae_lens.training.sae_trainer as trainer_module
import torch
from vision_training_helpers import shared_tiny, synthetic_images, tiny_config

import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)
from sae_vision_ext.training.candidates import Candidates
from sae_vision_ext.training.runner import VisionSAETrainingRunner

ROWS = 64 * 12


def sae_section(name: str, tmp_path) -> dict:
    if name == "topk":
        return {"architecture": "topk", "d_in": 192, "d_sae": 384, "k": 8}
    if name == "matryoshka_topk":
        return {
            "architecture": "matryoshka_topk",
            "d_in": 192,
            "d_sae": 384,
            "k_levels": [8, 64, 384],
            "level_weighting": "reverse",
            "standardize_input": True,
        }

    path = tmp_path / "candidates.safetensors"
    if not path.exists():
        Candidates.from_points(torch.randn(96, 192, generator=torch.Generator().manual_seed(1))).save(path)
    return {"architecture": "ra_sae", "d_in": 192, "d_sae": 96, "k": 8, "candidates_path": str(path)}


def train(cfg):
    model, preprocess = shared_tiny(cfg.seed)
    runner = VisionSAETrainingRunner(
        cfg, images=synthetic_images(), model=model, preprocess=preprocess, say=lambda m: None
    )
    return runner.run()


def interrupt_at_step(monkeypatch, step: int) -> None:
    """SIGTERM during step ``step`` (1-based): the runner finishes it, writes a checkpoint and returns."""

    original = trainer_module.SAETrainer.step
    calls = {"n": 0}

    def step_then_sigterm(self, batch):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(trainer_module.SAETrainer, "step", step_then_sigterm)


@pytest.mark.parametrize("architecture", ["topk", "matryoshka_topk", "ra_sae"])
def test_resume_after_interruption_is_bit_exact(tmp_path, monkeypatch, architecture, device):
    sae = sae_section(architecture, tmp_path)
    # the SAE trains on the device; the shared tiny vision model stays on the CPU
    settings = dict(sae=sae, training_rows=ROWS, n_checkpoints=2, device=str(device), model_device="cpu")
    reference = train(tiny_config(tmp_path / "reference", **settings))
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 5)
        stopped = train(tiny_config(tmp_path / "run", **settings))
    assert stopped.interrupted and stopped.n_training_rows == 5 * 64
    resumed = train(tiny_config(tmp_path / "run", **settings, resume_from_checkpoint="latest"))
    assert next(resumed.sae.parameters()).device.type == device.type
    assert resumed.n_training_rows == reference.n_training_rows == ROWS
    expected, got = reference.sae.state_dict(), resumed.sae.state_dict()
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"{architecture}: resumed run differs from the uninterrupted one in {different}"
