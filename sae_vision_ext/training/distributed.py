"""Data-parallel SAE training with SAELens's own ``SAETrainer`` (torchrun; gloo on CPU, NCCL on GPU).

Each of W ranks holds a full copy of the SAE and reads a disjoint slice of every global batch:
global batch t is ``X_t = [X_t^0; X_t^1; ...; X_t^(W-1)]``, rank r reading only ``X_t^r`` (b = B / W rows).
For a loss that is a mean over rows, ``L(X) = (1/B) sum_i l(x_i) = (1/W) sum_r L(X^r)``, hence

    grad L(X_t) = (1/W) sum_r grad L(X_t^r)

so averaging the local gradients (all-reduce SUM, divide by W) *before* SAELens clips the gradient norm and
steps Adam reproduces single-process training on the same global batches, up to floating-point rounding.

How this is done without touching ``SAETrainer`` (which calls ``sae.training_forward_pass`` directly, so a
``DistributedDataParallel`` wrapper would never see the forward):

- gradients: a ``post_accumulate_grad`` hook on every parameter all-reduces its ``.grad`` during
  ``loss.backward()``, i.e. before ``clip_grad_norm_`` and ``optimizer.step()`` (:class:`GradientAverager`);
- identical start: parameters and buffers are broadcast from rank 0 (:func:`broadcast_module`);
- per-batch statistics (:class:`DistributedSAETrainer`): after each step the firing counts are summed over
  ranks (``act_freq_scores``), a latent counts as fired if it fired on any rank
  (``n_forward_passes_since_fired``, which drives the dead-latent mask of the TopK auxiliary loss), and
  floating-point buffers are averaged;
- activation normalisation (``expected_average_only_in``, ``covariance_whitening``) is estimated by SAELens's
  own ``ActivationScaler`` on the *gathered* global batches, so every rank gets the single-process statistics;
- checkpoints are written by rank 0 only, followed by a barrier; resume loads the same checkpoint on every
  rank;
- a data provider that raises on one rank (a SIGTERM handler, an exhausted stream) stops every rank at the
  same step (:class:`StoppedOnAnotherRank` on the others) instead of leaving them blocked in a collective.

Exact only for losses that are means of per-row terms (standard, TopK + AuxK, JumpReLU, gated, and the
plugin's nested-k Matryoshka loss with ``reconstruction_loss="mse"``). Not exact, equivalent in distribution:
BatchTopK selects the top ``k * b`` activations of the *local* batch and its running threshold becomes the
mean of the per-rank estimates; the Matryoshka ``"nmse"`` loss divides by the local batch's variance. Several
SAEs at once (SAELens's ``MultiSAETrainer``) are not covered: it builds plain ``SAETrainer`` objects
internally. The ``TrainStepOutput`` (and so wandb's loss curves, logged by rank 0 only) describes rank 0's
local batch.

Resume: ``DistributedSAETrainer.load_trainer_state`` also applies ``_saelens_compat.fix_resumed_counters``
(any world size): SAELens 6.54's intermediate checkpoints store ``n_training_steps`` one short, and checkpoint
thresholds already passed are not dropped (the first step after a resume would write another checkpoint).

Launch: ``torchrun --nproc_per_node N -m sae_vision_ext.cli train-distributed --cache DIR ...`` (see
``sae-vision train-distributed --help``), or :func:`spawn_local` to start N local processes from Python
(tests, notebooks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.training.sae_trainer import SAETrainer

from sae_vision_ext._saelens_compat import fix_resumed_counters, progress_bars_off

__all__ = [
    "DistributedContext",
    "init_distributed",
    "current_context",
    "destroy_distributed",
    "find_free_port",
    "spawn_local",
    "broadcast_module",
    "GradientAverager",
    "rank_slice",
    "RankBatches",
    "RankSlicedBatches",
    "GatheredBatches",
    "StoppedOnAnotherRank",
    "CachedActivationRows",
    "DistributedSAETrainer",
    "train_on_rows",
    "trainer_progress_bar_off",
]


from sae_vision_ext.activations.process_group import (  # noqa: F401 - re-exported
    DistributedContext,
    current_context,
    destroy_distributed,
    find_free_port,
    init_distributed,
    spawn_local,
)
from sae_vision_ext.activations.rows import CachedActivationRows  # noqa: F401 - re-exported

# ------------------------------------------------------------------------------------------------------------
# Gradients and parameters


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (identical initialisation without a shared
    seed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


class GradientAverager:
    """Average every parameter's gradient over ranks as soon as backward has accumulated it.

    A ``post_accumulate_grad`` hook runs ``grad <- (sum_r grad_r) / W`` for each parameter, so by the time the
    caller clips and steps, every rank holds the gradient of the global-batch loss. Averaging an
    accumulated ``.grad`` twice is harmless: the part already averaged is identical on all ranks. Ranks must
    run the same autograd graph (they do for one SAE on equal-sized batches), since collectives are matched in
    order. ``remove()`` detaches the hooks.
    """

    def __init__(self, module: torch.nn.Module, group: Any = None):
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.handles = []
        if self.world_size > 1:
            self.handles = [
                param.register_post_accumulate_grad_hook(self._average)
                for param in module.parameters()
                if param.requires_grad
            ]

    def _average(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=self.group)
        param.grad.div_(self.world_size)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# ------------------------------------------------------------------------------------------------------------
# Rank-sliced input


def rank_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """Rows ``[r * b, (r + 1) * b)`` of a global batch, b = B / W (B must be divisible by W)."""
    if global_batch_size % world_size:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the world size {world_size}; "
            "equal local batches are what makes the averaged gradient equal the global one"
        )
    local = global_batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


class RankBatches(Iterator[torch.Tensor]):
    """Rank ``rank``'s share of each global batch of ``rows``, endlessly (epoch after epoch).

    Epoch e visits ``rows`` in ``order_e`` (identity, or ``randperm`` seeded by ``shuffle_seed + e``, the same
    on every rank); global batch t of the epoch is ``order_e[t*B:(t+1)*B]`` (a trailing partial batch is
    dropped) and this rank reads only its :func:`rank_slice` of it, never the other ranks' rows.
    ``start_batch`` skips that many global batches without reading them (resume).

    ``rows`` is anything with ``len()`` and row indexing returning ``[n, d]`` (tensor, numpy array or memmap,
    :class:`CachedActivationRows`); contiguous slices are used when not shuffling.
    """

    def __init__(
        self,
        rows: Any,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle_seed: int | None = None,
        start_batch: int = 0,
        dtype: torch.dtype | None = None,
    ):
        self.rows = rows
        self.global_batch_size = global_batch_size
        self.local = rank_slice(global_batch_size, rank, world_size)
        self.batches_per_epoch = len(rows) // global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(rows)} rows cannot fill one global batch of {global_batch_size}")
        self.shuffle_seed = shuffle_seed
        self.dtype = dtype
        self.batch_index = start_batch
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def _epoch_order(self, epoch: int) -> torch.Tensor | None:
        if self.shuffle_seed is None:
            return None
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.shuffle_seed + epoch)
            self._order = torch.randperm(len(self.rows), generator=generator)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> RankBatches:
        return self

    def __next__(self) -> torch.Tensor:
        epoch, within = divmod(self.batch_index, self.batches_per_epoch)
        start = within * self.global_batch_size
        lo, hi = start + self.local.start, start + self.local.stop
        order = self._epoch_order(epoch)
        batch = self.rows[lo:hi] if order is None else self.rows[order[lo:hi]]
        self.batch_index += 1
        batch = torch.as_tensor(batch)
        return batch if self.dtype is None else batch.to(self.dtype)


class RankSlicedBatches(Iterator[torch.Tensor]):
    """This rank's slice of each global batch of any deterministic provider (the same on every rank).

    For providers that cannot read a slice directly (a store with its own mixing and resume state): every rank
    builds the provider with the GLOBAL batch size and the same seed, and keeps rows :func:`rank_slice`.
    Exact, but each rank reads (not trains on) all rows; prefer :class:`RankBatches` when rows are
    random-access.
    """

    def __init__(self, provider: Iterator[torch.Tensor], rank: int, world_size: int):
        self.provider, self.rank, self.world_size = provider, rank, world_size

    def __iter__(self) -> RankSlicedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.provider)
        return batch[rank_slice(batch.shape[0], self.rank, self.world_size)]


class StoppedOnAnotherRank(RuntimeError):
    """Raised on every rank whose data provider was fine when another rank's provider raised (same step)."""


