"""Benchmark: RA-SAE training step and k-means candidates (not a timed test).

Ratios from one run:
  1. RA-SAE step vs a SAELens TopK SAE step of the same size (the price of the archetypal dictionary);
  2. the reference code's formulation (each ``get_dictionary()`` call projects W / Lambda in place and
     computes D; called for the decoder and again for the loss, so twice per step) vs ours (D once per step,
     projection once per optimiser step, before the next use); target >= 1.8x;
  3. streaming faiss k-means (sae_vision_ext.training.candidates) rows/s vs scikit-learn MiniBatchKMeans
     (one partial_fit pass over the same rows, same number of centroids), with the final k-means objective.
     Ours is one cheap streaming pass (moments + reservoir) plus a fixed cost (20 Lloyd iterations on a
     64-rows-per-centroid sample); MiniBatchKMeans pays per row. So our rows/s grows with the dataset:
     measured 1.48x MiniBatchKMeans at the default 2M rows, 0.64x at 200k rows (1,024 centroids, d 64, 2
     cores).

Every step runs through SAELens's SAETrainer.step (projection, forward, backward, grad clip, Adam) with the
TopK auxiliary loss active (half the latents marked dead), as late in a real run. Every model steps with the
same Adam kernel: SAETrainer's own (``--adam default``) or PyTorch's fused one (``--adam fused``, set on
every trainer's optimizer before the first step), so ratio 2 compares D once vs twice and nothing else; run
both to see what the kernel is worth. The paper's size (d=768, d_sae=3840, n'=32000: 0.19 TFLOP for D per
step) does not fit a small CPU; the defaults keep d=768 and shrink d_sae / n'.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import faiss
import numpy as np
import torch
from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

import sae_vision_ext  # noqa: F401  (registers the architectures)
from sae_vision_ext.activations.rows import rows_from_array
from sae_vision_ext.saes.archetypal import RASAETrainingSAE, RASAETrainingSAEConfig
from sae_vision_ext.training.candidates import compute_candidates

EPILOG = """examples:
  python benchmarks/archetypal_step.py                      # defaults (a few minutes on 2 cores)
  python benchmarks/archetypal_step.py --tiny               # seconds, for smoke tests
  python benchmarks/archetypal_step.py --d-sae 3840 --n-candidates 32000 --batch 4096   # paper size (GPU)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=1536)
    p.add_argument("--n-candidates", type=int, default=12288)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=7, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--adam",
        choices=("default", "fused"),
        default="default",
        help="Adam kernel of every trainer: SAETrainer's default, or fused=True",
    )
    p.add_argument("--kmeans-rows", type=int, default=2_000_000)
    p.add_argument("--kmeans-d", type=int, default=64)
    p.add_argument("--kmeans-k", type=int, default=1024)
    p.add_argument("--skip-kmeans", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.d_in, args.d_sae, args.n_candidates, args.batch, args.k = 64, 128, 512, 64, 8
        args.steps, args.warmup = 2, 1
        args.kmeans_rows, args.kmeans_d, args.kmeans_k = 5000, 16, 32
    return args


class DictionaryTwiceRASAE(RASAETrainingSAE):
    """The reference code's formulation: every read of D (decoder, then the loss) projects W / Lambda in
    place and recomputes D, as ``get_dictionary()`` does there."""

    def one_dictionary(self):
        return contextlib.nullcontext()

    def _current_dictionary(self, for_step=False):
        if self.training and torch.is_grad_enabled():
            self.archetypal.project_()
            return self.archetypal.compute_for_step()
        return super()._current_dictionary(for_step)


def _trainer(sae, args):
    total = (args.steps + args.warmup) * args.batch
    cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=args.batch,
        lr=1e-4,
        lr_end=1e-4,
        device=args.device,
        logger=LoggingConfig(log_to_wandb=False),
    )
    return SAETrainer(cfg, sae, iter(()))


