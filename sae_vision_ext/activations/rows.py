"""Reading activation rows: the one vocabulary every reader uses.

- :class:`CachedActivations`: a committed activation cache on disk (ours, or one SAELens wrote),
  memory-mapped; its metadata, hooks and widths, and every token row of a hook in stored order
  (:meth:`~CachedActivations.iter_rows`).
- :class:`CachedActivationRows`: one hook's token rows of a cache with ``len()``, ``rows[a:b]`` and
  ``rows[index_tensor]`` (random access; what the distributed trainer samples from).
- :class:`RowSource`: re-iterable float32 ``[n, d]`` chunks of an array, a ``.npy`` / ``.safetensors`` file or
  a cache (what candidate k-means and the evaluation commands read); :func:`open_row_source` picks by path.

The training providers, which hand out batches and can resume at a position, are in
:mod:`~sae_vision_ext.activations.store` (``ImageActivationStore``, ``CachedActivationStore``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets.features  # noqa: F401 - registers the Array2D Arrow extension type that cache shards use
import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open

CACHE_METADATA_FILENAME = "sae_vision_cache.json"
INCOMPLETE_SUFFIX = ".incomplete"

__all__ = [
    "CacheShard",
    "CachedActivations",
    "CachedActivationRows",
    "RowSource",
    "as_float32_rows",
    "cache_metadata",
    "open_row_source",
    "rows_from_activation_cache",
    "rows_from_array",
    "rows_from_file",
]


# ----------------------------------------------------------------------------------------------- a cache


def _rows_between(blocks: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the blocks laid end to end (a view when in one block, else a copy)."""
    pieces, offset = [], 0
    for block in blocks:
        lo, hi = max(start - offset, 0), min(stop - offset, block.shape[0])
        if lo < hi:
            pieces.append(block[lo:hi])
        offset += block.shape[0]
        if offset >= stop:
            break
    if not pieces:
        return blocks[0][:0]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclass
class CacheShard:
    """One Arrow file: per hook a list of ``[rows, d]`` numpy views over the memory-mapped file."""

    filename: str
    blocks: dict[str, list[np.ndarray]]
    n_rows: int

    def rows(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Token rows ``[start, stop)`` of ``hook`` (a view when they lie in one block, else a copy)."""
        return _rows_between(self.blocks[hook], start, stop)

    def all_rows(self, hook: str) -> np.ndarray:
        blocks = self.blocks[hook]
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


class CachedActivations:
    """Read-only view of a committed activation cache (ours or one written by SAELens); needs no model.

    ``metadata`` is our ``sae_vision_cache.json`` (empty for foreign caches); ``hook_widths`` maps each
    ``Array2D`` column to its ``d_in``; ``context_size`` is the tokens per stored row.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "state.json").exists():
            incomplete = self.path.with_name(self.path.name + INCOMPLETE_SUFFIX)
            hint = (
                f" ({incomplete} exists: that cache was interrupted; run the cache command again to "
                "finish it)"
                if incomplete.exists()
                else ""
            )
            raise FileNotFoundError(f"{self.path} is not a complete activation cache{hint}")
        state = json.loads((self.path / "state.json").read_text())
        meta_path = self.path / CACHE_METADATA_FILENAME
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.shards: list[CacheShard] = []
        self.hook_widths: dict[str, int] = {}
        self.context_size: int | None = None
        self.dtype: str | None = None
        for entry in state["_data_files"]:
            self.shards.append(self._read_shard(self.path / entry["filename"]))
        if not self.hook_widths:
            raise ValueError(f"{self.path} has no Array2D activation column")

    def _read_shard(self, shard: Path) -> CacheShard:
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(shard), "r")).read_all()
        except (pa.ArrowInvalid, OSError) as err:
            first_line = str(err).splitlines()[0][:160]
            raise ValueError(
                f"cache shard {shard} is damaged or missing ({type(err).__name__}: {first_line}); restore "
                "it, or write the cache again (the same `sae-vision cache` command with --overwrite)"
            ) from err
        blocks: dict[str, list[np.ndarray]] = {}
        for name in table.column_names:
            column = table.column(name)
            shape = getattr(column.type, "shape", None)
            if shape is None or len(shape) != 2:
                continue  # e.g. SAELens's token_ids column
            context, width = shape
            self.hook_widths.setdefault(name, int(width))
            self.context_size = int(context)
            self.dtype = str(column.type.value_type)
            blocks[name] = [
                _flat_values(chunk).reshape(-1, width) for chunk in column.chunks if len(chunk) > 0
            ]
        return CacheShard(shard.name, blocks, table.num_rows * (self.context_size or 0))

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_widths)

    @property
    def n_rows(self) -> int:
        """Token rows in the cache (``len(dataset) * context_size``)."""
        return sum(s.n_rows for s in self.shards)

    @property
    def shuffled(self) -> bool:
        """True when the writer permuted token rows within each shard (our caches)."""
        return bool(self.metadata.get("shuffled_within_shards", False))

    def hook(self, hook_name: str | None = None) -> str:
        """``hook_name`` checked against the cache's columns; None picks the only one (else an error)."""
        if hook_name is None:
            if len(self.hook_widths) != 1:
                raise ValueError(
                    f"{self.path} holds activations of {self.hook_names}; choose one with --hook (hook_name=)"
                )
            return self.hook_names[0]
        if hook_name not in self.hook_widths:
            raise ValueError(f"{self.path} has no column {hook_name!r}; its columns are {self.hook_names}")
        return hook_name

    def iter_rows(self, hook: str, block_rows: int = 65536) -> Iterator[np.ndarray]:
        """Every token row of ``hook`` in stored order, in blocks."""
        for shard in self.shards:
            for start in range(0, shard.n_rows, block_rows):
                yield shard.rows(hook, start, min(start + block_rows, shard.n_rows))

    def __repr__(self) -> str:
        return (
            f"CachedActivations({str(self.path)!r}, hooks={self.hook_widths}, rows={self.n_rows}, "
            f"context_size={self.context_size}, shards={len(self.shards)})"
        )