class _AgreedBatches(Iterator[torch.Tensor]):
    """Next batch, or the same stop on every rank: a provider that raises (SIGTERM handler, exhausted stream)
    on one rank makes all ranks leave the training loop at the same step instead of deadlocking in a
    collective. Costs one 1-element all-reduce per step."""

    def __init__(self, provider: Iterator[torch.Tensor], device: torch.device | str):
        self.provider, self.device = provider, device

    def __iter__(self) -> _AgreedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        error: BaseException | None = None
        batch = None
        try:
            batch = next(self.provider)
        except BaseException as raised:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = raised
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if flag.item() > 0:
            raise StoppedOnAnotherRank("another rank's data provider stopped; stopping at the same step")
        return batch


# ------------------------------------------------------------------------------------------------------------
# The trainer


class GatheredBatches(Iterator[torch.Tensor]):
    """Each rank's next local batch, all-gathered into the global batch (rank order), on every rank.

    For statistics that must be computed on global batches so that all ranks agree (input normalisation,
    standardisation): feed the estimator ``GatheredBatches(provider, world_size, device)`` instead of
    ``provider``.
    """

    def __init__(self, local_batches: Iterator[torch.Tensor], world_size: int, device: torch.device | str):
        self.local_batches, self.world_size, self.device = local_batches, world_size, device

    def __iter__(self) -> GatheredBatches:
        return self

    def __next__(self) -> torch.Tensor:
        local = next(self.local_batches).to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts)


