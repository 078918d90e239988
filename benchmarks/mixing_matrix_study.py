"""Study: how RA-SAE's mixing matrix W should be optimised under SAELens's SAETrainer (issue 16).

SAELens's ``SAETrainer`` steps every parameter with one Adam at one learning rate. Adam moves every entry of W
by ~lr per step whatever its gradient, so W's one-hot rows spread over many candidates at once. This script
trains, on synthetic data with a known dictionary (``sparse_dictionary_data``, centred), with SAELens's own
trainer:

  topk            SAELens TopK (random init, rescale_acts_by_decoder_norm=True, AuxK on)
  topk_centroids  the control: TopK started at the same centroids (``init_decoder_from_candidates``: decoder
                  = centroids, encoder tied to them), AuxK on
  topk_centroids_decoder_only  the control as it was before issue 16 (decoder at the centroids, encoder
                  left at SAELens's random init); not in the default --methods
  ra_<update>     RA-SAE with mixing_update = adam (reference) | scaled (s = 1/n') | softmax (s = 1),
                  rescale_acts_by_decoder_norm False (the plugin's default) and, as ``..._rescale``, True

For every seed the k-means candidates AND the SAE initialisation change (fair protocol: centred data, varied
k-means seed). Reported per method (mean +- std over seeds; stability over all seed pairs):

  stability        mean Hungarian-matched |cosine| between the dictionaries of two seeds (Fel et al. Eq. 2)
  identifiability  mean matched cosine between the true atoms and the learned ones
  FVU              sum ||x - x_hat||^2 / sum ||x - mean||^2 on held-out rows (inference SAE as saved/loaded)
  dead             latents that never fire on the held-out rows
  W row max        mean over atoms of max_j W_ij (1 = a single candidate; 1/n' = uniform)
  W row entropy    mean over atoms of -sum_j W_ij log W_ij (nats; 0 = one-hot, log n' = uniform)
  auxk             whether TopK's auxiliary loss is > 0 and reaches the trainable parameters when every
                   latent is marked dead (checked on the trained SAE), and the trainer's dead count at the end

Writes ``results.json`` and ``results.md`` to ``--output`` and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from tqdm import tqdm

from sae_vision_ext._saelens_compat import progress_bars_off
from sae_vision_ext.activations.rows import rows_from_array
from sae_vision_ext.evals.stability import stability
from sae_vision_ext.evals.synthetic import identifiability, sparse_dictionary_data
from sae_vision_ext.evals.train import make_training_sae, shuffled_batches, to_inference_sae
from sae_vision_ext.saes.archetypal import RASAETrainingSAEConfig, init_decoder_from_candidates
from sae_vision_ext.training.candidates import compute_candidates

EPILOG = """examples:
  python benchmarks/mixing_matrix_study.py --output /tmp/mixing            # defaults (~3 min on 2 busy cores)
  python benchmarks/mixing_matrix_study.py --tiny --output /tmp/mixing     # seconds, smoke test
  python benchmarks/mixing_matrix_study.py --seeds 0 1 2 3 4 --steps 3000 --output /tmp/mixing_long
