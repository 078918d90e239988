"""The Archetypal SAE paper's five-model study (Fel et al. 2025): one RA-SAE per vision model, in turn.

Each model has a full runner config in ``examples/configs/asae_five_models/`` (DINOv2, SigLIP, ViT, ConvNeXt,
ResNet-50: the final layer's tokens / feature map, d_sae = 5 x width, 32,000 k-means candidates, ImageNet-1k).
For each chosen model the script

1. reads its config (``VisionSAERunnerConfig``, the file ``sae-vision train --config`` reads);
2. computes the archetype candidates when the config's ``candidates_path`` does not exist yet: the training
   images go through the model once (or ``--candidate-images`` of them), streaming k-means
   (``compute_candidates``: exact per-dimension statistics, a uniform sample of the rows, faiss k-means on
   the standardised sample), written as a candidates file;
3. trains the RA-SAE with the normal runner (``VisionSAETrainingRunner``: SAELens's ``SAETrainer``, held-out
   metrics, a SAELens SAE folder per model);

then prints one table (model, d_in, d_sae, FVU, L0, dead latents) and writes it as ``results.json`` and
``results.md`` in the output folder. ``--tiny`` swaps every model for a small random-init model of the same
family at 28-64 px, the bundled sample photos, 64 candidates and a few hundred rows: seconds per model on a
CPU, to check the pipeline, not to measure anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "asae_five_models"
MODELS = ("dinov2", "siglip", "vit", "convnext", "resnet50")

# --tiny: a small same-family architecture (random init), its input size, the rows it reads
TINY_MODELS = {
    "dinov2": ("timm:vit_small_patch14_reg4_dinov2.lvd142m", 28),  # CLS + 4 registers + 2x2 patches
    # timm has no SigLIP smaller than B/16 (86M parameters, ~6 s to initialise on a 2-core CPU): a small ViT
    # without a CLS token stands in (one register token; SigLIP has none)
    "siglip": ("timm:vit_wee_patch16_reg1_gap_256.sbb_in1k", 32),
    "vit": ("timm:vit_tiny_patch16_224.augreg_in21k", 32),
    "convnext": ("timm:convnext_atto.d2_in1k", 64),  # 2x2 map at stages.3
    "resnet50": ("timm:resnet18.a1_in1k", 64),
}
TINY_SETTINGS = {
    "training_rows": 256, "train_batch_size_rows": 64, "buffer_size_rows": 256, "lr": 1e-3, "lr_end": 1e-3,
    "lr_scheduler_name": "constant", "lr_warm_up_steps": 0, "lr_decay_steps": 0, "model_batch_size": 32,
    "num_workers": 0, "eval_dataset_path": None, "eval_holdout_images": 4, "n_eval_images": 8,
    "augment": "crop_flip", "n_batches_for_norm_estimate": 1, "dead_feature_window": 4, "n_checkpoints": 0,
    "pretrained": False, "device": "cpu", "dataset_path": "",
}  # fmt: skip
TINY_CANDIDATES, TINY_CANDIDATE_VIEWS, TINY_K = 64, 32, 4

EPILOG = """examples:
  python examples/asae_five_models.py                          # all five, full size (ImageNet-1k, a GPU)
  python examples/asae_five_models.py --models dinov2,resnet50 --output runs/asae5
  python examples/asae_five_models.py --models vit --set sae.k=64 --set dataset_path=/data/imagenet/train \\
      --set eval_dataset_path=/data/imagenet/val --candidate-images 200000
  python examples/asae_five_models.py --tiny --output /tmp/asae5   # seconds per model: random tiny models
  sae-vision train --config examples/configs/asae_five_models/dinov2.yaml   # one model, candidates ready
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    p.add_argument(
        "--output",
        default=None,
        help="output folder: <output>/<model> per SAE, <output>/candidates/<model>.safetensors, "
        "results.json / .md (default: each config's own paths, results in runs/asae_five_models)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field in every config (sae.k=64, lr=3e-4, dataset_path=DIR)",
    )
    p.add_argument(
        "--candidate-images",
        type=int,
        default=None,
        help="images read for the k-means candidates (default: one pass over the training images)",
    )
    p.add_argument(
        "--candidate-sample-rows",
        type=int,
        default=None,
        help="rows kept in memory for the k-means (default 64 per candidate: 2,048,000 rows at 32,000)",
    )
    p.add_argument("--recompute-candidates", action="store_true", help="recompute existing candidates")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier SAE run")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random-init same-family models, sample photos, a few hundred rows (seconds)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        p.error(f"--models takes a comma-separated subset of {', '.join(MODELS)}; got {unknown or 'none'}")
    return args


