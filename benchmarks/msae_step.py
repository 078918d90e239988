"""Matryoshka SAE (nested TopK) training cost, as ratios in one run (not a timed test).

Two comparisons on the same random batch:
  1. one SAELens ``SAETrainer.step`` (forward, firing statistics, backward, grad clipping, Adam, scheduler)
     of ``MatryoshkaTopKTrainingSAE`` with the authors' k ladder against SAELens's ``TopKTrainingSAE`` of the
     same size (k = --topk-k, no dead latents, so no auxiliary loss); target MSAE / TopK <= 1.3x;
  2. the level decodes alone, forward + backward on the MSAE's own latents and decoder:
     ``nested_reconstructions`` (sae_vision_ext/saes/nested_decode.py) against its specification
     ``naive_topk_reconstructions`` (one topk and one dense decode per level); target naive / nested >= 3x.
Runs are interleaved round by round and the median time per variant is reported, so a busy machine slows all
variants alike. The MSAE's cost depends on how many latents are positive (every level with k above that count
reuses the ReLU decode); --active-fraction sets b_enc so that fraction of latents is positive (0.5 is the tied
initialisation; the paper reports ~80% zeros after training, i.e. 0.2).
"""

import argparse
import statistics
import time

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

import sae_vision_ext  # noqa: F401  (registers the architecture)
from sae_vision_ext.saes import nested_decode
from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKTrainingSAE, MatryoshkaTopKTrainingSAEConfig
from sae_vision_ext.saes.nested_decode import naive_topk_reconstructions, nested_reconstructions

EPILOG = """example:
  python benchmarks/msae_step.py                  # d_in 768, d_sae 6144, batch 2048, fractions 0.5 and 0.2
  python benchmarks/msae_step.py --batch 4096 --threads 1 --active-fraction 0.2
"""


def make_trainer(sae, batch_size):
    cfg = SAETrainerConfig(
        total_training_samples=10**9, train_batch_size_samples=batch_size, lr=1e-4, lr_end=1e-4
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))


@torch.no_grad()
def set_active_fraction(sae, x, fraction):
    """Shift b_enc per latent so that ``fraction`` of its pre-activations on x are positive."""
    pre = sae._hidden_pre(sae._prepare_input(x))
    sae.b_enc -= torch.quantile(pre[:2048], 1.0 - fraction, dim=0)


def median_times(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each ``runs[name]()``, after one warm-up call each, in rotating order."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for r in range(repeats):
        names = list(runs)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def report(times: dict[str, list[float]]) -> dict[str, float]:
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        runs = ", ".join(f"{v:.2f}" for v in times[name])
        print(f"  {name:7s} median {t * 1000:8.1f} ms   (all: {runs} s)")
    return median


def decode_fn(decode, z, decoder, levels, scores=None):
    """Forward and backward of one level decode on fresh leaves (weights: each level's sum)."""

    def run():
        z_leaf = z.detach().requires_grad_()
        decoder_leaf = decoder.detach().requires_grad_()
        outs = decode(z_leaf, decoder_leaf, levels, scores)
        # nested_reconstructions returns the levels that share the full decode once: the same loss terms
        per_level = [outs[min(i, len(outs) - 1)] for i in range(len(levels))]
        loss = sum(out.square().sum() for out in per_level)
        loss.backward()

    return run


def run(args, fraction):
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    msae_cfg = MatryoshkaTopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, level_weighting="reverse")
    msae = MatryoshkaTopKTrainingSAE(msae_cfg)
    set_active_fraction(msae, x, fraction)
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.topk_k))
    levels = msae_cfg.k_levels

    with torch.no_grad():
        z = torch.relu(msae._hidden_pre(msae._prepare_input(x)))
        decoder = msae.W_dec / msae.W_dec.norm(dim=-1, keepdim=True)
        counts = (z > 0).sum(-1)
        partial = [k for k in levels if k < int(counts.max())]
        # the planner's choice, for the record (a private function: the decode itself takes no plan)
        plan = nested_decode._plan_levels(partial, counts, args.d_sae, len(partial) < len(levels))
    print(
        f"\nactive fraction {fraction}: positive latents per row mean {counts.float().mean():.0f}, "
        f"max {int(counts.max())} of {args.d_sae}; partial levels {partial} -> plan {plan}; "
        f"levels >= {int(counts.max())} reuse the ReLU decode"
    )

    print(" 1. training step")
    trainers = {"topk": make_trainer(topk, args.batch), "msae": make_trainer(msae, args.batch)}
    step_runs = {name: (lambda t=t: t.step(x)) for name, t in trainers.items()}
    steps = report(median_times(step_runs, args.repeats))
    print(f"  MSAE / TopK step = {steps['msae'] / steps['topk']:.2f}x (target <= 1.3x)")

    print(" 2. level decodes, forward + backward")
    decodes = {"nested": decode_fn(nested_reconstructions, z, decoder, levels)}
    if not args.skip_naive:
        decodes["naive"] = decode_fn(naive_topk_reconstructions, z, decoder, levels)
    decode_times = report(median_times(decodes, args.repeats))
    if "naive" in decode_times:
        ratio = decode_times["naive"] / decode_times["nested"]
        print(f"  naive / nested decode = {ratio:.2f}x faster (target >= 3x)")
    return steps, decode_times


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
    parser.add_argument("--skip-naive", action="store_true", help="time only the nested decode in part 2")
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