"""

RA_METHODS = {  # name -> (mixing_update, mixing_lr_scale or "1/n'", rescale_acts_by_decoder_norm)
    "ra_adam": ("adam", 1.0, False),
    "ra_scaled": ("scaled", "1/n'", False),
    "ra_softmax": ("softmax", 1.0, False),
    "ra_adam_rescale": ("adam", 1.0, True),
    "ra_scaled_rescale": ("scaled", "1/n'", True),
    "ra_softmax_rescale": ("softmax", 1.0, True),
}
METHODS = ("topk", "topk_centroids", *RA_METHODS, "topk_centroids_decoder_only")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", type=Path, required=True, help="folder for results.json / results.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="k-means and SAE seeds")
    p.add_argument("--methods", nargs="+", default=list(METHODS[:-1]), choices=METHODS)
    p.add_argument("--d-in", type=int, default=32)
    p.add_argument("--n-atoms", type=int, default=64, help="true atoms of the synthetic data")
    p.add_argument("--d-sae", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="true and SAE TopK k")
    p.add_argument("--noise-std", type=float, default=0.01)
    p.add_argument("--n-rows", type=int, default=16384, help="training rows (plus --n-eval held out)")
    p.add_argument("--n-eval", type=int, default=4096)
    p.add_argument("--n-candidates", type=int, default=512)
    p.add_argument("--delta", type=float, default=0.1, help="RA-SAE bound on ||Lambda_i||")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dead-window", type=int, default=200, help="SAETrainer dead_feature_window (steps)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is ~15x faster on 2 busy cores)"
    )
    p.add_argument("--tiny", action="store_true", help="a few seconds: small sizes, 60 steps, 2 seeds")
    args = p.parse_args(argv)
    if args.tiny:
        args.n_rows, args.n_eval, args.n_candidates, args.steps, args.dead_window = 2048, 512, 96, 60, 20
        args.seeds = args.seeds[:2] if len(args.seeds) >= 2 else [0, 1]
    return args


# ------------------------------------------------------------------------------------------------ training
def build_sae(method: str, args: argparse.Namespace, candidates: torch.Tensor, cand_path: Path) -> Any:
    if method.startswith("topk"):
        sae = make_training_sae(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k))
        if method == "topk_centroids":
            init_decoder_from_candidates(sae, candidates)
        elif method == "topk_centroids_decoder_only":  # the control before issue 16: random encoder
            with torch.no_grad():
                sae.W_dec.data.copy_(candidates[: args.d_sae])
        return sae
    update, scale, rescale = RA_METHODS[method]
    scale = 1.0 / candidates.shape[0] if scale == "1/n'" else scale
    cfg = RASAETrainingSAEConfig(
        d_in=args.d_in,
        d_sae=args.d_sae,
        k=args.k,
        delta=args.delta,
        candidates_path=str(cand_path),
        mixing_update=update,
        mixing_lr_scale=scale,
        rescale_acts_by_decoder_norm=rescale,
    )
    return make_training_sae(cfg)


def train(sae: Any, x: torch.Tensor, args: argparse.Namespace, seed: int) -> SAETrainer:
    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=int(0.2 * args.steps),
        dead_feature_window=args.dead_window,
        device=args.device,
        n_checkpoints=0,
        save_final_checkpoint=False,
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=shuffled_batches(x, args.batch, seed=seed))
    with progress_bars_off(True):
        trainer.fit()
    return trainer


# ------------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def reconstruction(sae: Any, x: torch.Tensor) -> tuple[float, int]:
    sae.eval()
    acts = sae.encode(x)
    x_hat = sae.decode(acts)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    dead = int((acts > 0).sum(0).eq(0).sum())
    return fvu, dead


@torch.no_grad()
def row_concentration(W: torch.Tensor) -> tuple[float, float]:
    W = W.double()
    entropy = -(W * W.clamp(min=1e-300).log()).sum(1)
    return float(W.max(1).values.mean()), float(entropy.mean())


def auxk_check(sae: Any, x: torch.Tensor) -> bool:
    """TopK's auxiliary loss with every latent marked dead: > 0 and its gradient reaches the parameters."""
    sae.train()
    sae.zero_grad(set_to_none=True)
    dead = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
    out = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    aux = out.losses["auxiliary_reconstruction_loss"]
    aux.backward()
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    ok = float(aux.detach()) > 0 and any(float(g.abs().sum()) > 0 for g in grads)
    if hasattr(sae, "archetypal"):
        g = sae.archetypal.mixing_parameter.grad
        ok = ok and g is not None and float(g.abs().sum()) > 0
    sae.zero_grad(set_to_none=True)
    return ok


def run_one(method: str, seed: int, x_train, x_eval, true_atoms, cands, cand_path, args) -> dict[str, Any]:
    torch.manual_seed(seed)
    sae = build_sae(method, args, cands, cand_path)
    start = time.perf_counter()
    trainer = train(sae, x_train, args, seed)
    seconds = time.perf_counter() - start
    aux_ok = auxk_check(sae, x_train[: args.batch])
    inference = to_inference_sae(sae)
    atoms = inference.W_dec.detach().float()
    fvu, dead = reconstruction(inference, x_eval)
    row: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "fvu": fvu,
        "dead": dead,
        "identifiability": identifiability(atoms, true_atoms),
        "trainer_dead_at_end": int(trainer.dead_neurons.sum()),
        "auxk_active": aux_ok,
        "train_seconds": seconds,
        "atoms": atoms,
    }
    if hasattr(sae, "archetypal"):
        d = sae.archetypal
        d.ensure_projected_()
        row["W_row_max"], row["W_row_entropy"] = row_concentration(d.W.detach())
        if d.Lambda is not None:
            row["Lambda_norm_over_delta"] = float(d.Lambda.detach().norm(dim=1).mean() / d.delta)
    return row


