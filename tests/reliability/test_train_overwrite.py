"""A finished run is never overwritten nor mixed with a new one (issue 14): ``train --output <run>`` without
``--resume`` refuses before any work (exit 2, one line naming --resume and --overwrite); ``--overwrite``
replaces the run's own files and checkpoints and keeps every other file."""

from __future__ import annotations

import json

import pytest
from vision_training_helpers import TINY_MODEL, shared_tiny, synthetic_images, tiny_config

from sae_vision_ext.cli import main as cli_main
from sae_vision_ext.training import runner as runner_module
from sae_vision_ext.training.checkpoints import RUN_ID_FILENAME, committed_checkpoints
from sae_vision_ext.training.runner import VisionSAETrainingRunner

HOOK = "blocks.1.hook_resid_post"


def train(cfg, **kw):
    model, preprocess = shared_tiny(cfg.seed)
    return VisionSAETrainingRunner(
        cfg, images=synthetic_images(), model=model, preprocess=preprocess, say=lambda m: None, **kw
    ).run()


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, training_rows=64 * 6, n_checkpoints=2))
    return out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_into_a_finished_run_is_refused_and_changes_nothing(finished, monkeypatch):
    before = snapshot(finished)
    assert (finished / "sae_weights.safetensors").exists() and committed_checkpoints(finished / "checkpoints")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(runner_module, "load_model_for", no_model)
    with pytest.raises(
        FileExistsError, match=r"already holds a run .*add --resume to continue it, or --overwrite"
    ):
        VisionSAETrainingRunner(tiny_config(finished, training_rows=64 * 6), images=synthetic_images()).run()
    assert snapshot(finished) == before


def test_train_command_refuses_with_exit_2_and_one_line(finished, capsys, monkeypatch):
    before = snapshot(finished)
    monkeypatch.setattr(runner_module, "load_model_for", lambda *a, **k: pytest.fail("work started"))
    code = cli_main(
        (
            f"train --model {TINY_MODEL} --random-init --img-size 32 --hook {HOOK} --tokens all "
            f"--dataset unused --output {finished} --quiet"
        ).split()
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("sae-vision train: error:") and "--resume" in err[0] and "--overwrite" in err[0]
    assert snapshot(finished) == before


def test_train_overwrite_replaces_only_the_runs_own_files(finished):
    (finished / "notes.txt").write_text("mine")
    (finished / "checkpoints" / "keep.txt").write_text("mine too")
    old_id = json.loads((finished / "checkpoints" / RUN_ID_FILENAME).read_text())["run_id"]
    old = [p.name for p in committed_checkpoints(finished / "checkpoints")]
    assert old == ["192", "320"]
    with pytest.raises(ValueError, match="--overwrite and --resume contradict"):
        train(tiny_config(finished, training_rows=64 * 4, resume_from_checkpoint="latest"), overwrite=True)
    result = train(tiny_config(finished, training_rows=64 * 4, n_checkpoints=1), overwrite=True)
    assert result.n_training_rows == 256
    assert [p.name for p in committed_checkpoints(finished / "checkpoints")] == ["192"]  # only the new run's
    assert json.loads((finished / "runner_cfg.json").read_text())["training_rows"] == 256
    assert json.loads((finished / "checkpoints" / RUN_ID_FILENAME).read_text())["run_id"] != old_id
    assert (finished / "notes.txt").read_text() == "mine"
    assert (finished / "checkpoints" / "keep.txt").read_text() == "mine too"
