"""Helpers for the ``setup`` directives of README.md's blocks (see tests/test_readme.py).

A README block may use names or files it does not make itself (``sae``, ``images``, ``runs/clip_l8/final``,
``list_attr_celeba.txt`` ...). Its setup snippet makes them with these functions, at tiny scale, in the
block's working directory. Everything is seeded; nothing here downloads anything the fake Hub does not serve.
"""

from __future__ import annotations

from pathlib import Path

import torch


def images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    """A preprocessed-looking image batch ``[n, 3, size, size]``."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_sae(d_in: int, d_sae: int = 64, k: int = 8, seed: int = 0, **metadata):
    """A SAELens TopK SAE with random weights and ``metadata`` (model_name, hook_name, token_selection
    ...)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        for name in ("W_enc", "W_dec"):
            getattr(sae, name).normal_(0, d_in**-0.5)
    for key, value in metadata.items():
        setattr(sae.cfg.metadata, key, value)
    return sae


def saved_random_sae(path: str, d_in: int, d_sae: int = 64, k: int = 8, **metadata):
    """``random_sae`` saved as a SAELens folder at ``path``; returns the SAE."""
    sae = random_sae(d_in, d_sae, k, **metadata)
    sae.save_model(path)
    return sae


def activation_cache(
    path: str,
    model_name: str,
    hook_name: str,
    n_images: int = 16,
    img_size: int = 56,
    token_selection: str = "patches",
    dataset: str = "./photos",
) -> None:
    """What ``sae-vision cache`` writes, at tiny scale: ``n_images`` crop-flip views of ``dataset``."""
    from sae_vision_ext.training.caching import cache_activations
    from sae_vision_ext.training.config import VisionSAERunnerConfig

    cfg = VisionSAERunnerConfig(
        sae=None,
        model_name=model_name,
        img_size=img_size,
        hook_name=hook_name,
        token_selection=token_selection,
        dataset_path=dataset,
        augment="crop_flip",
        num_workers=0,
        verbose=False,
    )
    cache_activations(cfg, path, n_images, progress=False)


def rows_file(path: str, n: int = 4096, d: int = 32, seed: int = 0) -> None:
    """A ``.npy`` file of ``n`` activation-like rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    np.save(path, (rng.standard_normal((n, d)) + rng.standard_normal(d)).astype(np.float32))


def overcomplete_checkpoint(path: str, d_in: int = 48, d_sae: int = 192, seed: int = 0) -> None:
    """A ``torch.save(state_dict)`` of an overcomplete TopK SAE (linear + LayerNorm encoder, free
    dictionary)."""
    g = torch.Generator().manual_seed(seed)
    torch.save(
        {
            "encoder.final_block.0.weight": torch.randn(d_sae, d_in, generator=g) * d_in**-0.5,
            "encoder.final_block.0.bias": torch.zeros(d_sae),
            "encoder.final_block.1.weight": torch.ones(d_sae),
            "encoder.final_block.1.bias": torch.zeros(d_sae),
            "dictionary._weights": torch.randn(d_sae, d_in, generator=g),
        },
        path,
    )


def celeba_attributes(path: str, n: int, seed: int = 0) -> None:
    """``list_attr_celeba.txt`` in CelebA's layout for ``n`` images (attributes Male, Eyeglasses)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2, (n, 2), generator=g) * 2 - 1
    lines = [str(n), "Male Eyeglasses"] + [
        f"{i:06d}.jpg {a:d} {b:d}" for i, (a, b) in enumerate(values.tolist())
    ]
    Path(path).write_text("\n".join(lines) + "\n")


def trainer_setup(d_in: int, d_sae: int = 256, k: int = 16, rows: int = 512, batch: int = 64):
    """``(sae, trainer_cfg)``: a SAELens TopK training SAE and a short ``SAETrainerConfig``."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    return sae, SAETrainerConfig(
        total_training_samples=rows,
        train_batch_size_samples=batch,
        lr=1e-3,
        lr_end=1e-3,
        n_batches_for_norm_estimate=2,
    )


def image_source(model_name: str, hook_name: str, img_size: int = 56, dataset: str = "./photos"):
    """An ``ImageActivationSource`` (patch tokens of ``dataset`` through the model's pretrained weights)."""
    from sae_vision_ext.activations.source import ImageActivationSource
    from sae_vision_ext.vision.load import load_vision_model

    model, preprocess = load_vision_model(model_name, img_size=img_size)
    return ImageActivationSource(
        model.eval(), preprocess, dataset, hook_name, token_selection="patches", model_batch_size=4
    )
