"""One SAELens training step of the Matryoshka SAE (nested TopK) against two baselines, as ratios in one run.

Variants, each stepped by its own ``SAETrainer.step`` (forward, firing statistics, backward, grad clipping,
Adam, scheduler), on the same random batch:
  topk   SAELens's TopKTrainingSAE of the same size (k = --topk-k, no dead latents, so no auxiliary loss)
  msae   MatryoshkaTopKTrainingSAE with the authors' k ladder (nested decode)
  naive  the same MSAE with one topk and one dense decode per level (h dense decodes)
Steps are interleaved round by round and the median time per variant is reported, so a busy machine slows all
variants alike. The MSAE's cost depends on how many latents are positive (every level with k above that count
reuses the ReLU decode); --active-fraction sets b_enc so that fraction of latents is positive (0.5 is the tied
initialisation; the paper reports ~80% zeros after training, i.e. 0.2).
"""

import argparse
import statistics
import time

import torch

EPILOG = """example:
  python benchmarks/msae_step.py                      # d_in 768, d_sae 6144, batch 2048, fractions 0.5 and 0.2
  python benchmarks/msae_step.py --batch 4096 --threads 1 --active-fraction 0.2
"""


def make_trainer(sae, batch_size):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = SAETrainerConfig(
        total_training_samples=10**9, train_batch_size_samples=batch_size, lr=1e-4, lr_end=1e-4
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))


@torch.no_grad()
def set_active_fraction(sae, x, fraction):
    """Shift b_enc per latent so that ``fraction`` of its pre-activations on x are positive."""
    pre = sae._hidden_pre(sae._prepare_input(x))
    sae.b_enc -= torch.quantile(pre[:2048], 1.0 - fraction, dim=0)


def run(args, fraction):
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    import sae_vision_ext  # noqa: F401  (registers the architecture)
    from sae_vision_ext.saes.matryoshka_topk import (
        MatryoshkaTopKTrainingSAE,
        MatryoshkaTopKTrainingSAEConfig,
        naive_topk_reconstructions,
        plan_nested_decode,
    )

    class NaiveMSAE(MatryoshkaTopKTrainingSAE):
        nested_decode = staticmethod(naive_topk_reconstructions)

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    msae_cfg = MatryoshkaTopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, level_weighting="reverse")
    msae = MatryoshkaTopKTrainingSAE(msae_cfg)
    set_active_fraction(msae, x, fraction)
    naive = NaiveMSAE(
        MatryoshkaTopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, level_weighting="reverse")
    )
    naive.load_state_dict(msae.state_dict())
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.topk_k))

    with torch.no_grad():
        z = torch.relu(msae._hidden_pre(msae._prepare_input(x)))
        counts = (z > 0).sum(-1)
        partial = [k for k in msae_cfg.k_levels if k < int(counts.max())]
        plan = plan_nested_decode(
            partial, counts, args.d_sae, full_available=len(partial) < len(msae_cfg.k_levels)
        )
    print(
        f"\nactive fraction {fraction}: positive latents per row mean {counts.float().mean():.0f}, "
        f"max {int(counts.max())} of {args.d_sae}; partial levels {partial} -> plan {plan}; "
        f"levels >= {int(counts.max())} reuse the ReLU decode"
    )

    trainers = {"topk": make_trainer(topk, args.batch), "msae": make_trainer(msae, args.batch)}
    if not args.skip_naive:
        trainers["naive"] = make_trainer(naive, args.batch)
    times = {name: [] for name in trainers}
    for trainer in trainers.values():  # warm-up
        trainer.step(x)
    for r in range(args.repeats):
        names = list(trainers)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order each round
        for name in names:
            start = time.perf_counter()
            trainers[name].step(x)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        print(
            f"  {name:6s} step median {t * 1000:8.1f} ms   (all: {', '.join(f'{v:.2f}' for v in times[name])} s)"
        )
    msae_vs_topk = median["msae"] / median["topk"]
    line = f"  MSAE / TopK step = {msae_vs_topk:.2f}x (target <= 1.3x)"
    if "naive" in median:
        line += f";  naive / MSAE = {median['naive'] / median['msae']:.2f}x faster (target >= 3x)"
    print(line)
    return median


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=6144)
    parser.add_argument("--batch", type=int, default=2048, help="rows per step (the paper trains with 4096)")
    parser.add_argument("--topk-k", type=int, default=64, help="k of the SAELens TopK baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--active-fraction", type=float, nargs="+", default=[0.5, 0.2])
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"sizes: d_in={args.d_in} d_sae={args.d_sae} batch={args.batch} topk k={args.topk_k} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats}"
    )
    for fraction in args.active_fraction:
        run(args, fraction)


if __name__ == "__main__":
    main()
