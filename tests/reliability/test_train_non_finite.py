"""Non-finite values never reach a saved SAE (issue 14): NaN / inf / 1e30 input rows are skipped and counted
(the summary says how many); a step that still gives a non-finite loss or weight stops the run with a clear
error, keeps the last good checkpoint as the newest one and saves no SAE."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens.saes.topk_sae import TopKTrainingSAE
from safetensors.torch import load_file
from vision_training_helpers import shared_tiny, synthetic_images, tiny_config

from sae_vision_ext.training import runner as runner_module
from sae_vision_ext.training.checkpoints import committed_checkpoints
from sae_vision_ext.training.progress import NonFiniteTrainingError
from sae_vision_ext.training.runner import VisionSAETrainingRunner

ROWS = 64 * 12
MSAE = {"architecture": "matryoshka_topk", "d_in": 192, "d_sae": 384, "k_levels": [8, 64, 384]}
TOPK = {"architecture": "topk", "d_in": 192, "d_sae": 384, "k": 8}


def train(cfg):
    model, preprocess = shared_tiny(cfg.seed)
    return VisionSAETrainingRunner(
        cfg, images=synthetic_images(), model=model, preprocess=preprocess, say=lambda m: None
    ).run()


class Poisoned:
    """The store, with a NaN, an inf and a 1e30 value put into three rows of three batches."""

    def __init__(self, store):
        self.store, self.n = store, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def __next__(self):
        batch, self.n = next(self.store).clone(), self.n + 1
        for at, value in ((2, float("nan")), (5, float("inf")), (9, 1e30)):
            if self.n == at:
                batch[self.n, 3] = value
        return batch


@pytest.mark.parametrize("sae", [TOPK, MSAE], ids=["topk", "matryoshka_topk"])
def test_train_skips_and_counts_non_finite_rows(tmp_path, monkeypatch, sae):
    make_store = runner_module.VisionSAETrainingRunner._make_store
    monkeypatch.setattr(
        runner_module.VisionSAETrainingRunner, "_make_store", lambda self, *a: Poisoned(make_store(self, *a))
    )
    result = train(tiny_config(tmp_path / "run", sae=sae, training_rows=ROWS))
    assert result.n_training_rows == ROWS and result.counters["non_finite_rows"] == 3
    assert all(torch.isfinite(t).all() for t in result.sae.state_dict().values())
    assert math.isfinite(result.metrics["blocks.1.hook_resid_post"]["fvu"])
    assert "non-finite input rows skipped: 3" in result.summary()
    assert (tmp_path / "run" / "sae_weights.safetensors").exists()


def test_train_stops_at_a_non_finite_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original, calls = TopKTrainingSAE.training_forward_pass, {"n": 0}

    def nan_at_step_7(self, step_input):
        calls["n"] += 1
        output = original(self, step_input)
        if calls["n"] == 7:  # the step that reaches the second checkpoint (448 rows)
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(TopKTrainingSAE, "training_forward_pass", nan_at_step_7)
    out = tmp_path / "run"
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"training stopped at 448 rows: a step gave the SAE for "
        r"blocks.1.hook_resid_post a non-finite loss or weight .*the SAE was not saved and the last "
        r"good checkpoint is .*checkpoints/256\. Lower --lr",
    ):
        train(tiny_config(out, training_rows=ROWS, n_checkpoints=3))
    assert [p.name for p in committed_checkpoints(out / "checkpoints")] == ["256"]

    assert all(
        torch.isfinite(t).all()
        for t in load_file(out / "checkpoints" / "256" / "sae_weights.safetensors").values()
    )
    assert not (out / "sae_weights.safetensors").exists()
