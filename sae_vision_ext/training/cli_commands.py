"""``sae-vision cache``, ``sae-vision train`` and ``sae-vision eval``: ``add_parser(subparsers)`` + ``run_*(args)``.

Every setting is a field of :class:`~sae_vision_ext.training.config.VisionSAERunnerConfig`: read from ``--config``
(YAML or JSON), then the explicit flags, then ``--set key=value`` (dotted keys reach into ``sae`` and ``logger``).
When the config gives no ``sae.d_in`` it is taken from the hook's width, and ``--expansion`` sets ``d_sae``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

TRAIN_EPILOG = """examples:
  sae-vision train --dataset ./photos --model timm:vit_small_patch14_reg4_dinov2.lvd142m \\
      --hook blocks.9.hook_resid_post --tokens patches --architecture matryoshka_topk --expansion 8 \\
      --rows 2000000 --batch-size 4096 --lr 1e-4 --output runs/dinov2_msae --checkpoints 10
  sae-vision train --config run.yaml --set sae.level_weighting=reverse --resume      # continue the latest checkpoint
  sae-vision train --cache runs/cache_l9 --architecture topk --set sae.k=32 --output runs/topk
"""
CACHE_EPILOG = """examples:
  sae-vision cache --dataset ./photos --model timm:vit_small_patch14_reg4_dinov2.lvd142m \\
      --hook blocks.9.hook_resid_post --tokens patches --images 20000 --output runs/cache_l9
  (interrupted? run the same command again: finished shards are kept)
"""
EVAL_EPILOG = """examples:
  sae-vision eval runs/dinov2_msae --dataset ./val_photos --n-images 500
  sae-vision eval runs/topk --cache runs/cache_val --json metrics.json
  sae-vision eval runs/dinov2_msae --dataset ./val_photos --k 64        # MSAE at k = 64
