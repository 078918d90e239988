"""Each SAELens workaround in ``sae_vision_ext._saelens_compat``, pinned to the SAELens behaviour it works
around.

A test here that fails after a SAELens upgrade means SAELens changed that behaviour: if it fixed it, delete
the workaround (and its test); if it moved, follow it in ``_saelens_compat`` only.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import pytest
import sae_lens.training.multi_sae_trainer as multi_sae_trainer_module
import sae_lens.training.sae_trainer as sae_trainer_module
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from sae_vision_ext import _saelens_compat as compat

D_IN, D_SAE, BATCH = 8, 16, 8


def _sae() -> StandardTrainingSAE:
    torch.manual_seed(0)
    return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))


def _rows():
    generator = torch.Generator().manual_seed(1)
    while True:
        yield torch.randn(BATCH, D_IN, generator=generator)


def _trainer_cfg(steps: int = 4, **kw) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=steps * BATCH,
        train_batch_size_samples=BATCH,
        lr=1e-3,
        lr_end=1e-3,
        device="cpu",
        **kw,
    )


def _multi_rows():
    for batch in _rows():
        yield {"a": batch, "b": batch * 2}


# ----------------------------------------------------------------------------------------------- progress bar


def test_saelens_has_no_switch_for_its_trainers_progress_bars():
    """Works around: no argument or config field turns the trainers' bars off (a new one: use it instead)."""
    for trainer in (SAETrainer, MultiSAETrainer):
        assert list(inspect.signature(trainer.fit).parameters) == ["self"]
    names = [f.name for f in dataclasses.fields(SAETrainerConfig)]
    assert not [
        n for n in names if any(word in n for word in ("progress", "pbar", "tqdm", "disable", "quiet"))
    ]


@pytest.mark.parametrize("multi", [False, True], ids=["SAETrainer", "MultiSAETrainer"])
def test_the_trainers_bar_comes_from_the_module_name_that_is_quieted(capfd, multi):
    def fit():
        if multi:
            saes = {"a": _sae(), "b": _sae()}
            MultiSAETrainer(_trainer_cfg(2), saes, {"a": "a", "b": "b"}, _multi_rows()).fit()
        else:
            SAETrainer(_trainer_cfg(2), _sae(), _rows()).fit()

    desc = "Training Multi-SAE" if multi else "Training SAE"
    fit()
    assert desc in capfd.readouterr().err  # SAELens draws its bar ...
    with compat.progress_bars_off():
        fit()
    assert desc not in capfd.readouterr().err  # ... through the name progress_bars_off replaces
    assert sae_trainer_module.tqdm is tqdm and multi_sae_trainer_module.tqdm is tqdm  # restored
    with compat.progress_bars_off(off=False):
        fit()
    assert desc in capfd.readouterr().err


def test_progress_bars_off_restores_the_bar_after_an_error():
    with pytest.raises(RuntimeError), compat.progress_bars_off():
        raise RuntimeError("boom")
    assert sae_trainer_module.tqdm is tqdm and multi_sae_trainer_module.tqdm is tqdm


# ----------------------------------------------------------------------------------------------- resume


def _checkpointed(tmp_path, multi: bool):
    """A 4-step run with one checkpoint: the threshold is 16 rows, so SAELens writes it after step 3 (24
    rows)."""
    cfg = _trainer_cfg(4, n_checkpoints=1, checkpoint_path=str(tmp_path))
    if multi:
        trainer = MultiSAETrainer(cfg, {"a": _sae(), "b": _sae()}, {"a": "a", "b": "b"}, _multi_rows())
    else:
        trainer = SAETrainer(cfg, _sae(), _rows())
    assert trainer.checkpoint_thresholds == [2 * BATCH]
    with compat.progress_bars_off():
        trainer.fit()
    return cfg, tmp_path / str(3 * BATCH)


def test_saelens_resume_is_one_step_short_and_keeps_passed_thresholds(tmp_path):
    """Works around: SAETrainer saves its checkpoint before counting the step, and its loader does not drop
    checkpoint thresholds already passed. ``fix_resumed_counters`` repairs both."""
    cfg, checkpoint = _checkpointed(tmp_path, multi=False)
    resumed = SAETrainer(cfg, _sae(), _rows())
    resumed.load_trainer_state(checkpoint)
    assert resumed.n_training_samples == 3 * BATCH
    assert resumed.n_training_steps == 2  # three steps were done: SAELens stores one short
    assert resumed.checkpoint_thresholds == [2 * BATCH]  # passed, yet still pending
    compat.fix_resumed_counters(resumed)
    assert resumed.n_training_steps == 3 and resumed.checkpoint_thresholds == []


