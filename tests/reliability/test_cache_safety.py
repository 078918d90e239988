"""Issue 14: ``--overwrite`` replaces only our caches, and a cache interrupted at any moment resumes.

The writer is driven with made-up rows (no model), so each state an interruption can leave on disk is built
exactly; one test SIGKILLs a real process at the first moments and in the commit window.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_vision_ext.activations.cache import (
    CACHE_METADATA_FILENAME,
    CACHE_SETTINGS_FILENAME,
    INCOMPLETE_SUFFIX,
    ActivationCacheWriter,
    CachedActivations,
)

HOOK = "blocks.0.hook_resid_post"
SETTINGS = {"model_name": "made-up", "hook_names": [HOOK], "augment": "crop_flip", "crop_scale": [0.35, 1.0]}
N_IMAGES, PER_SHARD, CONTEXT, WIDTH = 10, 4, 2, 3  # shards of 4, 4, 2 images


def fake_writer(path: Path, overwrite: bool = False, **settings) -> ActivationCacheWriter:
    return ActivationCacheWriter(
        path, N_IMAGES, PER_SHARD, {**SETTINGS, **settings}, seed=1, overwrite=overwrite
    )


def write_shard(writer: ActivationCacheWriter, index: int) -> None:
    start, end = writer.shard_range(index)
    rows = torch.randn((end - start) * CONTEXT, WIDTH, generator=torch.Generator().manual_seed(index))
    writer.write_shard(index, {HOOK: rows}, CONTEXT, {"n_images_ok": end - start, "n_images_failed": 0})


def write_cache(path: Path, overwrite: bool = False, **settings) -> CachedActivations:
    """Prepare, write the missing shards, commit: what the cache command does."""
    writer = fake_writer(path, overwrite, **settings)
    for index in writer.prepare():
        write_shard(writer, index)
    return writer.commit()


def rows(path: Path) -> np.ndarray:
    return np.concatenate(list(CachedActivations(path).iter_rows(HOOK)))


@pytest.fixture
def reference(tmp_path) -> np.ndarray:
    return rows(write_cache(tmp_path / "reference").path)


# ----------------------------------------------------------------------------------------------- overwrite


def test_overwrite_refuses_a_folder_of_the_users(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    (path / "thesis.tex").write_text("my thesis")
    with pytest.raises(FileExistsError, match=r"not an activation cache .*thesis\.tex.*refusing to replace"):
        write_cache(path, overwrite=True)
    assert (path / "thesis.tex").read_text() == "my thesis" and sorted(os.listdir(path)) == ["thesis.tex"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing moved aside, no work folder


def test_overwrite_refuses_a_plain_file(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a folder")
    with pytest.raises(FileExistsError, match="is a file, not an activation cache"):
        write_cache(path, overwrite=True)
    assert path.read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_refuses_a_cache_holding_other_files(tmp_path):
    path = write_cache(tmp_path / "out").path
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        write_cache(path, overwrite=True, augment="none")
    assert (path / "notes.txt").read_text() == "mine" and (path / CACHE_METADATA_FILENAME).exists()


def test_overwrite_refuses_a_work_folder_that_is_not_ours(tmp_path):
    work = tmp_path / f"out{INCOMPLETE_SUFFIX}"
    work.mkdir()
    (work / "thesis.tex").write_text("my thesis")
    with pytest.raises(FileExistsError, match=r"not an interrupted activation cache .*thesis\.tex"):
        write_cache(tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(work)) == ["thesis.tex"]


def test_overwrite_replaces_our_cache_and_our_interrupted_one(tmp_path, reference):
    path = tmp_path / "out"
    write_cache(path, augment="none")
    with pytest.raises(FileExistsError, match="already exists .*overwrite"):
        write_cache(path)
    assert np.array_equal(rows(write_cache(path, overwrite=True).path), reference)
    assert sorted(os.listdir(tmp_path)) == ["out", "reference"]  # the old cache is gone, nothing left aside

    # an interrupted cache of ours made with other settings: refused, replaced with overwrite
    other = fake_writer(tmp_path / "again", augment="none")
    other.prepare()
    write_shard(other, 0)
    with pytest.raises(ValueError, match=r"other settings \(differs in: augment\)"):
        write_cache(tmp_path / "again")
    assert np.array_equal(rows(write_cache(tmp_path / "again", overwrite=True).path), reference)


def test_an_empty_folder_is_written_into(tmp_path, reference):
    (tmp_path / "out").mkdir()
    assert np.array_equal(rows(write_cache(tmp_path / "out").path), reference)


# ----------------------------------------------------------------------------------------------- interrupted


def killed_after_mkdir(path: Path) -> None:
    work = path.with_name(path.name + INCOMPLETE_SUFFIX)
    work.mkdir()
    (work / f".{CACHE_SETTINGS_FILENAME}.tmp-99999").write_text('{"fingerp')  # a torn atomic write


def settings_but_no_shard(path: Path) -> None:
    fake_writer(path).prepare()


def some_shards(path: Path) -> None:
    writer = fake_writer(path)
    writer.prepare()
    write_shard(writer, 1)


def all_shards_no_commit(path: Path) -> None:
    writer = fake_writer(path)
    for index in writer.prepare():
        write_shard(writer, index)


def commit_files_written(path: Path) -> None:
    """Killed in the commit window: dataset files and metadata written, the final rename not done."""
    writer = fake_writer(path)
    for index in writer.prepare():
        write_shard(writer, index)
    writer._write_commit_files()


def commit_half_done_by_the_old_writer(path: Path) -> None:
    """What the previous version left when killed before its rename: settings and shard records deleted."""
    commit_files_written(path)
    work = path.with_name(path.name + INCOMPLETE_SUFFIX)
    for name in [CACHE_SETTINGS_FILENAME, *(p.name for p in work.glob("data-*.json"))]:
        (work / name).unlink()


def overwrite_half_done(path: Path) -> None:
    """Killed between the two renames of an overwrite: the old cache aside, the new one not yet in place."""
    write_cache(path, augment="none")
    writer = fake_writer(path, overwrite=True)
    for index in writer.prepare():
        write_shard(writer, index)
    writer._write_commit_files()
    os.rename(path, path.with_name(f".{path.name}.old-99999"))


STATES = [
    killed_after_mkdir,
    settings_but_no_shard,
    some_shards,
    all_shards_no_commit,
    commit_files_written,
    commit_half_done_by_the_old_writer,
    overwrite_half_done,
]


@pytest.mark.parametrize("state", STATES, ids=[s.__name__ for s in STATES])
def test_a_rerun_resumes_every_interrupted_state(tmp_path, reference, state):
    path = tmp_path / "out"
    state(path)
    with pytest.raises(FileNotFoundError):  # an interrupted cache never reads as complete
        CachedActivations(path)
    assert np.array_equal(rows(write_cache(path).path), reference)
    assert sorted(os.listdir(tmp_path)) == ["out", "reference"]  # no work folder, nothing left aside
    assert sorted(os.listdir(path)) == sorted(os.listdir(tmp_path / "reference"))


def test_shards_without_their_settings_are_refused_not_overwritten(tmp_path):
    all_shards_no_commit(tmp_path / "out")
    work = tmp_path / f"out{INCOMPLETE_SUFFIX}"
    (work / CACHE_SETTINGS_FILENAME).unlink()
    with pytest.raises(FileExistsError, match="no record of their settings"):
        write_cache(tmp_path / "out")
    assert len(list(work.glob("data-*.arrow"))) == 3


# ----------------------------------------------------------------------------------------------- real SIGKILL

KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {here!r})
import test_cache_safety as t
from sae_vision_ext.activations import cache

moment, path = sys.argv[1], Path(sys.argv[2])
if moment == "first_moments":  # right after the work folder is made, before its settings file is written
    real = cache.write_json_atomic
    def write_json_atomic(target, payload):
        if target.name == cache.CACHE_SETTINGS_FILENAME:
            os.kill(os.getpid(), signal.SIGKILL)
        real(target, payload)
    cache.write_json_atomic = write_json_atomic
else:  # the commit window: every file written, the work folder about to be renamed
    real = os.rename
    def rename(src, dst):
        if str(src).endswith(cache.INCOMPLETE_SUFFIX):
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.rename = rename
t.write_cache(path)
"""


@pytest.mark.parametrize("moment", ["first_moments", "commit_window"])
def test_sigkill_then_rerun_finishes_the_cache(tmp_path, reference, moment):
    path = tmp_path / "out"
    code = KILLER.format(here=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code, moment, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert (tmp_path / f"out{INCOMPLETE_SUFFIX}").is_dir() and not path.exists()
    assert np.array_equal(rows(write_cache(path).path), reference)


def test_a_cache_reads_in_a_fresh_process(tmp_path, reference):
    """The reader registers the Arrow ``Array2D`` type itself (it failed when ``datasets`` was not
    imported)."""
    path = write_cache(tmp_path / "out").path
    code = (
        "import sys; from sae_vision_ext.activations.cache import CachedActivations as C; "
        "print(C(sys.argv[1]).n_rows)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip() == str(len(reference))
