"""The `sae-vision` commands built from config dataclasses: --help lists every flag with its default, a
mistake is one line on stderr with exit code 2, and --help imports neither SAELens nor torch."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_vision_ext import cli
from sae_vision_ext.analysis.dashboard import RANKINGS
from sae_vision_ext.commands import dashboard
from sae_vision_ext.evals.compare import FAMILIES
from sae_vision_ext.evals.report_config import REPORT_FAMILIES

ROOT = Path(__file__).resolve().parents[2]


def _main(command: str):
    return importlib.import_module(f"sae_vision_ext.commands.{cli.SUBCOMMANDS[command][0]}").main


def _help(command: str, capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _main(command)([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # help wraps lines: compare with single spaces


# command -> snippets of its --help: the flags in the one vocabulary, each with its default
HELP = {
    "dashboard": [
        "--sae PATH",
        "--model [str]",
        "--weights [str]",
        "--dataset [str]",
        "--output str",
        "dataset split (default: train)",
        "number of latent cards (default: 16)",
        "top images per latent (default: 8)",
        "use at most this many images (default: 1000)",
        "how to pick the top latents (default: total)",
        "images per forward pass (default: 32)",
        "output folder (default: artifacts/dashboard)",
        "--demo",
        "--synthetic",
        "--latents",
        "--ks",
        "--rank-by {total,frequency,max}",
        "--name-concepts",
        "--vocabulary",
        "--quiet",
    ],
    "candidates": [
        "SOURCE",
        "--output str",
        "--hook [str]",
        "--no-standardize",
        "number of centroids (paper: 32000) (default: 32000)",
        "k-means iterations on the sample (default: 20)",
        "full Lloyd passes over every row (default: 0)",
        "rows read per chunk (default: 65536)",
        "--kmeans-init {auto,kmeans++,random}",
        "--quiet",
    ],
    "convert": [
        "SOURCE",
        "OUT_DIR",
        "--sae-id",
        "--format {auto,msae,overcomplete}",
        "--model [str]",
        "checkpoint layout (default: auto)",
        "--hook [str]",
        "--sparsity",
        "--threshold",
        "--delta",
    ],
    "report": [
        "--output str",
        "--tiny",
        "--no-standardize",
        "latents of every SAE (default: 256)",
        "k values of the TopK SAEs (default: [3, 6, 12, 24])",
        "learning rate (default: 0.003)",
        "--data str",
        "(default: synthetic-hierarchical)",
        "--families",
        "--quiet",
    ],
    "synthetic": [
        "--kind {sparse,hierarchical}",
        "sparse codes or coarse-to-fine atoms (default: sparse)",
        "--output str",
        "--true-k",
        "latents of every SAE (default: 64)",
        "--quiet",
    ],
    "train-distributed": [
        "--cache str",
        "--rows int",
        "--hook [str]",
        "--sae KEY=VALUE",
        "--expansion [int]",
        "--batch-size int",
        "(default: 4096)",
        "learning rate (default: 0.0003)",
        "--checkpoint-path [str]",
        "--checkpoints int",
        "--resume [str]",
        "--output [str]",
        "SAE dtype (default: float32)",
        "--quiet",
    ],
}

# command -> (arguments with a mistake, a phrase of the one-line error)
PARSE_MISTAKES = {
    "dashboard": (["--n-latents", "abc"], "invalid int value: 'abc'"),
    "candidates": (["rows.npy", "--output", "c.safetensors", "--n-candidates", "many"], "invalid int value"),
    "convert": (["a.pth", "out", "--format", "pickle"], "invalid choice"),
    "report": (["--output", "out", "--d-sae", "big"], "invalid int value"),
    "synthetic": (["--output", "out", "--kind", "dense"], "invalid choice"),
    "train-distributed": (["--cache", "c", "--rows", "1e"], "invalid int value"),
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_lists_the_flags_with_their_defaults(command, capsys):
    text = _help(command, capsys)
    assert f"usage: sae-vision {command}" in text and "examples:" in text
    missing = [snippet for snippet in HELP[command] if snippet not in text]
    assert not missing, f"not in `sae-vision {command} --help`: {missing}"
    for old in (
        "--no-pretrained",
        "--images",
        "--activations",
        "--training-samples",
        "--sae-option",
        "--checkpoint-dir",
    ):  # the flags renamed into the one vocabulary
        assert old not in text, old


def test_report_help_shows_the_tiny_defaults_with_tiny(capsys):
    assert "latents of every SAE (default: 32)" in _help("report", capsys, "--tiny")


def _one_line_error(command: str, capsys, argv: list[str]) -> str:
    try:
        code = _main(command)(argv)
    except SystemExit as exit_info:  # argparse's own mistakes (types, choices, missing flags)
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sae-vision {command}: error:"), err
    return err


@pytest.mark.parametrize("command", sorted(PARSE_MISTAKES))
def test_a_bad_value_is_one_line_and_exit_code_2(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, phrase = PARSE_MISTAKES[command]
    assert phrase in _one_line_error(command, capsys, argv)


def test_a_missing_file_is_one_line_and_exit_code_2(capsys, tmp_path):
    missing = str(tmp_path / "missing")
    cases = {
        "dashboard": (["--sae", missing, "--synthetic", "4"], "not an SAE folder"),
        "candidates": ([missing + ".npy", "--output", str(tmp_path / "c.safetensors")], "no activation rows"),
        "convert": ([missing + ".pth", str(tmp_path / "out")], "checkpoint not found"),
        "report": (
            ["--output", str(tmp_path / "r"), "--data", missing + ".npy", "--quiet"],
            "no such activation source",
        ),
        "train-distributed": (["--cache", missing, "--rows", "64"], "no activation cache"),
    }
    for command, (argv, phrase) in cases.items():
        assert phrase in _one_line_error(command, capsys, argv), command
    assert not (tmp_path / "out").exists()


def test_other_user_mistakes_are_one_line(capsys, tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    cache = ["--cache", str(tmp_path), "--rows", "64"]
    cases = [
        ("convert", [str(tmp_path / "garbage.pth"), str(tmp_path / "out")], "not a readable PyTorch"),
        ("dashboard", ["--demo", "--latents", "3,x", "--output", str(tmp_path / "d")], "comma-separated"),
        ("synthetic", ["--output", str(tmp_path / "s"), "--data", "rows.npy"], "generates its own data"),
        ("train-distributed", [*cache, "--expansion", "0"], "--expansion must be a positive integer"),
        ("train-distributed", [*cache, "--expansion", "2", "--sae", "d_sae=8"], "not both"),
        ("train-distributed", [*cache, "--sae", "k"], "must look like KEY=VALUE"),
    ]
    for command, argv, phrase in cases:
        assert phrase in _one_line_error(command, capsys, argv), command


def test_choices_mirror_the_library():
    """The commands list choices without importing the torch-importing library modules; they must agree."""

    assert dashboard.RANKINGS == RANKINGS
    assert set(REPORT_FAMILIES) == set(FAMILIES) - {"topk_centroids"}


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_help_imports_neither_sae_lens_nor_torch(command):
    code = (
        "import sys\n"
        "from sae_vision_ext.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('heavy:', sorted(m for m in ('sae_lens', 'torch') if m in sys.modules))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "heavy: []"
