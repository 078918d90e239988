"""Dictionary stability (Fel et al. 2025, Eq. 2): one-to-one matching of two dictionaries' atoms.

    S_ij = <d1_i, d2_j> / (||d1_i|| ||d2_j||)           cosine similarity of atoms (rows)
    pi   = argmax_{one-to-one} sum_i |S_{i, pi(i)}|      Hungarian algorithm (scipy linear_sum_assignment)
    stability(D1, D2) = mean_i |S_{i, pi(i)}|

With ``allow_sign_flip=True`` (the paper) an atom and its negation count as the same concept, so |S| is
matched; otherwise S itself. Dictionaries of different sizes match min(n1, n2) pairs. Zero atoms have
cosine 0 with everything.

A fair comparison (see REFERENCE "Ablating Archetypes"): vary the k-means seed between runs, centre the
data, and report a TopK SAE initialised from the same centroids beside RA-SAE.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _as_matrix(d: Any) -> np.ndarray:
    if hasattr(d, "W_dec") and not isinstance(d, (torch.Tensor, np.ndarray)):
        d = d.W_dec  # an SAE: its decoder atoms
    if isinstance(d, torch.Tensor):
        d = d.detach().to("cpu", torch.float64).numpy()
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"a dictionary must be a 2-D [n_atoms, d] matrix, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("dictionary contains NaN/inf")
    return d


def cosine_matrix(D1: Any, D2: Any) -> np.ndarray:
    """Cosine similarity S [n1, n2] between the rows of two dictionaries (float64)."""
    a, b = _as_matrix(D1), _as_matrix(D2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dictionaries have different widths: {a.shape[1]} vs {b.shape[1]}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def match_dictionaries(
    D1: Any, D2: Any, allow_sign_flip: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching of the atoms of D1 [n1, d] and D2 [n2, d] (tensors, arrays or SAEs).

    Returns ``(row_ind, col_ind, cosines)``: atom ``row_ind[k]`` of D1 matches atom ``col_ind[k]`` of D2 with
    cosine ``cosines[k]`` (absolute value when ``allow_sign_flip``), sorted by ``row_ind``.
    """
    S = cosine_matrix(D1, D2)
    score = np.abs(S) if allow_sign_flip else S
    row_ind, col_ind = linear_sum_assignment(score, maximize=True)
    return row_ind, col_ind, score[row_ind, col_ind]


def stability(D1: Any, D2: Any, allow_sign_flip: bool = True) -> float:
    """Mean matched cosine between two dictionaries (1 = same atoms up to order and sign)."""
    return float(match_dictionaries(D1, D2, allow_sign_flip)[2].mean())


__all__ = ["cosine_matrix", "match_dictionaries", "stability"]
