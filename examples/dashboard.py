"""Write an HTML dashboard of an SAE's top latents (top images, patch heatmaps, statistics)
and an FVU-L0 plot.

With ``--sae`` the dashboard shows that SAELens checkpoint on ``--images`` (a folder, or the sample photos).
Without it, a small TopK SAE is fitted on the spot to the patch tokens of the photos at ``--hook`` (a quick
demonstration loop, not the project's trainer) and shown, with an FVU-L0 curve over several k. ``--check``
opens the page in headless Chromium, fails on console errors and keeps a screenshot next to the page.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "timm:vit_small_patch14_reg4_dinov2.lvd142m"

EPILOG = """examples:
  python examples/dashboard.py --out artifacts/dash       # DINOv2-S, SAE fitted on 32 sample photos
  python examples/dashboard.py --sae runs/dino_l8/final --images ~/data/val --out artifacts/dash --check
  python examples/dashboard.py --model open_clip:ViT-B-32/laion2b_s34b_b79k --hook blocks.8.hook_resid_post
  python examples/dashboard.py --model timm:convnext_base.fb_in22k --hook stages.2.hook_out  # CNN map
  python examples/dashboard.py --tiny --out /tmp/dash --check        # tiny random CLIP, seconds on a CPU
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random CLIP, few images, few steps (for tests)")
    parser.add_argument("--random-init", action="store_true", help="skip pretrained weights")
    parser.add_argument("--img-size", type=int, default=224,
                        help="input resolution (default 224; 0 = the model's own, 518 for DINOv2)")
    parser.add_argument("--sae", help="SAELens SAE folder (default: fit a small TopK SAE here)")
    parser.add_argument("--hook", default=None,
                        help="hook for the fitted SAE (default: the middle block's resid_post)")
    parser.add_argument("--images",
                        help="image folder (default: the sample photos shipped with scikit-image)")
    parser.add_argument("--n-images", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--d-sae", type=int, default=256, help="fitted SAE width (default 256)")
    parser.add_argument("--k", type=int, default=16, help="fitted SAE TopK k (default 16)")
    parser.add_argument("--steps", type=int, default=300, help="fitting steps (default 300)")
    parser.add_argument("--n-latents", type=int, default=12, help="latent cards (default 12)")
    parser.add_argument("--out", default="artifacts/dashboard_example", help="output folder")
    parser.add_argument("--check", action="store_true",
                        help="open the page in headless Chromium and screenshot it")
    return parser.parse_args(argv)


def load_model(args):
    """(model, preprocess, weights description): a tiny random CLIP with --tiny, else pretrained weights when
    they can be loaded, else a random init of the same architecture (said out loud)."""
    from sae_vision_ext.analysis.toy import tiny_clip
    from sae_vision_ext.vision.load import describe_weights, load_vision_model_or_random

    if args.tiny:
        return (*tiny_clip(), "tiny random CLIP")
    model, preprocess, weights = load_vision_model_or_random(
        args.model, pretrained=not args.random_init, img_size=args.img_size or None
    )
    return model, preprocess, describe_weights(weights)


def fit_topk_sae(rows, hook, d_sae, k, steps, model_name, seed=0):
    """A SAELens TopK SAE fitted to ``rows`` by a plain Adam loop on the squared error (demonstration
    only)."""
    import torch

    from sae_vision_ext.analysis.toy import make_sae

    torch.manual_seed(seed)
    sae = make_sae(rows.shape[1], d_sae, hook, architecture="topk", k=k, token_selection="patches",
                   model_name=model_name, seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(rows.mean(dim=0))
        sae.b_enc.zero_()
        picks = torch.randint(0, rows.shape[0], (d_sae,))  # with replacement: rows may be fewer than d_sae
        sae.W_dec.copy_(torch.nn.functional.normalize(rows[picks] - rows.mean(0), dim=-1))
        sae.W_enc.copy_(sae.W_dec.T)
    sae.train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    batch = min(1024, rows.shape[0])
    for _ in range(steps):
        x = rows[torch.randint(0, rows.shape[0], (batch,))]
        loss = (sae.decode(sae.encode(x)) - x).pow(2).sum(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return sae.eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch
    from sae_lens import SAE

    from sae_vision_ext.activations.sample_images import sample_images
    from sae_vision_ext.analysis.dashboard import collect_rows, write_dashboard

    model, preprocess, source = load_model(args)
    print(f"model: {model.spec} ({source})")
    n_images = 8 if args.tiny else args.n_images
    if args.images:
        from sae_vision_ext.activations.images import open_images

        collection = open_images(args.images)
        images = [collection.load(i) for i in range(min(n_images, len(collection)))]
    else:
        images = sample_images(n_images)
    if args.sae:
        sae = SAE.load_from_disk(args.sae)
        ks = None
    else:
        middle = model.n_layers // 2
        cnn = model.layer_noun == "stages"  # a CNN: the middle stage's feature map
        hook = args.hook or (f"stages.{middle}.hook_out" if cnn else f"blocks.{middle}.hook_resid_post")
        from sae_vision_ext.analysis.toy import make_sae

        probe = make_sae(model.hook_width(hook), 1, hook, token_selection="patches")
        with torch.no_grad():
            rows = collect_rows(model, probe, images, preprocess)
        steps = 30 if args.tiny else args.steps
        t0 = time.perf_counter()
        sae = fit_topk_sae(rows, hook, 64 if args.tiny else args.d_sae, args.k, steps, model.spec)
        print(f"fitted a TopK SAE (d_sae={sae.cfg.d_sae}, k={args.k}) "
              f"on {rows.shape[0]} patch tokens at {hook} "
              f"in {time.perf_counter() - t0:.1f} s")
        ks = None
    with torch.no_grad():
        paths = write_dashboard(model, sae, images, args.out, preprocess=preprocess, n_latents=args.n_latents,
                                top_k=6, ks=ks, title=f"{model.spec} — {sae.cfg.metadata.hook_name}")
    print(f"dashboard: {paths['html']}\nFVU vs L0: {paths['plot']}")
    if args.check:
        from sae_vision_ext.analysis.browser import open_page

        report = open_page(paths["html"], screenshot=Path(args.out) / "dashboard.png")
        status = report.body_attribute("data-status")
        print(f"chromium: status={status}, cards={report.body_attribute('data-cards')}, "
              f"console messages={len(report.console)}, screenshot={report.screenshot}")
        if status != "ok" or report.console:
            print("\n".join(report.console))
            return 1
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
