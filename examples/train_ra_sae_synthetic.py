"""Train RA-SAE on synthetic data with known concepts, beside a TopK SAE started from the same centroids.

Data: x = sum_j c_j a_j + noise with a few active concepts per row (non-negative coefficients), so the
true concepts a_j lie inside the cone of the data. The script

1. computes k-means candidates with the streaming faiss k-means (element-wise standardised), once per seed;
2. trains, per seed, RA-SAE (``ra_sae``) and the control: a SAELens TopK SAE whose decoder starts at the
   same candidates (``init_decoder_from_candidates``), both with SAELens's SAETrainer;
3. reports reconstruction (FVU), recovery of the true concepts (mean Hungarian-matched |cosine|) and
   stability across seeds (the k-means seed and the init seed both vary, as a fair comparison needs);
4. optionally exports the RA-SAE as a plain SAELens ``topk`` SAE (``--export DIR``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

EPILOG = """examples:
  python examples/train_ra_sae_synthetic.py --tiny
  python examples/train_ra_sae_synthetic.py --d 64 --n-concepts 128 --d-sae 128 --steps 1500 \\
      --export out/ra_topk
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=int, default=48, help="activation width")
    p.add_argument("--n-concepts", type=int, default=96, help="true concepts")
    p.add_argument("--active", type=int, default=3, help="concepts active per row")
    p.add_argument("--d-sae", type=int, default=96)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--n-candidates", type=int, default=768)
    p.add_argument("--delta", type=float, default=0.5)
    p.add_argument("--rows", type=int, default=40_000)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--export", default=None, help="save the first RA-SAE as a plain SAELens topk SAE here")
    p.add_argument("--tiny", action="store_true", help="seconds-long run for tests")
    args = p.parse_args(argv)
    if args.tiny:
        args.d, args.n_concepts, args.d_sae, args.n_candidates = 16, 24, 24, 96
        args.rows, args.steps, args.batch = 3000, 40, 128
    return args


def train(sae, x, args, seed):
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield x[torch.randint(0, x.shape[0], (args.batch,), generator=g)]

    cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch,
                           train_batch_size_samples=args.batch, lr=args.lr, lr_end=args.lr, device="cpu",
                           logger=LoggingConfig(log_to_wandb=False),
                           dead_feature_window=200)
    trainer = SAETrainer(cfg, sae, batches())
    for _ in range(args.steps):
        trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
    return sae.eval()


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    import sae_vision_ext  # noqa: F401
    from sae_vision_ext.activations.rows import rows_from_array
    from sae_vision_ext.evals.stability import match_dictionaries, stability
    from sae_vision_ext.saes.archetypal import (
        RASAETrainingSAE,
        RASAETrainingSAEConfig,
        init_decoder_from_candidates,
    )
    from sae_vision_ext.training.candidates import compute_candidates

    t0 = time.perf_counter()
    from sae_vision_ext.evals.synthetic import sparse_dictionary_data

    data = sparse_dictionary_data(args.rows, args.d, args.n_concepts, args.active, noise_std=0.02, seed=1234)
    x, concepts = data.x, data.atoms
    print(f"data: {args.rows} rows, d={args.d}, {args.n_concepts} concepts, {args.active} active per row")
    results: dict[str, list] = {"ra_sae": [], "topk_centroids": []}
    for seed in args.seeds:
        cands = compute_candidates(rows_from_array(x, 8192), args.n_candidates, seed=seed).candidates
        torch.manual_seed(seed)
        ra_cfg = RASAETrainingSAEConfig(d_in=args.d, d_sae=args.d_sae, k=args.k, delta=args.delta,
                                        dictionary_init="random_candidates", dictionary_init_seed=seed)
        ra = train(RASAETrainingSAE(ra_cfg, candidates=cands), x, args, seed)
        torch.manual_seed(seed)
        control = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d, d_sae=args.d_sae, k=args.k,
                                                        rescale_acts_by_decoder_norm=False))
        init_decoder_from_candidates(control, cands, init="random_candidates", seed=seed)
        control = train(control, x, args, seed)
        for name, sae in (("ra_sae", ra), ("topk_centroids", control)):
            with torch.no_grad():
                x_hat = sae(x[:4096])
            fvu = float(((x[:4096] - x_hat) ** 2).sum() / ((x[:4096] - x[:4096].mean(0)) ** 2).sum())
            recovery = float(match_dictionaries(concepts, sae.W_dec.detach())[2].mean())
            results[name].append((sae, fvu, recovery))
            print(f"seed {seed} {name:15s} FVU {fvu:.4f}  concept recovery {recovery:.3f}")
    for name, runs in results.items():
        if len(runs) > 1:
            pairs = [
                stability(a[0].W_dec.detach(), b[0].W_dec.detach())
                for i, a in enumerate(runs)
                for b in runs[i + 1 :]
            ]
            print(f"{name:15s} stability across seeds {sum(pairs) / len(pairs):.3f}")
    if args.export:
        results["ra_sae"][0][0].save_plain_model(args.export)
        print(f"exported the first RA-SAE as a plain SAELens topk SAE to {args.export}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
