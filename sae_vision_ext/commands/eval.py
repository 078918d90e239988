"""``sae-vision eval``: FVU, cosine, L0 and dead latents of a trained SAE, per k for Matryoshka SAEs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from sae_vision_ext.commands._common import add_config, new_parser, one_line_errors, parse, say, write_json
from sae_vision_ext.training.config import option, resolve_device

DESCRIPTION = """Evaluate a saved SAE folder. With no --dataset / --cache it re-evaluates on the rows its
training run held out (rebuilt from the run's config: the same rows, so the same numbers as the run's
summary). With --dataset the images go through the model the SAE was trained on, rebuilt from its metadata
(pretrained tag, weights file checked by hash, or the seeded random init); --model / --weights override it,
with a warning. A cache, a model or weights that differ from the SAE's are reported."""

EPILOG = """examples:
  sae-vision eval runs/dinov2_msae                                   # the run's own held-out rows
  sae-vision eval runs/dinov2_msae --dataset ./val_photos --n-eval-images 500
  sae-vision eval runs/topk --cache runs/cache_val --json metrics.json
  sae-vision eval runs/dinov2_msae --dataset ./val_photos --ks 16 64 256   # a Matryoshka SAE at chosen k
"""


@dataclass
class EvalConfig:
    """What to evaluate, on what."""

    sae_path: str = option(
        "", positional=True, metavar="SAE_FOLDER", help="SAE folder (cfg.json + sae_weights.safetensors)"
    )
    dataset_path: str | None = option(
        None, "--dataset", help="images: hub dataset, dataset folder or image folder"
    )
    dataset_split: str = option("train", "--split", help="dataset split (an image folder has none)")
    cached_activations_path: str | None = option(
        None, "--cache", help="an activation cache instead of images"
    )
    n_eval_images: int | None = option(None, help="images (or cache images) to evaluate (default: all)")
    model_name: str | None = option(None, "--model", help="override the model of the SAE's metadata")
    model_weights: str | None = option(None, "--weights", help="override the weights of the SAE's metadata")
    ks: list[int] | None = option(
        None,
        nargs="+",
        required=False,
        help="Matryoshka SAE: k values to evaluate (default: its trained levels)",
    )
    device: str = option("auto", help="auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:1, mps")
    num_workers: int = option(0, "--workers", help="DataLoader worker processes decoding images")
    json: str | None = option(None, help="also write the metrics to this JSON file")
    quiet: bool = option(False, help="no progress bars")


def build_parser(argv: Sequence[str] = ()):
    parser = new_parser("sae-vision eval", DESCRIPTION, EPILOG)
    add_config(parser, EvalConfig)
    return parser


def format_metrics(metrics: dict) -> str:
    return (
        f"FVU {metrics['fvu']:.4f} | FVU per sample {metrics['fvu_per_sample']:.4f} | "
        f"cosine {metrics['cosine']:.4f} | "
        f"L0 {metrics['l0']:.1f} of {metrics['d_sae']} (zeros {metrics['fraction_zero']:.1%}) | "
        f"dead {metrics['dead_fraction']:.1%} over {metrics['n_rows']:,} rows"
    )


@one_line_errors("eval")
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg: EvalConfig = parse(build_parser(argv), argv).config
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.evals.saved import evaluate_sae_folder
    from sae_vision_ext.training.monitor import per_k_table

    if cfg.n_eval_images is not None and cfg.n_eval_images <= 0:
        raise ValueError(f"--n-eval-images must be positive, got {cfg.n_eval_images}")
    metrics = evaluate_sae_folder(
        cfg.sae_path,
        dataset=cfg.dataset_path,
        cache=cfg.cached_activations_path,
        n_images=cfg.n_eval_images,
        split=cfg.dataset_split,
        model_name=cfg.model_name,
        weights=cfg.model_weights,
        ks=cfg.ks,
        device=resolve_device(cfg.device),
        workers=cfg.num_workers,
        say=say,
        progress=not cfg.quiet,
    )
    print(f"{cfg.sae_path} on {metrics['source']}:\n  {format_metrics(metrics)}")
    if metrics["per_k"]:
        print("\n".join(per_k_table(metrics["per_k"])))
    if cfg.json:
        write_json(cfg.json, metrics)
    return 0