"""

# flag destination -> config field
FIELD_FLAGS = {
    "model": "model_name",
    "weights": "model_weights",
    "img_size": "img_size",
    "tokens": "token_selection",
    "dataset": "dataset_path",
    "split": "dataset_split",
    "image_column": "image_column",
    "augment": "augment",
    "model_batch_size": "model_batch_size",
    "workers": "num_workers",
    "device": "device",
    "seed": "seed",
    "rows": "training_rows",
    "batch_size": "train_batch_size_rows",
    "lr": "lr",
    "output": "output_path",
    "checkpoints": "n_checkpoints",
    "eval_dataset": "eval_dataset_path",
    "holdout": "eval_holdout_images",
    "n_eval_images": "n_eval_images",
    "shard_images": "images_per_shard",
    "cache_dtype": "cache_dtype",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("config")
    g.add_argument("--config", help="YAML or JSON file with VisionSAERunnerConfig fields")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set sae.d_sae=4096 --set lr=3e-4 (repeatable)")  # fmt: skip
    m = parser.add_argument_group("model and data")
    m.add_argument("--model", help="load_vision_model spec, e.g. timm:vit_small_patch14_reg4_dinov2.lvd142m")
    m.add_argument("--weights", help="local weights file for the model")
    pre = m.add_mutually_exclusive_group()
    pre.add_argument("--pretrained", dest="pretrained", action="store_const", const=True,
                     help="require pretrained weights (default: use them when present locally)")  # fmt: skip
    pre.add_argument("--random-init", dest="pretrained", action="store_const", const=False,
                     help="random weights (seeded by --seed)")  # fmt: skip
    m.add_argument("--img-size", type=int, help="input resolution (position embeddings resampled)")
    m.add_argument("--hook", action="append", help="hook name (repeat for several SAEs from one forward pass)")
    m.add_argument("--tokens", help="token selection: cls, registers, prefix, patches, all, pooled, embed")
    m.add_argument("--dataset", help="hub dataset name, save_to_disk folder or image folder")
    m.add_argument("--split", help="dataset split (default train)")
    m.add_argument("--image-column", help="image column of a HF dataset (default: detected)")
    m.add_argument("--augment", choices=["none", "crop_flip"], help="random resized crops + flips per position")
    m.add_argument("--model-batch-size", type=int, help="images per forward pass")
    m.add_argument("--workers", type=int, help="DataLoader worker processes decoding images")
    m.add_argument("--device", help="cpu, cuda, cuda:1, mps")
    m.add_argument("--seed", type=int)
    m.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers: Any) -> None:
    """Add ``cache``, ``train`` and ``eval`` to the ``sae-vision`` command."""
    fmt = argparse.RawDescriptionHelpFormatter

    train = subparsers.add_parser("train", help="train SAE(s) on a vision model's activations",
                                  description="Train SAEs with SAELens's SAETrainer from images or a cache.",
                                  epilog=TRAIN_EPILOG, formatter_class=fmt)  # fmt: skip
    _add_common(train)
    t = train.add_argument_group("SAE and training")
    t.add_argument("--architecture", help="registered training architecture (default matryoshka_topk)")
    t.add_argument("--d-sae", type=int, help="dictionary size")
    t.add_argument("--expansion", type=int, help="d_sae = expansion * d_in (default 8)")
    t.add_argument("--rows", type=int, help="training rows (activation vectors)")
    t.add_argument("--batch-size", type=int, help="rows per training step")
    t.add_argument("--lr", type=float)
    t.add_argument("--output", help="output folder (SAELens SAE folder)")
    t.add_argument("--checkpoints", type=int, help="number of evenly spaced checkpoints")
    t.add_argument("--resume", nargs="?", const="latest", help="resume from the latest checkpoint or a folder")
    t.add_argument("--cache", help="train from this activation cache (no model needed)")
    t.add_argument("--eval-dataset", help="held-out images for the final metrics")
    t.add_argument("--holdout", type=int, help="hold out this many training images for the final metrics")
    t.add_argument("--n-eval-images", type=int, help="evaluation views")
    t.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    train.set_defaults(func=run_train)

    cache = subparsers.add_parser("cache", help="write a model's activations to an on-disk cache",
                                  description="Cache activations in SAELens's format (resumable, atomic).",
                                  epilog=CACHE_EPILOG, formatter_class=fmt)  # fmt: skip
    _add_common(cache)
    c = cache.add_argument_group("cache")
    c.add_argument("--output", required=True, help="cache folder to create")
    c.add_argument("--images", type=int, required=True, help="image positions (views) to cache")
    c.add_argument("--shard-images", type=int, help="images per shard (default 4096)")
    c.add_argument("--cache-dtype", choices=["float32", "float16"])
    c.add_argument("--overwrite", action="store_true", help="replace an existing complete cache")
    cache.set_defaults(func=run_cache)

    ev = subparsers.add_parser("eval", help="FVU, cosine, L0, dead latents of a trained SAE on images or a cache",
                               description="Evaluate an SAE folder; the model, hook and token selection come from "
                               "its metadata.", epilog=EVAL_EPILOG, formatter_class=fmt)  # fmt: skip
    ev.add_argument("sae_path", help="SAE folder (cfg.json + sae_weights.safetensors)")
    ev.add_argument("--dataset", help="images: hub dataset, dataset folder or image folder")
    ev.add_argument("--split", default="train")
    ev.add_argument("--cache", help="an activation cache instead of images (no model needed)")
    ev.add_argument("--n-images", type=int, default=256, help="images (or cache rows / context) to evaluate")
    ev.add_argument("--model", help="override the model spec stored in the SAE metadata")
    ev.add_argument("--weights", help="local weights file for the model")
    ev.add_argument("--k", type=int, help="encode with this k (Matryoshka SAE)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--workers", type=int, default=0)
    ev.add_argument("--json", help="also write the metrics to this file")
    ev.set_defaults(func=run_eval)


# ----------------------------------------------------------------------------------------------- config building


def config_dict_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config file, then explicit flags, then ``--set`` overrides."""
    from sae_vision_ext.training.config import apply_overrides, load_config_file

    data: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for flag, name in FIELD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[name] = value
    if getattr(args, "pretrained", None) is not None:
        data["pretrained"] = args.pretrained
    if getattr(args, "hook", None):
        data["hook_name"] = args.hook if len(args.hook) > 1 else args.hook[0]
    if getattr(args, "cache", None):
        data["use_cached_activations"] = True
        data["cached_activations_path"] = args.cache
    if getattr(args, "resume", None):
        data["resume_from_checkpoint"] = args.resume
    if getattr(args, "wandb", False):
        data.setdefault("logger", {})["log_to_wandb"] = True
    if getattr(args, "quiet", False):
        data["verbose"] = False
    sae = dict(data.get("sae") or {})
    if getattr(args, "architecture", None):
        sae["architecture"] = args.architecture
    if getattr(args, "d_sae", None):
        sae["d_sae"] = args.d_sae
    data["sae"] = sae
    return apply_overrides(data, list(getattr(args, "set", []) or []))


