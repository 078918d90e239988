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
