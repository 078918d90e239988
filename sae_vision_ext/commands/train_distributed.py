"""``sae-vision train-distributed``: data-parallel SAE training on cached activations, under torchrun.

Launch: ``torchrun --nproc_per_node N -m sae_vision_ext.cli train-distributed --cache DIR ...``; without
torchrun it trains in one process. The trainer is :mod:`sae_vision_ext.training.distributed`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from sae_vision_ext.commands._common import (
    CONFIG_DEST,
    add_config,
    new_parser,
    one_line_errors,
    parse,
    sae_section,
)
from sae_vision_ext.training.config import option

DESCRIPTION = """Train a SAELens SAE (any registered architecture) on cached activations, data-parallel over
the processes started by torchrun (gloo on CPU, NCCL on GPU). --batch-size and --rows are GLOBAL: the result
equals a single-process run with the same numbers. Rank 0 writes the checkpoints and the final SAE."""

EPILOG = """examples:
  # 2 processes on one machine (gloo on CPU, NCCL when CUDA is available)
  torchrun --standalone --nproc_per_node 2 -m sae_vision_ext.cli train-distributed \\
      --cache runs/cache --architecture topk --sae k=32 --expansion 8 \\
      --batch-size 4096 --rows 10_000_000 --checkpoint-path runs/ddp --checkpoints 4 \\
      --output runs/ddp/final
  # resume after an interruption (same command + --resume)
  torchrun --standalone --nproc_per_node 2 -m sae_vision_ext.cli train-distributed ... \\
      --resume runs/ddp/5000192
  # 2 nodes x 8 GPUs
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
      -m sae_vision_ext.cli train-distributed --cache /data/cache ...
"""


@dataclass
class DistributedTrainConfig:
    """The rows, the SAE, and SAELens's trainer settings (batch and row counts are global)."""

    cached_activations_path: str = option(
        MISSING,
        "--cache",
        help="activation cache (`sae-vision cache`, "
        "or any SAELens cached-activation folder), or a .pt / .npy [N, d] "
        "tensor",
    )
    training_rows: int = option(MISSING, "--rows", help="GLOBAL number of rows to train on")
    hook_name: str | None = option(None, "--hook", help="column of the cache (None: its only column)")
    architecture: str = option("topk", help="registered SAELens / plugin training architecture")
    sae: list[str] = option(
        [],
        nargs="+",
        action="extend",
        required=False,
        metavar="KEY=VALUE",
        help="SAE config fields (values read as YAML), e.g. --sae k=32 "
        "normalize_activations=expected_average_only_in",
    )
    expansion: int | None = option(None, help="d_sae = expansion x d_in (None: 8; or --sae d_sae=N)")
    train_batch_size_rows: int = option(4096, "--batch-size", help="GLOBAL rows per step (k x world size)")
    lr: float = option(3e-4, help="learning rate")
    lr_scheduler_name: str = option("constant", help="SAELens lr scheduler (not constant: decays to lr / 10)")
    lr_decay_steps: int = option(0, help="decay steps")
    dead_feature_window: int = option(1000, help="steps without firing before a latent counts as dead")
    feature_sampling_window: int = option(2000, help="steps between SAELens feature-sparsity logs")
    n_batches_for_norm_estimate: int = option(100, help="batches for input statistics / norm estimates")
    checkpoint_path: str | None = option(None, help="where rank 0 writes SAELens checkpoints (None: none)")
    n_checkpoints: int = option(0, "--checkpoints", help="evenly spaced checkpoints (to --checkpoint-path)")
    resume_from_checkpoint: str | None = option(None, "--resume", help="checkpoint folder to continue from")
    output_path: str | None = option(None, "--output", help="rank 0 saves the final inference SAE here")
    seed: int = option(0, help="init seed (rank 0's init is broadcast anyway)")
    shuffle_seed: int | None = option(None, help="shuffle the rows per epoch (the same order on every rank)")
    dtype: str = option("float32", help="SAE dtype")
    backend: str | None = option(
        None, choices=("gloo", "nccl"), help="None: nccl if CUDA is available, else gloo"
    )
    quiet: bool = option(False, help="no progress bar")


def build_parser(argv: Sequence[str] = ()):
    parser = new_parser("sae-vision train-distributed", DESCRIPTION, EPILOG)
    add_config(parser, DistributedTrainConfig)
    return parser


def sae_config(cfg: DistributedTrainConfig, d_in: int, device: str) -> dict[str, Any]:
    """The training SAE's config: ``--architecture``, the ``--sae`` fields, ``d_sae`` from ``--expansion``."""
    sae, expansion = sae_section(cfg.architecture, cfg.sae, cfg.expansion)
    return {
        "d_in": d_in,
        "d_sae": expansion * d_in,
        "dtype": cfg.dtype,
        "device": device,
        "normalize_activations": "none",
        **sae,
    }


def _load_rows(path: str, hook_name: str | None) -> Any:
    # heavy: imported when the command runs, so --help stays instant
    import numpy as np
    import torch

    from sae_vision_ext.activations.rows import CachedActivationRows

    if not Path(path).exists():
        raise FileNotFoundError(f"no activation cache or row file at {path}")
    if path.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    return CachedActivationRows(path, hook_name)


@one_line_errors("train-distributed")
def main(argv: Sequence[str] | None = None) -> int:
    """Train as the flags say, on this rank of the torchrun job (or alone)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg: DistributedTrainConfig = getattr(parse(build_parser(argv), argv), CONFIG_DEST)
    sae_config(cfg, 1, "cpu")  # flag mistakes stop here, before any process group is formed
    # heavy: imported when the command runs, so --help stays instant
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import TrainingSAE

    from sae_vision_ext.training.distributed import (
        destroy_distributed,
        init_distributed,
        train_on_rows,
        trainer_progress_bar_off,
    )

    context = init_distributed(cfg.backend)
    try:
        rows = _load_rows(cfg.cached_activations_path, cfg.hook_name)
        d_in = int(rows.d_in) if hasattr(rows, "d_in") else int(rows.shape[1])
        device = str(context.device)
        torch.manual_seed(cfg.seed)
        sae = TrainingSAE.from_dict(sae_config(cfg, d_in, device))
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cfg.training_rows,
            train_batch_size_samples=cfg.train_batch_size_rows,
            lr=cfg.lr,
            lr_end=cfg.lr / 10 if cfg.lr_scheduler_name != "constant" else cfg.lr,
            lr_scheduler_name=cfg.lr_scheduler_name,
            lr_decay_steps=cfg.lr_decay_steps,
            device=device,
            dead_feature_window=cfg.dead_feature_window,
            feature_sampling_window=cfg.feature_sampling_window,
            n_checkpoints=cfg.n_checkpoints,
            checkpoint_path=cfg.checkpoint_path,
            save_final_checkpoint=cfg.checkpoint_path is not None,
            n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
        )
        with trainer_progress_bar_off(cfg.quiet):
            trainer = train_on_rows(
                sae,
                trainer_cfg,
                rows,
                context=context,
                shuffle_seed=cfg.shuffle_seed,
                resume_from=cfg.resume_from_checkpoint,
            )
        if context.is_main:
            if cfg.output_path:
                trainer.sae.save_inference_model(cfg.output_path)
            summary = {
                "world_size": context.world_size,
                "steps": trainer.n_training_steps,
                "samples": trainer.n_training_samples,
                "output": cfg.output_path,
            }
            print(json.dumps(summary))
        context.barrier()
    finally:
        destroy_distributed()
    return 0
