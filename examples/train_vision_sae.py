"""Train vision SAEs from Python: a config, images, SAELens's trainer, a SAELens folder you can load back.

Trains a Matryoshka SAE (or any registered architecture) on a vision model's patch tokens, one SAE per
hook when several hooks are given (one forward pass feeds all of them, SAELens's ``MultiSAETrainer`` trains
them), prints the held-out metrics, then loads the SAE back with ``SAE.load_from_disk`` and encodes a few
rows at a chosen k.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  python examples/train_vision_sae.py                                   # sample photos, DINOv2 ViT-S/14, MSAE
  python examples/train_vision_sae.py --images ./my_photos --rows 500000 --output runs/my_msae
  python examples/train_vision_sae.py --hooks blocks.5.hook_resid_post,blocks.9.hook_resid_post \\
      --architecture topk
  python examples/train_vision_sae.py --tiny                            # seconds: tiny ViT, few rows
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="timm:vit_small_patch14_reg4_dinov2.lvd142m")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--hooks", default="blocks.9.hook_resid_post", help="comma-separated hook names")
    p.add_argument("--tokens", default="patches")
    p.add_argument("--images", help="image folder or HF dataset (default: the scikit-image sample photos)")
    p.add_argument("--architecture", default="matryoshka_topk",
                   help="matryoshka_topk, topk, batchtopk, standard, ...")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--output", default="runs/example_vision_sae")
    p.add_argument("--random-init", action="store_true", help="random model weights (seed 0), on purpose")
    p.add_argument("--tiny", action="store_true", help="tiny ViT at 32 px, 1k rows (seconds)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from sae_lens import SAE

    from sae_vision_ext.training.config import VisionSAERunnerConfig, sae_config_from_dict
    from sae_vision_ext.training.runner import VisionSAETrainingRunner, load_model_for

    if args.tiny:  # a tiny random model: runs anywhere in seconds
        args.random_init = True
        args.model, args.img_size, args.rows, args.batch_size = "timm:vit_tiny_patch16_224", 32, 1024, 128
        args.hooks, args.expansion = "blocks.1.hook_resid_post", 2
    hooks = args.hooks.split(",")
    if args.images:
        images = args.images
    else:
        from sae_vision_ext.activations.sample_images import sample_images

        images = sample_images()

    # 1. the config, without the SAE first: the model tells the hook's width
    cfg = VisionSAERunnerConfig(
        sae=None, model_name=args.model, pretrained=not args.random_init, img_size=args.img_size,
        hook_name=hooks, token_selection=args.tokens,
        augment="crop_flip", model_batch_size=16, num_workers=1, buffer_size_rows=8 * args.batch_size,
        training_rows=args.rows, train_batch_size_rows=args.batch_size, lr=args.lr, eval_holdout_images=2,
        n_eval_images=8, n_batches_for_norm_estimate=4, output_path=args.output, n_checkpoints=1, seed=0,
    )  # fmt: skip
    model, preprocess, weights = load_model_for(cfg)
    d_in = model.hook_width(hooks[0])
    sae_fields = {"architecture": args.architecture, "d_in": d_in, "d_sae": args.expansion * d_in}
    if args.architecture == "matryoshka_topk":
        sae_fields.update(level_weighting="reverse", standardize_input=True,
                          k_levels=[8, 2 * d_in] if args.tiny else None)  # fmt: skip
    elif args.architecture in ("topk", "batchtopk"):
        sae_fields["k"] = 16
    cfg.sae = sae_config_from_dict({k: v for k, v in sae_fields.items() if v is not None})

    # 2. train: images -> model (background thread) -> mixing buffer -> SAETrainer / MultiSAETrainer
    runner = VisionSAETrainingRunner(cfg, images=images, model=model, preprocess=preprocess)
    runner.weights = weights
    result = runner.run()
    print(result.summary())

    # 3. load it back like any SAELens SAE (importing sae_vision_ext registers the architectures)
    import sae_vision_ext  # noqa: F401

    path = result.sae_paths[hooks[0]]
    sae = SAE.load_from_disk(path)
    print(f"loaded {type(sae).__name__} from {path}: metadata model={sae.cfg.metadata.model_name} "
          f"hook={sae.cfg.metadata.hook_name} tokens={sae.cfg.metadata.token_selection}")  # fmt: skip
    rows = torch.randn(4, d_in)
    kwargs = {"k": 8} if args.architecture == "matryoshka_topk" else {}
    latents = sae.encode(rows, **kwargs)
    print(f"encode({tuple(rows.shape)}{', k=8' if kwargs else ''}) -> {tuple(latents.shape)}, "
          f"non-zero per row: {(latents != 0).sum(-1).tolist()}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
