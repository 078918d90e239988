"""Tiny models, SAEs and images for examples, demos and tests (no downloads, seconds on a CPU).

- :func:`tiny_clip`: an open_clip CLIP with a 2-block 64-wide ViT (8x8 patches on 32x32 images, so a 4x4
  grid), a 2-block text tower and a 32-d joint embedding, random weights; hooked, with SAE splicing enabled.
- :func:`tiny_timm_vit`: a 2-block timm ViT with 4 register tokens (DINOv2-style layout), random weights.
- :func:`make_sae`: a SAELens ``StandardSAE`` / ``TopKSAE`` carrying the metadata that says where it belongs.
- :func:`planted_sae`: an SAE whose decoder atoms are given directions (``W_dec = D``, ``W_enc = D^T``,
  zero biases).
- :func:`synthetic_images`: PIL images of coloured shapes on coloured backgrounds.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image, ImageDraw
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor

from sae_vision_ext.vision.load import load_vision_model

TINY_CLIP_ARCH = "TinyCLIP-sae-vision"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip_config() -> str:
    """Make ``open_clip:TinyCLIP-sae-vision`` known to open_clip (idempotent); returns the architecture
    name."""
    if TINY_CLIP_ARCH not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="sae_vision_tiny_clip_"))
        path = folder / f"{TINY_CLIP_ARCH}.json"
        path.write_text(json.dumps(TINY_CLIP_CONFIG), encoding="utf-8")
        open_clip.add_model_config(path)
    return TINY_CLIP_ARCH


def _quiet_load(spec: str, **kwargs: Any) -> tuple[Any, Any]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that a random init has no pretrained weights
    try:
        model, preprocess = load_vision_model(spec, pretrained=False, **kwargs)
    finally:
        root.setLevel(level)
    return model, preprocess


def tiny_clip(seed: int = 0) -> tuple[Any, Any]:
    """``(hooked tiny CLIP, preprocess)`` with random weights drawn from ``seed``."""
    arch = register_tiny_clip_config()
    torch.manual_seed(seed)
    return _quiet_load(f"open_clip:{arch}")


def tiny_timm_vit(seed: int = 0, registers: int = 4) -> tuple[Any, Any]:
    """``(hooked 2-block timm ViT on 28x28 images, 14x14 patches, 1 CLS + registers, preprocess)``."""
    torch.manual_seed(seed)
    return _quiet_load(
        "timm:vit_small_patch14_reg4_dinov2",
        img_size=28,
        depth=2,
        embed_dim=64,
        num_heads=2,
        reg_tokens=registers,
        num_classes=0,
    )


def make_sae(
    d_in: int,
    d_sae: int,
    hook_name: str,
    architecture: str = "standard",
    token_selection: str | None = None,
    model_name: str | None = None,
    k: int = 8,
    seed: int = 0,
) -> Any:
    """A randomly initialised SAELens SAE (``"standard"`` or ``"topk"``) with vision metadata."""
    metadata = SAEMetadata(
        hook_name=hook_name, model_name=model_name, token_selection=token_selection, modality="vision"
    )
    torch.manual_seed(seed)
    if architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    elif architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=metadata))
    else:
        raise ValueError(f"architecture must be 'standard' or 'topk', got {architecture!r}")
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    return sae.eval()


def planted_sae(directions: Tensor, hook_name: str, token_selection: str | None = None, **kwargs: Any) -> Any:
    """A ``StandardSAE`` with decoder atoms ``directions`` ``[d_sae, d_in]``, ``W_enc = directions^T``, zero
    biases: ``encode(x) = relu(x D^T)``, exact for nonnegative combinations of orthonormal atoms."""
    d_sae, d_in = directions.shape
    sae = make_sae(d_in, d_sae, hook_name, token_selection=token_selection, **kwargs)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def orthonormal_directions(n: int, d: int, seed: int = 0) -> Tensor:
    """``n`` orthonormal rows in ``R^d`` (``n <= d``)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=generator))
    return q.T.contiguous()


def synthetic_images(n: int, size: int = 64, seed: int = 0) -> list[Any]:
    """``n`` RGB PIL images: a coloured circle, square or triangle on a coloured background."""
    rng = random.Random(seed)
    images = []
    for _ in range(n):
        background = tuple(rng.randrange(256) for _ in range(3))
        color = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        r = rng.randrange(size // 8, size // 3)
        cx, cy = rng.randrange(r, size - r), rng.randrange(r, size - r)
        shape = rng.choice(["circle", "square", "triangle"])
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        images.append(image)
    return images
