"""On-disk activation cache in SAELens's cached-activation format, written in shards and committed atomically.

Format (what ``datasets.load_from_disk`` and SAELens's ``ActivationsStore(cached_activations_path=...)``
read): a ``save_to_disk``-style folder (``state.json``, ``dataset_info.json``, Arrow stream files) with one
``Array2D(shape=(context_size, d_in))`` column per hook, named after the hook. For images, ``context_size`` is
the number of selected tokens per image, so ``len(dataset) * context_size`` token rows are stored.

Shuffling: shard ``i`` holds image positions ``[i M, (i + 1) M)`` (``M = images_per_shard``). Before it is
written, its token rows are permuted jointly across hooks with a generator seeded by ``(seed, i)`` and packed
back into rows of ``context_size``, so consecutive rows come from different images and a reader can stream
each shard in order. Each shard is written to a temporary name, fsynced and renamed.

Atomic commit: work happens in ``<path>.incomplete/``, whose ``cache_settings.json`` (written atomically
before any shard, kept until the commit is complete) says what the shards were made with. Only when every
shard is done are ``dataset_info.json``, ``state.json`` and the metadata file (``sae_vision_cache.json``:
model, weights, hooks, token selection, image count, ...) written, and the folder renamed to ``<path>`` in one
``os.rename``; the bookkeeping files are removed after that. An interrupted cache therefore never looks
complete, and running the same command again, whenever it was killed, reuses the shards that are done or
finishes the commit.

Overwrite safety: ``overwrite`` replaces only a folder that is one of our caches (``state.json`` and the
metadata file, nothing else in it) or an interrupted one of ours; a file, or a folder holding anything else,
is refused and left as it is. An empty folder is written into as if it were absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Array2D, DatasetInfo, Features

# cache_metadata is the reader's; runner.py imports it from here
from sae_vision_ext.activations.rows import (  # noqa: F401
    CACHE_METADATA_FILENAME,
    INCOMPLETE_SUFFIX,
    CachedActivations,
    cache_metadata,
)

CACHE_SETTINGS_FILENAME = "cache_settings.json"
FORMAT_VERSION = 1
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
_OUR_NAMES = "|".join(
    [r"data-\d{5}\.(arrow|json)"]
    + [
        re.escape(n)
        for n in ("dataset_info.json", "state.json", CACHE_METADATA_FILENAME, CACHE_SETTINGS_FILENAME)
    ]
)
_OUR_FILE = re.compile(rf"({_OUR_NAMES})|\.({_OUR_NAMES})\.tmp-\d+")  # tmp: an interrupted atomic write


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def activation_features(hook_widths: dict[str, int], context_size: int, dtype: str = "float32"):
    """HF ``Features``: one ``Array2D((context_size, d_in))`` column per hook."""
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"cache dtype must be one of {list(_NUMPY_DTYPES)}, got {dtype!r}")
    return Features({hook: Array2D(shape=(context_size, d), dtype=dtype) for hook, d in hook_widths.items()})


def _array2d_column(values: np.ndarray, features, hook: str):
    """Arrow ``Array2D`` extension array from ``values [n, c, d]`` (zero copy of the numpy buffer)."""
    n, c, d = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c * d + 1, d, dtype=np.int32)), flat)
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c + 1, c, dtype=np.int32)), inner)
    ext_type = features.arrow_schema.field(hook).type
    return pa.ExtensionArray.from_storage(ext_type, outer)


def write_arrow_shard(path: Path, columns: dict[str, np.ndarray], features) -> int:
    """Write ``{hook: [n, c, d]}`` as one Arrow stream file at ``path`` (temporary name, fsync, rename)."""
    path = Path(path)
    schema = features.arrow_schema
    arrays = [_array2d_column(columns[name], features, name) for name in schema.names]
    table = pa.Table.from_arrays(arrays, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=max(1, 1 << 14))
    _fsync_file(tmp)
    os.replace(tmp, path)
    return table.num_rows


def commit_dataset_folder(folder: Path, data_files: list[str], features, fingerprint: str) -> None:
    """Write ``dataset_info.json`` and ``state.json`` so that ``datasets.load_from_disk(folder)`` works."""
    info = DatasetInfo(features=features)
    with open(folder / "dataset_info.json", "wb") as f:
        info._dump_info(f, pretty_print=True)
        f.flush()
        os.fsync(f.fileno())
    write_json_atomic(
        folder / "state.json",
        {
            "_data_files": [{"filename": name} for name in data_files],
            "_fingerprint": fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        },
    )


# ----------------------------------------------------------------------------------------------- writing


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ActivationCacheWriter:
    """Writes the activations of an :class:`~sae_vision_ext.activations.source.ImageActivationSource` to disk.

    ``settings`` are the facts that determine the content (model, weights, hooks, selection, dataset, seed,
    augmentation, shard size, dtype); a resumed run must match them. ``metadata`` is stored with the cache.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_images: int,
        images_per_shard: int,
        settings: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        dtype: str = "float32",
        seed: int = 0,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.work = self.path.with_name(self.path.name + INCOMPLETE_SUFFIX)
        if n_images <= 0:
            raise ValueError(f"n_images must be positive, got {n_images}")
        self.n_images = int(n_images)
        self.images_per_shard = int(images_per_shard)
        self.n_shards = -(-self.n_images // self.images_per_shard)
        self.settings = dict(settings, images_per_shard=self.images_per_shard, dtype=dtype, seed=seed)
        self.metadata = dict(metadata or {})
        self.dtype = dtype
        self.seed = int(seed)
        self.overwrite = overwrite
        self._finish_only = False  # prepare(): the work folder holds a finished commit, not yet renamed
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"cache dtype must be one of {list(_NUMPY_DTYPES)}, got {dtype!r}")

    # -- layout
    def shard_name(self, index: int) -> str:
        return f"data-{index:05d}.arrow"

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.images_per_shard
        return start, min(start + self.images_per_shard, self.n_images)

    def _shard_record(self, index: int) -> dict[str, Any] | None:
        record_path = self.work / f"data-{index:05d}.json"
        if not (self.work / self.shard_name(index)).exists() or not record_path.exists():
            return None
        record = json.loads(record_path.read_text())
        if tuple(record.get("positions", ())) != self.shard_range(index):
            return None
        return record

    def prepare(self) -> list[int]:
        """Check the destination, create or reuse the work folder; returns the shard indices still to write.

        A work folder is resumed in any state an interruption leaves: settings written but no shard, some or
        all shards, or the commit half done. One made with other settings is refused (replaced with
        ``overwrite``).
        """
        if _exists(self.path):
            check_replaceable(self.path, self.overwrite)
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"cannot write the cache: {parent} is not writable")
        fingerprint = settings_fingerprint(self.settings)
        if _exists(self.work):
            previous = _interrupted_settings(self.work)
            if previous is not None and previous.get("fingerprint") != fingerprint:
                if not self.overwrite:
                    changed = sorted(
                        k
                        for k in set(previous.get("settings", {})) | set(self.settings)
                        if previous.get("settings", {}).get(k) != self.settings.get(k)
                    )
                    raise ValueError(
                        f"{self.work} holds an interrupted cache made with other settings (differs in: "
                        f"{', '.join(changed) or 'unknown'}); delete it, use the same settings to resume, or "
                        "pass overwrite (--overwrite) to start again"
                    )
                shutil.rmtree(self.work)  # ours (checked above) and explicitly replaced
                self.work.mkdir()
            for torn in self.work.glob(".*.tmp-*"):  # atomic writes cut short (ours: checked above)
                torn.unlink(missing_ok=True)
        else:
            self.work.mkdir(parents=True)
        settings = {"fingerprint": fingerprint, "settings": self.settings}
        write_json_atomic(self.work / CACHE_SETTINGS_FILENAME, settings)
        fsync_dir(self.work)
        self._finish_only = _committed_in(self.work, fingerprint)
        if self._finish_only:  # only the final rename is missing
            return []
        return [i for i in range(self.n_shards) if self._shard_record(i) is None]

    def discard_if_empty(self) -> bool:
        """Remove the work folder when none of its shards holds a row (nothing is lost); True if removed."""
        if not self.work.is_dir() or _foreign_entries(self.work):
            return False
        for record in self.work.glob("data-*.json"):
            try:
                if json.loads(record.read_text()).get("n_contexts", 0) > 0:
                    return False
            except (OSError, ValueError):
                return False
        shutil.rmtree(self.work)
        return True

    def write_shard(self, index: int, rows: dict[str, torch.Tensor], context_size: int, extra: dict) -> None:
        """Permute the shard's token rows (jointly across hooks), pack in ``context_size`` rows, write."""
        hook_widths = {h: int(t.shape[1]) for h, t in rows.items()}
        features = activation_features(hook_widths, context_size, self.dtype)
        n = next(iter(rows.values())).shape[0]
        if n % context_size:
            raise ValueError(
                f"shard {index}: {n} token rows is not a multiple of context_size {context_size}"
            )
        generator = torch.Generator().manual_seed(mix_seed(self.seed, 31, index))
        order = torch.randperm(n, generator=generator)
        np_dtype = _NUMPY_DTYPES[self.dtype]
        columns = {
            h: t[order]
            .to(torch.float32)
            .numpy()
            .astype(np_dtype, copy=False)
            .reshape(-1, context_size, t.shape[1])
            for h, t in rows.items()
        }
        record = {
            "positions": list(self.shard_range(index)),
            "n_contexts": n // context_size,
            "context_size": context_size,
            "hook_widths": hook_widths,
            **extra,
        }
        write_json_atomic(self.work / f"data-{index:05d}.json", record)
        write_arrow_shard(self.work / self.shard_name(index), columns, features)

    def commit(self) -> CachedActivations:
        """All shards done: write the dataset files and metadata, then rename the work folder into place.

        ``cache_settings.json`` and the shard records stay until the rename is done, so a commit interrupted
        at any moment is finished by running the same command again. An empty result (no readable image) is an
        error: the work folder is removed and nothing is committed.
        """
        if not self._finish_only:
            self._write_commit_files()
        if _exists(self.path):  # overwrite: move the old cache aside first, so a crash leaves one of the two
            check_replaceable(self.path, self.overwrite)
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.rename(self.path, old)
            os.rename(self.work, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.work, self.path)
        fsync_dir(self.path.parent)
        for name in [CACHE_SETTINGS_FILENAME, *(f"data-{i:05d}.json" for i in range(self.n_shards))]:
            (self.path / name).unlink(missing_ok=True)
        for leftover in self.path.parent.glob(f".{glob_escape(self.path.name)}.old-*"):
            if leftover.is_dir() and _is_our_cache(leftover):  # left by an interrupted overwrite
                shutil.rmtree(leftover, ignore_errors=True)
        return CachedActivations(self.path)

    def _write_commit_files(self) -> None:
        records = []
        for i in range(self.n_shards):
            record = self._shard_record(i)
            if record is None:
                raise RuntimeError(f"shard {i} of {self.n_shards} is missing; the cache is not complete")
            records.append(record)
        n_contexts = sum(r["n_contexts"] for r in records)
        n_failed = sum(r.get("n_images_failed", 0) for r in records)
        if n_contexts == 0:
            self.discard_if_empty()
            raise ValueError(
                f"no image could be read: all {n_failed:,} image positions failed, so the cache {self.path} "
                "would be empty; nothing was committed"
            )
        widths = records[0]["hook_widths"]
        context_size = records[0]["context_size"]
        features = activation_features(widths, context_size, self.dtype)
        data_files = [self.shard_name(i) for i in range(self.n_shards)]
        metadata = {
            **self.metadata,
            "format_version": FORMAT_VERSION,
            "hook_names": list(widths),
            "hook_widths": widths,
            "context_size": context_size,
            "n_images": self.n_images,
            "n_images_ok": sum(r.get("n_images_ok", 0) for r in records),
            "n_images_failed": n_failed,
            "n_contexts": n_contexts,
            "n_rows": n_contexts * context_size,
            "n_shards": self.n_shards,
            "images_per_shard": self.images_per_shard,
            "dtype": self.dtype,
            "seed": self.seed,
            "shuffled_within_shards": True,
            "settings": self.settings,
            "created_unix": time.time(),
        }
        commit_dataset_folder(self.work, data_files, features, settings_fingerprint(metadata))
        write_json_atomic(self.work / CACHE_METADATA_FILENAME, metadata)
        fsync_dir(self.work)


