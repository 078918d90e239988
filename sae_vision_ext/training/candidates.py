"""Archetype candidates: streaming k-means over activation rows (Fel et al. 2025, Sec. 3).

The archetypal dictionary D = W C + Lambda needs a fixed set C of n' candidate points inside the data's
convex hull. As in the paper, C holds k-means centroids of the element-wise standardised activations:

    z = (x - mu) / sigma                       mu, sigma: per-dimension mean and std over ALL rows
    centroids_z = kmeans(z, n')                (faiss, squared L2)
    C = centroids_z * sigma + mu               (data space; each row is a mean of data rows, so in the hull)

Streaming, for datasets far larger than memory (every step reads the rows chunk by chunk):

1. one pass: exact mean / std (Chan's parallel update, float64) and a uniform reservoir sample
   (Algorithm R) of ``sample_rows`` rows -- the only rows ever held in memory;
2. faiss k-means on the standardised sample (k-means++ seeding up to 4,096 centroids, random above);
3. optionally ``refine_passes`` full Lloyd iterations over the whole stream: faiss assigns each chunk to its
   nearest centroid, per-centroid sums are accumulated, centroids become the exact means of their members.
   Each pass costs 2 * n_rows * n' * d FLOPs, as much as one k-means iteration over the full data.

Memory: ``sample_rows * d * 4`` bytes for the sample plus ``n' * d`` for the centroids.

The result is saved as a candidates file (safetensors; layout, writer and readers in
``sae_vision_ext.saes.candidates_file``, re-exported here); the archetypal SAE configs point to it with
``candidates_path``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from sae_vision_ext.activations.rows import as_float32_rows
from sae_vision_ext.saes.candidates_file import Candidates
from sae_vision_ext.saes.candidates_file import candidates_shape as candidates_shape
from sae_vision_ext.saes.candidates_file import load_candidates as load_candidates
from sae_vision_ext.saes.candidates_file import load_candidates_file as load_candidates_file

KMEANS_PP_MAX_K = 4096  # kmeans_init="auto": k-means++ seeding up to this many centroids, random above


def _limit_rows(source: Iterable[np.ndarray], max_rows: int | None) -> Iterator[np.ndarray]:
    seen = 0
    for chunk in source:
        chunk = as_float32_rows(chunk)
        if max_rows is not None:
            if seen >= max_rows:
                return
            chunk = chunk[: max_rows - seen]
        seen += chunk.shape[0]
        yield chunk


# ------------------------------------------------------------------------------------- streaming statistics
class RunningMoments:
    """Exact per-dimension mean and (population) variance over a stream, merged chunk by chunk in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        nb = chunk.shape[0]
        if nb == 0:
            return
        mean_b = chunk.mean(axis=0)
        m2_b = ((chunk - mean_b) ** 2).sum(axis=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        assert self.m2 is not None
        return np.sqrt(self.m2 / max(self.n, 1))


class Reservoir:
    """Uniform sample without replacement of ``size`` rows from a stream of unknown length (Algorithm R)."""

    def __init__(self, size: int, d: int, seed: int = 0) -> None:
        self.rows = np.empty((size, d), dtype=np.float32)
        self.size = size
        self.filled = 0
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def update(self, chunk: np.ndarray) -> None:
        if self.filled < self.size:
            take = min(self.size - self.filled, chunk.shape[0])
            self.rows[self.filled : self.filled + take] = chunk[:take]
            self.filled += take
            self.seen += take
            chunk = chunk[take:]
        n = chunk.shape[0]
        if n == 0:
            return
        # row number i (0-based over the stream) replaces slot j ~ U{0..i} when j < size
        slots = self.rng.integers(0, self.seen + np.arange(n) + 1)
        keep = np.flatnonzero(slots < self.size)
        if keep.size:
            slots_kept = slots[keep]
            # sequential semantics: when several rows hit one slot, the last one stays
            _, last_from_end = np.unique(slots_kept[::-1], return_index=True)
            last = keep.size - 1 - last_from_end
            self.rows[slots_kept[last]] = chunk[keep[last]]
        self.seen += n

    @property
    def sample(self) -> np.ndarray:
        return self.rows[: self.filled]


# ----------------------------------------------------------------------------------------------- k-means
def _row_bar(total: int | None, desc: str, enabled: bool) -> Any:
    """A tqdm bar over rows read (rows/s) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc=desc, disable=not enabled, leave=None,
                dynamic_ncols=True)  # fmt: skip


def _check_chunk(chunk: np.ndarray, d: int | None, n_seen: int) -> None:
    if d is not None and chunk.shape[1] != d:
        raise ValueError(f"row width changed from {d} to {chunk.shape[1]} at row {n_seen}")
    if not np.isfinite(chunk).all():
        bad = int(np.argwhere(~np.isfinite(chunk))[0, 0])
        raise ValueError(
            f"activation rows contain NaN/inf (first at row {n_seen + bad}); clean the data first"
        )


def compute_candidates(
    source: Iterable[Any],
    n_candidates: int,
    *,
    standardize: bool = True,
    n_iter: int = 20,
    sample_rows: int | None = None,
    refine_passes: int = 0,
    seed: int = 0,
    max_rows: int | None = None,
    kmeans_init: Literal["auto", "kmeans++", "random"] = "auto",
    std_eps: float = 1e-6,
    verbose: bool = False,
    progress: bool = True,
) -> Candidates:
    """k-means candidates of a (re-iterable) stream of activation rows; see the module docstring.

    ``source`` yields [n, d] chunks (numpy or torch) and must restart on every ``iter()`` when
    ``refine_passes > 0`` (a :class:`RowSource` does). ``sample_rows`` defaults to ``64 * n_candidates``.
    ``kmeans_init="auto"`` seeds with k-means++ up to ``KMEANS_PP_MAX_K`` centroids and uniformly at random
    above: k-means++ seeding is sequential over k and costs ~70 Lloyd iterations at k = 32,000.
    ``progress`` shows a tqdm bar (rows/s) on stderr for every pass over the rows; ``verbose`` prints faiss's
    k-means iterations.
    """
    import faiss

    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    if kmeans_init not in ("auto", "kmeans++", "random"):
        raise ValueError(f"kmeans_init must be 'auto', 'kmeans++' or 'random', got {kmeans_init!r}")
    if sample_rows is None:
        sample_rows = 64 * n_candidates
    if sample_rows < n_candidates:
        raise ValueError(f"sample_rows ({sample_rows}) must be >= n_candidates ({n_candidates})")
    t0 = time.perf_counter()

    # pass 1: exact moments over every row + uniform reservoir sample
    moments = RunningMoments()
    reservoir: Reservoir | None = None
    d: int | None = None
    total = getattr(source, "n_rows", None)
    if max_rows is not None:
        total = max_rows if total is None else min(total, max_rows)
    passes = 1 + refine_passes
    with _row_bar(total, f"candidates: statistics and sample (pass 1/{passes})", progress) as bar:
        for chunk in _limit_rows(source, max_rows):
            bar.update(chunk.shape[0])
            if chunk.shape[0] == 0:
                continue
            _check_chunk(chunk, d, moments.n)
            if reservoir is None:
                d = chunk.shape[1]
                reservoir = Reservoir(sample_rows, d, seed=seed)
            moments.update(chunk)
            reservoir.update(chunk)
    if reservoir is None or d is None:
        raise ValueError("the row source yielded no rows")
    n_rows = moments.n
    if n_rows < n_candidates:
        raise ValueError(
            f"only {n_rows} rows for {n_candidates} centroids; k-means needs at least as many rows"
        )
    if standardize:
        mean = moments.mean.astype(np.float64)
        std = moments.std
        std = np.where(std > std_eps, std, 1.0)  # constant dimensions are left unscaled
    else:
        mean, std = np.zeros(d), np.ones(d)
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    sample = (reservoir.sample - mean32) / std32
    t_pass1 = time.perf_counter() - t0

    # k-means on the sample (faiss)
    if progress:
        print(f"candidates: k-means of {sample.shape[0]:,} sampled rows into {n_candidates:,} centroids "
              f"({n_iter} iterations)", file=sys.stderr, flush=True)  # fmt: skip
    kmeans = faiss.Kmeans(d, n_candidates, niter=n_iter, seed=seed, verbose=verbose,
                          max_points_per_centroid=max(1, math.ceil(sample.shape[0] / n_candidates)),
                          min_points_per_centroid=1)
    if kmeans_init == "auto":
        kmeans_init = "kmeans++" if n_candidates <= KMEANS_PP_MAX_K else "random"
    if kmeans_init == "kmeans++" and hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
        kmeans.cp.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    centroids = np.array(kmeans.centroids, dtype=np.float32)
    _, assign = kmeans.index.search(sample, 1)
    counts = np.bincount(assign[:, 0], minlength=n_candidates)
    t_kmeans = time.perf_counter() - t0 - t_pass1

    # optional streaming Lloyd passes over every row
    inertia = None
    for refine in range(refine_passes):
        index = faiss.IndexFlatL2(d)
        index.add(centroids)
        sums = torch.zeros(n_candidates, d, dtype=torch.float64)
        counts_t = torch.zeros(n_candidates, dtype=torch.float64)
        inertia = 0.0
        with _row_bar(n_rows, f"candidates: Lloyd refinement (pass {refine + 2}/{passes})", progress) as bar:
            for chunk in _limit_rows(source, max_rows):
                z = (chunk - mean32) / std32
                dist, idx = index.search(np.ascontiguousarray(z), 1)
                idx_t = torch.from_numpy(idx[:, 0].astype(np.int64))
                sums.index_add_(0, idx_t, torch.from_numpy(z).double())
                counts_t.index_add_(0, idx_t, torch.ones(len(idx_t), dtype=torch.float64))
                inertia += float(dist.sum())
                bar.update(chunk.shape[0])
        filled = counts_t > 0  # empty clusters keep their previous centroid
        new = torch.from_numpy(centroids).double()
        new[filled] = sums[filled] / counts_t[filled, None]
        centroids = new.float().numpy()
        counts = counts_t.numpy().astype(np.int64)
    elapsed = time.perf_counter() - t0

    centroids_t = torch.from_numpy(centroids)
    data_space = centroids_t.double() * torch.from_numpy(std) + torch.from_numpy(mean)
    metadata = {
        "n_rows": int(n_rows),
        "n_candidates": int(n_candidates),
        "d": int(d),
        "standardize": bool(standardize),
        "n_iter": int(n_iter),
        "sample_rows": int(reservoir.filled),
        "refine_passes": int(refine_passes),
        "seed": int(seed),
        "kmeans_init": kmeans_init,
        "sample_objective": float(kmeans.obj[-1]) if len(kmeans.obj) else None,
        "stream_inertia": inertia,
        "seconds": {"stats_and_sample": t_pass1, "kmeans": t_kmeans, "total": elapsed},
        "rows_per_second": n_rows * (1 + refine_passes) / max(elapsed, 1e-9),
    }
    return Candidates(
        candidates=data_space.float(),
        centroids_standardized=centroids_t,
        mean=torch.from_numpy(mean).float(),
        std=torch.from_numpy(std).float(),
        counts=torch.from_numpy(np.asarray(counts, dtype=np.int64)),
        metadata=metadata,
    )
