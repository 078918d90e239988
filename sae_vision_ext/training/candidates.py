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

The candidates file is a safetensors file with ``candidates`` [n', d] (data space),
``centroids_standardized`` [n', d], ``mean`` [d], ``std`` [d], ``counts`` [n'] and JSON metadata. The
archetypal SAE configs point to it with ``candidates_path``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

CANDIDATES_KEY = "candidates"
KMEANS_PP_MAX_K = 4096  # kmeans_init="auto": k-means++ seeding up to this many centroids, random above
FORMAT_NAME = "sae_vision_ext.candidates/1"


# --------------------------------------------------------------------------------------------- row sources
class RowSource:
    """A re-iterable source of activation rows: every ``iter()`` restarts and yields float32 [n, d] chunks."""

    def __init__(self, make_iter: Callable[[], Iterator[Any]], d: int | None = None, n_rows: int | None = None,
                 description: str = "rows"):
        self._make_iter = make_iter
        self.d = d
        self.n_rows = n_rows
        self.description = description

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self._make_iter():
            yield _as_float32_rows(chunk)

    def __repr__(self) -> str:
        return f"RowSource({self.description}, n_rows={self.n_rows}, d={self.d})"


def _as_float32_rows(chunk: Any) -> np.ndarray:
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().to("cpu", torch.float32).numpy()
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim != 2:
        chunk = chunk.reshape(-1, chunk.shape[-1])
    return np.ascontiguousarray(chunk)


def rows_from_array(rows: np.ndarray | torch.Tensor, chunk_rows: int = 65536) -> RowSource:
    """Row source over an in-memory (or memory-mapped) 2-D array or tensor."""
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows [n, d], got shape {tuple(rows.shape)}")

    def make() -> Iterator[Any]:
        for start in range(0, rows.shape[0], chunk_rows):
            yield rows[start : start + chunk_rows]

    return RowSource(make, d=int(rows.shape[1]), n_rows=int(rows.shape[0]), description="array")


def rows_from_file(path: str | Path, chunk_rows: int = 65536, key: str | None = None) -> RowSource:
    """Row source over a ``.npy`` file (memory-mapped) or one 2-D tensor of a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        src = rows_from_array(arr, chunk_rows)
        src.description = str(path)
        return src
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if key is None:
                if len(keys) != 1:
                    raise ValueError(f"{path} holds tensors {keys}; choose one with key=/--key")
                key = keys[0]
            if key not in keys:
                raise ValueError(f"{path} has no tensor {key!r}; it holds {keys}")
            shape = f.get_slice(key).get_shape()
        if len(shape) != 2:
            raise ValueError(f"tensor {key!r} in {path} has shape {shape}; expected [n_rows, d]")

        def make() -> Iterator[Any]:
            with safe_open(str(path), framework="pt") as f:
                sl = f.get_slice(key)
                for start in range(0, shape[0], chunk_rows):
                    yield sl[start : start + chunk_rows]

        return RowSource(make, d=int(shape[1]), n_rows=int(shape[0]), description=f"{path}:{key}")
    raise ValueError(f"unsupported row file {path}: use .npy, .safetensors or an activation-cache directory")


def rows_from_activation_cache(path: str | Path, hook_name: str | None = None,
                               chunk_rows: int = 65536) -> RowSource:
    """Row source over an activation cache: an HF ``datasets`` dataset saved with ``save_to_disk`` whose
    column (named after the hook) holds ``Array2D(context_size, d)`` examples; every token row is a row."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path} is a DatasetDict without a 'train' split: {list(ds)}")
        ds = ds["train"]
    columns = list(ds.column_names)
    if hook_name is None:
        if len(columns) != 1:
            raise ValueError(f"{path} has columns {columns}; choose the hook column with --hook (hook_name=)")
        hook_name = columns[0]
    if hook_name not in columns:
        raise ValueError(f"{path} has no column {hook_name!r}; its columns are {columns}")
    shape = getattr(ds.features[hook_name], "shape", None)
    if shape is None:
        first = np.asarray(ds.with_format("numpy")[0][hook_name])
        shape = first.shape
    d = int(shape[-1])
    rows_per_example = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    examples_per_chunk = max(1, chunk_rows // max(rows_per_example, 1))
    n_examples = len(ds)

    def make() -> Iterator[Any]:
        view = ds.with_format("numpy", columns=[hook_name])
        for start in range(0, n_examples, examples_per_chunk):
            yield np.asarray(view[start : start + examples_per_chunk][hook_name]).reshape(-1, d)

    return RowSource(make, d=d, n_rows=n_examples * rows_per_example, description=f"{path}:{hook_name}")


def open_row_source(path: str | Path, hook_name: str | None = None, chunk_rows: int = 65536) -> RowSource:
    """Open an activation-cache directory, a ``.npy`` file or a ``.safetensors`` file as a row source."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no activation rows at {path}")
    if path.is_dir():
        return rows_from_activation_cache(path, hook_name=hook_name, chunk_rows=chunk_rows)
    return rows_from_file(path, chunk_rows=chunk_rows, key=hook_name)


def _limit_rows(source: Iterable[np.ndarray], max_rows: int | None) -> Iterator[np.ndarray]:
    seen = 0
    for chunk in source:
        chunk = _as_float32_rows(chunk)
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


# ------------------------------------------------------------------------------------------------- results
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
        return cls(points, points.clone(), torch.zeros(d), torch.ones(d), torch.zeros(n, dtype=torch.int64),
                   dict(metadata))

    def save(self, path: str | Path) -> Path:
        """Write the candidates file (safetensors) that ``candidates_path`` in an archetypal SAE config reads."""
        from safetensors.torch import save_file

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
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"candidates file not found: {path} (create one with `sae-vision candidates`)")
    with safe_open(str(path), framework="pt") as f:
        if CANDIDATES_KEY not in f.keys():
            raise ValueError(f"{path} is not a candidates file: no {CANDIDATES_KEY!r} tensor (has {list(f.keys())})")
        shape = f.get_slice(CANDIDATES_KEY).get_shape()
    if len(shape) != 2:
        raise ValueError(f"candidates in {path} have shape {shape}; expected [n_candidates, d]")
    return int(shape[0]), int(shape[1])


def load_candidates(path: str | Path, space: Literal["data", "standardized"] = "data") -> torch.Tensor:
    """Candidate points [n', d] from a candidates file, in data space (default) or standardised space."""
    from safetensors.torch import load_file

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
    from safetensors import safe_open
    from safetensors.torch import load_file

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
        raise ValueError(f"activation rows contain NaN/inf (first at row {n_seen + bad}); clean the data first")


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
        raise ValueError(f"only {n_rows} rows for {n_candidates} centroids; k-means needs at least as many rows")
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
