"""Cost of hooked activation capture against the bare library forward pass (one run, interleaved).

Variants, each timed ``--repeats`` times in a shuffled interleaved order (so machine load drifts hit all
of them alike), reported as median wall time (and minimum), median process CPU time, and the ratios of
those medians to the bare forward. On a machine shared with other jobs the CPU-time ratio is the steadier of
the two:

- bare: the library model's own forward (``encode_image`` / timm ``forward``)
- hooked: the HookedVisionModel forward with no hooks attached
- capture last: ``run_with_cache`` of the last block's ``hook_resid_post`` (full forward)
- capture all: ``run_with_cache`` of every hook point (full forward)
- stop L: ``run_with_cache(..., stop_at_layer=L)`` of ``blocks.{L-1}.hook_resid_post``; expected cost ~ L/N

A CNN (``--model timm:resnet50.a1_in1k``, ``timm:convnext_base.fb_in22k``) is measured the same way, with
stage hooks (``stages.{s}.hook_out``): its maps reach the hooks as spatial-token views, which cost nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

EPILOG = """examples:
  python benchmarks/capture_overhead.py
  python benchmarks/capture_overhead.py --model open_clip:ViT-B-16/openai --batch 8 --repeats 15
  python benchmarks/capture_overhead.py --img-size 112 --repeats 3     # quick look
  python benchmarks/capture_overhead.py --model timm:resnet50.a1_in1k  # a CNN: stage hooks
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Hooked capture vs bare forward (ratios from one run).",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:vit_base_patch16_clip_224.openai")
    parser.add_argument("--img-size", type=int, default=None, help="default: the model's own (224)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sae_vision_ext.vision.load import load_vision_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_vision_model(args.model, pretrained=False, img_size=args.img_size)
    n = model.n_layers
    h, w = model.cfg.image_size
    images = torch.randn(args.batch, 3, h, w)
    bare = model.model
    bare_forward = bare.encode_image if hasattr(bare, "encode_image") else bare
    cnn = model.layer_noun == "stages"
    layer_hook = "stages.{}.hook_out" if cnn else "blocks.{}.hook_resid_post"
    last = layer_hook.format(n - 1)
    stops = sorted({max(1, n // 4), n // 2, (3 * n) // 4})

    variants = {
        "bare forward": lambda: bare_forward(images),
        "hooked forward (no hooks)": lambda: model(images),
        f"capture {last}": lambda: model.run_with_cache(images, names_filter=last),
        f"capture all {len(model.hook_dict)} hooks": lambda: model.run_with_cache(images),
    }
    for stop in stops:
        variants[f"stop_at_layer={stop} (of {n})"] = (
            lambda stop=stop: model.run_with_cache(images, names_filter=layer_hook.format(stop - 1),
                                                   stop_at_layer=stop))
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    rng = random.Random(0)
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                start, cpu_start = time.perf_counter(), time.process_time()
                variants[name]()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)

    base = statistics.median(times["bare forward"])
    cpu_base = statistics.median(cpu_times["bare forward"])
    tokens = model.layout_at(last).n_tokens
    print(f"model {model.spec} (random init), {n} {model.layer_noun}, d_model={model.cfg.d_model}, "
          f"image {h}x{w}, {tokens} tokens at {last}, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats, medians")
    print(f"{'variant':40s} {'wall s':>8s} {'min s':>8s} {'ratio':>6s} "
          f"{'cpu s':>8s} {'ratio':>6s} {'expected':>9s}")
    for name, values in times.items():
        median = statistics.median(values)
        expected = ""
        if name.startswith("stop_at_layer"):
            stop = int(name.split("=")[1].split()[0])
            expected = "" if cnn else f"~{stop / n:.2f}"  # a CNN's stages differ in cost
        elif name != "bare forward":
            expected = "<=1.03"
        cpu = statistics.median(cpu_times[name])
        print(f"{name:40s} {median:8.3f} {min(values):8.3f} {median / base:6.3f} "
              f"{cpu:8.3f} {cpu / cpu_base:6.3f} {expected:>9s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
