"""``sae-vision cache``: write a vision model's activations to an on-disk cache (SAELens's format,
resumable)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from sae_vision_ext.commands._common import UserError, flag_value, given_fields, one_line_errors, parse
from sae_vision_ext.commands._runner import runner_config_data, runner_parser
from sae_vision_ext.training.config import VisionSAERunnerConfig, option

DESCRIPTION = """Cache a vision model's activations at one or more hooks in SAELens's cached-activation format
(shuffled shards, written atomically; run the same command again to resume an interrupted cache). The model
uses its pretrained weights, downloaded when needed (--weights FILE or --random-init otherwise).
`sae-vision train --cache DIR` then trains without the model, taking the hook, tokens and model identity from
the cache."""

EPILOG = """examples:
  sae-vision cache --dataset ./photos --model timm:vit_small_patch14_reg4_dinov2.lvd142m \\
      --hook blocks.9.hook_resid_post --tokens patches --images 20000 --output runs/cache_l9
  sae-vision cache --dataset ./photos --augment crop_flip --images 100000 ...   # more views than photos
  sae-vision cache --dataset 'shards/train-{0000..0099}.tar' --images 1000000 ...   # WebDataset tars
  sae-vision cache --dataset hf-stream:NAME:train --images 1000000 ...   # an HF dataset, streamed
  (interrupted? run the same command again: finished shards are kept)
"""


@dataclass
class CacheOptions:
    """What to cache."""

    images: int = option(
        0,
        help="image positions (views) to cache; more than the dataset holds needs "
        "--augment crop_flip or --allow-repeat",
        required=True,
    )
    overwrite: bool = option(False, help="replace an existing complete cache")


# training-only settings
HIDE = tuple(
    name
    for name in VisionSAERunnerConfig.__dataclass_fields__
    if name.startswith(
        (
            "lr",
            "adam",
            "n_restart",
            "eval_",
            "train_batch",
            "training_",
            "buffer_",
            "activations_",
            "dead_",
            "feature_",
            "n_batches",
            "n_checkpoints",
            "save_final",
            "resume",
            "checkpoint",
            "images_per_segment",
            "autocast",
            "dtype",
            "n_eval",
            "cached_",
            "prefetch",
        )
    )
)


def _parser(argv: Sequence[str]):
    parser, file = runner_parser(argv, "sae-vision cache", DESCRIPTION, EPILOG, HIDE, with_sae=False)
    parser.add_arguments(CacheOptions, dest="cache")
    return parser, file


def build_parser(argv: Sequence[str] = ()):
    return _parser(argv)[0]


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is (as SIGINT raises ``KeyboardInterrupt``)."""


def _raise_interrupted(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Interrupted


def main(argv: Sequence[str] | None = None) -> int:
    """SIGINT / SIGTERM end the command with one line and exit code 130 / 143; finished shards are kept."""
    argv = list(sys.argv[1:] if argv is None else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main_thread else None
    try:
        return _main(argv)
    except KeyboardInterrupt as interrupt:
        name, code = ("SIGTERM", 143) if isinstance(interrupt, Interrupted) else ("SIGINT", 130)
        output = flag_value(argv, "--output", "--output-path")
        kept = f"; finished shards are kept in {output}.incomplete" if output else ""
        print(
            f"sae-vision cache: interrupted ({name}){kept}: run the same command again to resume",
            file=sys.stderr,
            flush=True,
        )
        return code
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


@one_line_errors("cache")
def _main(argv: list[str]) -> int:
    """Under ``torchrun`` the shards are split over the ranks (one cache, committed once)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, file = _parser(argv)
    args = parse(parser, argv)
    if args.cache.images <= 0:
        raise UserError(f"--images must be a positive number of image positions, got {args.cache.images}")
    data = runner_config_data(args, argv, parser, file, "cache", HIDE)
    if "output_path" not in {**given_fields(parser, argv), **file}:
        raise UserError("give the cache folder to write: --output DIR")
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.activations.process_group import destroy_distributed, init_distributed
    from sae_vision_ext.training.caching import cache_activations

    context = init_distributed()
    try:
        cfg = VisionSAERunnerConfig.from_dict({**data, "sae": None})
        cache = cache_activations(
            cfg,
            cfg.output_path,
            args.cache.images,
            overwrite=args.cache.overwrite,
            allow_repeat=cfg.allow_repeat,
            progress=cfg.verbose,
        )
        meta = cache.metadata
        if context.is_main:
            print(
                f"cache: {cache.path}\n  rows: {meta['n_rows']:,} ({meta['context_size']} per image) | "
                f"hooks: {meta['hook_widths']} | images read: {meta['n_images_ok']:,} | "
                f"skipped: {meta['n_images_failed']:,}"
            )
    finally:
        destroy_distributed()
    return 0
