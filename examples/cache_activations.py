"""Cache a vision model's activations to disk once, then train SAEs from the cache without the model.

1. ``cache_activations`` writes SAELens's cached-activation format (one ``Array2D`` column per hook), shard by
   shard, shuffled, committed atomically (run it again after an interruption: finished shards are kept);
2. the cache reads back with plain ``datasets.load_from_disk`` and with SAELens's own ``ActivationsStore``;
3. an SAE trains from it (``use_cached_activations=True``): no model is loaded.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  python examples/cache_activations.py                    # sample photos, DINOv2 ViT-S/14, 512 views
  python examples/cache_activations.py --images ./photos --n-images 20000 --output runs/cache_l9
  python examples/cache_activations.py --tiny             # seconds
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="timm:vit_small_patch14_reg4_dinov2.lvd142m")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--hook", default="blocks.9.hook_resid_post")
    p.add_argument("--images", help="image folder or HF dataset (default: the scikit-image sample photos)")
    p.add_argument("--n-images", type=int, default=512, help="image views (random resized crops) to cache")
    p.add_argument("--output", default="runs/example_cache")
    p.add_argument("--random-init", action="store_true", help="random model weights (seed 0), on purpose")
    p.add_argument("--tiny", action="store_true", help="tiny ViT at 32 px, 48 views (seconds)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    import datasets
    import torch
    from sae_lens.training.activations_store import ActivationsStore

    from sae_vision_ext.training.caching import cache_activations
    from sae_vision_ext.training.config import VisionSAERunnerConfig
    from sae_vision_ext.training.runner import VisionSAETrainingRunner
    from sae_vision_ext.vision.load import describe_weights

    if args.tiny:  # a tiny random model: runs anywhere in seconds
        args.random_init = True
        args.model, args.img_size, args.hook, args.n_images = (
            "timm:vit_tiny_patch16_224", 32, "blocks.1.hook_resid_post", 48
        )
    if args.images:
        images = args.images
    else:
        from sae_vision_ext.activations.sample_images import sample_images

        images = sample_images()
    out = Path(args.output)

    # 1. cache (no SAE in this config: sae=None)
    cache_cfg = VisionSAERunnerConfig(sae=None, model_name=args.model, pretrained=not args.random_init,
                                      img_size=args.img_size, hook_name=args.hook,
                                      token_selection="patches", augment="crop_flip", model_batch_size=16,
                                      num_workers=1, images_per_shard=128, seed=0)  # fmt: skip
    cache = cache_activations(cache_cfg, out / "cache", args.n_images, images=images, overwrite=True)
    meta = cache.metadata
    print(f"cache {cache.path}: {meta['n_rows']:,} rows x {meta['hook_widths']} "
          f"in {meta['n_shards']} shards; "
          f"model {meta['model_name']} ({describe_weights(meta['weights'])}), "
          f"tokens {meta['token_selection']}")  # fmt: skip

    # 2. read it back without the model: HF datasets and SAELens's ActivationsStore
    ds = datasets.load_from_disk(str(cache.path))
    print(f"datasets.load_from_disk: {len(ds)} rows, features {ds.features}")
    width, context = meta["hook_widths"][args.hook], meta["context_size"]
    store = ActivationsStore(model=None, dataset=None, streaming=False, hook_name=args.hook,
                             hook_head_index=None, context_size=context, d_in=width, n_batches_in_buffer=16,
                             total_training_tokens=meta["n_rows"],
                             store_batch_size_prompts=8, train_batch_size_tokens=64, prepend_bos=False,
                             normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                             cached_activations_path=str(cache.path))  # fmt: skip
    print(f"SAELens ActivationsStore batch: {tuple(next(store).shape)}")

    # 3. train from the cache: no model is loaded
    train_cfg = VisionSAERunnerConfig(
        sae={"architecture": "topk", "d_in": width, "d_sae": 4 * width, "k": 16}, model_name=args.model,
        hook_name=args.hook, token_selection="patches", use_cached_activations=True,
        cached_activations_path=str(cache.path), training_rows=min(meta["n_rows"], 16384),
        train_batch_size_rows=64,
        lr=1e-3, output_path=str(out / "sae"), seed=0,
    )  # fmt: skip
    result = VisionSAETrainingRunner(train_cfg).run()
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
