"""Data-parallel SAE training under torchrun, checked against single-process training on the same batches.

Run with N processes (gloo on CPU, NCCL on GPUs):

    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --tiny

Every rank reads only its 1/N slice of each global batch from an activation cache (SAELens's cached-activation
format; a synthetic one is written first if --cache does not exist). Rank 0 writes the checkpoints. With
--check, rank 0 then trains the same SAE in a single process on the same global batches and prints the
largest weight difference, which should be at the level of float32 rounding. Also runs without torchrun
(world size 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EPILOG = """examples:
  torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --tiny --check
  torchrun --standalone --nproc_per_node 4 examples/train_distributed.py --cache runs/cache \\
      --d-sae 4096 --k 32 --batch-size 4096 --rows 20_000_000 --output runs/ddp
The same training as a command: sae-vision train-distributed --help
"""


def write_synthetic_cache(path: str, n_rows: int, d_in: int, context_size: int = 16, seed: int = 0) -> None:
    """A SAELens-format cache of sparse-ish synthetic activations (a few directions per row)."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((4 * d_in, d_in)).astype(np.float32)
    codes = rng.exponential(1.0, (n_rows, 4 * d_in)).astype(np.float32) * (
        rng.random((n_rows, 4 * d_in)) < 0.05
    )
    rows = (codes @ directions + 0.05 * rng.standard_normal((n_rows, d_in))).astype(np.float32)
    hook = "blocks.0.hook_resid_post"
    features = datasets.Features({hook: datasets.Array2D(shape=(context_size, d_in), dtype="float32")})
    n = n_rows // context_size * context_size
    dataset = datasets.Dataset.from_dict({hook: rows[:n].reshape(-1, context_size, d_in)}, features=features)
    dataset.save_to_disk(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="activation cache (default: <output>/cache, synthetic)")
    parser.add_argument("--output", default="runs/train_distributed")
    parser.add_argument("--d-in", type=int, default=64, help="width of the synthetic cache")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024, help="GLOBAL batch")
    parser.add_argument("--rows", type=int, default=200_000, help="GLOBAL training rows")
    parser.add_argument("--check", action="store_true", help="compare with single-process training (rank 0)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run: d_in 16, d_sae 64, 20 steps")
    args = parser.parse_args(argv)
    if args.tiny:
        args.d_in, args.d_sae, args.k, args.batch_size, args.rows = 16, 64, 4, 64, 64 * 20

    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import TrainingSAE

    from sae_vision_ext.training.distributed import (
        CachedActivationRows,
        RankBatches,
        destroy_distributed,
        init_distributed,
        train_on_rows,
        trainer_progress_bar_off,
    )

    context = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.world_size))
    cache = args.cache or os.path.join(args.output, "cache")
    if context.is_main and not os.path.exists(cache):
        write_synthetic_cache(
            cache, n_rows=max(4 * args.batch_size, 20_000 if not args.tiny else 2048), d_in=args.d_in
        )
    context.barrier()  # every rank waits for the cache
    rows = CachedActivationRows(cache)

    def make_sae():
        torch.manual_seed(0)
        return TrainingSAE.from_dict(dict(architecture="topk", d_in=rows.d_in, d_sae=args.d_sae, k=args.k,
                                          device=str(context.device)))

    def trainer_cfg(checkpoints: str | None):
        return SAETrainerConfig(total_training_samples=args.rows, train_batch_size_samples=args.batch_size,
                                lr=1e-3, lr_end=1e-3, device=str(context.device), dead_feature_window=50,
                                checkpoint_path=checkpoints, n_checkpoints=2 if checkpoints else 0,
                                save_final_checkpoint=checkpoints is not None)

    started = time.perf_counter()
    trainer = train_on_rows(make_sae(), trainer_cfg(os.path.join(args.output, "checkpoints")), rows,
                            context=context, shuffle_seed=0)
    seconds = time.perf_counter() - started
    if context.is_main:
        summary = {"world_size": context.world_size, "backend": context.backend,
                   "steps": trainer.n_training_steps, "samples": trainer.n_training_samples,
                   "seconds": round(seconds, 2),
                   "checkpoints": sorted(os.listdir(os.path.join(args.output, "checkpoints")))}
        if args.check:
            from sae_lens.training.sae_trainer import SAETrainer

            single = SAETrainer(
                trainer_cfg(None), make_sae(), RankBatches(rows, args.batch_size, shuffle_seed=0)
            )
            with trainer_progress_bar_off():
                single.fit()
            summary["max_abs_weight_difference_vs_single_process"] = max(
                (trainer.sae.state_dict()[k].cpu() - v.cpu()).abs().max().item()
                for k, v in single.sae.state_dict().items()
            )
        print(json.dumps(summary))
    context.barrier()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
