"""Quickstart: train a Matryoshka SAE (MSAE) on DINOv2 ViT-S/14 (registers) patch tokens from real photos.

    python -m sae_vision_ext.quickstart              # ~2-4 minutes on 2 CPU cores
    python -m sae_vision_ext.quickstart --help

Images: the sample photos shipped inside scikit-image (astronaut, coffee, the cat, ...), seen through random
resized crops and flips (a new view per image position), with 2 photos held out for the final metrics. The model
is the real DINOv2 architecture; its pretrained weights are used when they are present locally (``--weights FILE``
or the local Hugging Face cache), otherwise it is randomly initialised and the run says so. The SAE is the MSAE of
Zaigrajew et al. (nested TopK levels 64, 128, ..., d_sae; reverse weighting RW; inputs standardised), trained by
SAELens's ``SAETrainer``; the output folder is a SAELens SAE folder (``SAE.load_from_disk``).

The defaults are the smallest run that is still a real one; every size is a flag, and ``--config`` / the
``sae-vision train`` command take the same settings at full scale (the config's own defaults are the paper's).
"""

from __future__ import annotations

import argparse
import sys
import time

EPILOG = """examples:
  python -m sae_vision_ext.quickstart
  python -m sae_vision_ext.quickstart --rows 200000 --img-size 224 --output runs/quickstart_224
  python -m sae_vision_ext.quickstart --weights ~/dinov2_vits14_reg4.safetensors     # pretrained, local file
  python -m sae_vision_ext.quickstart --tiny                                          # seconds, for tests
"""

MODEL = "timm:vit_small_patch14_reg4_dinov2.lvd142m"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sae_vision_ext.quickstart",
        description="Train an MSAE on DINOv2 ViT-S/14 (reg4) patch tokens of offline sample photos; print its "
        "metrics and output folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--model", default=MODEL, help=f"model spec (default {MODEL})")
    p.add_argument("--weights", help="local weights file for the model (else: local HF cache, else random init)")
    p.add_argument("--img-size", type=int, default=168, help="input resolution; 168 -> 12x12 = 144 patches/image")
    p.add_argument("--hook", default="blocks.9.hook_resid_post", help="hook to train on")
    p.add_argument("--tokens", default="patches", help="token selection (patches, cls, registers, all)")
    p.add_argument("--rows", type=int, default=98_304, help="training rows (patch tokens)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per SAE step")
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weighting", default="reverse", help="MSAE level weighting: reverse (RW) or uniform (UW)")
    p.add_argument("--holdout", type=int, default=2, help="photos held out for the final metrics")
    p.add_argument("--eval-views", type=int, default=24, help="augmented views of the held-out photos to evaluate")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding and augmenting images")
    p.add_argument("--checkpoints", type=int, default=2, help="checkpoints during training")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run (tests): tiny images, few rows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def quickstart_config(args: argparse.Namespace):
    """The ``VisionSAERunnerConfig`` the quickstart trains, without its ``sae`` (see :func:`msae_config`)."""
    from sae_vision_ext.training.config import VisionSAERunnerConfig

    if args.tiny:
        args.img_size, args.rows, args.batch_size, args.expansion = 56, 2048, 256, 2
        args.eval_views, args.checkpoints = 4, 1
    return VisionSAERunnerConfig(
        sae=None,  # set once the model tells the hook's width
        model_name=args.model,
        model_weights=args.weights,
        img_size=args.img_size,
        hook_name=args.hook,
        token_selection=args.tokens,
        augment="crop_flip",
        crop_scale=(0.25, 1.0),
        model_batch_size=32,
        num_workers=args.workers,
        prefetch_batches=2,
        buffer_size_rows=8 * args.batch_size,
        eval_holdout_images=args.holdout,
        n_eval_images=args.eval_views,
        training_rows=args.rows,
        train_batch_size_rows=args.batch_size,
        lr=args.lr,
        n_batches_for_norm_estimate=2 if args.tiny else 8,
        output_path=args.output,
        n_checkpoints=args.checkpoints,
        resume_from_checkpoint="latest" if args.resume else None,
        seed=args.seed,
        device=args.device,
        verbose=not args.quiet,
    )


def msae_config(d_in: int, args: argparse.Namespace):
    """MSAE: d_sae = expansion * d_in, the authors' k ladder, RW weighting, standardised inputs."""
    from sae_vision_ext.saes.matryoshka_topk import default_k_levels
    from sae_vision_ext.training.config import sae_config_from_dict

    d_sae = args.expansion * d_in
    return sae_config_from_dict({
        "architecture": "matryoshka_topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k_levels": default_k_levels(d_sae, k_start=16 if args.tiny else 64),
        "level_weighting": args.weighting,
        "standardize_input": True,
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    from sae_vision_ext.activations.sample_images import sample_images
    from sae_vision_ext.training.runner import VisionSAETrainingRunner, load_model_for

    cfg = quickstart_config(args)
    say = print
    images = sample_images()
    if len(images) < args.holdout + 2:  # without scikit-image: matplotlib's single sample photo
        say(f"note: only {len(images)} sample photo(s) (install scikit-image for 16); nothing is held out, so the "
            "metrics below are on fresh training-stream rows")  # fmt: skip
        args.holdout = cfg.eval_holdout_images = 0
    say(f"quickstart: {len(images)} sample photos (scikit-image), random resized crops + flips, "
        f"{args.holdout} photos held out")  # fmt: skip
    model, preprocess, weights = load_model_for(cfg, say=say)
    d_in = int(model.hook_width(args.hook))
    cfg.sae = msae_config(d_in, args)
    d_sae = cfg.sae.d_sae
    say(f"model: {args.model} ({weights}) at {model.cfg.image_size[0]}px, hook {args.hook}, {args.tokens} tokens "
        f"({model.token_layout.n_patches} per image)")  # fmt: skip
    say(f"SAE: matryoshka_topk d_in={d_in} d_sae={d_sae} k_levels={cfg.sae.k_levels} weighting={args.weighting}; "
        f"{args.rows:,} rows in batches of {args.batch_size}")  # fmt: skip
    runner = VisionSAETrainingRunner(cfg, images=images, model=model, preprocess=preprocess,
                                     say=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    runner.weights = weights
    result = runner.run()
    print(result.summary())
    if result.interrupted:
        return 130
    print(f"load it with: SAE.load_from_disk({str(result.output_path)!r}) after `import sae_vision_ext`")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
