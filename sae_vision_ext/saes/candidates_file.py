"""The candidates file: the fixed points C of an archetypal dictionary, as one safetensors file.

Written by ``sae-vision candidates`` (``training/candidates.py`` computes the k-means centroids) and read by
the archetypal SAE configs through ``candidates_path``. Layout (format ``sae_vision_ext.candidates/1``)::

    candidates              [n', d]  float32   C in data space (what the SAE uses by default)
    centroids_standardized  [n', d]  float32   the same centroids in standardised space, (C - mean) / std
    mean                    [d]      float32   per-dimension standardisation
    std                     [d]      float32
    counts                  [n']     int64     rows assigned to each centroid
    header metadata: {"format": FORMAT_NAME, "metadata": JSON of how the candidates were computed}

Only ``candidates`` is required when reading; the other tensors default to the identity standardisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CANDIDATES_KEY = "candidates"
FORMAT_NAME = "sae_vision_ext.candidates/1"

CandidatesSpace = Literal["data", "standardized"]


@dataclass
class Candidates:
    """k-means candidates: ``candidates`` in data space (what the SAE uses) plus the standardisation."""

    candidates: torch.Tensor  # [n', d], data space
    centroids_standardized: torch.Tensor  # [n', d]
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    counts: torch.Tensor  # [n'] rows assigned to each centroid (sample, or whole stream if refined)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_points(cls, points: torch.Tensor, **metadata: Any) -> Candidates:
        """Wrap arbitrary candidate points [n', d] (no standardisation: mean 0, std 1)."""
        points = torch.as_tensor(points).detach().float()
        n, d = points.shape
        no_counts = torch.zeros(n, dtype=torch.int64)
        return cls(points, points.clone(), torch.zeros(d), torch.ones(d), no_counts, dict(metadata))

    def save(self, path: str | Path) -> Path:
        """Write the candidates file that ``candidates_path`` in an archetypal SAE config reads."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            CANDIDATES_KEY: self.candidates.detach().cpu().float().clone(),
            "centroids_standardized": self.centroids_standardized.detach().cpu().float().clone(),
            "mean": self.mean.detach().cpu().float().clone(),
            "std": self.std.detach().cpu().float().clone(),
            "counts": self.counts.detach().cpu().to(torch.int64).clone(),
        }
        meta = {"format": FORMAT_NAME, "metadata": json.dumps(self.metadata)}
        save_file(tensors, str(path), metadata=meta)
        return path


def candidates_shape(path: str | Path) -> tuple[int, int]:
    """(n_candidates, d) of a candidates file, read from its header only."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"candidates file not found: {path} (create one with `sae-vision candidates`)"
        )
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if CANDIDATES_KEY not in keys:
            raise ValueError(f"{path} is not a candidates file: no {CANDIDATES_KEY!r} tensor (has {keys})")
        shape = f.get_slice(CANDIDATES_KEY).get_shape()
    if len(shape) != 2:
        raise ValueError(f"candidates in {path} have shape {shape}; expected [n_candidates, d]")
    return int(shape[0]), int(shape[1])


def load_candidates(path: str | Path, space: CandidatesSpace = "data") -> torch.Tensor:
    """Candidate points [n', d] from a candidates file, in data space (default) or standardised space."""
    candidates_shape(path)  # clear errors for missing / foreign files
    tensors = load_file(str(path))
    if space == "data":
        return tensors[CANDIDATES_KEY]
    if space == "standardized":
        if "centroids_standardized" not in tensors:
            raise ValueError(f"{path} holds no standardised centroids; use space='data'")
        return tensors["centroids_standardized"]
    raise ValueError(f"space must be 'data' or 'standardized', got {space!r}")


def load_candidates_file(path: str | Path) -> Candidates:
    """Every tensor and the metadata of a candidates file."""
    candidates_shape(path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    n, d = tensors[CANDIDATES_KEY].shape
    return Candidates(
        candidates=tensors[CANDIDATES_KEY],
        centroids_standardized=tensors.get("centroids_standardized", tensors[CANDIDATES_KEY]),
        mean=tensors.get("mean", torch.zeros(d)),
        std=tensors.get("std", torch.ones(d)),
        counts=tensors.get("counts", torch.zeros(n, dtype=torch.int64)),
        metadata=json.loads(meta.get("metadata", "{}")),
    )


__all__ = [
    "CANDIDATES_KEY",
    "FORMAT_NAME",
    "Candidates",
    "CandidatesSpace",
    "candidates_shape",
    "load_candidates",
    "load_candidates_file",
]
