"""``sae-vision quickstart`` (also ``python -m sae_vision_ext.quickstart`` and ``make demo``): train a
Matryoshka SAE (MSAE) on DINOv2 ViT-S/14 (registers) patch tokens of real photos, in minutes on a CPU.

Images: the sample photos shipped inside scikit-image (astronaut, coffee, the cat, ...), seen through random
resized crops and flips (a new view per image position), 2 photos held out for the final metrics. The model is
DINOv2 with its pretrained weights (downloaded when needed, or ``--weights FILE``); unlike ``sae-vision
train``, the quickstart runs anyway when they cannot be had, on the same architecture with random weights, and
says so at the start and in the summary. The SAE is the MSAE of Zaigrajew et al. (nested TopK levels 64, 128,
..., d_sae; reverse weighting; standardised inputs) trained by SAELens's ``SAETrainer``; the output folder is
a SAELens SAE folder with ``metrics.jsonl`` and PNG curves.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sae_vision_ext.commands._common import add_config, new_parser, one_line_errors, parse, say
from sae_vision_ext.training.config import VisionSAERunnerConfig, option, resolve_device, sae_config_from_dict

MODEL = "timm:vit_small_patch14_reg4_dinov2.lvd142m"

EPILOG = """examples:
  sae-vision quickstart
  sae-vision quickstart --rows 200000 --img-size 224 --output runs/quickstart_224
  sae-vision quickstart --weights ~/dinov2_vits14_reg4.safetensors       # pretrained, local file
  sae-vision quickstart --tiny                                            # seconds, for tests
"""


@dataclass
class QuickstartConfig:
    """The quickstart's run: the smallest one that is still a real one; every size is a flag."""

    output_path: str = option("runs/quickstart", "--output", help="output folder")
    model_name: str = option(MODEL, "--model", help="load_vision_model spec")
    model_weights: str | None = option(None, "--weights", help="local weights file for the model")
    random_init: bool = option(False, help="random model weights drawn from --seed, on purpose")
    img_size: int = option(168, help="input resolution; 168 -> 12x12 = 144 patches per image")
    hook_name: str = option("blocks.9.hook_resid_post", "--hook", help="hook to train on")
    token_selection: str = option(
        "patches", "--tokens", help="token selection (patches, cls, registers, all)"
    )
    training_rows: int = option(98_304, "--rows", help="training rows (patch tokens)")
    train_batch_size_rows: int = option(1024, "--batch-size", help="rows per SAE step")
    expansion: int = option(8, help="d_sae = expansion x d_in")
    lr: float = option(1e-3, help="learning rate")
    level_weighting: str = option(
        "reverse", "--weighting", help="MSAE level weighting: reverse (RW) or uniform"
    )
    eval_holdout_images: int = option(2, "--holdout", help="photos held out for the final metrics")
    n_eval_images: int = option(24, help="augmented views of the held-out photos evaluated")
    num_workers: int = option(1, "--workers", help="DataLoader workers decoding and augmenting images")
    n_checkpoints: int = option(2, "--checkpoints", help="checkpoints during training")
    resume: bool = option(False, help="continue from the latest checkpoint in --output")
    overwrite: bool = option(False, help="replace an earlier quickstart run in --output (else it is refused)")
    seed: int = option(0, help="seed of everything random (SAE init, views, random model weights)")
    device: str = option("auto", help="auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:1, mps")
    tiny: bool = option(False, help="a seconds-long run (tests): tiny images, few rows")
    quiet: bool = option(False, help="no progress bars")


def build_parser(argv: Sequence[str] = ()):
    parser = new_parser("sae-vision quickstart", __doc__.split("\n\n")[0], EPILOG)
    add_config(parser, QuickstartConfig)
    return parser