def test_saelens_multi_trainer_resume_is_one_step_short_too(tmp_path):
    cfg, checkpoint = _checkpointed(tmp_path, multi=True)
    resumed = MultiSAETrainer(cfg, {"a": _sae(), "b": _sae()}, {"a": "a", "b": "b"}, _multi_rows())
    resumed.load_checkpoint(checkpoint)
    steps = [resumed.n_training_steps] + [t.n_training_steps for t in resumed.trainers.values()]
    assert steps == [2, 2, 2] and resumed.checkpoint_thresholds == [2 * BATCH]
    compat.fix_resumed_counters(resumed)
    steps = [resumed.n_training_steps] + [t.n_training_steps for t in resumed.trainers.values()]
    assert steps == [3, 3, 3] and resumed.checkpoint_thresholds == []


# ----------------------------------------------------------------------------------------------- building


def test_saelens_builds_training_saes_only_from_a_dict_that_becomes_a_new_config():
    """Works around: ``TrainingSAE.from_dict`` is SAELens's builder, and it makes a new config; there is no
    builder from a config object. ``build_training_sae`` keeps the object the runner filled in."""
    cfg = StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
    cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    assert TrainingSAE.from_dict(cfg.to_dict()).cfg is not cfg
    assert not any(hasattr(TrainingSAE, name) for name in ("from_config", "from_cfg", "from_sae_config"))
    built = compat.build_training_sae(cfg)
    assert isinstance(built, StandardTrainingSAE) and built.cfg is cfg


# ----------------------------------------------------------------------------------------------- saving


def test_file_names_are_saelens_constants():
    """The names SAE folders and checkpoints on disk already use; ``SAE.load_from_disk`` reads them."""
    names = (
        compat.SAE_WEIGHTS_FILENAME,
        compat.SAE_CFG_FILENAME,
        compat.SPARSITY_FILENAME,
        compat.RUNNER_CFG_FILENAME,
        compat.TRAINER_STATE_FILENAME,
    )
    assert names == (
        "sae_weights.safetensors",
        "cfg.json",
        "sparsity.safetensors",
        "runner_cfg.json",
        "trainer_state.pt",
    )


def test_save_final_sae_writes_the_layout_of_saelens_runner(tmp_path):
    """Works around: SAELens writes a final SAE only in its language-model runner's ``save_final_sae``; ours
    writes the same files (the runner config aside, which is the caller's), and ``SAE.load_from_disk`` reads
    them back to the same weights."""
    sae, sparsity = _sae(), torch.linspace(-6, -1, D_SAE)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # not unit norm: the inference save must keep what the SAE computes
    stand_in = types.SimpleNamespace(
        cfg=types.SimpleNamespace(to_dict=lambda: {}, logger=types.SimpleNamespace(log_to_wandb=False))
    )
    LanguageModelSAETrainingRunner.save_final_sae(stand_in, sae, str(tmp_path / "saelens"), sparsity)
    compat.save_final_sae(sae, tmp_path / "ours", sparsity)
    theirs = {p.name for p in (tmp_path / "saelens").iterdir()}
    ours = {p.name for p in (tmp_path / "ours").iterdir()}
    assert theirs == ours | {compat.RUNNER_CFG_FILENAME}
    for name in ours:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "saelens" / name).read_bytes(), name
    loaded = SAE.load_from_disk(tmp_path / "ours")
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))


# ----------------------------------------------------------------------------------------------- forward


def test_saelens_error_term_reruns_under_its_private_disable_hooks():
    """``sae_hooks_disabled`` borrows the private helper SAELens's own ``forward`` uses for its error term."""
    assert "_disable_hooks(self)" in inspect.getsource(SAE.forward)
    sae = _sae()
    with compat.sae_hooks_disabled(sae):
        assert all(not isinstance(getattr(sae, name), type(sae.hook_dict[name])) for name in sae.hook_dict)
    assert all(getattr(sae, name) is hook for name, hook in sae.hook_dict.items())
