"""Geometry of a learned dictionary ``D`` (``[n_atoms, d]``, one atom per row, e.g. an SAE's ``W_dec``).

- Coherence: with unit atoms ``u_i = d_i / ||d_i||``, the mutual coherence is ``max_{i != j} |<u_i, u_j>|``
  and the mean coherence is ``mean_i max_{j != i} |<u_i, u_j>|`` (how redundant the typical atom is).
- Stable rank: ``||D||_F^2 / ||D||_2^2 = sum_i s_i^2 / s_1^2`` (singular values ``s``); computed on the unit
  atoms by default, so it counts directions, not norms. Between 1 and ``min(n_atoms, d)``.
- Distance of atoms from the data (the A-SAE paper's worry that unconstrained atoms leave the data): for each
  atom, the cosine distance ``1 - max_n cos(d_i, x_n)`` to its closest data point, or the Euclidean distance
  ``min_n ||d_i - x_n||`` (scale-dependent; only meaningful when atoms live at the data's scale, e.g. A-SAE).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def decoder_atoms(sae: Any) -> Tensor:
    """The SAE's dictionary ``[d_sae, d_in]`` (``W_dec``, which archetypal SAEs expose as the fused ``W C +
    Lambda``)."""
    with torch.no_grad():
        return sae.W_dec.detach().clone()


def _unit_rows(D: Tensor) -> Tensor:
    return F.normalize(D.double(), dim=-1)


def coherence(D: Tensor, chunk_size: int = 4096) -> dict[str, float]:
    """``{"max": mutual coherence, "mean_max": mean over atoms of the largest |cos| with another atom}``."""
    U = _unit_rows(D)
    n = U.shape[0]
    if n < 2:
        raise ValueError("coherence needs at least two atoms")
    best = torch.empty(n, dtype=U.dtype)
    for start in range(0, n, chunk_size):
        block = (U[start : start + chunk_size] @ U.T).abs()
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = -1.0
        best[start : start + chunk_size] = block.max(dim=1).values
    return {"max": float(best.max()), "mean_max": float(best.mean())}


def mutual_coherence(D: Tensor) -> float:
    """``max_{i != j} |cos(d_i, d_j)|``."""
    return coherence(D)["max"]


def stable_rank(D: Tensor, normalize_atoms: bool = True) -> float:
    """``||D||_F^2 / ||D||_2^2``, on unit atoms when ``normalize_atoms``."""
    M = _unit_rows(D) if normalize_atoms else D.double()
    singular_values = torch.linalg.svdvals(M)
    return float(singular_values.pow(2).sum() / singular_values[0].pow(2).clamp_min(1e-300))


def atom_data_distance(D: Tensor, data: Tensor, metric: str = "cosine", chunk_size: int = 8192) -> Tensor:
    """Per-atom distance to the closest data row: ``1 - max_n cos(d_i, x_n)`` or ``min_n ||d_i - x_n||``."""
    D = D.double()
    data = data.reshape(-1, data.shape[-1])
    if metric == "cosine":
        U = _unit_rows(D)
        best = torch.full((D.shape[0],), -2.0, dtype=torch.float64)
        for start in range(0, data.shape[0], chunk_size):
            X = _unit_rows(data[start : start + chunk_size])
            best = torch.maximum(best, (U @ X.T).max(dim=1).values)
        return 1.0 - best
    if metric == "euclidean":
        best = torch.full((D.shape[0],), float("inf"), dtype=torch.float64)
        for start in range(0, data.shape[0], chunk_size):
            X = data[start : start + chunk_size].double()
            best = torch.minimum(best, torch.cdist(D, X).min(dim=1).values)
        return best
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def dictionary_report(D: Tensor, data: Tensor | None = None) -> dict[str, float]:
    """Coherence, stable rank and (with ``data``) the mean cosine distance of atoms from the data."""
    result = {}
    c = coherence(D)
    result["coherence_max"] = c["max"]
    result["coherence_mean_max"] = c["mean_max"]
    result["stable_rank"] = stable_rank(D)
    if data is not None:
        result["atom_data_cosine_distance"] = float(atom_data_distance(D, data).mean())
    return result
