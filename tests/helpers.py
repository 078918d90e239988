"""Builders shared by the tests (import as ``from helpers import ...``: ``tests/`` is on ``sys.path``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(
    script: str, *args: object, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``script`` (a path below the repository, e.g. ``examples/steer.py``) as a user would: a fresh
    Python process in the repository root, offline, one OpenMP thread; ``env`` adds variables."""
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT, check=False
    )


def load_script(script: str) -> types.ModuleType:
    """The module of ``script`` (a path below the repository, e.g. ``examples/steer.py``), imported in this
    process (its ``main`` not run): for ``--help`` or its helpers without the start-up of a subprocess."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# overcomplete/__init__.py imports its plotting helpers, which need cv2 and a matplotlib older than ours
# (``matplotlib.cm.get_cmap``); nothing in the tests plots, so they are replaced by an empty module while
# importing.
OVERCOMPLETE_PLOTTING = (
    "overlay_top_heatmaps",
    "evidence_top_images",
    "zoom_top_images",
    "contour_top_image",
)


def import_overcomplete_sae() -> types.ModuleType:
    """The real ``overcomplete.sae`` module (a dev dependency), imported with its plotting package stubbed.

    A missing package fails here, loudly. Pair with :func:`forget_overcomplete` when the test is done."""
    plotting = types.ModuleType("overcomplete.visualization")
    for name in OVERCOMPLETE_PLOTTING:
        setattr(plotting, name, None)
    sys.modules["overcomplete.visualization"] = plotting
    try:
        return importlib.import_module("overcomplete.sae")
    finally:
        del sys.modules["overcomplete.visualization"]


def forget_overcomplete() -> None:
    """Drop every ``overcomplete`` module from ``sys.modules`` (code under test must not rely on them)."""
    for name in [n for n in sys.modules if n.split(".")[0] == "overcomplete"]:
        del sys.modules[name]
