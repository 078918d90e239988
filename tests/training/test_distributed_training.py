"""Data-parallel training over 2 gloo processes (loopback) equals single-process training with the same global
batch."""

import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)
from sae_vision_ext.commands.train_distributed import DistributedTrainConfig, main, sae_config
from sae_vision_ext.errors import UserError
from sae_vision_ext.training.distributed import (
    CachedActivationRows,
    DistributedContext,
    DistributedSAETrainer,
    RankBatches,
    RankSlicedBatches,
    rank_slice,
    spawn_local,
    train_on_rows,
)

D_IN, D_SAE, K, BATCH, STEPS = 16, 64, 4, 32, 40


def _rows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH * 25, D_IN, generator=generator) * 3 + 1  # 25 batches per epoch: 40 steps wrap


def _sae(architecture="topk"):
    torch.manual_seed(0)
    return TrainingSAE.from_dict(
        dict(
            architecture=architecture,
            d_in=D_IN,
            d_sae=D_SAE,
            k=K,
            normalize_activations="expected_average_only_in",
        )
    )


def _msae():
    torch.manual_seed(0)
    return TrainingSAE.from_dict(
        dict(
            architecture="matryoshka_topk",
            d_in=D_IN,
            d_sae=D_SAE,
            k_levels=[4, 16, D_SAE],
            level_weighting="reverse",
        )
    )


def _trainer_cfg(checkpoint_dir=None, steps=STEPS, n_checkpoints=2):
    return SAETrainerConfig(
        total_training_samples=BATCH * steps,
        train_batch_size_samples=BATCH,
        lr=3e-3,
        lr_end=3e-4,
        lr_scheduler_name="cosineannealing",
        dead_feature_window=3,
        feature_sampling_window=1000,
        n_batches_for_norm_estimate=4,
        checkpoint_path=checkpoint_dir,
        n_checkpoints=n_checkpoints,
        save_final_checkpoint=checkpoint_dir is not None,
    )


def _snapshot(trainer) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in trainer.sae.state_dict().items()},
        "act_freq_scores": trainer.act_freq_scores.clone(),
        "since_fired": trainer.n_forward_passes_since_fired.clone(),
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "samples": trainer.n_training_samples,
        "steps": trainer.n_training_steps,
        "scaling_factor": trainer.activation_scaler.scaling_factor,
    }


def _worker(context: DistributedContext, out: str) -> None:
    torch.set_num_threads(1)
    rows = _rows()
    log = os.path.join(out, f"saved-by-rank{context.rank}.txt")

    def record(checkpoint_path):
        with open(log, "a") as f:
            f.write(f"{checkpoint_path}\n")

    full = train_on_rows(
        _sae(),
        _trainer_cfg(os.path.join(out, "ddp")),
        rows,
        context=context,
        shuffle_seed=5,
        save_checkpoint_fn=record,
    )
    context.barrier()
    first = sorted((p for p in os.listdir(os.path.join(out, "ddp")) if p.isdigit()), key=int)[0]
    resumed = train_on_rows(
        _sae(),
        _trainer_cfg(os.path.join(out, "resumed")),
        rows,
        context=context,
        shuffle_seed=5,
        resume_from=os.path.join(out, "ddp", first),
    )
    batchtopk = train_on_rows(_sae("batchtopk"), _trainer_cfg(steps=10), rows, context=context)

    def interrupted_on_rank1():  # e.g. a SIGTERM handler in the data provider, on one rank only
        batches = RankBatches(rows, BATCH, context.rank, context.world_size)
        for i in range(100):
            if context.rank == 1 and i == 6:
                raise KeyboardInterrupt
            yield next(batches)

    stopping = DistributedSAETrainer(_trainer_cfg(n_checkpoints=0), _sae(), iter(()), context=context)
    stopping.data_provider = (
        interrupted_on_rank1()
    )  # assigned later, as a runner that wraps its provider does
    try:
        stopping.fit()
        stop = "finished"
    except (KeyboardInterrupt, RuntimeError) as error:
        stop = type(error).__name__
    msae = train_on_rows(
        _msae(), _trainer_cfg(steps=15, n_checkpoints=0), rows, context=context, shuffle_seed=2
    )
    torch.save(
        {
            "full": _snapshot(full),
            "resumed": _snapshot(resumed),
            "first": first,
            "msae": _snapshot(msae),
            "stop": (stop, stopping.n_training_steps),
            "batchtopk_threshold": batchtopk.sae.topk_threshold.item()
            if hasattr(batchtopk.sae, "topk_threshold")
            else batchtopk.sae.state_dict().get("threshold"),
        },
        os.path.join(out, f"rank{context.rank}.pt"),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn_local(_worker, 2, (str(out),), backend="gloo", start_method="fork")

    torch.set_num_threads(1)
    single = SAETrainer(
        _trainer_cfg(str(out / "single")), _sae(), RankBatches(_rows(), BATCH, shuffle_seed=5)
    )
    single.fit()
    msae = SAETrainer(
        _trainer_cfg(steps=15, n_checkpoints=0), _msae(), RankBatches(_rows(), BATCH, shuffle_seed=2)
    )
    msae.fit()
    return {
        "msae": _snapshot(msae),
        "out": out,
        "single": _snapshot(single),
        "rank0": torch.load(out / "rank0.pt", weights_only=False),
        "rank1": torch.load(out / "rank1.pt", weights_only=False),
    }


def test_two_gloo_ranks_equal_single_process_training(runs):
    single, ddp = runs["single"], runs["rank0"]["full"]
    assert ddp["steps"] == single["steps"] == STEPS and ddp["samples"] == single["samples"] == BATCH * STEPS
    assert (
        ddp["scaling_factor"] is None and single["scaling_factor"] is None
    )  # folded into the weights at the end
    for name, expected in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], expected, rtol=1e-4, atol=1e-5, msg=name)
    # the statistics SAETrainer keeps per batch are global: firing counts and the dead-latent mask (AuxK loss)
    assert torch.equal(ddp["act_freq_scores"], single["act_freq_scores"])
    assert torch.equal(ddp["since_fired"], single["since_fired"])
    assert ddp["n_frac_active_samples"] == single["n_frac_active_samples"]
    assert (single["since_fired"] > 3).any(), "the test should exercise the AuxK loss on dead latents"
    # and the two ranks hold the same model
    for name, tensor in ddp["state"].items():
        assert torch.equal(tensor, runs["rank1"]["full"]["state"][name]), name


