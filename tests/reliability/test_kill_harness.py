"""Kill-test harness (issue 14): ``sae-vision cache`` and ``sae-vision train`` (TopK, Matryoshka, RA-SAE) are
SIGKILLed at random moments, including the first second; re-running the same command (``--resume`` for
training) must complete and end bit-identical to an uninterrupted run of the same seed, and a partial cache
must never read as complete.

Every test here is ``slow`` (about 2 minutes for the short ones, 20-30 for the sweep): the default suite keeps
one SIGKILL-then-resume test per command (``tests/training/test_runner.py``, ``tests/reliability/
test_cache_safety.py``). The short tests kill each command a few times; the full sweep (20+ kills per command)
reports its figures on stdout (``pytest -m slow -s tests/reliability/test_kill_harness.py``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from vision_training_helpers import TINY_MODEL, synthetic_images

from sae_vision_ext.activations.cache import CachedActivations

TESTS_DIR = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"
ARCHITECTURES = {
    "topk": ["--architecture", "topk", "--sae", "k=8"],
    "matryoshka_topk": ["--architecture", "matryoshka_topk", "--sae", "k_levels=[8,64,384]"],
    "ra_sae": ["--architecture", "ra_sae", "--sae", "k=8", "candidates_path=CANDIDATES"],
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sae_vision_ext.cli", *args]


def run(args: list[str], kill_after: float | None = None, cwd: Path | None = None) -> int:
    """Run ``args``; with ``kill_after``, SIGKILL it that many seconds after the start. Returns the exit
    code."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_after is None:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-3000:]
        return 0
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    return process.returncode


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(synthetic_images(8)):
        image.save(folder / f"{i}.png")
    return folder


def cache_args(photos: Path, out: Path) -> list[str]:
    return cli(
        "cache",
        "--model",
        TINY_MODEL,
        "--random-init",
        "--seed",
        "3",
        "--img-size",
        "32",
        "--hook",
        HOOK,
        "--tokens",
        "all",
        "--dataset",
        str(photos),
        "--augment",
        "crop_flip",
        "--workers",
        "0",
        "--model-batch-size",
        "4",
        "--images",
        "128",
        "--shard-images",
        "16",
        "--output",
        str(out),
        "--quiet",
    )


def cache_content(path: Path) -> np.ndarray:
    return np.concatenate(list(CachedActivations(path).iter_rows(HOOK)))


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("ref") / "cache"
    started = time.monotonic()
    run(cache_args(photos, out))
    return out, time.monotonic() - started


def kill_cache_then_rerun(photos: Path, reference: Path, seconds: float, out: Path) -> int:
    code = run(cache_args(photos, out), kill_after=seconds)
    try:  # killed or not, what is on disk reads as complete only if it is the whole cache
        CachedActivations(out)
    except FileNotFoundError:
        pass
    else:
        assert np.array_equal(cache_content(out), cache_content(reference)), (
            "a partial cache read as complete"
        )
    run(cache_args(photos, out))
    assert np.array_equal(cache_content(out), cache_content(reference))
    return code


def kill_moments(rng: random.Random, duration: float, n: int) -> list[float]:
    """``n`` moments: one in the first second, the rest uniform over the first 90% of a reference run."""
    return [rng.uniform(0.2, 1.0)] + [rng.uniform(0.5, duration * 0.9) for _ in range(n - 1)]


@pytest.mark.slow
def test_killed_cache_resumes_to_the_same_cache(tmp_path, photos, reference_cache):
    reference, duration = reference_cache
    for i, seconds in enumerate(kill_moments(random.Random(0), duration, 2)):
        kill_cache_then_rerun(photos, reference, seconds, tmp_path / f"cache{i}")


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def candidates(tmp_path_factory, reference_cache):
    out = tmp_path_factory.mktemp("cand") / "candidates.safetensors"
    run(
        cli(
            "candidates",
            str(reference_cache[0]),
            "--hook",
            HOOK,
            "--n-candidates",
            "400",
            "--output",
            str(out),
            "--quiet",
        )
    )
    return out


def train_args(
    architecture: str, cache: Path, out: Path, candidates: Path, resume: bool = False
) -> list[str]:
    sae = [a.replace("CANDIDATES", str(candidates)) for a in ARCHITECTURES[architecture]]
    return cli(
        "train",
        "--cache",
        str(cache),
        *sae,
        "--expansion",
        "2",
        "--rows",
        "2560",
        "--batch-size",
        "64",
        "--checkpoints",
        "8",
        "--seed",
        "5",
        "--output",
        str(out),
        "--quiet",
        *(["--resume"] if resume else []),
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "sae_weights.safetensors")


def kill_train_then_resume(architecture, cache, candidates, reference, seconds, out) -> int:
    code = run(train_args(architecture, cache, out, candidates), kill_after=seconds)
    if (
        code != 0
    ):  # killed (perhaps after the SAE was written, while plotting or exiting): resume all the same
        run(train_args(architecture, cache, out, candidates, resume=True))
    ours, theirs = weights(out), weights(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), (
            f"{architecture}: {key} differs after a kill at {seconds:.2f} s"
        )
    return code


def reference_run(architecture, cache, candidates, root) -> tuple[Path, float]:
    out = root / f"ref_{architecture}"
    started = time.monotonic()
    run(train_args(architecture, cache, out, candidates))
    return out, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["matryoshka_topk"])
def test_killed_training_resumes_to_the_same_sae(tmp_path, reference_cache, candidates, architecture):
    reference, duration = reference_run(architecture, reference_cache[0], candidates, tmp_path)
    for i, seconds in enumerate(kill_moments(random.Random(1), duration, 2)):
        kill_train_then_resume(
            architecture, reference_cache[0], candidates, reference, seconds, tmp_path / f"r{i}"
        )


# ----------------------------------------------------------------------------------------------- full sweep


@pytest.mark.slow
def test_full_kill_sweep(tmp_path, photos, reference_cache, candidates):
    """20+ kills per command; prints how many landed mid-run and how many runs finished first."""
    rng = random.Random(2026)
    reference, duration = reference_cache
    figures = {}
    codes = [
        kill_cache_then_rerun(photos, reference, s, tmp_path / f"c{i}")
        for i, s in enumerate(kill_moments(rng, duration, 20))
    ]
    figures["cache"] = codes
    for architecture in ARCHITECTURES:
        ref, duration = reference_run(architecture, reference_cache[0], candidates, tmp_path)
        figures[architecture] = [
            kill_train_then_resume(
                architecture, reference_cache[0], candidates, ref, s, tmp_path / f"{architecture}{i}"
            )
            for i, s in enumerate(kill_moments(rng, duration, 20))
        ]
    for name, codes in figures.items():
        killed = sum(code == -signal.SIGKILL for code in codes)
        print(
            f"kill sweep {name}: {len(codes)} runs, {killed} killed mid-run, {len(codes) - killed} finished "
            "first; "
            "every one completed and matched the uninterrupted run bit for bit"
        )
