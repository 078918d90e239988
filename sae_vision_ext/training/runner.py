"""Train SAEs on a vision model with SAELens's own trainers: images or a cache -> ``SAETrainer`` -> SAELens
folder.

``VisionSAETrainingRunner(cfg).run()``:

1. preflight, before any work: output and checkpoint folders writable and free (or ``--resume`` /
   ``--overwrite``); each hook's width equals ``sae.d_in``;
2. the data (:mod:`~sae_vision_ext.training.data`): an :class:`ImageActivationStore` (images -> model -> rows,
   model on a background thread) or a :class:`CachedActivationStore` (no model);
3. one hook: SAELens ``SAETrainer``; several hooks: SAELens ``MultiSAETrainer`` (one SAE per hook, one
   forward), watched by :class:`TrainingMonitor` (``metrics.jsonl``, the bar's loss / L0 postfix) and fed
   through :class:`ProgressProvider` (the bar; non-finite rows and steps);
4. checkpoints (:mod:`~sae_vision_ext.training.checkpoints`): complete or absent; resuming restores trainer
   state, weights, RNG and the exact data position. SIGINT / SIGTERM stop between two steps and write one;
5. the output: SAELens inference folder(s) whose ``cfg.metadata`` carries the vision facts
   (``modality="vision"``, model, hook, token selection, image size, weights), plus ``eval_metrics.json`` from
   held-out images, ``runner_cfg.json``, ``metrics.jsonl`` and plots.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import wandb
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer

from sae_vision_ext._saelens_compat import build_training_sae, progress_bars_off
from sae_vision_ext.activations.cache import CachedActivations
from sae_vision_ext.activations.store import StoppableProvider, TrainingInterrupted
from sae_vision_ext.saes import register_architectures
from sae_vision_ext.training.checkpoints import (
    STAGING_DIRNAME,
    check_output_free,
    check_writable,
    checkpoint_state,
    commit_checkpoint,
    publish_outputs,
    record_run_id,
    remove_previous_run,
    resolve_checkpoint,
    restore_checkpoint,
    resume_fingerprint,
)
from sae_vision_ext.training.config import VisionSAERunnerConfig
from sae_vision_ext.training.data import (
    buffer_rows,
    held_out_rows,
    image_source,
    load_model_for,
    row_store,
    training_images,
    vision_metadata,
)
from sae_vision_ext.training.metrics import VisionSAEEvaluator, dead_latents
from sae_vision_ext.training.monitor import TrainingMonitor, matryoshka_levels, per_k_metrics
from sae_vision_ext.training.progress import (
    NonFiniteTrainingError,
    ProgressProvider,
    TrainingResult,
)


class VisionSAETrainingRunner:
    """Trains one SAE per hook of ``cfg`` (see the module docstring).

    ``images`` / ``eval_images`` override ``cfg.dataset_path`` / ``cfg.eval_dataset_path`` (a list of PIL
    images, a folder, a dataset); ``model`` + ``preprocess`` override loading ``cfg.model_name``.
    """

    def __init__(
        self,
        cfg: VisionSAERunnerConfig,
        images: Any = None,
        eval_images: Any = None,
        model: Any = None,
        preprocess: Any = None,
        say=None,
        weights: dict[str, Any] | None = None,
        overwrite: bool = False,
    ):
        self.cfg = cfg
        # replace an earlier run in the output folder (else a new run there is refused; see check_output_free)
        self.overwrite = overwrite
        self.images = images
        self.eval_images = eval_images
        self.model = model
        self.preprocess = preprocess
        # which weights the model has (vision.load.weights_record); given with a model, else found on loading
        self.weights = weights
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stop = threading.Event()
        self.store: Any = None
        self.trainer: Any = None
        self.monitor: TrainingMonitor | None = None
        self.progress: ProgressProvider | None = None
        self.hooks = cfg.hook_names
        self.output_path = Path(cfg.output_path)
        self.checkpoint_root = Path(cfg.checkpoint_path)
        self.staging = self.checkpoint_root / STAGING_DIRNAME
        self.run_id: str | None = None
        self.last_checkpoint: Path | None = None
        self._cache: CachedActivations | None = None
        self._health: dict[str, torch.Tensor] = {}  # per hook: the last step's loss + the sum of its weights

    # ------------------------------------------------------------------ run
    def run(self) -> TrainingResult:
        cfg = self.cfg
        started = time.perf_counter()
        cache_meta = self._preflight()
        train_images, eval_images = (None, None) if cfg.use_cached_activations else self._collections()
        checkpoint, state = self._start_or_resume()
        saes = self._build_saes(cache_meta)
        eval_rows, eval_source = held_out_rows(cfg, self.model, self.preprocess, eval_images)
        evaluator = VisionSAEEvaluator(eval_rows, eval_source) if eval_rows is not None else None
        self._build_trainer(saes, train_images, evaluator, checkpoint, state)
        if cfg.logger.log_to_wandb:
            _start_wandb(cfg)
        resumed_rows = self.trainer.n_training_samples
        train_started = time.perf_counter()
        interrupted = self._fit(saes, fresh=checkpoint is None)
        train_seconds = time.perf_counter() - train_started
        counters = {**self.store.counters, "non_finite_rows": self.progress.non_finite_rows}
        rows = self.trainer.n_training_samples
        if interrupted:
            return self._stop_with_checkpoint(saes, counters, time.perf_counter() - started)

        if evaluator is None:
            stream_rows = self._stream_rows(train_images, position=self.store.state_dict())
            evaluator = VisionSAEEvaluator(stream_rows, "training stream (not held out)")
        metrics = self._final_metrics(saes, evaluator)
        sae_paths = publish_outputs(self.output_path, saes, self._sparsities(), metrics, cfg.to_dict())
        plots = self.monitor.write_plots(metrics)
        if cfg.logger.log_to_wandb:
            _log_final_metrics(metrics)
        return TrainingResult(
            saes,
            self.output_path,
            sae_paths,
            metrics,
            rows,
            train_seconds,
            counters=counters,
            weights=self.weights,
            eval_source=evaluator.source,
            checkpoint=self.last_checkpoint,
            metrics_log=self.monitor.path,
            plots=plots,
            rows_this_run=rows - resumed_rows,
        )

    # ------------------------------------------------------------------ preflight
    def _preflight(self) -> dict | None:
        """Check everything that can fail before any work; the cache's metadata when training from one."""
        cfg = self.cfg
        if cfg.sae is None:
            raise ValueError("the config has no sae section: nothing to train")
        if self.overwrite and cfg.resume_from_checkpoint is not None:
            raise ValueError("--overwrite and --resume contradict each other: give one")
        resume = cfg.resume_from_checkpoint is not None
        check_output_free(self.output_path, self.checkpoint_root, resume, self.overwrite)
        check_writable(self.output_path, "output folder")
        check_writable(self.checkpoint_root, "checkpoint folder")
        if cfg.use_cached_activations:
            cache = CachedActivations(cfg.cached_activations_path)
            missing = [h for h in self.hooks if h not in cache.hook_widths]
            if missing:
                raise ValueError(
                    f"cache {cache.path} has no activations for {missing}; it holds {cache.hook_names}"
                )
            check_widths(cfg.sae, {h: cache.hook_widths[h] for h in self.hooks})
            self._cache = cache
            return cache.metadata
        self._ensure_model()
        check_widths(cfg.sae, {h: int(self.model.hook_width(h)) for h in self.hooks})
        return None

    def _ensure_model(self) -> None:
        if self.model is None:
            self.model, self.preprocess, self.weights = load_model_for(self.cfg)
        if self.preprocess is None:
            self.preprocess = getattr(self.model, "preprocess", None)
            if self.preprocess is None:
                raise ValueError("a model passed to the runner needs its preprocess transform")

    def _collections(self) -> tuple[Any, Any]:
        return training_images(self.cfg, self.images, self.eval_images)

    def held_out_rows(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """``({hook: rows}, source)``: the rows this run's final metrics are computed on (same images, views
        and order), so a saved SAE can be re-evaluated exactly; ``(None, "")`` when the run holds nothing
        out."""
        if self.cfg.use_cached_activations:
            return held_out_rows(self.cfg)
        self._ensure_model()
        _, eval_images = self._collections()
        return held_out_rows(self.cfg, self.model, self.preprocess, eval_images)

    # ------------------------------------------------------------------ setup
    def _start_or_resume(self) -> tuple[Path | None, dict[str, Any] | None]:
        """``--overwrite`` clears the earlier run; ``--resume`` finds and checks the checkpoint. A new run
        gets a new id, so checkpoints of any earlier run in this folder can no longer be resumed."""
        if self.overwrite:
            removed = remove_previous_run(self.output_path, self.checkpoint_root)
            if removed:
                self.say(
                    f"--overwrite: removed the earlier run in {self.output_path} ({len(removed)} files and "
                    "checkpoint folders; other files are kept)"
                )
        shutil.rmtree(self.staging, ignore_errors=True)
        spec = self.cfg.resume_from_checkpoint
        checkpoint = resolve_checkpoint(spec, self.checkpoint_root, say=self.say)
        if spec == "latest" and checkpoint is None:
            self.say(f"no checkpoint in {self.checkpoint_root} yet: starting from scratch")
        state = checkpoint_state(checkpoint, self._fingerprint()) if checkpoint is not None else None
        self.run_id = state.get("run_id") if state is not None else uuid.uuid4().hex
        if self.run_id is not None:
            record_run_id(self.checkpoint_root, self.run_id)
        return checkpoint, state

    def _build_saes(self, cache_meta: dict | None) -> dict[str, Any]:
        """One training SAE per hook, its config carrying the run's device, dtype and vision metadata."""
        register_architectures()
        torch.manual_seed(self.cfg.seed)
        saes = {}
        for hook in self.hooks:
            sae_cfg = copy.deepcopy(self.cfg.sae)
            sae_cfg.device = self.cfg.device
            sae_cfg.dtype = self.cfg.dtype
            for key, value in vision_metadata(self.cfg, hook, self.model, self.weights, cache_meta).items():
                sae_cfg.metadata[key] = value
            saes[hook] = build_training_sae(sae_cfg)
        return saes

    def _build_trainer(
        self, saes, train_images, evaluator, checkpoint: Path | None, state: dict | None
    ) -> None:
        """The store (from the checkpoint's data position), SAELens's trainer (restored from the checkpoint),
        the monitor wrapped around its steps and the progress provider feeding it."""
        cfg = self.cfg
        self.store = self._make_store(train_images, state["data_position"] if state is not None else None)
        if repetition := self.store.repetition_message(cfg.training_rows):
            self.say(repetition)
        provider = StoppableProvider(self.store, self.stop)
        trainer_cfg = cfg.to_sae_trainer_config(checkpoint_path=str(self.staging))
        if len(self.hooks) == 1:
            self.trainer = SAETrainer(
                trainer_cfg,
                saes[self.hooks[0]],
                provider,
                evaluator=evaluator,
                save_checkpoint_fn=self._commit_checkpoint,
            )
        else:
            self.trainer = MultiSAETrainer(
                trainer_cfg,
                saes,
                {h: h for h in self.hooks},
                provider,
                evaluator=evaluator,
                save_checkpoint_fn=self._commit_checkpoint,
            )
        if checkpoint is not None:
            restore_checkpoint(self.trainer, checkpoint)
            self.say(f"resumed from {checkpoint} at {state['n_training_samples']:,} rows")
        self._watch_health()
        # wraps each trainer's step(): metrics.jsonl in the output folder, the bar's loss/MSE/L0/dead postfix
        resumed_step = state["n_training_steps"] if state is not None else None
        self.monitor = TrainingMonitor(
            self.output_path,
            self._sub_trainers(),
            cfg.training_rows,
            cfg.train_batch_size_rows,
            resumed_step=resumed_step,
            live=cfg.verbose,
        )
        self.progress = ProgressProvider(
            provider,
            cfg.training_rows,
            lambda: self.trainer.n_training_samples,
            self.store.counters,
            enabled=cfg.verbose,
            status=self.monitor.postfix,
            health=self._health_value,
        )
        if state is not None:
            self.progress.non_finite_rows = int(state.get("non_finite_rows", 0))
        self.trainer.data_provider = self.progress

    def _make_store(self, train_images: Any, position: dict | None):
        cfg = self.cfg
        if cfg.use_cached_activations:
            return row_store(cfg, position, cache=self._cache)
        source = image_source(
            cfg, self.model, self.preprocess, train_images, seed=cfg.seed, augment=cfg.augment
        )
        return row_store(cfg, position, source=source)

    def _fingerprint(self) -> dict[str, Any]:
        return resume_fingerprint(self.cfg.to_dict(), buffer_rows(self.cfg))

    # ------------------------------------------------------------------ training
    def _fit(self, saes: dict[str, Any], fresh: bool) -> bool:
        """SAELens's ``fit`` (its own bar off; SIGINT / SIGTERM stop it between steps); True when stopped."""
        if fresh:
            self._fit_input_statistics(saes, self.progress)
        interrupted = False
        try:
            with self._signals_stop_training(), progress_bars_off():
                self.trainer.fit()
        except TrainingInterrupted:
            interrupted = True
        except NonFiniteTrainingError:  # from the batch check or a checkpoint: the message names the hook(s)
            raise self._non_finite_error(self._unhealthy_hooks() or list(self.hooks)) from None
        finally:
            self.progress.close(final=self.trainer.n_training_samples)
            self.monitor.close()
            self.store.close()
            with contextlib.suppress(OSError):
                self.staging.rmdir()  # only when empty
        unhealthy = self._unhealthy_hooks()  # the last step is checked here (the others at the next batch)
        if unhealthy:
            raise self._non_finite_error(unhealthy)
        return interrupted

    def _stop_with_checkpoint(self, saes, counters: dict[str, int], seconds: float) -> TrainingResult:
        rows = self.trainer.n_training_samples
        if rows > 0:
            self.trainer.save_checkpoint(checkpoint_name=str(rows))
            with contextlib.suppress(OSError):
                self.staging.rmdir()
        self.say(f"stopped at {rows:,} rows; checkpoint: {self.last_checkpoint}")
        return TrainingResult(
            saes,
            self.output_path,
            {},
            {},
            rows,
            seconds,
            interrupted=True,
            checkpoint=self.last_checkpoint,
            counters=counters,
            weights=self.weights,
            metrics_log=self.monitor.path,
        )

    def _final_metrics(
        self, saes: dict[str, Any], evaluator: VisionSAEEvaluator
    ) -> dict[str, dict[str, Any]]:
        """Held-out metrics per hook (and per k for Matryoshka SAEs), plus the dead fraction over the last
        training window."""
        metrics: dict[str, dict[str, Any]] = {}
        for hook, sae in saes.items():
            metrics[hook] = {**evaluator.metrics(sae, hook), "source": evaluator.source}
            if matryoshka_levels(sae):  # the same rows at each k of the levels (and ReLU)
                at_k = lambda kw, s=sae, h=hook: evaluator.metrics(s, h, encode_kwargs=kw)  # noqa: E731
                metrics[hook]["per_k"] = per_k_metrics(sae, at_k)
        for hook, sub in self._sub_trainers().items():
            if sub.n_frac_active_samples:
                window = int(sub.n_frac_active_samples)
                dead = dead_latents(sub.act_freq_scores.detach().cpu(), window)
                metrics[hook]["dead_fraction_train"] = float(dead.double().mean())
                metrics[hook]["dead_window_rows"] = window
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _commit_checkpoint(self, checkpoint_path: Path | None) -> None:
        """SAELens's ``save_checkpoint_fn``: add our state next to its files, then publish the folder
        atomically."""
        if checkpoint_path is None:
            return
        unhealthy = self._unhealthy_hooks()
        if unhealthy:  # never publish a checkpoint of a broken SAE: the last good one stays the latest
            shutil.rmtree(checkpoint_path, ignore_errors=True)
            raise self._non_finite_error(unhealthy)
        samples = self.trainer.n_training_samples
        state = {
            "n_training_samples": samples,
            "n_training_steps": samples // self.cfg.train_batch_size_rows,
            "data_position": self.store.state_dict(),
            "counters": dict(self.store.counters),
            "hooks": self.hooks,
            "resume_fingerprint": self._fingerprint(),
            "run_id": self.run_id,
            "non_finite_rows": self.progress.non_finite_rows if self.progress is not None else 0,
            "saved_unix": time.time(),
        }
        self.last_checkpoint = commit_checkpoint(
            Path(checkpoint_path), self.checkpoint_root, state, self.cfg.to_dict()
        )
        if self.cfg.verbose:
            self.say(f"checkpoint: {self.last_checkpoint}")

    # ------------------------------------------------------------------ health of the steps
    def _watch_health(self) -> None:
        """Wrap each trainer's ``step``: count the rows its batch lost as non-finite in the run's rows (so the
        schedule, checkpoints and resume stay those of the stream), and keep the step's loss + the sum of the
        SAE's weights as a device scalar (non-finite when any of them is), read at the next batch: no extra
        sync."""
        for hook, sub in self._sub_trainers().items():
            original = sub.step

            def step(batch, sub=sub, original=original, hook=hook):
                sub.n_training_samples += self.progress.skipped_in_batch if self.progress is not None else 0
                output = original(batch)
                with torch.no_grad():
                    weights = torch.stack([p.detach().float().sum() for p in sub.sae.parameters()]).sum()
                    self._health[hook] = output.loss.detach().float() + weights.to(output.loss.device)
                return output

            sub.step = step

    def _health_value(self) -> torch.Tensor | None:
        if not self._health:
            return None
        values = list(self._health.values())
        return values[0] if len(values) == 1 else torch.stack([v.to(values[0].device) for v in values]).sum()

    def _unhealthy_hooks(self) -> list[str]:
        """Hooks whose last step left a non-finite loss or weight (one host sync; called when it matters)."""
        return [h for h, value in self._health.items() if not math.isfinite(float(value))]

    def _non_finite_error(self, hooks: list[str]) -> NonFiniteTrainingError:
        rows = self.trainer.n_training_samples
        kept = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint is not None
            else "no checkpoint was written"
        )
        return NonFiniteTrainingError(
            f"training stopped at {rows:,} rows: a step gave the SAE for {', '.join(hooks)} a non-finite "
            "loss or weight (NaN/inf) although non-finite input rows are skipped; the SAE was not saved and "
            f"{kept}. Lower --lr (a new run: --overwrite) or check the activations"
        )

    # ------------------------------------------------------------------ helpers
    def _fit_input_statistics(self, saes: dict[str, Any], provider: Any) -> None:
        """Architectures that standardise their input (MSAE ``standardize_input``) estimate mean and scale
        first.

        Uses ``n_batches_for_norm_estimate`` batches of the stream (they count in the data position, like
        SAELens's own norm estimate); the statistics are SAE buffers, so checkpoints carry them.
        """
        needing = [
            h for h, sae in saes.items() if getattr(sae, "input_standardization_is_set", True) is False
        ]
        if not needing:
            return
        n = max(1, min(self.cfg.n_batches_for_norm_estimate, self.cfg.total_training_steps))
        batches = [next(provider) for _ in range(n)]
        for hook in needing:
            rows = [b[hook] if isinstance(b, dict) else b for b in batches]
            saes[hook].fit_input_standardization(rows)

    def _sub_trainers(self) -> dict[str, Any]:
        if len(self.hooks) == 1:
            return {self.hooks[0]: self.trainer}
        return dict(self.trainer.trainers)

    def _sparsities(self) -> dict[str, torch.Tensor]:
        return {h: t.log_feature_sparsity for h, t in self._sub_trainers().items() if t.n_frac_active_samples}

    def _stream_rows(self, train_images: Any, position: dict, n_batches: int = 4) -> dict[str, torch.Tensor]:
        """Fresh rows from where training stopped, for metrics when nothing is held out."""
        store = self._make_store(train_images, position)
        try:
            batches = [next(store) for _ in range(n_batches)]
        finally:
            store.close()
        if isinstance(batches[0], dict):
            return {h: torch.cat([b[h] for b in batches]) for h in self.hooks}
        return {self.hooks[0]: torch.cat(batches)}

    @contextlib.contextmanager
    def _signals_stop_training(self):
        """SIGINT / SIGTERM: finish the current step, write a checkpoint, return. A second SIGINT aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop.set()
            self.say(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def train_vision_sae(cfg: VisionSAERunnerConfig, **kwargs: Any) -> TrainingResult:
    """``VisionSAETrainingRunner(cfg, **kwargs).run()``."""
    return VisionSAETrainingRunner(cfg, **kwargs).run()


def check_widths(sae_cfg: Any, hook_widths: dict[str, int]) -> None:
    """Every hook's width must equal the SAE's ``d_in``; the error names both."""
    for hook, width in hook_widths.items():
        if int(width) != int(sae_cfg.d_in):
            raise ValueError(
                f"SAE width mismatch: sae.d_in = {sae_cfg.d_in} but hook {hook!r} gives rows of width "
                f"{width}; set sae.d_in={width}"
            )


def _start_wandb(cfg: VisionSAERunnerConfig) -> None:
    logger = cfg.logger
    wandb.init(
        project=logger.wandb_project,
        entity=logger.wandb_entity,
        name=logger.run_name,
        id=logger.wandb_id,
        config=cfg.to_dict(),
    )


def _log_final_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    """The final held-out metrics (and per-k rows) to wandb, then end the wandb run."""
    final = {
        f"final/{h}/{k}": v for h, m in metrics.items() for k, v in m.items() if k not in ("source", "per_k")
    }
    for h, m in metrics.items():
        for r in m.get("per_k", ()):
            final.update({f"final/{h}/{key}_k{r['k']}": r[key] for key in ("fvu", "cosine", "l0")})
    wandb.log(final)
    wandb.finish()