def time_interleaved(saes: dict, args, batches) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per SAETrainer.step; the models take turns step by step, so load
    changes on a shared machine hit them alike."""
    trainers = {name: _trainer(sae, args) for name, sae in saes.items()}
    if args.adam == "fused":
        for trainer in trainers.values():
            for group in trainer.optimizer.param_groups:
                group["fused"] = True
    wall: dict[str, list[float]] = {name: [] for name in saes}
    cpu: dict[str, list[float]] = {name: [] for name in saes}
    for i, x in enumerate(batches):
        for name, trainer in trainers.items():
            trainer.n_forward_passes_since_fired[: trainer.sae.cfg.d_sae // 2] = 10**9  # aux loss active
            if args.device != "cpu":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            trainer.step(x)
            if args.device != "cpu":
                torch.cuda.synchronize()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in saes}


def bench_steps(args) -> dict[str, tuple[float, float]]:
    g = torch.Generator().manual_seed(0)
    candidates = torch.randn(args.n_candidates, args.d_in, generator=g)
    batches = [torch.randn(args.batch, args.d_in, generator=g) for _ in range(args.steps + args.warmup)]
    common = dict(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=args.device)
    gflop_d = 2 * args.d_sae * args.n_candidates * args.d_in / 1e9
    print(
        f"step sizes: d_in={args.d_in} d_sae={args.d_sae} n_candidates={args.n_candidates} "
        f"batch={args.batch} k={args.k} device={args.device} threads={torch.get_num_threads()} "
        f"steps={args.steps} (median) adam={args.adam}"
    )
    print(
        f"  computing D: {gflop_d:.2f} GFLOP forward (+ about as much backward); "
        f"W has {args.d_sae * args.n_candidates / 1e6:.1f}M parameters"
    )
    saes = {
        "topk": TopKTrainingSAE(TopKTrainingSAEConfig(**common, rescale_acts_by_decoder_norm=False)),
        "once": RASAETrainingSAE(RASAETrainingSAEConfig(**common, delta=1.0), candidates=candidates),
        "twice": DictionaryTwiceRASAE(RASAETrainingSAEConfig(**common, delta=1.0), candidates=candidates),
    }
    counts0 = {n: saes[n].archetypal.n_computations for n in ("once", "twice")}
    out = time_interleaved(saes, args, batches)
    per_step = {n: (saes[n].archetypal.n_computations - counts0[n]) / len(batches) for n in counts0}
    labels = {"topk": "TopK SAE step", "once": "RA-SAE step (ours)", "twice": "reference-style step"}
    print(f"  {'':26s} {'wall ms':>10s} {'CPU ms':>10s}")
    for name, label in labels.items():
        extra = f"   D computed {per_step[name]:.0f}x per step" if name in per_step else ""
        print(f"  {label:26s} {out[name][0] * 1e3:10.1f} {out[name][1] * 1e3:10.1f}{extra}")
    for label, a, b in (("ratio RA-SAE / TopK", "once", "topk"), ("ratio twice / once", "twice", "once")):
        print(
            f"  {label:26s} {out[a][0] / out[b][0]:9.2f}x {out[a][1] / out[b][1]:9.2f}x"
            + ("   (target >= 1.8)" if b == "once" else "")
        )
    return out


def bench_kmeans(args) -> dict[str, float]:
    from sklearn.cluster import MiniBatchKMeans  # optional: scikit-learn is a dev dependency

    rng = np.random.default_rng(0)
    n, d, k = args.kmeans_rows, args.kmeans_d, args.kmeans_k
    centres = rng.standard_normal((4 * k, d)).astype(np.float32) * 3
    rows = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d)).astype(np.float32)
    rows *= np.geomspace(0.5, 5, d).astype(np.float32)
    chunk = 16384
    print(
        f"k-means sizes: rows={n} d={d} centroids={k} chunk={chunk} "
        f"(faiss threads={faiss.omp_get_max_threads()})"
    )

    t = time.perf_counter()
    ours = compute_candidates(rows_from_array(rows, chunk), k, seed=0)
    t_ours = time.perf_counter() - t
    mean, std = ours.mean.numpy(), ours.std.numpy()
    z = (rows - mean) / std

    t = time.perf_counter()
    mbk = MiniBatchKMeans(n_clusters=k, batch_size=chunk, n_init=1, random_state=0)
    for start in range(0, n, chunk):
        mbk.partial_fit(z[start : start + chunk])
    t_mbk = time.perf_counter() - t

    def objective(centroids):
        index = faiss.IndexFlatL2(d)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        dist, _ = index.search(np.ascontiguousarray(z), 1)
        return float(dist.mean())

    obj_ours, obj_mbk = objective(ours.centroids_standardized.numpy()), objective(mbk.cluster_centers_)
    print(f"  faiss streaming (stats+sample+{20} iters) {n / t_ours:12.0f} rows/s   objective {obj_ours:.4f}")
    print(f"  sklearn MiniBatchKMeans (1 pass)        {n / t_mbk:12.0f} rows/s   objective {obj_mbk:.4f}")
    print(f"  ratio rows/s faiss / MiniBatchKMeans    {t_mbk / t_ours:.2f}x")
    return {
        "ours_rows_per_s": n / t_ours,
        "mbk_rows_per_s": n / t_mbk,
        "obj_ours": obj_ours,
        "obj_mbk": obj_mbk,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    bench_steps(args)
    if not args.skip_kmeans:
        bench_kmeans(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