def config_data(key: str, args) -> dict[str, Any]:
    """The model's config file as a mapping, with ``--output``, ``--tiny`` and ``--set`` applied."""
    from sae_vision_ext.training.config import apply_overrides, load_config_file

    data = load_config_file(CONFIG_DIR / f"{key}.yaml")
    if args.output:
        out = Path(args.output)
        data["output_path"] = str(out / key)
        data["checkpoint_path"] = None
        data["sae"]["candidates_path"] = str(out / "candidates" / f"{key}.safetensors")
    if args.tiny:
        data.update(TINY_SETTINGS)
        data["model_name"], data["img_size"] = TINY_MODELS[key]
        data["sae"].update(n_candidates=TINY_CANDIDATES, k=TINY_K)
    data["verbose"] = not args.quiet
    return apply_overrides(data, args.overrides)


class ImageRows:
    """Re-iterable ``[n, d]`` chunks of one hook's rows from the first ``n_images`` image positions."""

    def __init__(self, source: Any, hook: str, n_images: int):
        self.source, self.hook, self.n_images = source, hook, n_images
        self.n_rows = n_images * source.tokens_per_image  # for the progress bar

    def __iter__(self):
        for chunk in self.source.iter_chunks(0, self.n_images):
            yield chunk.rows[self.hook]


def stale_candidates(path: Path, model_name: str, hook: str, n_candidates: int, width: int) -> str | None:
    """Why the candidates file at ``path`` does not fit this run (None when it does)."""
    from sae_vision_ext.training.candidates import load_candidates_file

    found = load_candidates_file(path)
    meta = found.metadata
    n, d = (int(s) for s in found.candidates.shape)
    if (n, d) != (n_candidates, width):
        return f"it holds {n} candidates of width {d}, this run needs {n_candidates} of width {width}"
    if meta.get("model_name", model_name) != model_name or meta.get("hook_name", hook) != hook:
        return f"it was computed for {meta.get('model_name')} {meta.get('hook_name')}"
    return None


def compute_candidates_file(cfg, model, preprocess, train_images, args, say) -> Path:
    """The config's candidates file from the training images (one pass, or ``--candidate-images``)."""
    from sae_vision_ext.training.candidates import compute_candidates
    from sae_vision_ext.training.data import image_source

    path = Path(cfg.sae.candidates_path)
    n_images = args.candidate_images or (TINY_CANDIDATE_VIEWS if args.tiny else len(train_images))
    source = image_source(cfg, model, preprocess, train_images, seed=cfg.seed, augment=cfg.augment)
    rows = ImageRows(source, cfg.hook_names[0], n_images)
    candidates = compute_candidates(rows, cfg.sae.n_candidates, seed=cfg.seed, progress=not args.quiet,
                                    sample_rows=args.candidate_sample_rows)  # fmt: skip
    candidates.metadata.update(model_name=cfg.model_name, hook_name=cfg.hook_names[0],
                               token_selection=cfg.token_selection, n_images=n_images)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    candidates.save(path)
    say(f"candidates: {cfg.sae.n_candidates} from {candidates.metadata['n_rows']:,} rows of {n_images:,} "
        f"images -> {path}")  # fmt: skip
    return path


