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
    "convert": "sae_vision_ext.loading.convert",
    "train-distributed": "sae_vision_ext.training.distributed",
}

EPILOG = """examples:
  sae-vision cache --help
  sae-vision train --model timm:vit_small_patch14_reg4_dinov2.lvd142m --hook blocks.9.hook_resid_post
  sae-vision eval runs/quickstart/final
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