# ----------------------------------------------------------------------------------------------- safety


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that the cache writer does not make (sorted)."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_symlink() or not (p.is_file() and _OUR_FILE.fullmatch(p.name))
    )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f", ... ({len(names)} entries)" if len(names) > 3 else "")


def _is_our_cache(folder: Path) -> bool:
    has_files = (folder / "state.json").is_file() and (folder / CACHE_METADATA_FILENAME).is_file()
    return has_files and not _foreign_entries(folder)


def check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse (``FileExistsError``, one line naming what is there) unless ``path`` may become the cache.

    An empty folder may; a committed cache of ours may with ``overwrite``; anything else never.
    """
    path = Path(path)
    keep = "choose another output folder, or move it away yourself"
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"{path} is a file, not an activation cache: refusing to replace it; {keep}")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if not _is_our_cache(path):
        foreign = _foreign_entries(path) if (path / CACHE_METADATA_FILENAME).is_file() else entries
        raise FileExistsError(
            f"{path} is not an activation cache written by sae-vision (it holds {_listing(foreign)}): "
            f"refusing to replace it; {keep}"
        )
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists (a complete cache); pass overwrite (--overwrite) to replace it"
        )


def _interrupted_settings(work: Path) -> dict[str, Any] | None:
    """What an interrupted cache's work folder was made with, ``{"fingerprint", "settings"}``: from its
    settings file, else (a commit half done by an older version) from its metadata; None before any shard.

    Refuses (``FileExistsError``) a work folder that is not ours, or holds shards without their settings.
    """
    if work.is_symlink() or not work.is_dir():
        raise FileExistsError(f"{work} is a file, not an interrupted activation cache; move it away")
    foreign = _foreign_entries(work)
    if foreign:
        raise FileExistsError(
            f"{work} is not an interrupted activation cache (it holds {_listing(foreign)}); move it away or "
            "choose another output folder"
        )
    for name in (CACHE_SETTINGS_FILENAME, CACHE_METADATA_FILENAME):
        try:
            payload = json.loads((work / name).read_text())
        except (OSError, ValueError):
            continue
        if name == CACHE_SETTINGS_FILENAME:
            return payload
        if isinstance(payload.get("settings"), dict):
            return {"fingerprint": settings_fingerprint(payload["settings"]), "settings": payload["settings"]}
    if any(work.glob("data-*.arrow")):
        raise FileExistsError(
            f"{work} holds shards but no record of their settings, so it cannot be resumed; delete it to "
            "start again"
        )
    return None  # interrupted before its first shard: start afresh in it


def _committed_in(work: Path, fingerprint: str) -> bool:
    """True when ``work`` holds a finished commit (state, metadata, every shard) of these settings."""
    try:
        metadata = json.loads((work / CACHE_METADATA_FILENAME).read_text())
        state = json.loads((work / "state.json").read_text())
    except (OSError, ValueError):
        return False
    if settings_fingerprint(metadata.get("settings", {})) != fingerprint:
        return False
    return all((work / entry["filename"]).is_file() for entry in state.get("_data_files", []))


def nothing_readable_error(dataset: Any, n_failed: int, n_dataset: int, errors: list[str]) -> ValueError:
    """The error for a cache in which no image could be read (each pass visits every image once)."""
    n_files = min(n_failed, n_dataset)
    tried = f"all {n_files:,} image files"
    if n_files < n_dataset:
        tried = f"the {n_files:,} image files tried (of {n_dataset:,})"
    first = f" (first error: {errors[0]})" if errors else ""
    return ValueError(
        f"no image could be read from {dataset}: {tried} are unreadable{first}; nothing was cached"
    )


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
