"""Resume refuses what would change the result (issue 14): any config difference (lr and its schedule,
training_rows, the whole sae section), a checkpoint of another run, and a damaged checkpoint (the newest one
is passed over, with a message, for the previous complete one). A run that trains no new rows reports no
rows/s."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import sae_lens.training.sae_trainer as trainer_module
import torch
from vision_training_helpers import shared_tiny, synthetic_images, tiny_config

from sae_vision_ext.training.checkpoints import committed_checkpoints
from sae_vision_ext.training.runner import TrainingResult, VisionSAETrainingRunner

ROWS = 64 * 12
MSAE = {"architecture": "matryoshka_topk", "d_in": 192, "d_sae": 384, "k_levels": [8, 64, 384]}


def train(cfg, said=None):
    model, preprocess = shared_tiny(cfg.seed)
    say = said.append if said is not None else (lambda m: None)
    return VisionSAETrainingRunner(
        cfg, images=synthetic_images(), model=model, preprocess=preprocess, say=say
    ).run()


def interrupted_run(monkeypatch, out, step: int, **overrides):
    """A run SIGTERMed during step ``step``: it writes its checkpoints (n_checkpoints=2: at 320 rows) and
    returns."""

    original, calls = trainer_module.SAETrainer.step, {"n": 0}

    def step_then_sigterm(self, batch):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.SAETrainer, "step", step_then_sigterm)
        result = train(tiny_config(out, training_rows=ROWS, n_checkpoints=2, **overrides))
    assert result.interrupted
    return result


@pytest.mark.parametrize(
    ("change", "keys"),
    [
        ({"lr": 1e-3}, "lr, lr_end"),  # lr_end follows lr (lr / 10)
        (
            {"lr_scheduler_name": "cosineannealing", "lr_warm_up_steps": 2},
            "lr_scheduler_name, lr_warm_up_steps",
        ),
        ({"training_rows": 64 * 4}, "training_rows"),
        ({"sae": {**MSAE, "k_levels": [8, 32, 384]}}, "sae.k_levels"),
        ({"sae": {**MSAE, "level_weighting": "reverse"}}, "sae.level_weighting"),
    ],
    ids=["lr", "schedule", "rows", "k_levels", "level_weighting"],
)
def test_resume_refuses_a_changed_config(tmp_path_factory, monkeypatch, change, keys):
    out = tmp_path_factory.mktemp("changed") / "run"
    interrupted_run(monkeypatch, out, 7, sae=MSAE)
    fields = {"training_rows": ROWS, "n_checkpoints": 2, "sae": MSAE, **change}
    with pytest.raises(ValueError, match=rf"was made with a different config \(differs in: {keys}\)"):
        train(tiny_config(out, resume_from_checkpoint="latest", **fields))


def test_resume_refuses_the_checkpoint_of_another_run(tmp_path, monkeypatch):
    """A new run killed before its first checkpoint, then --resume: it must not continue an older run's
    checkpoint that sits in its folder."""

    old = interrupted_run(monkeypatch, tmp_path / "old", 7)
    original = trainer_module.SAETrainer.step

    def killed(self, batch):
        raise SystemExit("killed")  # stands for a SIGKILL before the first checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.SAETrainer, "step", killed)
        with pytest.raises(SystemExit):
            train(tiny_config(tmp_path / "new", training_rows=ROWS, n_checkpoints=2))
    assert trainer_module.SAETrainer.step is original
    assert not committed_checkpoints(tmp_path / "new" / "checkpoints")
    shutil.copytree(old.checkpoint, tmp_path / "new" / "checkpoints" / old.checkpoint.name)
    with pytest.raises(ValueError, match=r"belongs to another run .* train from scratch with --overwrite"):
        train(
            tiny_config(
                tmp_path / "new", training_rows=ROWS, n_checkpoints=2, resume_from_checkpoint="latest"
            )
        )


def test_resume_passes_over_a_damaged_checkpoint_and_names_the_file(tmp_path, monkeypatch):
    reference = train(tiny_config(tmp_path / "reference", training_rows=ROWS, n_checkpoints=2))
    stopped = interrupted_run(monkeypatch, tmp_path / "run", 7)
    assert [p.name for p in committed_checkpoints(tmp_path / "run" / "checkpoints")] == ["320", "448"]
    weights = stopped.checkpoint / "sae_weights.safetensors"
    weights.write_bytes(
        weights.read_bytes()[:1000]
    )  # truncated, as a full disk or a copy cut short leaves it
    with pytest.raises(
        ValueError,
        match=rf"checkpoint .*448 is damaged \({weights} cannot be read: .*\); resume "
        r"from an earlier checkpoint",
    ):
        train(
            tiny_config(
                tmp_path / "run",
                training_rows=ROWS,
                n_checkpoints=2,
                resume_from_checkpoint=str(stopped.checkpoint),
            )
        )
    said = []
    resumed = train(
        tiny_config(tmp_path / "run", training_rows=ROWS, n_checkpoints=2, resume_from_checkpoint="latest"),
        said,
    )
    assert any(
        f"{weights} cannot be read" in m
        and "falling back to the previous complete checkpoint" in m
        and m.endswith("/320")
        for m in said
    ), said
    assert resumed.n_training_rows == ROWS
    expected, got = reference.sae.state_dict(), resumed.sae.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_summary_never_divides_by_zero_seconds(tmp_path):
    done = TrainingResult({}, tmp_path, {}, {}, 13_184, 0.0, rows_this_run=0)
    assert "rows/s" not in done.summary() and "none in this run" in done.summary()
    tiny = TrainingResult({}, tmp_path, {}, {}, 13_184, 1e-12, rows_this_run=64)
    assert "rows/s" not in tiny.summary()
    resumed = TrainingResult({}, tmp_path, {}, {}, 13_184, 2.0, rows_this_run=4_096)
    assert "trained on 13,184 rows (4,096 of them in this run, 2.0 s, 2,048 rows/s)" in resumed.summary()
    # a run resumed from its final checkpoint trains nothing new
    train(tiny_config(tmp_path / "run", training_rows=64 * 4, save_final_checkpoint=True))
    again = train(
        tiny_config(
            tmp_path / "run",
            training_rows=64 * 4,
            save_final_checkpoint=True,
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "final_256"),
        )
    )
    assert again.rows_this_run == 0 and "rows/s" not in again.summary()
