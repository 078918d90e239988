"""Name SAE latents with CLIP text embeddings (MSAE paper), then search images by a named concept.

With ``--sae`` (a SAELens folder trained on ``hook_image_embed`` of a CLIP model) the first ``--n-latents``
latents are named with the shipped English vocabulary (or ``--vocabulary FILE``). Without it, a demonstration
SAE is built whose first atoms are the text embeddings of known words plus noise, and the script reports how
many of those words concept naming recovers. Text embeddings are cached on disk ($SAE_VISION_CACHE or
~/.cache/sae_vision_ext), so the second run is fast. Finally the photos are searched with a query steered
along the first named latent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "open_clip:ViT-B-32/laion2b_s34b_b79k"

EPILOG = """examples:
  python examples/name_concepts.py                                   # ViT-B-32, demonstration SAE
  python examples/name_concepts.py --sae runs/clip_embed/final --n-latents 50 --template "a photo of a {}"
  python examples/name_concepts.py --vocabulary my_words.txt --top-n 3
  python examples/name_concepts.py --tiny                            # tiny random CLIP, seconds on a CPU
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"CLIP-family model spec (default {DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random CLIP, 1000-word vocabulary (for tests)")
    parser.add_argument("--random-init", action="store_true", help="skip pretrained weights")
    parser.add_argument("--sae", help="SAELens SAE folder trained on hook_image_embed")
    parser.add_argument("--vocabulary", help="word list file (default: the shipped English list)")
    parser.add_argument("--vocab-size", type=int, default=None, help="use only the first N words")
    parser.add_argument("--template", default="{}",
                        help='prompt template, e.g. "a photo of a {}" (default "{}")')
    parser.add_argument("--n-latents", type=int, default=12, help="latents to name and print (default 12)")
    parser.add_argument("--top-n", type=int, default=3, help="words per latent (default 3)")
    parser.add_argument("--strength", type=float, default=2.0,
                        help="search strength in units of the mean embedding norm (default 2)")
    return parser.parse_args(argv)


def demonstration_sae(model, words, n_planted, seed=0):
    """An SAE whose atom i (i < n_planted) is the text embedding of words[i] plus 30% noise."""
    import torch

    from sae_vision_ext.analysis.concepts import clip_text_encoder
    from sae_vision_ext.analysis.toy import make_sae

    generator = torch.Generator().manual_seed(seed)
    d = model.cfg.d_image_embed
    text = torch.nn.functional.normalize(clip_text_encoder(model)(words[:n_planted]).float(), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(n_planted, d, generator=generator), dim=-1)
    atoms = torch.nn.functional.normalize(text + 0.3 * noise, dim=-1)
    sae = make_sae(d, n_planted * 2, "hook_image_embed", model_name=model.spec, seed=seed)
    with torch.no_grad():
        sae.W_dec[:n_planted] = atoms
        sae.W_enc[:, :n_planted] = atoms.T
    return sae


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch
    from sae_lens import SAE

    from sae_vision_ext.activations.sample_images import sample_images
    from sae_vision_ext.analysis.concepts import name_concepts
    from sae_vision_ext.analysis.retrieval import concept_search, embed_images
    from sae_vision_ext.analysis.vocabulary import load_vocabulary
    from sae_vision_ext.vision.load import describe_weights, load_model_for_sae

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from steer import load_model  # the sibling example's loader (pretrained if cached, else random init)

    if args.sae:  # a trained SAE: rebuild the very model it was trained on (tag, weights file or random seed)
        sae = SAE.load_from_disk(args.sae)
        model, preprocess, weights = load_model_for_sae(sae)
        source = describe_weights(weights)
    else:
        model, preprocess, source = load_model(args)
    print(f"model: {model.spec} ({source})")
    words = load_vocabulary(args.vocabulary)
    vocab_size = args.vocab_size or (1000 if args.tiny else None)
    if vocab_size:
        words = words[:vocab_size]
    if args.sae:
        planted = None
        latents = list(range(min(args.n_latents, int(sae.cfg.d_sae))))
    else:
        shuffled = [words[i] for i in torch.randperm(len(words), generator=torch.Generator().manual_seed(0))]
        planted = shuffled[: args.n_latents]
        sae = demonstration_sae(model, planted, args.n_latents)
        latents = list(range(args.n_latents))
    t0 = time.perf_counter()
    names = name_concepts(sae, words, model=model, latents=latents, top_n=args.top_n, template=args.template)
    print(f"named {len(latents)} latents against {len(words)} words in {time.perf_counter() - t0:.1f} s")
    print(f"\n{'latent':>6} | {'best words (cosine)':<60}" + (" | planted" if planted else ""))
    for latent in latents:
        concept = names[latent]
        best = ", ".join(f"{w} ({s:.2f})" for w, s in zip(concept.words, concept.scores))
        print(f"{latent:>6} | {best:<60}" + (f" | {planted[latent]}" if planted else ""))
    if planted:
        recovered = sum(names[i].name == planted[i] for i in latents)
        print(f"\nconcept naming recovered {recovered}/{len(latents)} planted words")

    photos = sample_images(6 if args.tiny else 16)
    gallery = embed_images(model, torch.stack([preprocess(p) for p in photos]))
    latent = latents[0]
    strength = args.strength * float(gallery.norm(dim=-1).mean())
    result = concept_search(sae, gallery[0], gallery, latent=names[latent].name, names=names,
                            strength=strength, top_k=5, exclude=[0])
    plain = concept_search(sae, gallery[0], gallery, latent=latent, strength=0.0, top_k=5, exclude=[0])
    print(f"\nsearch from photo 0: nearest photos {plain.indices[0].tolist()}; steered towards "
          f"{names[latent].name!r}: {result.indices[0].tolist()}")
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
