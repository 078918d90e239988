"""The training runner: preflight errors, outputs and metadata, several hooks, cache training, and resuming
after SIGTERM / SIGKILL to the same final SAE."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sae_lens.training.sae_trainer as trainer_module
import torch
from sae_lens import SAE
from vision_training_helpers import TINY_MODEL, shared_tiny, synthetic_images, tiny_config

import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)
from sae_vision_ext.activations.source import ImageActivationSource
from sae_vision_ext.evals.reconstruction import evaluate_sae
from sae_vision_ext.evals.saved import evaluate_sae_folder
from sae_vision_ext.training import runner as runner_module
from sae_vision_ext.training.caching import cache_activations
from sae_vision_ext.training.checkpoints import committed_checkpoints
from sae_vision_ext.training.runner import VisionSAETrainingRunner

TESTS_DIR = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"


def _train(cfg, share_model=True, **kw):
    """Train on the synthetic photos; the tiny model is built once per session (same weights as
    random-init(5))."""
    if share_model and cfg.model_name == TINY_MODEL and cfg.img_size == 32 and "model" not in kw:
        kw["model"], kw["preprocess"] = shared_tiny(cfg.seed)
    return VisionSAETrainingRunner(cfg, images=synthetic_images(), say=lambda m: None, **kw).run()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key], sb[key], rtol=1e-5, atol=1e-6), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; resumed runs of the same config must end at the same SAE."""
    return _train(tiny_config(tmp_path_factory.mktemp("reference")))


# ----------------------------------------------------------------------------------------------- preflight