def test_the_plugin_matryoshka_sae_trains_the_same_distributed(runs):
    """Nested-k MSAE (unit-norm decoder parametrisation, reverse weighting): a mean-over-rows loss, so
    exact."""
    single, ddp = runs["msae"], runs["rank0"]["msae"]
    assert ddp["steps"] == single["steps"] == 15
    for name, expected in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], expected, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(ddp["act_freq_scores"], single["act_freq_scores"])


def test_checkpoints_are_written_once_by_rank_zero_with_single_process_names(runs):
    out = runs["out"]
    assert sorted(os.listdir(out / "ddp")) == sorted(os.listdir(out / "single"))
    assert not (out / "saved-by-rank1.txt").exists()
    saved = (out / "saved-by-rank0.txt").read_text().split()
    assert sorted(os.path.basename(p) for p in saved) == sorted(os.listdir(out / "ddp"))
    final = next(p for p in os.listdir(out / "ddp") if p.startswith("final_"))
    assert {"cfg.json", "sae_weights.safetensors", "trainer_state.pt"} <= set(os.listdir(out / "ddp" / final))


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(runs):
    full, resumed = runs["rank0"]["full"], runs["rank0"]["resumed"]
    assert resumed["steps"] == full["steps"] and resumed["samples"] == full["samples"]
    for name, expected in full["state"].items():
        torch.testing.assert_close(resumed["state"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    # thresholds already passed are not written again
    later = sorted(os.listdir(runs["out"] / "resumed"))
    assert runs["rank0"]["first"] not in later and any(p.startswith("final_") for p in later)


def test_batchtopk_threshold_is_kept_identical_across_ranks(runs):
    a, b = runs["rank0"]["batchtopk_threshold"], runs["rank1"]["batchtopk_threshold"]
    assert a is not None and torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_a_stop_on_one_rank_stops_all_ranks_at_the_same_step(runs):
    # 4 batches go to the norm estimate, then steps 0 and 1; rank 1 stops while fetching the 7th batch
    assert runs["rank1"]["stop"] == ("KeyboardInterrupt", 2)
    assert runs["rank0"]["stop"] == ("StoppedOnAnotherRank", 2)


def test_rank_batches_partition_each_global_batch():
    rows = torch.arange(40 * 2, dtype=torch.float32).reshape(40, 2)
    for shuffle_seed in (None, 3):
        single = RankBatches(rows, 8, shuffle_seed=shuffle_seed)
        parts = [RankBatches(rows, 8, r, 4, shuffle_seed=shuffle_seed) for r in range(4)]
        for _ in range(12):  # 5 batches per epoch: crosses two epoch boundaries
            assert torch.equal(torch.cat([next(p) for p in parts]), next(single))
    resumed, fresh = RankBatches(rows, 8, 1, 2, start_batch=7), RankBatches(rows, 8, 1, 2)
    for _ in range(7):
        next(fresh)
    assert torch.equal(next(resumed), next(fresh))
    sliced = RankSlicedBatches(RankBatches(rows, 8, shuffle_seed=3), 2, 4)
    assert torch.equal(next(sliced), next(RankBatches(rows, 8, 2, 4, shuffle_seed=3)))
    with pytest.raises(ValueError, match="not divisible"):
        rank_slice(10, 0, 4)


def test_cached_activation_rows_random_access(tmp_path):
    flat = np.arange(12 * 5 * 3, dtype=np.float32).reshape(-1, 3)
    features = datasets.Features(
        {"blocks.0.hook_resid_post": datasets.Array2D(shape=(5, 3), dtype="float32")}
    )
    datasets.Dataset.from_dict(
        {"blocks.0.hook_resid_post": flat.reshape(12, 5, 3)}, features=features
    ).save_to_disk(str(tmp_path / "cache"))
    rows = CachedActivationRows(tmp_path / "cache")
    assert len(rows) == 60 and rows.d_in == 3
    assert torch.equal(rows[7:23], torch.from_numpy(flat[7:23]))
    index = torch.tensor([59, 0, 13, 14, 13, 31])
    assert torch.equal(rows[index], torch.from_numpy(flat[index.numpy()]))
    assert torch.equal(next(RankBatches(rows, 20, 1, 2)), torch.from_numpy(flat[10:20]))


def test_cli_help_lists_torchrun_usage(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "torchrun" in text and "-m sae_vision_ext.cli train-distributed" in text
    for flag in ("--cache", "--rows", "--sae", "--expansion", "--hook", "--checkpoint-path", "--checkpoints"):
        assert flag in text
    assert "--activations" not in text and "--training-samples" not in text


def test_cli_trains_from_a_cache_and_saves_a_loadable_sae(tmp_path, capsys):
    rows = _rows().numpy()
    hook = "blocks.3.hook_resid_post"
    features = datasets.Features({hook: datasets.Array2D(shape=(8, D_IN), dtype="float32")})
    datasets.Dataset.from_dict({hook: rows.reshape(-1, 8, D_IN)}, features=features).save_to_disk(
        str(tmp_path / "cache")
    )
    code = main(
        (
            f"--cache {tmp_path / 'cache'} --sae d_sae=32 k=4 --batch-size 32 --rows 320 "
            f"--checkpoint-path {tmp_path / 'ckpt'} --output {tmp_path / 'sae'} --sae "
            "aux_loss_coefficient=0.5 --quiet"
        ).split()
    )
    assert code == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1]
    assert '"steps": 10' in summary and '"world_size": 1' in summary
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    assert sae.cfg.d_in == D_IN and sae.cfg.d_sae == 32 and sae.cfg.k == 4
    assert any(p.name.startswith("final_") for p in (tmp_path / "ckpt").iterdir())


def test_cli_sae_size_flags():
    cfg = DistributedTrainConfig(cached_activations_path="x", training_rows=10, sae=["k=32"], expansion=4)
    assert sae_config(cfg, 16, "cpu") | {"k": 32} == sae_config(cfg, 16, "cpu")
    assert sae_config(cfg, 16, "cpu")["d_sae"] == 64 and cfg.train_batch_size_rows == 4096
    assert sae_config(DistributedTrainConfig("x", 10), 16, "cpu")["d_sae"] == 8 * 16
    with pytest.raises(UserError, match="--expansion must be a positive integer"):
        sae_config(DistributedTrainConfig("x", 10, expansion=0), 16, "cpu")
    with pytest.raises(UserError, match="not both"):
        sae_config(DistributedTrainConfig("x", 10, expansion=2, sae=["d_sae=8"]), 16, "cpu")


@pytest.mark.slow  # ~30 s; the in-process two-rank gloo test covers the training path in the default suite
def test_cli_under_torchrun_trains_on_two_processes(tmp_path):
    """``torchrun --nproc_per_node 2 -m sae_vision_ext.cli train-distributed ...`` (gloo, loopback)."""

    hook = "blocks.3.hook_resid_post"
    features = datasets.Features({hook: datasets.Array2D(shape=(8, D_IN), dtype="float32")})
    datasets.Dataset.from_dict({hook: _rows().numpy().reshape(-1, 8, D_IN)}, features=features).save_to_disk(
        str(tmp_path / "cache")
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sae_vision_ext.cli",
        "train-distributed",
        "--cache",
        str(tmp_path / "cache"),
        "--sae",
        "k=4",
        "--expansion",
        "4",
        "--batch-size",
        "32",
        "--rows",
        "320",
        "--output",
        str(tmp_path / "sae"),
        "--quiet",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # printed by rank 0 only
    assert '"world_size": 2' in summaries[0] and '"steps": 10' in summaries[0]
    assert (tmp_path / "sae" / "cfg.json").exists()
