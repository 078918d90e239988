"""Load a published vision SAE by release name (SAELens's from_pretrained) and run it on photos.

Default: the MSAE authors' SAE on CLIP ViT-L/14 image embeddings (``WolodjaZ/MSAE``), converted on load
from their pickled ``.pth`` (restricted unpickling): ReLU latents by default, TopK at any k on request,
the authors' mean and scale folded in so it takes raw CLIP embeddings. ``--tiny`` writes a synthetic
checkpoint in the exact published layout into a temporary Hugging Face cache and uses a random-init CLIP,
so the whole path runs offline in seconds (the numbers then mean nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

EPILOG = """examples:
  python examples/load_from_hub.py                       # msae-clip-vit-l-14 / centered
                                                         # (Hub, or the local cache)
  python examples/load_from_hub.py --release msae-clip-vit-b-16 --sae-id not_centered --k 32
  python examples/load_from_hub.py --list                # the plugin's releases and their SAE ids
  python examples/load_from_hub.py --tiny --img-size 64  # offline, seconds: synthetic weights,
                                                         # random-init CLIP
  python examples/load_from_hub.py --save-dir out/msae   # also write the converted SAELens folder
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--release",
        default=None,
        help="release name (default: msae-clip-vit-l-14; msae-clip-vit-b-16 with --tiny)",
    )
    parser.add_argument("--sae-id", default="centered", help="SAE id within the release (default: centered)")
    parser.add_argument(
        "--k", type=int, default=64, help="TopK to compare with the ReLU latents (default: 64)"
    )
    parser.add_argument("--n-images", type=int, default=4, help="number of photos (default: 4)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--tiny", action="store_true", help="synthetic checkpoint in a temporary local cache")
    parser.add_argument(
        "--cache-dir", default=None, help="with --tiny: where to build the cache (default: temp)"
    )
    parser.add_argument("--save-dir", default=None, help="write the converted SAE here (SAELens folder)")
    parser.add_argument("--list", action="store_true", help="list the plugin's releases and exit")
    return parser.parse_args(argv)


def write_tiny_release(release, sae_id, model, images):
    """A synthetic checkpoint in the authors' layout at the release's path, sized to the model's hook."""
    import fnmatch

    import numpy as np
    import torch

    from sae_vision_ext.loading import RELEASES
    from sae_vision_ext.loading.hub_cache import seed_hf_cache

    info = RELEASES[release]
    if info.conversion_func != "sae_vision_ext_msae":
        raise SystemExit(f"--tiny builds MSAE releases only; {release} is not one")
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=info.hook_name)
    emb = cache[info.hook_name].float()
    d, n = emb.shape[-1], 8 * emb.shape[-1]
    path = info.saes[sae_id]
    if "*" in path:  # pattern releases: a concrete name of the published form
        path = path.replace("*_TopKReLU", f"{n}_{d}_TopKReLU").replace("_RW_*", "_RW_False_False_0.0")
        path = path.replace("train_image_*", f"train_image_2905936_{d}")
        assert fnmatch.fnmatchcase(path, info.saes[sae_id]), path
    g = torch.Generator().manual_seed(0)
    decoder = torch.randn(n, d, generator=g)
    decoder /= decoder.norm(dim=-1, keepdim=True)
    mean = emb.mean(0) if sae_id == "centered" else torch.zeros(d)
    ckpt = {
        "model": {
            "pre_bias": torch.zeros(d),
            "encoder": decoder.T.clone(),
            "latent_bias": torch.zeros(n),
            "decoder": decoder,
            "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
        },
        "mean_center": mean,
        "scaling_factor": math.sqrt(d) / float((emb - mean).pow(2).sum(-1).mean().clamp_min(1e-6)),
        "target_norm": np.float64(math.sqrt(d)),
    }
    local = os.path.join(tempfile.mkdtemp(), "msae.pth")
    torch.save(ckpt, local)
    seed_hf_cache(info.repo_id, {path: local})
    print(f"tiny: wrote a synthetic {n}x{d} checkpoint at hf://{info.repo_id}/{path} in the local cache")


def main(argv=None):
    args = parse_args(argv)
    release = args.release or ("msae-clip-vit-b-16" if args.tiny else "msae-clip-vit-l-14")
    if args.tiny:
        os.environ["HF_HUB_CACHE"] = args.cache_dir or tempfile.mkdtemp(prefix="hf-cache-")
    import torch

    import sae_vision_ext  # noqa: F401  (registers the architectures)
    from sae_vision_ext.activations.sample_images import sample_images
    from sae_vision_ext.evals.reconstruction import cosine_similarity, fraction_zero, fvu, l0
    from sae_vision_ext.loading import RELEASES, check_sae_fits_model, load_pretrained, register_releases
    from sae_vision_ext.vision.load import describe_weights, load_vision_model_or_random

    register_releases()
    if args.list:
        for name, info in RELEASES.items():
            hook = info.hook_name or "(the sae id)"  # ViT-Prisma: one SAE per hook, named by it
            ids = list(info.saes)
            shown = ", ".join(ids) if len(ids) <= 4 else f"{', '.join(ids[:2])}, ... ({len(ids)} ids)"
            print(f"{name:32s} {info.repo_id:34s} {info.model:44s} {hook:26s} ids: {shown}")
        return 0
    if release not in RELEASES:
        raise SystemExit(f"unknown release {release!r}; choose one of {', '.join(RELEASES)} (see --list)")
    start = time.perf_counter()
    info = RELEASES[release]
    model, preprocess, weights = load_vision_model_or_random(
        info.model, pretrained=not args.tiny, img_size=args.img_size
    )
    photos = sample_images(args.n_images)
    images = torch.stack([preprocess(photo) for photo in photos])
    if args.tiny:
        write_tiny_release(release, args.sae_id, model, images)

    sae = load_pretrained(release, args.sae_id)
    meta = sae.cfg.metadata
    hook = check_sae_fits_model(sae, model)
    print(
        f"SAE {release}/{args.sae_id}: {sae.cfg.architecture()} d_in={sae.cfg.d_in} d_sae={sae.cfg.d_sae} "
        f"on {meta.model_name} {hook} (from {meta.source})"
    )
    print(
        f"model: {model.spec} ({describe_weights(weights)}); "
        f"photos: {', '.join(p.info.get('name', '?') for p in photos)}"
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=hook)
        x = cache[hook].float()
        z = sae.encode(x)  # ReLU latents (the authors' inference default)
        x_hat = sae.decode(z)
        x_hat_k = sae(x, k=args.k)
    print(
        f"ReLU : cosine {cosine_similarity(x, x_hat):.4f}  FVU {fvu(x, x_hat):.4f}  "
        f"L0 {l0(z):.1f}  fraction zero {fraction_zero(z):.3f}"
    )
    print(f"TopK {args.k}: cosine {cosine_similarity(x, x_hat_k):.4f}  FVU {fvu(x, x_hat_k):.4f}")
    scale = meta.latent_scale or 1.0
    for photo, latents in zip(photos, z):
        top = latents.topk(5)
        shown = ", ".join(f"{int(i)}:{float(v) * scale:.3g}" for v, i in zip(top.values, top.indices))
        print(f"  {photo.info.get('name', '?'):12s} top latents (authors' units): {shown}")
    if args.save_dir:
        sae.save_model(args.save_dir)
        print(
            f"saved the converted SAE to {args.save_dir} "
            "(load with SAE.load_from_disk after import sae_vision_ext)"
        )
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
