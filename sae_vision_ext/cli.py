"""`sae-vision`: one command, one subcommand per capability.

Each subcommand is a module of :mod:`sae_vision_ext.commands` with ``main(argv) -> exit code``; this file only
names them, so ``sae-vision --help`` imports nothing heavy and each ``sae-vision CMD --help`` imports only its
command's flags.
"""

from __future__ import annotations

import importlib
import sys

from sae_vision_ext import __version__

# subcommand -> (module in sae_vision_ext.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "cache": ("cache", "write a vision model's activations to an on-disk cache (resumable)"),
    "train": ("train", "train SAE(s) on a vision model's activations, from images or a cache"),
    "eval": ("eval", "FVU, cosine, L0 and dead latents of a trained SAE (per k for Matryoshka SAEs)"),
    "dashboard": ("dashboard", "HTML dashboard of an SAE's top latents and a PNG of FVU against L0"),
    "candidates": ("candidates", "k-means archetype candidates from activation rows (for ra_sae / a_sae)"),
    "convert": (
        "convert",
        "convert a published checkpoint (MSAE authors', overcomplete) to a SAELens folder",
    ),
    "report": ("report", "train and compare SAEs (TopK, MSAE, RA-SAE) at matched L0; plots and tables"),
    "synthetic": ("synthetic", "soft-identifiability benchmark on synthetic data with known concepts"),
    "train-distributed": ("train_distributed", "data-parallel SAE training on cached activations (torchrun)"),
    "quickstart": ("quickstart", "train a Matryoshka SAE on DINOv2 patch tokens of sample photos (minutes)"),
}

EPILOG = """examples:
  sae-vision quickstart
  sae-vision cache --dataset ./photos --model timm:vit_small_patch14_reg4_dinov2.lvd142m \\
      --hook blocks.9.hook_resid_post --tokens patches --images 20000 --output runs/cache_l9
  sae-vision train --cache runs/cache_l9 --architecture matryoshka_topk --expansion 8 --output runs/msae_l9
  sae-vision eval runs/msae_l9
  sae-vision dashboard --sae runs/msae_l9 --dataset ./val_photos --output runs/msae_l9/dashboard
Run `sae-vision COMMAND --help` for a command's flags (each with its default)."""


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: sae-vision COMMAND [flags]",
        "",
        "Train, evaluate, convert and inspect sparse autoencoders on vision models (a SAELens plugin).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join([*lines, "", EPILOG])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"sae-vision {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"sae-vision: error: unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"sae_vision_ext.commands.{SUBCOMMANDS[name][0]}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
