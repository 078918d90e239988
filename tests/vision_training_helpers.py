"""Shared small fixtures for the activation / cache / runner tests (issue 5): tiny real models, synthetic
photos."""

from __future__ import annotations

import functools

import numpy as np

TINY_MODEL = "timm:vit_tiny_patch16_224"  # d_model 192, 12 blocks; at 32 px: 1 CLS + 2x2 patches
REG_MODEL = (
    "timm:vit_small_patch14_reg4_dinov2.lvd142m"  # d_model 384; at 28 px: 1 CLS + 4 registers + 2x2 patches
)


def synthetic_images(n: int = 12, seed: int = 0):
    """``n`` distinct RGB PIL images of slightly different sizes (deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(40 + i, 48, 3), dtype=np.uint8)) for i in range(n)]


def load_tiny(spec: str = TINY_MODEL, img_size: int = 32, seed: int = 0):
    """A randomly initialised real timm model (seeded) and its preprocess."""
    import torch

    from sae_vision_ext.vision.load import load_vision_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_vision_model(spec, pretrained=False, img_size=img_size)


@functools.lru_cache(maxsize=4)
def shared_tiny(seed: int = 5, img_size: int = 32):
    """One loaded tiny model per (seed, size) for the whole session: the weights random-init(seed) would
    build."""
    return load_tiny(TINY_MODEL, img_size=img_size, seed=seed)


def tiny_config(output, **overrides):
    """A seconds-long training config on the tiny model (random init), overridable field by field."""
    from sae_vision_ext.training.config import VisionSAERunnerConfig

    fields = dict(
        sae={"architecture": "topk", "d_in": 192, "d_sae": 384, "k": 8},
        model_name=TINY_MODEL,
        pretrained=False,
        img_size=32,
        hook_name="blocks.1.hook_resid_post",
        token_selection="all",
        augment="crop_flip",
        model_batch_size=4,
        num_workers=0,
        prefetch_batches=1,
        buffer_size_rows=128,
        training_rows=64 * 24,
        train_batch_size_rows=64,
        lr=3e-3,
        output_path=str(output),
        seed=5,
        verbose=False,
    )
    fields.update(overrides)
    return VisionSAERunnerConfig(**fields)
