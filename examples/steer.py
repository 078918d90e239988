"""Steer a CLIP model with an SAE latent and watch zero-shot predictions move; splice an SAE in with add_sae.

With ``--sae`` the SAE is a trained SAELens folder on ``hook_image_embed`` and ``--latent`` picks the concept.
Without it, a demonstration SAE is built whose latent 0 IS the text direction of ``--concept`` ("a photo of a
dog"), so adding it to an image embedding must raise the probability of that prompt. Pretrained weights are
used when they are in the local cache; otherwise a random init of the same architecture runs (said clearly).
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_MODEL = "open_clip:ViT-B-32/laion2b_s34b_b79k"

EPILOG = """examples:
  python examples/steer.py                                  # ViT-B-32, demonstration SAE, concept 'dog'
  python examples/steer.py --concept "a photo of a beach" --strengths 0,0.5,1,2
  python examples/steer.py --sae runs/clip_embed/final --latent 123 --mode clamp --strengths 0,5,10
  python examples/steer.py --tiny                           # tiny random CLIP, seconds on a CPU
"""

PROMPTS = [
    "a photo of a dog", "a photo of a cat", "a photo of a car", "a photo of a beach", "a photo of a person"
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"CLIP-family model spec (default {DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true", help="tiny random CLIP and 4 images (for tests)")
    parser.add_argument("--random-init", action="store_true", help="skip pretrained weights")
    parser.add_argument("--sae", help="SAELens SAE folder trained on hook_image_embed")
    parser.add_argument("--latent", type=int, default=0, help="latent to steer (default 0)")
    parser.add_argument("--concept", default=PROMPTS[0], help="demonstration concept prompt (without --sae)")
    parser.add_argument("--mode", default="add", choices=["add", "clamp", "scale", "ablate"])
    parser.add_argument("--strengths", default="0,0.5,1,2,4", help="comma-separated strengths")
    parser.add_argument("--n-images", type=int, default=8, help="number of sample photos (default 8)")
    return parser.parse_args(argv)


def load_model(args):
    """(model, preprocess, weights description): a tiny random CLIP with --tiny, else pretrained weights when
    they can be loaded, else a random init of the same architecture (said out loud)."""
    from sae_vision_ext.analysis.toy import tiny_clip
    from sae_vision_ext.vision.load import describe_weights, load_vision_model_or_random

    if args.tiny:
        return (*tiny_clip(), "tiny random CLIP")
    model, preprocess, weights = load_vision_model_or_random(args.model, pretrained=not args.random_init)
    return model, preprocess, describe_weights(weights)


def demonstration_sae(model, concept):
    """An SAE on hook_image_embed whose latent 0 is the unit text direction of ``concept``."""
    import torch

    from sae_vision_ext.analysis.concepts import clip_text_encoder
    from sae_vision_ext.analysis.toy import make_sae, orthonormal_directions

    text = torch.nn.functional.normalize(clip_text_encoder(model)([concept]).float(), dim=-1)[0]
    d = model.cfg.d_image_embed
    rest = orthonormal_directions(15, d, seed=0)
    rest = rest - (rest @ text)[:, None] * text  # keep the other atoms orthogonal to the concept
    atoms = torch.cat([text[None], torch.nn.functional.normalize(rest, dim=-1)])
    sae = make_sae(d, atoms.shape[0], "hook_image_embed", model_name=model.spec)
    with torch.no_grad():
        sae.W_dec.copy_(atoms)
        sae.W_enc.copy_(atoms.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch
    from sae_lens import SAE

    from sae_vision_ext.activations.sample_images import sample_images
    from sae_vision_ext.analysis.bias import zero_shot_from_prompts
    from sae_vision_ext.analysis.steering import steer

    model, preprocess, source = load_model(args)
    print(f"model: {model.spec} ({source})")
    if args.sae:
        sae = SAE.load_from_disk(args.sae)
        latent, label = args.latent, f"latent {args.latent}"
    else:
        sae = demonstration_sae(model, args.concept)
        latent, label = 0, f"demonstration latent 0 = text direction of {args.concept!r}"
    n_images = 4 if args.tiny else args.n_images
    images = torch.stack([preprocess(image) for image in sample_images(n_images)])
    prompts = PROMPTS if args.concept in PROMPTS else [args.concept] + PROMPTS[1:]
    classify = zero_shot_from_prompts(model, prompts)  # a head: embeddings -> logits over the prompts

    with torch.no_grad():
        baseline = model(images)
        model.add_sae(sae, use_error_term=True)
        spliced = model(images)
        model.reset_saes()
    print(f"add_sae(use_error_term=True) changes the output by at most "
          f"{float((spliced - baseline).abs().max()):.2e}")

    # the demonstration atom has unit norm: express "add" strengths in units of the mean embedding norm
    unit = float(baseline.norm(dim=-1).mean()) if (not args.sae and args.mode == "add") else 1.0
    print(f"\nsteering {label}, mode={args.mode}, on {n_images} photos"
          + (f" (strength x {unit:.2f} = mean embedding norm)" if unit != 1.0 else ""))
    print("mean zero-shot probability of each prompt")
    print(f"{'strength':>9} | " + " | ".join(f"{p.split()[-1][:8]:>8}" for p in prompts))
    strengths = [float(s) for s in args.strengths.split(",")]
    for strength in strengths:
        with torch.no_grad(), steer(model, sae, latents=latent, mode=args.mode, value=strength * unit):
            probs = classify(model(images)).softmax(dim=-1).mean(dim=0)
        print(f"{strength:>9.2f} | " + " | ".join(f"{float(p):>8.3f}" for p in probs))
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