def train_one(key: str, args, say, images: Any = None) -> dict[str, Any]:
    """Candidates (if needed) and training for one model; its row of the results table. ``images`` replaces
    the config's dataset (``--tiny``: the sample photos)."""
    from sae_vision_ext.training.config import VisionSAERunnerConfig
    from sae_vision_ext.training.data import load_model_for, training_images
    from sae_vision_ext.training.runner import VisionSAETrainingRunner

    started = time.perf_counter()
    data = config_data(key, args)
    sae_fields = data.pop("sae")
    # the model first (the config without its SAE): --tiny swaps the model, so the width comes from it
    cfg = VisionSAERunnerConfig.from_dict({**data, "sae": None})
    model, preprocess, weights = load_model_for(cfg)
    hook = cfg.hook_names[0]
    width = int(model.hook_width(hook))
    if args.tiny:  # keep the config's expansion (5x) on the tiny model's width
        expansion = sae_fields["d_sae"] // sae_fields["d_in"]
        sae_fields.update(d_in=width, d_sae=expansion * width)
    path = Path(sae_fields["candidates_path"])
    if path.exists():
        stale = stale_candidates(path, cfg.model_name, hook, sae_fields["n_candidates"], width)
        if args.recompute_candidates:
            path.unlink()
        elif stale:
            raise SystemExit(f"[{key}] the candidates file {path} does not fit this run: {stale}; "
                             "add --recompute-candidates to replace it")  # fmt: skip
        else:
            say(f"[{key}] candidates: {path} exists, kept")
    cfg = VisionSAERunnerConfig.from_dict({**data, "sae": sae_fields})
    train_images, _ = training_images(cfg, images)
    say(f"[{key}] {cfg.model_name} {hook} ({cfg.token_selection}): d_in {width}, d_sae {cfg.sae.d_sae}, "
        f"k {cfg.sae.k}, {cfg.sae.n_candidates} candidates, {cfg.training_rows:,} rows")  # fmt: skip
    if not path.exists():
        compute_candidates_file(cfg, model, preprocess, train_images, args, say)
    runner = VisionSAETrainingRunner(cfg, images=images, model=model, preprocess=preprocess, weights=weights,
                                     overwrite=args.overwrite, say=say)  # fmt: skip
    result = runner.run()
    metrics = result.metrics[hook]
    return {
        "model": key, "model_name": cfg.model_name, "hook": hook, "token_selection": cfg.token_selection,
        "d_in": width, "d_sae": int(cfg.sae.d_sae), "k": int(cfg.sae.k),
        "n_candidates": int(cfg.sae.n_candidates),
        "fvu": metrics.get("fvu"), "l0": metrics.get("l0"), "dead_fraction": metrics.get("dead_fraction"),
        "dead_fraction_train": metrics.get("dead_fraction_train"), "eval_source": metrics.get("source"),
        "training_rows": int(result.n_training_rows), "sae_path": str(result.sae_paths[hook]),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


COLUMNS = ("model", "d_in", "d_sae", "fvu", "l0", "dead_fraction", "training_rows", "seconds")


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("fvu", "dead_fraction"):
        return f"{value:.4f}"
    if column in ("l0", "seconds"):
        return f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def results_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict[str, Any]], tiny: bool) -> str:
    """``results.json`` and ``results.md`` in ``out``; the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = results_markdown(rows)
    title = "Tiny run (random-init stand-in models; the numbers mean nothing)" if tiny else "Results"
    (out / "results.md").write_text(f"{title}: one RA-SAE per model, held-out metrics\n\n{table}")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:  # random-init models: nothing to download
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sae_vision_ext.errors import UserError

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out = Path(args.output) if args.output else Path("runs/asae_five_models")
    images = None
    if args.tiny:
        from sae_vision_ext.activations.sample_images import sample_images

        images = sample_images()
    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        if args.tiny:  # 64 candidates for up to 2,560 atoms, knowingly (the paper: 32,000 candidates)
            warnings.filterwarnings("ignore", message=r"d_sae \(\d+\) exceeds the number of candidates")
        for key in args.models:
            try:
                rows.append(train_one(key, args, say, images))
            except (
                UserError,
                FileNotFoundError,
                FileExistsError,
            ) as err:  # no weights / data, a finished run
                print(f"error: [{key}] {err}", file=sys.stderr)
                return 2
            table = write_results(out, rows, args.tiny)  # after every model: a later failure keeps these
    print(table, end="")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
