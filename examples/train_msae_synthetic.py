"""Train the Matryoshka SAE (nested TopK, ``matryoshka_topk``) with SAELens's SAETrainer on synthetic sparse
data and print, on held-out rows, the reconstruction quality at every k (one model, k chosen at inference).

Each row is the sum of a few random unit "ground-truth" features with positive magnitudes, plus optional
offset and scale (so input standardisation has something to do), so a good SAE reaches a low FVU with a
small k.
"""

from __future__ import annotations

import argparse
import time

EPILOG = """examples:
  python examples/train_msae_synthetic.py --tiny
  python examples/train_msae_synthetic.py --d-in 64 --d-sae 512 --steps 2000 --level-weighting reverse
  python examples/train_msae_synthetic.py --k-levels 4 8 16 512 --loss nmse --standardize \\
      --offset 3 --scale 20
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long run (d_in 16, d_sae 64, 150 steps)")
    parser.add_argument("--d-in", type=int, default=32)
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--n-features", type=int, default=128, help="ground-truth features")
    parser.add_argument("--active", type=int, default=3, help="ground-truth features per row")
    parser.add_argument("--k-levels", type=int, nargs="+", default=None, help="default: 1 2 4 8 16 d_sae")
    parser.add_argument("--level-weighting", default="reverse", help="uniform | reverse | '1,2,3,...'")
    parser.add_argument("--loss", choices=["mse", "nmse"], default="mse")
    parser.add_argument("--standardize", action="store_true", help="keep (x - mu) * s inside the SAE")
    parser.add_argument("--offset", type=float, default=0.0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save", default=None, help="folder to save the trained inference SAE (SAELens format)"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.d_in, args.d_sae, args.n_features, args.steps, args.rows = 16, 64, 32, 150, 4000

    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    import sae_vision_ext  # noqa: F401  (registers matryoshka_topk)
    from sae_vision_ext.evals.reconstruction import cosine_similarity, fraction_zero, fvu, l0
    from sae_vision_ext.evals.synthetic import sparse_dictionary_data
    from sae_vision_ext.evals.train import shuffled_batches
    from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKTrainingSAE, MatryoshkaTopKTrainingSAEConfig

    torch.manual_seed(args.seed)
    synthetic = sparse_dictionary_data(args.rows, args.d_in, args.n_features, args.active, seed=args.seed)
    data = synthetic.x * args.scale + args.offset
    n_test = max(args.rows // 10, 1)
    train_rows, test_rows = data[:-n_test], data[-n_test:]
    k_levels = args.k_levels or [k for k in (1, 2, 4, 8, 16) if k < args.d_sae] + [args.d_sae]
    cfg = MatryoshkaTopKTrainingSAEConfig(
        d_in=args.d_in,
        d_sae=args.d_sae,
        k_levels=k_levels,
        level_weighting=args.level_weighting,
        reconstruction_loss=args.loss,
        standardize_input=args.standardize,
    )
    sae = MatryoshkaTopKTrainingSAE(cfg)
    if args.standardize:
        mean, scale = sae.fit_input_standardization(shuffled_batches(train_rows, 1024, seed=1), n_batches=8)
        print(f"input standardisation: |mu| = {mean.norm():.3f}, s = {scale:.4g} ({cfg.standardize_scale})")
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr,
    )
    print(
        f"training matryoshka_topk: d_in={args.d_in} d_sae={args.d_sae} k_levels={cfg.k_levels} "
        f"weighting={cfg.level_weighting} loss={cfg.reconstruction_loss} "
        f"steps={args.steps} batch={args.batch_size}"
    )
    start = time.perf_counter()
    SAETrainer(
        cfg=trainer_cfg, sae=sae, data_provider=shuffled_batches(train_rows, args.batch_size, args.seed)
    ).fit()
    print(f"trained in {time.perf_counter() - start:.1f} s")

    ks = sorted({*cfg.k_levels, *(k for k in (3, 6, 12) if k < args.d_sae)}) + [None]
    results = {}
    with torch.no_grad():
        recons = sae.reconstructions(test_rows, ks=ks)
        print(f"\nheld-out rows: {n_test}")
        print(f"{'k':>6} {'FVU':>8} {'cosine':>8} {'L0':>7}")
        for k in ks:
            latents = sae.encode(test_rows, k=k)
            row = {
                "fvu": fvu(test_rows, recons[k]),
                "cosine": cosine_similarity(test_rows, recons[k]),
                "l0": l0(latents),
            }
            results["relu" if k is None else k] = row
            label = "ReLU" if k is None else str(k)
            trained = "" if k is None or k in cfg.k_levels else "  (not a training level)"
            print(f"{label:>6} {row['fvu']:8.4f} {row['cosine']:8.4f} {row['l0']:7.1f}{trained}")
        print(f"fraction of zero ReLU latents: {fraction_zero(sae.encode(test_rows)):.3f}")
    if args.save:
        sae.save_inference_model(args.save)
        print(
            f"saved the inference SAE to {args.save} "
            "(load with SAE.load_from_disk after import sae_vision_ext)"
        )
    return results


if __name__ == "__main__":
    main()
