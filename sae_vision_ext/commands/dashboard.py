"""``sae-vision dashboard``: an HTML dashboard of an SAE's top latents and a PNG of FVU against L0."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_vision_ext.commands._common import (
    CONFIG_DEST,
    UserError,
    add_config,
    new_parser,
    one_line_errors,
    parse,
    say,
)
from sae_vision_ext.training.config import option, resolve_device

DESCRIPTION = """Write <output>/dashboard.html (self-contained: top-activating images with patch heatmaps,
names, statistics), <output>/fvu_vs_l0.png and <output>/dashboard_summary.json for an SAE folder. The
vision model is rebuilt from the SAE's metadata exactly as it was trained (pretrained tag, weights file, or
the seeded random init); --model / --weights override it, with a warning when they differ."""

EPILOG = """examples:
  sae-vision dashboard --sae runs/clip_b32_embed --dataset ~/data/val_images --output runs/dash_clip
  sae-vision dashboard --sae runs/dino_l12 --dataset ~/data/val_images --limit 2000 --n-latents 32 \\
      --rank-by frequency
  sae-vision dashboard --sae runs/msae --dataset imgs/ --ks 16,32,64,128 --name-concepts
  sae-vision dashboard --sae runs/msae runs/msae_small --dataset imgs/    # both SAEs on the FVU-L0 plot
  sae-vision dashboard --demo --output runs/dash_demo      # tiny random model + SAE, synthetic images
