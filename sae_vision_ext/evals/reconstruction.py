"""Reconstruction and sparsity metrics for any SAELens SAE, as plain functions on tensors.

The streamed evaluation a training run also needs (``evaluate_sae``, ``ReconstructionAccumulator``,
``per_sample_fvu``, ``dead_latents``) lives in :mod:`sae_vision_ext.training.metrics` and is re-exported here.

Notation and definitions (FVU over the dataset and per sample, cosine, L0, dead latents): see
:mod:`sae_vision_ext.training.metrics`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_vision_ext.training.metrics import (
    DEAD_FREQUENCY_THRESHOLD,
    EPS,
    ReconstructionAccumulator,
    dead_latents,
    evaluate_sae,
    flat_rows,
    per_sample_fvu,
)

__all__ = [
    "DEAD_FREQUENCY_THRESHOLD",
    "ReconstructionAccumulator",
    "cosine_similarity",
    "dead_latents",
    "evaluate_sae",
    "explained_variance",
    "fraction_zero",
    "fvu",
    "l0",
    "per_sample_fvu",
]


def fvu(x: Tensor, x_hat: Tensor, per_sample: bool = False, center: str = "sample") -> float:
    """Fraction of variance unexplained.

    ``per_sample=False``: ``sum ||x - x_hat||^2 / sum ||x - mean_rows(x)||^2`` over all rows.
    ``per_sample=True``: ``mean_n mean_d (x_hat - x)^2 / mean_d (x - m_n)^2`` with ``m_n`` the mean of row n's
    coordinates (``center="sample"``) or ``m_n = 0`` (``center="none"``).
    """
    x, x_hat = flat_rows(x).double(), flat_rows(x_hat).double()
    if not per_sample:
        residual = (x - x_hat).pow(2).sum()
        total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
        return float(residual / total.clamp_min(EPS))
    return float(per_sample_fvu(x, x_hat, center=center).mean())


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """Explained variance (R^2 of the A-SAE paper): ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``."""
    return 1.0 - fvu(x, x_hat, per_sample=False)


def cosine_similarity(x: Tensor, x_hat: Tensor) -> float:
    """Mean over rows of ``<x, x_hat> / (||x|| ||x_hat||)``."""
    x, x_hat = flat_rows(x).double(), flat_rows(x_hat).double()
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).mean())


def l0(z: Tensor) -> float:
    """Mean number of non-zero latents per row."""
    return float((flat_rows(z) != 0).sum(dim=-1).double().mean())


def fraction_zero(z: Tensor) -> float:
    """Mean fraction of latents that are exactly zero (the MSAE paper's "L0")."""
    return float((flat_rows(z) == 0).double().mean())
