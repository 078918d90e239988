"""Issue 14: ``sae-vision cache`` on unreadable images, with a shard size it must adjust, and under SIGTERM /
SIGINT.

An empty result is a one-line error that leaves nothing behind; the shard-size adjustment is said; a signal
ends the command with one line and exit code 143 / 130, and the same command then resumes the cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from vision_training_helpers import TINY_MODEL, synthetic_images

from sae_vision_ext.activations.cache import INCOMPLETE_SUFFIX, ActivationCacheWriter, CachedActivations
from sae_vision_ext.cli import main as cli_main

HOOK = "blocks.1.hook_resid_post"


def cache_argv(dataset: Path, out: Path, images: int, *extra: str) -> list[str]:
    return [
        *(
            f"cache --model {TINY_MODEL} --random-init --img-size 32 --hook {HOOK} --tokens all "
            f"--dataset {dataset} --workers 0 --model-batch-size 4 --seed 3 --quiet --augment "
            f"crop_flip --images {images} --output {out}"
        ).split(),
        *extra,
    ]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(synthetic_images(6)):
        image.save(folder / f"p{i}.png")
    return folder


@pytest.mark.parametrize(
    ("n_files", "expected"),
    [(16, "all 16 image files are unreadable"), (40, "the 32 image files tried (of 40) are unreadable")],
)
def test_a_folder_of_unreadable_files_is_an_error_not_an_empty_cache(tmp_path, capsys, n_files, expected):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(n_files):
        (folder / f"{i:02d}.png").write_bytes(b"not a png")
    out = tmp_path / "cache"
    assert cli_main(cache_argv(folder, out, n_files)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sae-vision cache: error: no image could be read from {folder}: {expected}"), last
    assert last.endswith("nothing was cached") and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["broken"]  # no cache, no work folder: nothing reads as complete


def test_the_shard_size_adjustment_is_said(tmp_path, photos, capsys):
    out = tmp_path / "cache"
    assert cli_main(cache_argv(photos, out, 12, "--shard-images", "6")) == 0
    assert "images per shard: 4 instead of 6 (--shard-images)" in capsys.readouterr().err
    assert CachedActivations(out).metadata["images_per_shard"] == 4


N_MANY = 400  # enough that the process is still caching when the signal comes


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("ref") / "cache"
    assert cli_main(cache_argv(photos, out, N_MANY, "--shard-images", "8")) == 0
    return np.concatenate(list(CachedActivations(out).iter_rows(HOOK)))


def check_interrupted(code: int, err: str, out: Path, signum: int, expected_code: int) -> None:
    lines = err.strip().splitlines()
    assert code == expected_code, err[-2000:]
    assert "Traceback" not in err and lines[-1] == (
        f"sae-vision cache: interrupted ({signal.Signals(signum).name}); finished shards are kept in "
        f"{out}{INCOMPLETE_SUFFIX}: run the same command again to resume"
    )
    assert not out.exists()


class SignalNotHandled(Exception):
    pass


def _not_handled(signum, frame):
    raise SignalNotHandled(f"signal {signum} reached the test: the command did not handle it")


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_a_signal_ends_the_cache_with_one_line_and_the_rerun_resumes(
    tmp_path, photos, reference, capsys, monkeypatch, signum, code
):
    """In process: the signal arrives right after the first shard is written."""

    original = ActivationCacheWriter.write_shard

    def write_then_signal(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 0:
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs in the meantime

    out = tmp_path / "cache"
    argv = cache_argv(photos, out, N_MANY, "--shard-images", "8")
    monkeypatch.setattr(ActivationCacheWriter, "write_shard", write_then_signal)
    previous = signal.signal(signal.SIGTERM, _not_handled)  # the command's own handler must take over
    # Python's own SIGINT handler, as in a fresh process: SAELens's LanguageModelSAETrainingRunner (run by an
    # earlier test) installs its own SIGINT / SIGTERM handlers and leaves them in place
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = cli_main(argv)
    except KeyboardInterrupt as interrupt:  # not a test-session interrupt: the command let it escape
        pytest.fail(f"the command let {interrupt!r} escape")
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    check_interrupted(rc, capsys.readouterr().err, out, signum, code)
    assert signal.getsignal(signal.SIGTERM) is previous  # restored

    monkeypatch.setattr(ActivationCacheWriter, "write_shard", original)
    assert cli_main(argv) == 0  # the same command resumes
    assert "resuming the cache in" in capsys.readouterr().err
    assert np.array_equal(np.concatenate(list(CachedActivations(out).iter_rows(HOOK))), reference)


@pytest.mark.slow
def test_sigterm_of_a_real_process(tmp_path, photos, reference):
    out = tmp_path / "cache"
    argv = cache_argv(photos, out, N_MANY, "--shard-images", "8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sae_vision_ext.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first_shard = out.with_name(out.name + INCOMPLETE_SUFFIX) / "data-00000.arrow"
    deadline = time.monotonic() + 120
    while not first_shard.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    check_interrupted(process.returncode, err.decode(), out, signal.SIGTERM, 143)
    assert cli_main(argv) == 0
    assert np.array_equal(np.concatenate(list(CachedActivations(out).iter_rows(HOOK))), reference)