def build_config(data: dict[str, Any], expansion: int | None = None, images: Any = None):
    """``(VisionSAERunnerConfig, model, preprocess)``; a missing ``sae.d_in`` is read off the hook's width.

    The model is loaded here only when the width is needed (and then handed to the runner, not loaded twice).
    """
    from sae_vision_ext.activations.cache import CachedActivations
    from sae_vision_ext.activations.source import resolve_hooks
    from sae_vision_ext.training.config import VisionSAERunnerConfig
    from sae_vision_ext.training.runner import load_model_for

    data = dict(data)
    sae = dict(data.get("sae") or {})
    sae.setdefault("architecture", "matryoshka_topk")
    model = preprocess = weights = None
    if "d_in" not in sae:
        hooks = resolve_hooks(data.get("hook_name", "hook_image_embed"), data.get("token_selection", "embed"))
        if data.get("use_cached_activations"):
            widths = CachedActivations(data["cached_activations_path"]).hook_widths
            missing = [h for h in hooks if h not in widths]
            if missing:
                raise ValueError(f"the cache has no activations for {missing}; it holds {list(widths)}")
            sae["d_in"] = widths[hooks[0]]
        else:
            probe = VisionSAERunnerConfig(sae={"architecture": "standard", "d_in": 1, "d_sae": 1},
                                          **{k: v for k, v in data.items() if k != "sae"})  # fmt: skip
            model, preprocess, weights = load_model_for(probe, say=_say)
            sae["d_in"] = int(model.hook_width(hooks[0]))
    if "d_sae" not in sae:
        sae["d_sae"] = int(sae["d_in"]) * (expansion or 8)
    data["sae"] = sae
    cfg = VisionSAERunnerConfig.from_dict(data)
    return cfg, model, preprocess, weights


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- commands


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError)


