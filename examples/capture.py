"""Capture activations of a hooked vision model on real photos (shipped offline with scikit-image).

Loads the model (pretrained weights, downloaded when needed; when they cannot be had, a random init of the
same architecture, said clearly), runs it on a few photos with ``run_with_cache`` and prints the hook names,
the token layout and the shape of every captured activation.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_MODEL = "timm:vit_base_patch14_reg4_dinov2.lvd142m"

EPILOG = """examples:
  python examples/capture.py
  python examples/capture.py --model open_clip:ViT-B-32/laion2b_s34b_b79k \\
      --hooks blocks.5.hook_resid_post,hook_image_embed
  python examples/capture.py --img-size 56 --n-images 2 --stop-at-layer 4      # seconds on a CPU
  python examples/capture.py --model timm:resnet50.a1_in1k                      # CNN: maps as spatial tokens
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default: {DEFAULT_MODEL})")
    parser.add_argument("--hooks", default=None,
                        help="comma-separated hook names, or 'all' (default: hook_embed, the middle and last "
                             "blocks' hook_resid_post, hook_pooled, and hook_image_embed for CLIP/SigLIP)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (default: the model's own; small values run fast)")
    parser.add_argument("--n-images", type=int, default=4, help="number of photos (default: 4)")
    parser.add_argument("--stop-at-layer", type=int, default=None,
                        help="run blocks 0..L-1 only (hooks after that are not computed)")
    parser.add_argument("--random-init", action="store_true", help="skip pretrained weights, random init")
    parser.add_argument("--weights", default=None, help="local checkpoint file to load instead")
    return parser.parse_args(argv)


def default_hooks(model, stop):
    n = model.n_layers if stop is None else stop
    cnn = model.layer_noun == "stages"
    names = ["hook_stem" if cnn else "hook_embed"]
    if n:
        layer = "stages.{}.hook_out" if cnn else "blocks.{}.hook_resid_post"
        names += [layer.format(i) for i in sorted({n // 2, n - 1})]
    if stop is None:
        names.append("hook_pooled")
        if model.has_image_embed:
            names.append("hook_image_embed")
    return names


def main(argv=None):
    args = parse_args(argv)
    import torch

    from sae_vision_ext.activations.sample_images import sample_images
    from sae_vision_ext.vision.hooked_vision_model import describe_hook_names
    from sae_vision_ext.vision.load import describe_weights, load_vision_model_or_random

    start = time.perf_counter()
    model, preprocess, weights = load_vision_model_or_random(
        args.model,
        weights=args.weights,
        pretrained=not args.random_init,
        img_size=args.img_size,
        device="cpu",
    )
    layout = model.token_layout  # None for a CNN: its maps differ in size (model.layout_at(hook))
    print(f"model: {model.spec} ({describe_weights(weights)}); "
          f"{model.n_layers} {model.layer_noun}, d_model={model.cfg.d_model}, "
          f"image {model.cfg.image_size[0]}x{model.cfg.image_size[1]}, patch {model.cfg.patch_size[0]}")
    if layout is not None:
        print(f"token layout: {layout.n_cls} CLS + {layout.n_registers} registers + {layout.n_patches} "
              f"patches (grid {layout.grid_size[0]}x{layout.grid_size[1]}) = {layout.n_tokens} tokens")
    print(f"{len(model.hook_dict)} hook points: {describe_hook_names(list(model.hook_dict))}")

    photos = sample_images(args.n_images)
    images = torch.stack([preprocess(photo) for photo in photos])
    print(f"photos: {', '.join(p.info.get('name', '?') for p in photos)} -> tensor {list(images.shape)}")

    if args.hooks is None:
        names = default_hooks(model, args.stop_at_layer)
    elif args.hooks == "all":
        names = None
    else:
        names = [name.strip() for name in args.hooks.split(",") if name.strip()]
    with torch.no_grad():
        output, cache = model.run_with_cache(images, names_filter=names, stop_at_layer=args.stop_at_layer)
    print("captured activations:")
    for name, acts in cache.cache_dict.items():
        line = f"  {name:32s} {list(acts.shape)}"
        if model.layer_noun == "stages" and model.is_token_hook(name):
            grid = model.layout_at(name).grid_size
            line += f"   feature map {grid[0]}x{grid[1]} as {grid[0] * grid[1]} spatial tokens"
        elif model.is_token_hook(name):
            parts = [f"{which}={list(layout.select(acts, which).shape)}"
                     for which, count in (("cls", layout.n_cls), ("registers", layout.n_registers),
                                          ("patches", layout.n_patches)) if count]
            line += "   " + ", ".join(parts)
        print(line)
    if output is not None:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        print(f"model output: {shape}")
    if "hook_pooled" in cache.cache_dict and len(photos) > 1:
        pooled = torch.nn.functional.normalize(cache["hook_pooled"].float(), dim=-1)
        sims = pooled @ pooled.T
        sims.fill_diagonal_(-2)
        i, j = divmod(int(sims.argmax()), len(photos))
        print(f"most similar pair (cosine of hook_pooled): "
              f"{photos[i].info['name']} ~ {photos[j].info['name']} "
              f"= {float(sims[i, j]):.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