"""

RANKINGS = ("total", "frequency", "max")  # = analysis.dashboard.RANKINGS (that module imports torch)


@dataclass
class DashboardConfig:
    """The SAE, the images, and what the dashboard shows."""

    sae: list[str] = option(
        [],
        nargs="+",
        action="extend",
        required=False,
        metavar="PATH",
        help="SAE folder(s) (SAELens format; repeatable); the first gets the dashboard, "
        "all go on the FVU-L0 plot (they must read the same hook)",
    )
    demo: bool = option(False, help="tiny random CLIP + random SAE on synthetic images (no --sae, --dataset)")
    model_name: str | None = option(None, "--model", help="model spec (None: the one the SAE was trained on)")
    model_weights: str | None = option(None, "--weights", help="weights file (None: the SAE's metadata)")
    device: str = option("auto", help="auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:1, mps")
    dataset_path: str | None = option(None, "--dataset", help="image folder, saved or hub dataset")
    dataset_split: str = option("train", "--split", help="dataset split")
    synthetic: int = option(0, help="use N synthetic shape images instead of --dataset")
    limit: int = option(1000, help="use at most this many images")
    output_path: str = option("artifacts/dashboard", "--output", help="output folder")
    n_latents: int = option(16, help="number of latent cards")
    top_k: int = option(8, help="top images per latent")
    latents: str | None = option(None, help="comma-separated latent indices to show instead of the top ones")
    rank_by: str = option("total", choices=RANKINGS, help="how to pick the top latents")
    batch_size: int = option(32, help="images per forward pass")
    ks: str | None = option(None, help="comma-separated inference k values for the FVU-L0 curve (MSAE)")
    name_concepts: bool = option(
        False, help="name latents with CLIP text embeddings (an SAE on hook_image_embed of a CLIP model)"
    )
    vocabulary: str | None = option(None, help="word list file for --name-concepts (None: the shipped list)")
    quiet: bool = option(False, help="no progress bars")


def build_parser(argv: Sequence[str] = ()):
    parser = new_parser("sae-vision dashboard", DESCRIPTION, EPILOG)
    add_config(parser, DashboardConfig)
    return parser


def _ints(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise UserError(f"{flag} takes comma-separated integers, e.g. 3,17,42; got {text!r}") from err


def load_images(cfg: DashboardConfig) -> list[Any]:
    """The images the dashboard reads: ``--synthetic`` / ``--demo`` shapes or the first ``--limit`` of
    ``--dataset`` (unreadable ones skipped and counted)."""
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.activations.images import open_images
    from sae_vision_ext.analysis.toy import synthetic_images

    if cfg.synthetic or cfg.demo:
        return synthetic_images(cfg.synthetic or 48, seed=0)
    if not cfg.dataset_path:
        raise UserError("give --dataset DIR (or --synthetic N)")
    collection = open_images(cfg.dataset_path, split=cfg.dataset_split)
    images, skipped = [], 0
    for index in range(min(len(collection), cfg.limit)):
        try:
            images.append(collection.load(index))
        except Exception:  # noqa: BLE001 - a corrupt image is skipped and counted
            skipped += 1
    if skipped:
        say(f"dashboard: skipped {skipped} unreadable images")
    if not images:
        raise UserError(f"no readable images in {cfg.dataset_path}")
    return images


def load_saes_and_model(cfg: DashboardConfig) -> tuple[list[tuple[str, Any]], Any, Any]:
    """``([(label, sae), ...], model, preprocess)``: the SAEs in ``--sae`` (or the demo's) and the model the
    first one was trained on, rebuilt from its metadata."""
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.analysis.toy import TINY_CLIP_ARCH, make_sae, register_tiny_clip_config, tiny_clip
    from sae_vision_ext.evals.saved import load_sae_folder
    from sae_vision_ext.vision.load import load_model_for_sae

    if cfg.demo:
        model, preprocess = tiny_clip()
        sae = make_sae(
            model.cfg.d_model, 64, "blocks.1.hook_resid_post", token_selection="cls", model_name=model.spec
        )
        return [("demo", sae)], model, preprocess
    if not cfg.sae:
        raise UserError("give --sae PATH (or --demo)")

    saes = [(Path(p).name, load_sae_folder(p, device=resolve_device(cfg.device))) for p in cfg.sae]
    spec = cfg.model_name or saes[0][1].cfg.metadata.get("model_name") or ""
    if TINY_CLIP_ARCH in spec:
        register_tiny_clip_config()
    model, preprocess, _ = load_model_for_sae(
        saes[0][1],
        device=resolve_device(cfg.device),
        model_name=cfg.model_name,
        weights=cfg.model_weights,
        say=say,
    )
    return saes, model, preprocess


@one_line_errors("dashboard")
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg: DashboardConfig = getattr(parse(build_parser(argv), argv), CONFIG_DEST)
    latents, ks = _ints(cfg.latents, "--latents"), _ints(cfg.ks, "--ks")
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.analysis.concepts import name_concepts
    from sae_vision_ext.analysis.dashboard import write_dashboard

    started = time.perf_counter()
    images = load_images(cfg)
    saes, model, preprocess = load_saes_and_model(cfg)
    sae = saes[0][1]
    names = None
    if cfg.name_concepts:
        names = name_concepts(sae, cfg.vocabulary, model=model, top_n=6, progress=not cfg.quiet)
    paths = write_dashboard(
        model,
        sae,
        images,
        cfg.output_path,
        preprocess=preprocess,
        n_latents=cfg.n_latents,
        top_k=cfg.top_k,
        latents=latents,
        rank_by=cfg.rank_by,
        names=names,
        batch_size=cfg.batch_size,
        extra_saes=saes[1:],
        ks=ks,
        progress=not cfg.quiet,
    )
    summary = json.loads(Path(paths["summary"]).read_text(encoding="utf-8"))["summary"]
    print(f"dashboard: {paths['html']}")
    print(f"FVU vs L0: {paths['plot']}")
    print(
        f"FVU {summary['fvu']:.4f} | cosine {summary['cosine']:.4f} | L0 {summary['l0']:.1f} | dead "
        f"{summary['dead_fraction']:.1%} on {summary['n_rows']:,} rows of {summary['hook_name']} "
        f"({len(images)} images, {time.perf_counter() - started:.1f} s)"
    )
    return 0