def _friendly(command):
    """Report configuration mistakes as one line and exit code 2, not a traceback."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except USER_ERRORS as err:
            print(f"sae-vision {getattr(args, 'command', '')}: error: {err}", file=sys.stderr)
            return 2

    wrapped.__name__ = command.__name__
    wrapped.__doc__ = command.__doc__
    return wrapped


@_friendly
def run_train(args: argparse.Namespace) -> int:
    from sae_vision_ext.training.runner import VisionSAETrainingRunner

    cfg, model, preprocess, weights = build_config(config_dict_from_args(args), expansion=args.expansion)
    runner = VisionSAETrainingRunner(cfg, model=model, preprocess=preprocess)
    if weights:
        runner.weights = weights
    result = runner.run()
    print(result.summary())
    return 130 if result.interrupted else 0


@_friendly
def run_cache(args: argparse.Namespace) -> int:
    """``sae-vision cache``; under ``torchrun`` the shards are split over the ranks (one cache, committed once)."""
    from sae_vision_ext.training.config import VisionSAERunnerConfig
    from sae_vision_ext.training.distributed import destroy_distributed, init_distributed
    from sae_vision_ext.training.runner import cache_activations

    context = init_distributed()
    try:
        data = config_dict_from_args(args)
        data.update(sae=None, use_cached_activations=False, cached_activations_path=None)
        cfg = VisionSAERunnerConfig.from_dict(data)
        cache = cache_activations(cfg, args.output, args.images, overwrite=args.overwrite, progress=not args.quiet)
        meta = cache.metadata
        if context.is_main:
            print(f"cache: {cache.path}\n  rows: {meta['n_rows']:,} ({meta['context_size']} per image) | hooks: "
                  f"{meta['hook_widths']} | images read: {meta['n_images_ok']:,} | "
                  f"skipped: {meta['n_images_failed']:,}")  # fmt: skip
    finally:
        destroy_distributed()
    return 0


def _random_init_seed(weights: str | None) -> int | None:
    match = re.fullmatch(r"random-init\(seed=(\d+)\)", weights or "")
    return int(match.group(1)) if match else None


def evaluate_sae_folder(
    sae_path: str,
    dataset: Any = None,
    cache: str | None = None,
    n_images: int = 256,
    model_spec: str | None = None,
    weights: str | None = None,
    k: int | None = None,
    device: str = "cpu",
    workers: int = 0,
    split: str = "train",
) -> dict[str, Any]:
    """Metrics of a saved SAE on images (through the model in its metadata) or on a cache."""
    import torch
    from sae_lens import SAE

    import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)
    from sae_vision_ext.evals.reconstruction import evaluate_sae

    sae = SAE.load_from_disk(sae_path, device=device)
    meta = sae.cfg.metadata
    hook = meta.hook_name
    if hook is None:
        raise ValueError(f"{sae_path} has no hook_name in its metadata; it was not trained by sae_vision_ext")
    encode_kwargs = {"k": k} if k is not None else None
    if cache:
        from sae_vision_ext.activations.cache import CachedActivations

        cached = CachedActivations(cache)
        if hook not in cached.hook_widths:
            raise ValueError(f"cache {cache} has no column {hook!r}; it holds {cached.hook_names}")
        limit = n_images * (cached.context_size or 1)

        def batches():
            have = 0
            for block in cached.iter_rows(hook, block_rows=4096):
                block = block[: limit - have]
                have += block.shape[0]
                yield torch.from_numpy(block.astype("float32"))
                if have >= limit:
                    return

        result = evaluate_sae(sae, batches(), encode_kwargs=encode_kwargs)
        result["source"] = f"cache {cache}"
        return result
    if dataset is None:
        raise ValueError("give --dataset (images) or --cache")
    from sae_vision_ext.activations.source import ImageActivationSource
    from sae_vision_ext.vision.load import load_vision_model, load_vision_model_or_random

    spec = model_spec or meta.model_name
    image_size = meta.image_size
    kwargs = dict(device=device, img_size=tuple(image_size) if image_size else None)
    seed = _random_init_seed(meta.weights)
    if seed is not None and not weights:
        _say(f"note: the SAE was trained on {spec} with random weights (seed {seed}); rebuilding them")
        model, preprocess, _ = load_vision_model_or_random(spec, pretrained=False, seed=seed, **kwargs)
    else:
        model, preprocess = load_vision_model(spec, pretrained=not weights, weights=weights, **kwargs)
    source = ImageActivationSource(model, preprocess, dataset if not isinstance(dataset, str) else _open(dataset, split),
                                   hook, token_selection=meta.token_selection or "patches", num_workers=workers,
                                   shuffle=False)  # fmt: skip
    batches = (chunk.rows[hook] for chunk in source.iter_chunks(0, min(n_images, source.n_images)))
    result = evaluate_sae(sae, batches, encode_kwargs=encode_kwargs)
    result.update(source=f"images {dataset if isinstance(dataset, str) else 'in-memory'}",
                  images_read=source.n_ok, images_skipped=source.n_failed)  # fmt: skip
    return result


def _open(dataset: str, split: str):
    from sae_vision_ext.activations.images import open_images

    return open_images(dataset, split=split)


def format_metrics(metrics: dict[str, Any]) -> str:
    return (
        f"FVU {metrics['fvu']:.4f} | FVU per sample {metrics['fvu_per_sample']:.4f} | cosine {metrics['cosine']:.4f} | "
        f"L0 {metrics['l0']:.1f} of {metrics['d_sae']} (zeros {metrics['fraction_zero']:.1%}) | "
        f"dead {metrics['dead_fraction']:.1%} over {metrics['n_rows']:,} rows"
    )


@_friendly
def run_eval(args: argparse.Namespace) -> int:
    metrics = evaluate_sae_folder(args.sae_path, dataset=args.dataset, cache=args.cache, n_images=args.n_images,
                                  model_spec=args.model, weights=args.weights, k=args.k, device=args.device,
                                  workers=args.workers, split=args.split)  # fmt: skip
    print(f"{args.sae_path} on {metrics['source']}:\n  {format_metrics(metrics)}")
    if args.json:
        clean = {k: v for k, v in metrics.items() if not hasattr(v, "shape")}
        Path(args.json).write_text(json.dumps(clean, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m sae_vision_ext.training.cli_commands train ...``) until ``sae-vision`` has it."""
    parser = argparse.ArgumentParser(prog="sae-vision")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