# Silence SAETrainer's progress bar (non-main ranks during ``fit``; the examples): the SAELens workaround
# lives in ``_saelens_compat``, this is its public name.
trainer_progress_bar_off = progress_bars_off


class DistributedSAETrainer(SAETrainer):
    """``SAETrainer`` for one rank of a data-parallel job; ``cfg`` describes the GLOBAL run.

    ``cfg.train_batch_size_samples`` and ``cfg.total_training_samples`` are the same numbers as for the
    equivalent single-process run; ``data_provider`` yields this rank's ``B / W`` rows of each global batch
    (see :class:`RankBatches`). With ``world_size == 1`` this is exactly ``SAETrainer``.
    Step counters, sample counters, checkpoint names, sparsity statistics and the dead-latent mask are all
    global, so checkpoints are interchangeable with single-process ones.
    """

    def __init__(
        self,
        cfg: Any,
        sae: Any,
        data_provider: Iterator[torch.Tensor],
        evaluator: Any = None,
        save_checkpoint_fn: Any = None,
        *,
        context: DistributedContext | None = None,
        broadcast_init: bool = True,
    ):
        self.context = context or current_context()
        self._collective_device = cfg.device  # set before SAETrainer assigns data_provider (see the setter)
        world = self.context.world_size
        if world > 1:
            rank_slice(cfg.train_batch_size_samples, 0, world)  # validates divisibility
            if not self.context.is_main and cfg.logger.log_to_wandb:
                cfg = dataclasses.replace(cfg, logger=dataclasses.replace(cfg.logger, log_to_wandb=False))
            if broadcast_init:
                broadcast_module(sae.to(cfg.device))  # NCCL broadcasts device tensors
        super().__init__(cfg, sae, data_provider, evaluator=evaluator, save_checkpoint_fn=save_checkpoint_fn)
        self.gradient_averager = GradientAverager(sae)

    @property
    def data_provider(self) -> Iterator[torch.Tensor]:
        return self._data_provider

    @data_provider.setter
    def data_provider(self, provider: Iterator[torch.Tensor]) -> None:
        """Providers assigned at any time (SAETrainer's constructor, or a runner later) stop all ranks
        together."""
        if self.context.is_distributed and not isinstance(provider, _AgreedBatches):
            provider = _AgreedBatches(provider, self._collective_device)
        self._data_provider = provider

    # ---- training loop seams -------------------------------------------------------------------------

    def fit(self):
        if self.context.is_distributed:
            self._estimate_input_normalisation()
        try:
            with progress_bars_off(not self.context.is_main):
                return super().fit()
        finally:
            self.gradient_averager.remove()

    def step(self, batch: torch.Tensor):
        world = self.context.world_size
        if world == 1:
            return super().step(batch)
        local = self.cfg.train_batch_size_samples // world
        if batch.shape[0] != local:
            raise ValueError(
                f"rank {self.context.rank} got a batch of {batch.shape[0]} rows; expected "
                f"{local} = train_batch_size_samples {self.cfg.train_batch_size_samples} / world size {world}"
            )
        samples_before = self.n_training_samples
        freq_before = self.act_freq_scores.clone()
        output = super().step(batch)
        self.n_training_samples = samples_before + local * world
        self._merge_step_statistics(freq_before)
        return output

    @torch.no_grad()
    def _merge_step_statistics(self, freq_before: torch.Tensor) -> None:
        """One all-reduce: firing counts summed, 'fired anywhere' for dead latents, float buffers averaged."""
        buffers = [b for b in self.sae.buffers() if b.is_floating_point()]
        fired_here = self.n_forward_passes_since_fired == 0
        parts = [
            (self.act_freq_scores - freq_before).double(),
            fired_here.double(),
            *[b.detach().reshape(-1).double() for b in buffers],
        ]
        packed = torch.cat(parts)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        d_sae = freq_before.numel()
        self.act_freq_scores.copy_(freq_before + packed[:d_sae].to(freq_before.dtype))
        self.n_forward_passes_since_fired[packed[d_sae : 2 * d_sae] > 0] = 0
        offset = 2 * d_sae
        for buffer in buffers:
            n = buffer.numel()
            buffer.copy_((packed[offset : offset + n] / self.context.world_size).view_as(buffer))
            offset += n

    def _estimate_input_normalisation(self) -> None:
        """SAELens's own estimators, fed the gathered global batches: same statistics as one process."""
        norm = self.sae.cfg.normalize_activations
        scaler = self.activation_scaler
        gathered = GatheredBatches(self.data_provider, self.context.world_size, self.cfg.device)
        n_batches = self.cfg.n_batches_for_norm_estimate
        if norm == "expected_average_only_in" and scaler.scaling_factor is None:
            scaler.estimate_scaling_factor(self.sae.cfg.d_in, gathered, n_batches)
        elif norm == "covariance_whitening" and scaler.whitening is None:
            scaler.estimate_whitening(self.sae.cfg.d_in, gathered, n_batches)

    # ---- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint_name, base_path=None, wandb_aliases=None) -> None:
        """Rank 0 writes (and calls ``save_checkpoint_fn``); the others wait at a barrier."""
        if self.context.is_main:
            super().save_checkpoint(checkpoint_name, base_path=base_path, wandb_aliases=wandb_aliases)
        self.context.barrier()

    def load_trainer_state(self, checkpoint_path) -> None:
        """SAELens's loader, plus the resume fixes of
        :func:`~sae_vision_ext._saelens_compat.fix_resumed_counters` (the step counter SAETrainer stores one
        short, checkpoint thresholds already passed), so a resumed run continues exactly like an uninterrupted
        one."""
        super().load_trainer_state(checkpoint_path)
        fix_resumed_counters(self)


