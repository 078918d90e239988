"""Synthetic data with known ground truth, and the identifiability score.

Sparse codes over a known dictionary (``sparse_dictionary_data``): atoms ``a_1..a_m`` are random unit vectors
in ``R^d``; each row activates exactly ``k`` atoms chosen uniformly, with magnitudes ``U(lo, hi)``: ``x_n =
sum_{j in S_n} c_nj a_j + noise``.

Hierarchical data (``hierarchical_data``): ``n_coarse`` coarse atoms ``p_c``; each has ``n_fine`` fine
children ``f_cj = parent_cosine * p_c + sqrt(1 - parent_cosine^2) * v_cj`` (``v_cj`` a random unit vector
orthogonal to ``p_c``). A row activates ``k_coarse`` coarse atoms with magnitude ``U(lo, hi)``; each active
coarse atom is refined, with probability ``p_fine``, by exactly one of its children with magnitude
``fine_scale * U(lo, hi)``. Children never fire without their parent, so a few latents capture the coarse
structure and more latents add detail: the setting in which training at several nested k (the Matryoshka SAE)
should give good reconstructions at every k.

Identifiability (the A-SAE paper's soft identifiability): match true atoms one-to-one to learned atoms with
the Hungarian algorithm on cosine similarity and report the mean matched cosine over the true atoms (1 for a
perfect dictionary up to permutation). Signs count by default: with non-negative codes a negated atom explains
nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_vision_ext.evals.stability import match_dictionaries


@dataclass
class SyntheticData:
    """Rows ``x`` ``[n, d]`` generated as ``codes @ atoms`` (+ noise), with the ground truth kept."""

    x: Tensor
    atoms: Tensor
    codes: Tensor
    parents: Tensor | None = None
    params: dict = field(default_factory=dict)

    @property
    def coarse_atoms(self) -> Tensor:
        """Atoms without a parent (all atoms for non-hierarchical data)."""
        if self.parents is None:
            return self.atoms
        return self.atoms[self.parents < 0]

    def describe(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in self.params.items())
        return f"synthetic {self.params.get('kind', 'data')} ({settings})"


def random_unit_atoms(n_atoms: int, d: int, generator: torch.Generator) -> Tensor:
    """``n_atoms`` rows drawn from the standard normal in ``R^d`` and scaled to unit norm."""
    return F.normalize(torch.randn(n_atoms, d, generator=generator), dim=-1)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def _choose_k(n_rows: int, n_items: int, k: int, generator: torch.Generator) -> Tensor:
    """``[n_rows, k]`` indices: ``k`` distinct items per row, uniformly."""
    return torch.rand(n_rows, n_items, generator=generator).argsort(dim=1)[:, :k]


def sparse_dictionary_data(
    n_rows: int = 8192,
    d_in: int = 32,
    n_atoms: int = 64,
    k: int = 4,
    magnitude: tuple[float, float] = (0.5, 1.5),
    noise_std: float = 0.0,
    seed: int = 0,
) -> SyntheticData:
    """Rows that are non-negative ``k``-sparse combinations of ``n_atoms`` random unit atoms."""
    if not 0 < k <= n_atoms:
        raise ValueError(f"need 0 < k <= n_atoms, got k={k}, n_atoms={n_atoms}")
    generator = torch.Generator().manual_seed(seed)
    atoms = random_unit_atoms(n_atoms, d_in, generator)
    codes = torch.zeros(n_rows, n_atoms)
    codes.scatter_(1, _choose_k(n_rows, n_atoms, k, generator), _uniform((n_rows, k), *magnitude, generator))
    x = codes @ atoms
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=generator)
    params = dict(
        kind="sparse", n_rows=n_rows, d_in=d_in, n_atoms=n_atoms, k=k, noise_std=noise_std, seed=seed
    )
    return SyntheticData(x=x, atoms=atoms, codes=codes, parents=None, params=params)


def hierarchical_data(
    n_rows: int = 8192,
    d_in: int = 64,
    n_coarse: int = 16,
    n_fine: int = 4,
    k_coarse: int = 2,
    p_fine: float = 0.8,
    fine_scale: float = 0.6,
    parent_cosine: float = 0.3,
    magnitude: tuple[float, float] = (0.5, 1.5),
    noise_std: float = 0.0,
    seed: int = 0,
) -> SyntheticData:
    """Coarse atoms refined by fine children (see module docstring). Atom order: coarse first, then children.

    ``parents[j]`` is ``-1`` for a coarse atom and the index of the parent for a fine atom.
    """
    if not 0 < k_coarse <= n_coarse:
        raise ValueError(f"need 0 < k_coarse <= n_coarse, got {k_coarse}, {n_coarse}")
    generator = torch.Generator().manual_seed(seed)
    coarse = random_unit_atoms(n_coarse, d_in, generator)
    noise_dirs = torch.randn(n_coarse, n_fine, d_in, generator=generator)
    noise_dirs = noise_dirs - (noise_dirs * coarse[:, None]).sum(-1, keepdim=True) * coarse[:, None]
    noise_dirs = F.normalize(noise_dirs, dim=-1)
    fine = parent_cosine * coarse[:, None] + math.sqrt(1 - parent_cosine**2) * noise_dirs
    atoms = torch.cat([coarse, fine.reshape(-1, d_in)])
    parents = torch.cat([torch.full((n_coarse,), -1), torch.arange(n_coarse).repeat_interleave(n_fine)])

    n_atoms = n_coarse * (1 + n_fine)
    codes = torch.zeros(n_rows, n_atoms)
    active_coarse = _choose_k(n_rows, n_coarse, k_coarse, generator)
    codes.scatter_(1, active_coarse, _uniform((n_rows, k_coarse), *magnitude, generator))
    refine = torch.rand(n_rows, k_coarse, generator=generator) < p_fine
    child = torch.randint(0, n_fine, (n_rows, k_coarse), generator=generator)
    child_index = n_coarse + active_coarse * n_fine + child
    child_value = fine_scale * _uniform((n_rows, k_coarse), *magnitude, generator) * refine
    codes.scatter_(1, child_index, child_value)
    x = codes @ atoms
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=generator)
    params = dict(
        kind="hierarchical",
        n_rows=n_rows,
        d_in=d_in,
        n_coarse=n_coarse,
        n_fine=n_fine,
        k_coarse=k_coarse,
        p_fine=p_fine,
        fine_scale=fine_scale,
        parent_cosine=parent_cosine,
        noise_std=noise_std,
        seed=seed,
    )
    return SyntheticData(x=x, atoms=atoms, codes=codes, parents=parents, params=params)


def identifiability(learned: Tensor, true: Tensor, allow_sign_flip: bool = False) -> float:
    """Mean cosine between each true atom and its Hungarian-matched learned atom (rows are atoms).

    Needs at least as many learned atoms as true atoms; extra learned atoms are ignored.
    """
    if learned.shape[0] < true.shape[0]:
        raise ValueError(f"need >= {true.shape[0]} learned atoms, got {learned.shape[0]}")
    _, _, cosines = match_dictionaries(true, learned, allow_sign_flip=allow_sign_flip)
    return float(torch.as_tensor(cosines).double().mean())
