"""``sae-vision train``: train SAE(s) with SAELens's SAETrainer on a vision model's activations."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sae_vision_ext.commands._common import one_line_errors, parse, say
from sae_vision_ext.commands._runner import describe_run, finish_config, runner_config_data, runner_parser
from sae_vision_ext.training.config import option

DESCRIPTION = """Train SAEs on a vision model's activations with SAELens's SAETrainer, from images (through
the model) or from an activation cache written by `sae-vision cache`. The model uses its pretrained weights,
downloaded when needed; without them the command stops and names the two ways out (--weights, --random-init).
Every flag is a field of VisionSAERunnerConfig (also accepted in --config FILE); the defaults are the MSAE
paper's setting (CLIP ViT-L/14 image embedding, batch 4096, lr 1e-4). The output folder is a SAELens SAE
folder with metrics.jsonl and PNG curves beside it."""

EPILOG = """examples:
  sae-vision train --dataset ./photos --model timm:vit_small_patch14_reg4_dinov2.lvd142m \\
      --hook blocks.9.hook_resid_post --tokens patches --architecture matryoshka_topk --expansion 8 \\
      --rows 2000000 --batch-size 4096 --lr 1e-4 --output runs/dinov2_msae --checkpoints 10
  # hook, tokens and model from the cache:
  sae-vision train --cache runs/cache_l9 --architecture topk --sae k=32 --output runs/topk
  # continue the latest checkpoint:
  sae-vision train --config run.yaml --sae level_weighting=reverse --resume
  # a deliberately random model:
  sae-vision train --random-init --model timm:vit_tiny_patch16_224 --dataset ./photos \\
      --hook blocks.5.hook_resid_post --tokens patches --rows 20000 --batch-size 1024 --output runs/smoke
"""

# cache-only settings
HIDE = ("allow_repeat", "images_per_shard", "cache_dtype")


@dataclass
class TrainOptions:
    """What to do with an earlier run in --output."""

    overwrite: bool = option(
        False,
        help="replace the run already in --output (its SAE files and checkpoints; "
        "other files are kept); without it (or --resume) such a folder is refused",
    )


def _parser(argv: Sequence[str]):
    parser, file = runner_parser(argv, "sae-vision train", DESCRIPTION, EPILOG, HIDE, with_sae=True)
    parser.add_arguments(TrainOptions, dest="train")
    return parser, file


def build_parser(argv: Sequence[str] = ()):
    return _parser(argv)[0]


@one_line_errors("train")
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, file = _parser(argv)
    args = parse(parser, argv)
    data = runner_config_data(args, argv, parser, file, "train", HIDE)
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.training.checkpoints import check_output_free
    from sae_vision_ext.training.runner import VisionSAETrainingRunner

    overwrite = args.train.overwrite
    output = data.get("output_path") or "runs/vision_sae"
    # before any work (the model is loaded next): an earlier run in --output is continued or replaced, never
    # mixed
    check_output_free(
        output,
        data.get("checkpoint_path") or Path(output) / "checkpoints",
        data.get("resume_from_checkpoint") is not None,
        overwrite,
    )
    cfg, model, preprocess, weights = finish_config(data)
    say(f"train: {describe_run(cfg, weights)}")
    result = VisionSAETrainingRunner(
        cfg, model=model, preprocess=preprocess, weights=weights, overwrite=overwrite
    ).run()
    print(result.summary())
    return 130 if result.interrupted else 0
