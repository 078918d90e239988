"""Every place where this package works around, or leans on a private detail of, SAELens 6.

One module, so that a SAELens upgrade touches one file. Each workaround names the SAELens behaviour it
works around; ``tests/test_saelens_compat.py`` pins that behaviour, so an upgrade that fixes it upstream
shows up as a failing test there (then delete the workaround). Like SAELens's own
``training/_interruption.py``, a private module: it imports torch and SAELens only, never a layer of this
package.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sae_lens.training.multi_sae_trainer as _multi_sae_trainer_module
import sae_lens.training.sae_trainer as _sae_trainer_module
import torch
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    TRAINER_STATE_FILENAME,
)
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import _disable_hooks
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from safetensors.torch import save_file

from sae_vision_ext._registration import resume_registration

__all__ = [
    "RUNNER_CFG_FILENAME",
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "SPARSITY_FILENAME",
    "TRAINER_STATE_FILENAME",
    "build_training_sae",
    "fix_resumed_counters",
    "progress_bars_off",
    "sae_hooks_disabled",
    "save_final_sae",
]

# -- File names ----------------------------------------------------------------------------------------
# The names SAELens gives the files of an SAE folder and of a checkpoint come from ``sae_lens.constants``
# (imported above and re-exported), never spelled out here: ``SAE.load_from_disk`` reads exactly these names,
# and the folders users already have on disk were written with them (the test pins their values).


# -- Progress bars -------------------------------------------------------------------------------------
_BAR_MODULES = (_sae_trainer_module, _multi_sae_trainer_module)


@contextlib.contextmanager
def progress_bars_off(off: bool = True) -> Iterator[None]:
    """Silence the progress bars of ``SAETrainer.fit`` and ``MultiSAETrainer.fit`` while the block runs.

    Works around: SAELens 6.54 draws them with ``tqdm(total=..., desc="Training SAE")`` (and
    ``"Training Multi-SAE"``) and offers no argument or ``SAETrainerConfig`` field to turn them off; tqdm's
    own switch, ``TQDM_DISABLE``, is read once, when tqdm is first imported, and would silence every bar of
    the process. The route that touches the least: while the block runs, the ``tqdm`` name those two modules
    look up is a ``tqdm`` with ``disable=True`` (restored afterwards, also after an error; nesting is fine).
    The runner shows its own bar (rows/s, loss, L0), and non-main ranks of a data-parallel job show none. A
    SAELens fit run by another thread during the block is quiet too.
    """
    if not off:
        yield
        return
    saved = [module.tqdm for module in _BAR_MODULES]
    for module, bar in zip(_BAR_MODULES, saved):
        module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        for module, bar in zip(_BAR_MODULES, saved):
            module.tqdm = bar


# -- Resume --------------------------------------------------------------------------------------------
def fix_resumed_counters(trainer: Any) -> None:
    """Make a trainer restored from a checkpoint continue exactly like the uninterrupted run.

    ``trainer``: an ``SAETrainer`` after ``load_trainer_state`` or a ``MultiSAETrainer`` after
    ``load_checkpoint``. Works around two things SAELens 6.54 does on resume:

    - ``fit`` writes an intermediate checkpoint before it increments ``n_training_steps``, so the stored
      step count is one short (the lr schedule, logging steps and sparsity windows would run one step late):
      it is recomputed as ``n_training_samples // train_batch_size_samples``;
    - ``checkpoint_thresholds`` are rebuilt from zero by the constructor and not trimmed by the loader, so the
      first step after a resume would write another checkpoint: thresholds already passed are dropped.
    """
    samples = int(trainer.n_training_samples)
    steps = samples // int(trainer.cfg.train_batch_size_samples)
    trainer.n_training_steps = steps
    if isinstance(trainer, MultiSAETrainer):
        for sub in trainer.trainers.values():
            sub.n_training_steps = steps
    trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= samples]


# -- Building and saving SAEs ---------------------------------------------------------------------------
def build_training_sae(sae_cfg: Any) -> Any:
    """The registered training SAE for ``sae_cfg`` (``sae_cfg.architecture()``), built on that config object.

    Works around: SAELens 6.54 builds a training SAE only from a dict (``TrainingSAE.from_dict``), which
    makes a new config from it; the runners fill in ``device``, ``dtype`` and the vision ``metadata`` on the
    config object and keep it, so the class is looked up in SAELens's registry and called on the object. The
    plugin's architectures must be registered first (``sae_vision_ext.saes.register_architectures``).
    """
    sae_cls, _ = get_sae_training_class(sae_cfg.architecture())
    return sae_cls(sae_cfg)


def save_final_sae(sae: Any, folder: str | Path, log_feature_sparsity: torch.Tensor | None = None) -> Path:
    """Write a trained SAE as SAELens writes a final SAE: the inference weights and config
    (``sae.save_inference_model``) plus, when given, the log feature sparsity; returns ``folder``.

    Works around: in SAELens 6.54 the final-SAE layout is written by
    ``LanguageModelSAETrainingRunner.save_final_sae`` (and ``MultiSAETrainingRunner._save_final_outputs``),
    methods of the language-model runners that need their config; this is the same layout for any trainer
    (the test compares the two). The runner config file (``RUNNER_CFG_FILENAME``) is the caller's.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(str(folder))
    if log_feature_sparsity is not None:
        save_file({"sparsity": log_feature_sparsity.detach().contiguous().cpu()}, folder / SPARSITY_FILENAME)
    return folder


# -- SAE forward with extra arguments ------------------------------------------------------------------------


def sae_hooks_disabled(sae):
    """Context manager: every HookPoint of ``sae`` is a pass-through for the block.

    SAELens's ``SAE.forward`` computes the ``use_error_term`` correction by re-running encode/decode under its
    private ``sae_lens.saes.sae._disable_hooks`` (so hooks see only the main pass); an SAE whose ``forward``
    takes extra arguments (``MatryoshkaTopKSAE.forward(x, k)``) repeats that, so it borrows the same helper.
    """
    return _disable_hooks(sae)


# SAELens may have finished importing while this module was (its imports above): finish the registration.
resume_registration()
