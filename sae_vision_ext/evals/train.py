"""Train any SAELens training SAE on rows of activations with SAELens's own ``SAETrainer``.

Shared by the synthetic benchmarks and the comparison report (small, in-memory runs). The image-fed runner
lives in ``sae_vision_ext.training``; this helper is for data that is already a tensor or an iterator of row
batches.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from sae_vision_ext._saelens_compat import build_training_sae, progress_bars_off
from sae_vision_ext.saes import register_architectures


def make_training_sae(sae_cfg: Any) -> Any:
    """The registered training SAE (SAELens's or the plugin's) for ``sae_cfg.architecture()``."""
    register_architectures()
    return build_training_sae(sae_cfg)


def shuffled_batches(rows: Tensor, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
    """Endless iterator over ``rows`` in batches of ``batch_size``, reshuffled every epoch (seeded)."""
    if rows.shape[0] < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} rows, got {rows.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
            yield rows[order[start : start + batch_size]]


def train_in_memory(
    sae_cfg: Any,
    rows_iter: Iterator[Tensor] | Tensor,
    n_rows: int,
    batch_size: int,
    lr: float,
    lr_end: float | None = None,
    decay_fraction: float = 0.2,
    warmup_steps: int = 0,
    seed: int = 0,
    device: str = "cpu",
    sae: Any | None = None,
    progress: bool = False,
    dead_feature_window: int | None = None,
) -> Any:
    """Train for ``n_rows`` rows with ``SAETrainer`` and return the training SAE.

    ``rows_iter`` is an iterator of ``[batch_size, d_in]`` tensors, or a tensor of rows (then shuffled,
    seeded). The learning rate is constant, then decays linearly to 0 over the last ``decay_fraction`` of the
    steps (the MSAE paper's schedule); ``lr_end`` defaults to ``lr``. ``sae`` overrides construction from
    ``sae_cfg`` (e.g. a training SAE whose weights were initialised by hand); the torch seed is set before
    construction. ``dead_feature_window``: steps without firing after which a latent counts as dead (then
    TopK's auxiliary loss revives it); default 1% of the steps, at least 25 and at most SAELens's 1,000, so
    short runs get the auxiliary loss as SAELens's long runs do (a fixed 1,000 would never trigger it).
    """
    if isinstance(rows_iter, Tensor):
        rows_iter = shuffled_batches(rows_iter, batch_size, seed=seed)
    torch.manual_seed(seed)
    if sae is None:
        sae = make_training_sae(sae_cfg)
    total_steps = max(1, n_rows // batch_size)
    if dead_feature_window is None:
        dead_feature_window = min(1000, max(25, total_steps // 100))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr if lr_end is None else lr_end,
        lr_scheduler_name="constant",
        lr_warm_up_steps=warmup_steps,
        lr_decay_steps=int(decay_fraction * total_steps),
        device=device,
        n_checkpoints=0,
        save_final_checkpoint=False,
        dead_feature_window=dead_feature_window,
    )
    with progress_bars_off(not progress):
        return SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=rows_iter).fit()


def to_inference_sae(training_sae: Any, folder: str | Path | None = None) -> Any:
    """Save ``training_sae`` as an inference checkpoint (SAELens folder) and load it back with
    ``SAE.load_from_disk``.

    This is the path a user takes, so the evaluation sees exactly what would be shipped (e.g. BatchTopK
    becomes JumpReLU). With ``folder=None`` a temporary folder is used and removed.
    """
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            training_sae.save_inference_model(tmp)
            return SAE.load_from_disk(tmp, device=str(training_sae.device))
    folder = Path(folder)
    training_sae.save_inference_model(folder)
    return SAE.load_from_disk(folder, device=str(training_sae.device))