# ------------------------------------------------------------------------------------------------ report
def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    summary = []
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        pairs = [stability(a["atoms"], b["atoms"]) for a, b in itertools.combinations(runs, 2)]
        entry: dict[str, Any] = {"method": method, "n_seeds": len(runs), "stability": mean_std(pairs)}
        for key in ("identifiability", "fvu", "dead", "W_row_max", "W_row_entropy",
                    "Lambda_norm_over_delta", "train_seconds", "trainer_dead_at_end"):  # fmt: skip
            entry[key] = mean_std([r.get(key, float("nan")) for r in runs])
        entry["auxk_active"] = all(r["auxk_active"] for r in runs)
        summary.append(entry)
    return summary


COLUMNS = [
    ("stability", "stability", 3),
    ("identifiability", "identif.", 3),
    ("fvu", "FVU", 3),
    ("dead", "dead", 1),
    ("W_row_max", "W row max", 3),
    ("W_row_entropy", "W row entropy", 2),
    ("Lambda_norm_over_delta", "mean Lambda norm / delta", 2),
    ("train_seconds", "train s", 1),
]


def markdown_table(summary: list[dict[str, Any]]) -> str:
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " | AuxK active |"
    sep = "|---" * (len(COLUMNS) + 2) + "|"
    lines = [head, sep]
    for s in summary:
        cells = []
        for key, _, digits in COLUMNS:
            m, sd = s[key]
            cells.append("–" if math.isnan(m) else f"{m:.{digits}f} ± {sd:.{digits}f}")
        lines.append(
            f"| {s['method']} | " + " | ".join(cells) + f" | {'yes' if s['auxk_active'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = sparse_dictionary_data(
        n_rows=args.n_rows + args.n_eval,
        d_in=args.d_in,
        n_atoms=args.n_atoms,
        k=args.k,
        noise_std=args.noise_std,
        seed=args.data_seed,
    )
    x = data.x - data.x[: args.n_rows].mean(0)  # centred (fair protocol)
    x_train, x_eval = x[: args.n_rows].contiguous(), x[args.n_rows :].contiguous()
    rows: list[dict[str, Any]] = []
    runs = [(seed, method) for seed in args.seeds for method in args.methods]
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(runs), desc="mixing study", unit="run") as bar:
        for seed in args.seeds:
            cands = compute_candidates(
                rows_from_array(x_train),
                args.n_candidates,
                seed=seed,
                sample_rows=args.n_rows,
                progress=False,
            )
            cand_path = Path(tmp) / f"candidates_{seed}.safetensors"
            cands.save(cand_path)
            for method in args.methods:
                bar.set_postfix(method=method, seed=seed)
                rows.append(
                    run_one(method, seed, x_train, x_eval, data.atoms, cands.candidates, cand_path, args)
                )
                bar.update(1)
    summary = summarise(rows, args.methods)
    elapsed = time.perf_counter() - t0
    command = "python benchmarks/mixing_matrix_study.py " + " ".join(argv if argv is not None else _argv())
    table = markdown_table(summary)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.mkdir(parents=True, exist_ok=True)
    per_run = [{k: v for k, v in r.items() if k != "atoms"} for r in rows]
    (args.output / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "settings": settings,
                "seconds": elapsed,
                "summary": summary,
                "runs": per_run,
            },
            indent=2,
        )  # fmt: skip
    )
    md = (
        f"# RA-SAE mixing-matrix study\n\n`{command}`\n\nSettings: {json.dumps(settings)}\n\n"
        f"Total time {elapsed:.0f} s. Mean ± std over seeds (stability: over seed pairs).\n\n{table}\n"
    )
    (args.output / "results.md").write_text(md)
    print(table)
    print(f"\n{len(rows)} runs in {elapsed:.0f} s; wrote {args.output / 'results.json'} and results.md")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
