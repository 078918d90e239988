"""The package's layers (pyproject.toml's import-linter contracts) hold, and the checker catches a breach."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the checker analyses the copy in `root`, not the installed (editable) package.
    return subprocess.run(
        [str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def copy_package(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "sae_vision_ext", tmp_path / "sae_vision_ext", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_every_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    root = copy_package(tmp_path)
    method = root / "sae_vision_ext" / "saes" / "matryoshka_topk.py"
    method.write_text(method.read_text() + "\nfrom sae_vision_ext.training import runner  # noqa: E402\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "Layers import only downward BROKEN" in result.stdout
    assert "sae_vision_ext.saes is not allowed to import sae_vision_ext.training" in result.stdout


def test_a_cycle_between_siblings_breaks_the_acyclic_contract(tmp_path):
    root = copy_package(tmp_path)
    # vision and activations share a layer, so either may import the other, but not both
    init = root / "sae_vision_ext" / "vision" / "__init__.py"
    init.write_text(init.read_text() + "\nimport sae_vision_ext.activations.source  # noqa: E402,F401\n")
    source = root / "sae_vision_ext" / "activations" / "source.py"
    source.write_text(source.read_text() + "\nimport sae_vision_ext.vision  # noqa: E402,F401\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "No import cycles between the modules of a package BROKEN" in result.stdout
