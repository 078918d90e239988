"""Bias probe (MSAE paper, CelebA): how a downstream classifier's predictions move when a concept latent is
scaled.

Inputs: embeddings ``X`` ``[N, d]`` of a labelled image set (the SAE's input space, e.g. CLIP image
embeddings), a classifier head ``h: [N, d] -> logits [N, C]`` with probabilities ``f = softmax(h)`` (a linear
probe fitted on ``X`` by ``fit_linear_probe``, or ``zero_shot_head`` / ``zero_shot_from_prompts``: zero-shot
CLIP prompts), concept latents and strengths. For each latent ``i`` and strength ``s`` the embeddings are
steered (``analysis.steering.steer_vectors``; by default ``mode="scale"``: ``z'_i = s * z_i``, so ``s = 0``
ablates the concept and ``s > 1`` amplifies it; the SAE error stays in place), and the table reports, for the
target class ``c``:

- ``p``: mean ``f(X')_c``; ``dp``: its change from the unsteered ``f(X)_c``;
- ``rate``: fraction of images predicted ``c`` (argmax); ``drate``: its change;
- ``flip``: fraction of images whose predicted class changed;
- for each binary attribute ``a`` (e.g. CelebA's ``Male``, ``Smiling``): ``dp|a=1`` and ``dp|a=0``, the change
  in mean ``f(X')_c`` within each group, which shows whom the concept's presence pushes.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_vision_ext.analysis.concepts import clip_text_encoder
from sae_vision_ext.analysis.retrieval import resolve_latent
from sae_vision_ext.analysis.steering import steer_vectors
from sae_vision_ext.evals.representation import Head, LinearProbe, fit_linear_probe, zero_shot_head

# the probe and zero-shot heads live in evals.representation; re-exported for ``analysis.fit_linear_probe``
__all__ = [
    "BiasTable",
    "Head",
    "LinearProbe",
    "bias_probe",
    "fit_linear_probe",
    "load_attributes",
    "zero_shot_from_prompts",
    "zero_shot_head",
]


def zero_shot_from_prompts(model: Any, prompts: Sequence[str], temperature: float = 100.0) -> Head:
    """A zero-shot head (:func:`~sae_vision_ext.evals.representation.zero_shot_head`) on the prompts embedded
    by a CLIP-family ``model``; ``temperature`` is CLIP's logit scale."""
    with torch.no_grad():
        text = clip_text_encoder(model)(list(prompts)).float().cpu()
    return zero_shot_head(text, logit_scale=temperature)


def _truthy(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "y", "t"):
        return True
    if text in ("0", "-1", "false", "no", "n", "f", ""):
        return False
    raise ValueError(f"cannot read {value!r} as a binary attribute (use 1/0, 1/-1 or true/false)")


def load_attributes(path: str | Path) -> tuple[list[str], dict[str, Tensor]]:
    """Binary image attributes from a table: ``(image ids, {attribute: bool [N]})``.

    Reads CelebA's ``list_attr_celeba.txt`` (line 1: the count, line 2: attribute names, then
    ``<file> <+1/-1>...``) or a CSV whose first column is the image id and whose other columns hold 1/0, 1/-1
    or true/false.
    """
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    if lines[0].strip().isdigit():  # CelebA layout
        names = lines[1].split()
        rows = [line.split() for line in lines[2:]]
        ids = [row[0] for row in rows]
        values = [row[1:] for row in rows]
    else:
        reader = list(csv.reader(lines))
        names = [name.strip() for name in reader[0][1:]]
        ids = [row[0] for row in reader[1:]]
        values = [row[1:] for row in reader[1:]]
    for row_id, row in zip(ids, values):
        if len(row) != len(names):
            raise ValueError(f"{path}: row {row_id!r} has {len(row)} values for {len(names)} attributes")
    columns = {
        name: torch.tensor([_truthy(row[j]) for row in values], dtype=torch.bool)
        for j, name in enumerate(names)
    }
    return ids, columns


@dataclass
class BiasTable:
    """One row per (latent, strength); see the module docstring for the columns."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    target_class: int = 1
    baseline_p: float = float("nan")
    baseline_rate: float = float("nan")

    def columns(self) -> list[str]:
        keys: list[str] = []
        for row in self.rows:
            for key in row:
                if key not in keys:
                    keys.append(key)
        return keys

    def row(self, latent: int, strength: float) -> dict[str, Any]:
        for row in self.rows:
            if row["latent"] == latent and math.isclose(row["strength"], strength):
                return row
        raise KeyError(f"no row for latent {latent} at strength {strength}")

    def to_markdown(self, digits: int = 3) -> str:
        cols = self.columns()

        def fmt(value: Any) -> str:
            return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns())
            writer.writeheader()
            writer.writerows(self.rows)
        return path


def _probabilities(classifier: Head, x: Tensor, batch_size: int) -> Tensor:
    chunks = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            chunks.append(classifier(x[start : start + batch_size]).float().softmax(dim=-1).cpu())
    return torch.cat(chunks)


def bias_probe(
    sae: Any,
    embeddings: Tensor,
    classifier: Head,
    latents: Sequence[int | str],
    strengths: Sequence[float] = (0.0, 0.5, 2.0, 4.0),
    mode: str = "scale",
    target_class: int = 1,
    attributes: Mapping[str, Tensor] | None = None,
    names: Any = None,
    batch_size: int = 4096,
) -> BiasTable:
    """Steer ``embeddings`` along each latent at each strength and tabulate the classifier's prediction
    shifts.

    ``attributes``: name -> boolean ``[N]`` labels (CelebA-style), reported as per-group shifts. ``names``:
    concept names, so latents may be given as words; they also fill the ``name`` column.
    """
    x = embeddings.detach().float()
    base = _probabilities(classifier, x, batch_size)
    base_pred = base.argmax(dim=-1)
    base_target = base[:, target_class]
    attributes = {k: torch.as_tensor(v).bool().cpu() for k, v in (attributes or {}).items()}
    for key, mask in attributes.items():
        if mask.shape[0] != x.shape[0]:
            raise ValueError(f"attribute {key!r} has {mask.shape[0]} labels for {x.shape[0]} embeddings")
    best_names = names.best() if hasattr(names, "best") else dict(names or {})
    table = BiasTable(
        target_class=target_class,
        baseline_p=float(base_target.mean()),
        baseline_rate=float((base_pred == target_class).double().mean()),
    )
    for latent in latents:
        index = resolve_latent(latent, names)
        for strength in strengths:
            steered = torch.cat(
                [
                    steer_vectors(sae, x[start : start + batch_size], [index], mode=mode, value=strength)
                    for start in range(0, x.shape[0], batch_size)
                ]
            )
            probs = _probabilities(classifier, steered, batch_size)
            pred = probs.argmax(dim=-1)
            target = probs[:, target_class]
            row: dict[str, Any] = {
                "latent": index,
                "name": best_names.get(index, ""),
                "mode": mode,
                "strength": float(strength),
                "p": float(target.mean()),
                "dp": float((target - base_target).mean()),
                "rate": float((pred == target_class).double().mean()),
                "drate": float(
                    (pred == target_class).double().mean() - (base_pred == target_class).double().mean()
                ),
                "flip": float((pred != base_pred).double().mean()),
            }
            for key, mask in attributes.items():
                for value, group in ((1, mask), (0, ~mask)):
                    shift = (target - base_target)[group]
                    row[f"dp|{key}={value}"] = float(shift.mean()) if shift.numel() else float("nan")
            table.rows.append(row)
    return table
