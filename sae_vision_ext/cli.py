"""`sae-vision`: one command, one subcommand per capability.

Each subcommand lives beside the code it drives, as a module with ``add_parser(subparsers)`` (which sets
``func``) and ``run(args)``; this file only collects them, so ``sae-vision --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that adds it; a module may add several subcommands.
SUBCOMMANDS: dict[str, str] = {
    "cache": "sae_vision_ext.training.cli_commands",
    "train": "sae_vision_ext.training.cli_commands",
    "eval": "sae_vision_ext.training.cli_commands",
    "candidates": "sae_vision_ext.training.candidates",
    "convert": "sae_vision_ext.loading.convert",
    "dashboard": "sae_vision_ext.analysis.dashboard",
    "report": "sae_vision_ext.evals.report",
    "synthetic": "sae_vision_ext.evals.synthetic",
    "train-distributed": "sae_vision_ext.training.distributed",
}

EPILOG = """examples:
  sae-vision train --help
  sae-vision cache --dataset ./photos --model timm:vit_small_patch14_reg4_dinov2.lvd142m \\
      --hook blocks.9.hook_resid_post --tokens patches --output runs/cache_l9
  sae-vision train --cache runs/cache_l9 --architecture matryoshka_topk --expansion 8 --output runs/msae_l9
  sae-vision eval runs/msae_l9 --dataset ./val_photos
  sae-vision dashboard --sae runs/msae_l9 --images ./val_photos --out artifacts/dash
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-vision",
        description="Train, evaluate, convert and inspect sparse autoencoders on vision models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted_module = SUBCOMMANDS.get(only) if only else None
    seen = set()
    for name, module_name in SUBCOMMANDS.items():
        if wanted_module is not None and module_name != wanted_module:
            # Only the module asked for is imported; the others stay listed by name.
            subparsers.add_parser(name, help=f"see: sae-vision {name} --help")
        elif module_name not in seen:
            seen.add(module_name)
            importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=wanted if wanted in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