def normalisation_batches(sae_cfg: Any, trainer_cfg: Any) -> int:
    """Global batches consumed by the input-normalisation estimate at the start of a fresh run."""
    estimated = getattr(sae_cfg, "normalize_activations", "none") in (
        "expected_average_only_in",
        "covariance_whitening",
    )
    return trainer_cfg.n_batches_for_norm_estimate if estimated else 0


def train_on_rows(
    sae: Any,
    trainer_cfg: Any,
    rows: Any,
    *,
    context: DistributedContext | None = None,
    shuffle_seed: int | None = None,
    resume_from: str | Path | None = None,
    evaluator: Any = None,
    save_checkpoint_fn: Any = None,
):
    """Train ``sae`` on ``rows`` (global batches of ``trainer_cfg.train_batch_size_samples``) on this rank.

    Works the same with one process or under torchrun. ``resume_from`` (a checkpoint folder written by SAELens
    / this trainer) restores weights, optimiser, schedulers, counters and the activation scaler on every rank
    and continues with the next unread global batch. Returns the trainer (``trainer.sae`` is the SAE).
    """
    context = context or current_context()
    start_batch = 0
    if resume_from is not None:
        sae.load_weights_from_checkpoint(resume_from)
    batches = RankBatches(
        rows,
        trainer_cfg.train_batch_size_samples,
        context.rank,
        context.world_size,
        shuffle_seed=shuffle_seed,
    )
    trainer = DistributedSAETrainer(
        trainer_cfg,
        sae,
        batches,
        evaluator=evaluator,
        save_checkpoint_fn=save_checkpoint_fn,
        context=context,
        broadcast_init=resume_from is None,
    )
    if resume_from is not None:
        trainer.load_trainer_state(resume_from)
        done = trainer.n_training_samples // trainer_cfg.train_batch_size_samples
        start_batch = done + normalisation_batches(sae.cfg, trainer_cfg)
    batches.batch_index = start_batch
    trainer.fit()
    return trainer
