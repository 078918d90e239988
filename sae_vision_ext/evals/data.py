"""Rows of activations for the evaluation commands: synthetic data or a saved file / cached-activation
dataset.

``load_rows(source)`` accepts
  - ``"synthetic-hierarchical"`` or ``"synthetic-sparse"`` (see ``sae_vision_ext.evals.synthetic``);
  - a ``.pt`` file (a tensor, or a dict holding one under ``key`` or ``"x"`` / ``"activations"``), loaded with
    ``weights_only=True``;
  - anything :func:`~sae_vision_ext.activations.rows.open_row_source` reads: a ``.npy`` file, a
    ``.safetensors`` file (tensor ``key`` or the only one), or a SAELens cached-activation folder (column
    ``key``).
Rows come back in memory as :class:`LoadedRows`: a float32 ``[n, d]`` tensor, flattened over any token axis,
with a description of the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_vision_ext.activations.rows import open_row_source
from sae_vision_ext.evals.synthetic import hierarchical_data, sparse_dictionary_data

SYNTHETIC_SOURCES = ("synthetic-hierarchical", "synthetic-sparse")


@dataclass
class LoadedRows:
    """Activation rows ``x`` ``[n, d]`` read into memory, with where they came from (``synthetic``: the
    ``SyntheticData`` with its ground truth when the source is synthetic)."""

    x: Tensor
    description: str
    synthetic: Any = None  # the SyntheticData when the source is synthetic
    info: dict = field(default_factory=dict)


def _flatten(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).float()


def _from_pt(path: Path, key: str | None) -> Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, dict):
        for name in [key, "x", "activations"]:
            if name is not None and name in obj:
                return obj[name]
        tensors = [v for v in obj.values() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise ValueError(
            f"{path}: give --key, one of {sorted(k for k, v in obj.items() if isinstance(v, Tensor))}"
        )
    raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


def _from_row_source(path: Path, key: str | None, max_rows: int | None) -> Tensor:
    """``.npy`` / ``.safetensors`` / activation-cache folder, read through a row source."""
    chunks, n = [], 0
    for chunk in open_row_source(path, hook_name=key):
        chunks.append(torch.from_numpy(chunk if chunk.flags.writeable else chunk.copy()))
        n += chunk.shape[0]
        if max_rows is not None and n >= max_rows:
            break
    if not chunks:
        raise ValueError(f"{path} holds no rows")
    return torch.cat(chunks)


def load_rows(
    source: str,
    key: str | None = None,
    max_rows: int | None = None,
    seed: int = 0,
    synthetic_kwargs: dict | None = None,
) -> LoadedRows:
    """Load activation rows from ``source`` (see module docstring); at most ``max_rows`` rows."""
    if source in SYNTHETIC_SOURCES:
        kwargs = dict(synthetic_kwargs or {})
        if max_rows is not None:
            kwargs["n_rows"] = max_rows
        make = hierarchical_data if source == "synthetic-hierarchical" else sparse_dictionary_data
        data = make(seed=seed, **kwargs)
        return LoadedRows(x=data.x, description=data.describe(), synthetic=data, info=dict(data.params))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such activation source: {source} (or use one of {SYNTHETIC_SOURCES})")
    if path.suffix == ".pt":
        x, kind = _from_pt(path, key), "torch tensor file"
    else:
        x = _from_row_source(path, key, max_rows)
        kind = "cached-activation dataset" if path.is_dir() else f"{path.suffix[1:]} file"
    x = _flatten(x)
    if max_rows is not None:
        x = x[:max_rows]
    column = f" (column {key})" if key else ""
    description = f"{kind} {path.resolve()}{column}: {x.shape[0]} rows x d={x.shape[1]}"
    return LoadedRows(x=x, description=description, info={"path": str(path.resolve()), "key": key})