def _flat_values(chunk) -> np.ndarray:
    storage = chunk.storage if hasattr(chunk, "storage") else chunk
    # offsets of a sliced list array may not start at 0: flatten() honours the slice
    return storage.flatten().flatten().to_numpy(zero_copy_only=True)


def cache_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a committed cache (``{}`` for a cache written by another tool)."""
    meta = Path(path) / CACHE_METADATA_FILENAME
    if not (Path(path) / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete activation cache")
    return json.loads(meta.read_text()) if meta.exists() else {}


class CachedActivationRows:
    """Random access to one hook's token rows of a cache, without a model.

    Flattened, stored row i of the cache holds token rows ``[i * context_size, (i + 1) * context_size)``.
    ``rows[a:b]`` and ``rows[index_tensor]`` read only the wanted rows of the memory-mapped shards and return
    a new ``[n, d_in]`` tensor in the stored dtype. ``cache`` is a :class:`CachedActivations` or its folder;
    ``hook_name`` may be omitted when the cache holds one hook.
    """

    def __init__(self, cache: CachedActivations | str | os.PathLike, hook_name: str | None = None):
        self.cache = cache if isinstance(cache, CachedActivations) else CachedActivations(cache)
        self.hook_name = self.cache.hook(hook_name)
        self.d_in = self.cache.hook_widths[self.hook_name]
        self.context_size = self.cache.context_size
        self._blocks = [block for shard in self.cache.shards for block in shard.blocks[self.hook_name]]
        self._ends = np.cumsum([block.shape[0] for block in self._blocks], dtype=np.int64)
        self._starts = self._ends - np.asarray([block.shape[0] for block in self._blocks], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[torch.arange(start, stop, step)]
            return torch.from_numpy(np.array(_rows_between(self._blocks, start, max(start, stop))))
        flat = torch.as_tensor(index, dtype=torch.long).reshape(-1).numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        out = np.empty((flat.size, self.d_in), dtype=self._blocks[0].dtype)
        block_of = np.searchsorted(self._ends, flat, side="right")
        for block in np.unique(block_of):
            wanted = block_of == block
            out[wanted] = self._blocks[block][flat[wanted] - self._starts[block]]
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        path, hook = str(self.cache.path), self.hook_name
        return f"CachedActivationRows({path!r}, {hook!r}, rows={len(self)}, d={self.d_in})"


# ----------------------------------------------------------------------------------------------- row sources


class RowSource:
    """A re-iterable source of activation rows: every ``iter()`` restarts and yields float32 [n, d] chunks."""

    def __init__(
        self,
        make_iter: Callable[[], Iterator[Any]],
        d: int | None = None,
        n_rows: int | None = None,
        description: str = "rows",
    ):
        self._make_iter = make_iter
        self.d = d
        self.n_rows = n_rows
        self.description = description

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self._make_iter():
            yield as_float32_rows(chunk)

    def __repr__(self) -> str:
        return f"RowSource({self.description}, n_rows={self.n_rows}, d={self.d})"


def as_float32_rows(chunk: Any) -> np.ndarray:
    """A tensor or array ``[..., d]`` as a contiguous float32 numpy array ``[n, d]``."""
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
        source = rows_from_array(np.load(path, mmap_mode="r"), chunk_rows)
        source.description = str(path)
        return source
    if path.suffix == ".safetensors":
        return _rows_from_safetensors(path, chunk_rows, key)
    raise ValueError(f"unsupported row file {path}: use .npy, .safetensors or an activation-cache directory")


def _rows_from_safetensors(path: Path, chunk_rows: int, key: str | None) -> RowSource:
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
            tensor_slice = f.get_slice(key)
            for start in range(0, shape[0], chunk_rows):
                yield tensor_slice[start : start + chunk_rows]

    return RowSource(make, d=int(shape[1]), n_rows=int(shape[0]), description=f"{path}:{key}")


def rows_from_activation_cache(
    path: str | Path, hook_name: str | None = None, chunk_rows: int = 65536
) -> RowSource:
    """Row source over an activation cache (:class:`CachedActivations`; a ``DatasetDict`` folder: its
    ``train`` split): every token row of column ``hook_name`` (None: the only activation column), in order."""
    path = Path(path)
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{path} is a DatasetDict without a 'train' split: {splits}")
        path = path / "train"
    cache = CachedActivations(path)
    hook = cache.hook(hook_name)
    return RowSource(
        lambda: cache.iter_rows(hook, chunk_rows),
        d=cache.hook_widths[hook],
        n_rows=cache.n_rows,
        description=f"{path}:{hook}",
    )


def open_row_source(path: str | Path, hook_name: str | None = None, chunk_rows: int = 65536) -> RowSource:
    """Open an activation-cache directory, a ``.npy`` file or a ``.safetensors`` file as a row source."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no activation rows at {path}")
    if path.is_dir():
        return rows_from_activation_cache(path, hook_name=hook_name, chunk_rows=chunk_rows)
    return rows_from_file(path, chunk_rows=chunk_rows, key=hook_name)