def test_width_mismatch_fails_before_any_work(tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(runner_module, "SAETrainer", no_training)
    monkeypatch.setattr(runner_module, "build_training_sae", no_training)
    cfg = tiny_config(tmp_path / "out", sae={"architecture": "topk", "d_in": 768, "d_sae": 1024, "k": 8})
    with pytest.raises(ValueError, match=r"d_in = 768.*'blocks.1.hook_resid_post'.*width 192"):
        _train(cfg)
    assert not (tmp_path / "out" / "cfg.json").exists()


def test_unwritable_output_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(runner_module, "load_model_for", no_model)
    with pytest.raises(PermissionError, match="output folder .*a_file/run is not writable"):
        VisionSAETrainingRunner(tiny_config(blocker / "run"), images=synthetic_images()).run()


# ----------------------------------------------------------------------------------------------- outputs


def test_msae_run_writes_a_saelens_folder_with_vision_metadata(tmp_path):
    sae_cfg = {
        "architecture": "matryoshka_topk",
        "d_in": 192,
        "d_sae": 256,
        "k_levels": [8, 32, 256],
        "level_weighting": "reverse",
        "standardize_input": True,
    }
    cfg = tiny_config(
        tmp_path / "run", sae=sae_cfg, eval_holdout_images=2, n_eval_images=8, n_batches_for_norm_estimate=2
    )
    result = _train(
        cfg, share_model=False
    )  # weights "random-init(seed=5)": the evaluator rebuilds them below
    out = tmp_path / "run"
    assert result.sae_paths == {HOOK: out}
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["modality"] == "vision" and meta["model_name"] == TINY_MODEL and meta["hook_name"] == HOOK
    assert meta["token_selection"] == "all" and meta["image_size"] == [32, 32] and meta["context_size"] == 5
    assert meta["weights"] == {"source": "random-init", "seed": 5} and meta["token_layout"]["n_patches"] == 4
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["source"] == "held-out images" and metrics["n_rows"] == 8 * 5
    assert 0 <= metrics["fvu"] < 1 and 0 < metrics["cosine"] <= 1 and metrics["l0"] > 0
    assert 0 <= metrics["dead_fraction"] <= 1 and 0 <= metrics["dead_fraction_train"] <= 1
    assert (out / "sparsity.safetensors").exists() and (out / "runner_cfg.json").exists()
    assert "FVU" in result.summary() and str(out) in result.summary()

    loaded = SAE.load_from_disk(out)
    assert loaded.cfg.architecture() == "matryoshka_topk" and loaded.cfg.metadata.hook_name == HOOK
    # the evaluator rebuilds the same random-init model from the metadata: same rows, same metrics
    images = synthetic_images(4)
    from_folder = evaluate_sae_folder(str(out), dataset=images, n_images=4)
    model, preprocess = shared_tiny(5)

    source = ImageActivationSource(model, preprocess, images, HOOK, "all", shuffle=False)
    direct = evaluate_sae(loaded, (c.rows[HOOK] for c in source.iter_chunks(0, 4)))
    assert from_folder["fvu"] == pytest.approx(direct["fvu"], rel=1e-5)
    assert [row["k"] for row in from_folder["per_k"]] == [8, 32, 256]  # a Matryoshka SAE: every trained level


def test_several_hooks_train_with_multi_sae_trainer_and_resume_after_sigterm(tmp_path, monkeypatch):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    full = _train(tiny_config(tmp_path / "full", hook_name=hooks, training_rows=64 * 8))
    assert set(full.sae_paths) == set(hooks)
    for hook in hooks:
        meta = json.loads((tmp_path / "full" / hook / "cfg.json").read_text())["metadata"]
        assert meta["hook_name"] == hook and full.metrics[hook]["n_rows"] > 0

    original = trainer_module.SAETrainer.step
    calls = {"n": 0}

    def step_then_sigterm(self, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 5:  # 2 SAEs per step: the 5th step
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(trainer_module.SAETrainer, "step", step_then_sigterm)
    cfg = tiny_config(tmp_path / "cut", hook_name=hooks, training_rows=64 * 8)
    stopped = _train(cfg)
    assert stopped.interrupted and stopped.n_training_rows == 5 * 64
    assert stopped.checkpoint == tmp_path / "cut" / "checkpoints" / "320"
    assert all((stopped.checkpoint / h / "sae_weights.safetensors").exists() for h in hooks)
    assert not (tmp_path / "cut" / hooks[0] / "cfg.json").exists()
    monkeypatch.setattr(trainer_module.SAETrainer, "step", original)
    resumed = _train(
        tiny_config(tmp_path / "cut", hook_name=hooks, training_rows=64 * 8, resume_from_checkpoint="latest")
    )
    for hook in hooks:
        _assert_same_weights(full.saes[hook], resumed.saes[hook])


def test_sigterm_writes_a_checkpoint_and_resume_matches(tmp_path, monkeypatch, reference):
    original = trainer_module.SAETrainer.step
    calls = {"n": 0}

    def step_then_sigterm(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(trainer_module.SAETrainer, "step", step_then_sigterm)
    stopped = _train(tiny_config(tmp_path / "run", n_checkpoints=2))
    assert stopped.interrupted and stopped.checkpoint.name == str(7 * 64)
    state = json.loads((stopped.checkpoint / "vision_state.json").read_text())
    assert state["n_training_steps"] == 7 and state["data_position"]["kind"] == "images"
    monkeypatch.setattr(trainer_module.SAETrainer, "step", original)
    with pytest.raises(ValueError, match="differs in: train_batch_size_rows"):
        _train(tiny_config(tmp_path / "run", train_batch_size_rows=32, resume_from_checkpoint="latest"))
    resumed = _train(tiny_config(tmp_path / "run", n_checkpoints=2, resume_from_checkpoint="latest"))
    assert not resumed.interrupted and resumed.n_training_rows == reference.n_training_rows
    _assert_same_weights(reference.sae, resumed.sae)
    # checkpoints at the evenly spaced thresholds, plus the one the signal wrote
    assert [p.name for p in committed_checkpoints(tmp_path / "run" / "checkpoints")] == ["448", "576", "1088"]


KILL_SCRIPT = """
import sys
import time

from sae_lens.training.sae_trainer import SAETrainer
from vision_training_helpers import synthetic_images, tiny_config

from sae_vision_ext.training.runner import VisionSAETrainingRunner

original = SAETrainer.step


def slow_step(self, batch):  # slow enough that the test can kill it between checkpoints
    time.sleep(0.15)
    return original(self, batch)


SAETrainer.step = slow_step
VisionSAETrainingRunner(tiny_config(sys.argv[1], n_checkpoints=3), images=synthetic_images()).run()
"""


def test_sigkill_mid_training_then_resume_gives_the_same_sae(tmp_path, reference):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, str(script), str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while not committed_checkpoints(out / "checkpoints"):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "cfg.json").exists()  # killed before the end
    found = committed_checkpoints(out / "checkpoints")
    assert found and int(found[-1].name) < reference.n_training_rows
    resumed = _train(tiny_config(out, n_checkpoints=3, resume_from_checkpoint="latest"))
    assert resumed.n_training_rows == reference.n_training_rows
    _assert_same_weights(reference.sae, resumed.sae)


# ----------------------------------------------------------------------------------------------- cache traini


def test_training_from_a_cache_needs_no_model(tmp_path, monkeypatch):
    model, preprocess = shared_tiny(5)
    cache_cfg = tiny_config(
        tmp_path / "unused", sae=None, hook_name=HOOK, token_selection="patches", images_per_shard=8
    )
    for name, n in (("train_cache", 48), ("eval_cache", 8)):
        cache_activations(
            cache_cfg,
            tmp_path / name,
            n,
            images=synthetic_images(),
            model=model,
            preprocess=preprocess,
            progress=False,
            say=lambda m: None,
        )

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner_module, "load_model_for", no_model)
    cfg = tiny_config(
        tmp_path / "run",
        token_selection="patches",
        use_cached_activations=True,
        cached_activations_path=str(tmp_path / "train_cache"),
        eval_dataset_path=str(tmp_path / "eval_cache"),
        training_rows=64 * 6,
        n_eval_images=8,
    )
    result = VisionSAETrainingRunner(cfg, say=lambda m: None).run()
    assert result.n_training_rows == 384 and result.metrics[HOOK]["source"] == "held-out cache"
    assert result.metrics[HOOK]["n_rows"] == 32
    meta = json.loads((tmp_path / "run" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == TINY_MODEL and meta["context_size"] == 4 and meta["image_size"] == [32, 32]
    wrong = tiny_config(
        tmp_path / "run2",
        token_selection="patches",
        use_cached_activations=True,
        cached_activations_path=str(tmp_path / "train_cache"),
        sae={"architecture": "standard", "d_in": 100, "d_sae": 200},
    )
    with pytest.raises(ValueError, match="d_in = 100.*width 192"):
        VisionSAETrainingRunner(wrong).run()


def test_evaluator_runs_inside_saelens_when_wandb_is_on(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    calls = []
    original = runner_module.VisionSAEEvaluator.__call__

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(runner_module.VisionSAEEvaluator, "__call__", counting)
    logger = {"log_to_wandb": True, "wandb_log_frequency": 1, "eval_every_n_wandb_logs": 2}
    _train(
        tiny_config(
            tmp_path / "run", training_rows=64 * 4, eval_holdout_images=2, n_eval_images=4, logger=logger
        )
    )
    assert len(calls) == 2  # SAETrainer called it at steps 2 and 4
    assert {"eval/fvu", "eval/cosine", "eval/l0", "eval/dead_fraction"} <= set(calls[0])