def runner_config(q: QuickstartConfig):
    """The ``VisionSAERunnerConfig`` the quickstart trains, without its ``sae`` (set once the hook width is
    known)."""
    if q.tiny:
        q.img_size, q.training_rows, q.train_batch_size_rows, q.expansion = 56, 2048, 256, 2
        q.n_eval_images, q.n_checkpoints = 4, 1
    if q.expansion <= 0:
        raise ValueError(f"--expansion must be a positive integer, got {q.expansion}")
    return VisionSAERunnerConfig(
        sae=None,
        model_name=q.model_name,
        model_weights=q.model_weights,
        pretrained=not q.random_init,
        img_size=q.img_size,
        hook_name=q.hook_name,
        token_selection=q.token_selection,
        augment="crop_flip",
        crop_scale=(0.25, 1.0),
        model_batch_size=32,
        num_workers=q.num_workers,
        buffer_size_rows=8 * q.train_batch_size_rows,
        eval_holdout_images=q.eval_holdout_images,
        n_eval_images=q.n_eval_images,
        training_rows=q.training_rows,
        train_batch_size_rows=q.train_batch_size_rows,
        lr=q.lr,
        n_batches_for_norm_estimate=2 if q.tiny else 8,
        output_path=q.output_path,
        n_checkpoints=q.n_checkpoints,
        resume_from_checkpoint="latest" if q.resume else None,
        seed=q.seed,
        device=q.device,
        verbose=not q.quiet,
    )


def msae_config(d_in: int, q: QuickstartConfig):
    """MSAE: d_sae = expansion x d_in, the authors' k ladder, RW weighting, standardised inputs."""
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.saes.matryoshka_topk import default_k_levels

    d_sae = q.expansion * d_in
    return sae_config_from_dict(
        {
            "architecture": "matryoshka_topk",
            "d_in": d_in,
            "d_sae": d_sae,
            "k_levels": default_k_levels(d_sae, k_start=16 if q.tiny else 64),
            "level_weighting": q.level_weighting,
            "standardize_input": True,
        }
    )


@one_line_errors("quickstart")
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    q: QuickstartConfig = parse(build_parser(argv), argv).config
    started = time.perf_counter()
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.activations.sample_images import sample_images
    from sae_vision_ext.training.progress import RANDOM_WEIGHTS_BANNER
    from sae_vision_ext.training.runner import VisionSAETrainingRunner
    from sae_vision_ext.vision.load import describe_weights, load_vision_model_or_random
    from sae_vision_ext.vision.tokens import layout_of

    cfg = runner_config(q)
    images = sample_images()
    if len(images) < q.eval_holdout_images + 2:  # without scikit-image: matplotlib's single sample photo
        print(
            f"note: only {len(images)} sample photo(s) (install scikit-image for 16); nothing is held out, "
            "so the metrics below are on fresh training-stream rows"
        )
        cfg.eval_holdout_images = 0
    print(
        f"quickstart: {len(images)} sample photos (scikit-image), random resized crops + flips, "
        f"{cfg.eval_holdout_images} photos held out"
    )
    model, preprocess, weights = load_vision_model_or_random(
        cfg.model_name,
        weights=cfg.model_weights,
        pretrained=cfg.pretrained,
        seed=cfg.seed,
        say=print,
        device=resolve_device(cfg.device),
        img_size=cfg.img_size,
    )
    if weights["source"] == "random-init":
        print(RANDOM_WEIGHTS_BANNER)
    d_in = int(model.hook_width(q.hook_name))
    cfg.sae = msae_config(d_in, q)
    print(
        f"model: {cfg.model_name} ({describe_weights(weights)}) at {model.cfg.image_size[0]}px, hook "
        f"{q.hook_name}, {q.token_selection} tokens ({layout_of(model, q.hook_name).n_patches} per image)"
    )
    print(
        f"SAE: matryoshka_topk d_in={d_in} d_sae={cfg.sae.d_sae} k_levels={cfg.sae.k_levels} weighting="
        f"{q.level_weighting}; {cfg.training_rows:,} rows in batches of {cfg.train_batch_size_rows}"
    )
    runner = VisionSAETrainingRunner(
        cfg,
        images=images,
        model=model,
        preprocess=preprocess,
        say=say,
        weights=weights,
        overwrite=q.overwrite,
    )
    result = runner.run()
    print(result.summary())
    if result.interrupted:
        return 130
    print(f"load it with: SAE.load_from_disk({str(result.output_path)!r}) after `import sae_vision_ext`")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0
