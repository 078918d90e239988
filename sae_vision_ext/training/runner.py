"""Train SAEs on a vision model with SAELens's own trainers: images or a cache -> ``SAETrainer`` -> SAELens folder.

``VisionSAETrainingRunner(cfg).run()``:

1. preflight, before any work: output and checkpoint folders writable; each hook's width equals ``sae.d_in``;
2. the data: an :class:`ImageActivationStore` (images -> model -> rows, model on a background thread) or a
   :class:`CachedActivationStore` (no model);
3. one hook: SAELens ``SAETrainer``; several hooks: SAELens ``MultiSAETrainer`` (one SAE per hook, one forward);
4. checkpoints: SAELens writes its files into ``<checkpoint_path>/.staging/<n>``; the runner adds the data position
   (``vision_state.json``) and the RNG state, fsyncs, and renames the folder to ``<checkpoint_path>/<n>``, so a
   checkpoint folder either is complete or does not exist. Resuming restores trainer state, weights, RNG and the
   exact data position. SIGINT / SIGTERM stop between two steps and write a checkpoint;
5. the output: SAELens inference folder(s) whose ``cfg.metadata`` carries the vision facts (``modality="vision"``,
   model, hook, token selection, image size, weights), plus ``eval_metrics.json`` from held-out images.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_vision_ext.activations.cache import CachedActivations, fsync_dir, write_json_atomic
from sae_vision_ext.activations.store import (
    CachedActivationStore,
    ImageActivationStore,
    StoppableProvider,
    TrainingInterrupted,
)
from sae_vision_ext.errors import UserError
from sae_vision_ext.training.config import RUNNER_CFG_FILENAME, VisionSAERunnerConfig
from sae_vision_ext.training.monitor import TrainingMonitor, matryoshka_levels, per_k_metrics
from sae_vision_ext.vision.load import describe_weights

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_BANNER = (
    "!! The vision model had RANDOM weights: the SAE's latents describe a random network, not learned features.\n"
    "!! For a real run give pretrained weights (the default when the Hugging Face Hub is reachable) or --weights FILE."
)

VISION_STATE_FILENAME = "vision_state.json"
RNG_STATE_FILENAME = "rng_state.pt"
EVAL_METRICS_FILENAME = "eval_metrics.json"
STAGING_DIRNAME = ".staging"
RUN_ID_FILENAME = "run_id.json"  # in the checkpoint folder: the run its checkpoints belong to
# config fields that must match between a checkpoint and the run that resumes it (plus the whole sae section)
RESUME_KEYS = (
    "model_name", "pretrained", "model_weights", "hook_name", "token_selection", "dataset_path", "dataset_split",
    "image_column", "use_cached_activations", "cached_activations_path", "train_batch_size_rows", "seed",
    "augment", "crop_scale", "shuffle_images", "img_size", "buffer_size_rows", "activations_mixing_fraction",
    "images_per_segment", "eval_holdout_images", "model_batch_size", "autocast_model", "training_rows", "lr",
    "lr_end", "lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps", "lr_decay_fraction", "n_restart_cycles",
    "adam_beta1", "adam_beta2", "dead_feature_window", "feature_sampling_window", "n_batches_for_norm_estimate",
    "autocast", "dtype",
)  # fmt: skip
# what a finished run leaves in its output folder (in a subfolder per hook when there are several)
OUTPUT_FILENAMES = ("sae_weights.safetensors", "cfg.json", "sparsity.safetensors", EVAL_METRICS_FILENAME,
                    RUNNER_CFG_FILENAME, "metrics.jsonl", "training_curves.png", "fvu_vs_k.png")  # fmt: skip


class NonFiniteTrainingError(UserError):
    """A training step produced a non-finite loss or weight; the run stopped without saving that SAE."""


# ----------------------------------------------------------------------------------------------- helpers


def _flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"sae": {"k": 8}}`` -> ``{"sae.k": 8}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and prove a file can be written there; raise a readable error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"the {what} {path} is not writable ({type(err).__name__}: {err})") from err
    return path


def check_widths(sae_cfg: Any, hook_widths: dict[str, int]) -> None:
    """Every hook's width must equal the SAE's ``d_in``; the error names both."""
    for hook, width in hook_widths.items():
        if int(width) != int(sae_cfg.d_in):
            raise ValueError(
                f"SAE width mismatch: sae.d_in = {sae_cfg.d_in} but hook {hook!r} gives rows of width {width}; "
                f"set sae.d_in={width}"
            )


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


def committed_checkpoints(checkpoint_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``checkpoint_root``, oldest first (by training rows)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not (child / VISION_STATE_FILENAME).exists():
            continue
        digits = child.name.removeprefix("final_")
        if digits.isdigit():
            found.append((int(digits), child.name.startswith("final_"), child))
    return [p for _, _, p in sorted(found)]


def resolve_checkpoint(spec: str | None, checkpoint_root: str | os.PathLike, say=None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest complete checkpoint whose files all read (or None): a damaged
    newer one is passed over, and ``say`` tells which and why; else that folder (damaged: ``ValueError``)."""
    if spec is None:
        return None
    if spec == "latest":
        found = committed_checkpoints(checkpoint_root)
        damaged = []
        for path in reversed(found):
            damage = checkpoint_damage(path)
            if damage is None:
                if damaged and say is not None:
                    say(f"checkpoint {damaged[0][0]} is damaged ({damaged[0][1]}); falling back to the previous "
                        f"complete checkpoint {path}")  # fmt: skip
                return path
            damaged.append((path, damage))
        if damaged:
            raise ValueError(f"no readable checkpoint in {checkpoint_root}: all {len(found)} are damaged (the newest: "
                             f"{damaged[0][1]}); train from scratch with --overwrite")  # fmt: skip
        return None
    path = Path(spec)
    if not (path / VISION_STATE_FILENAME).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {VISION_STATE_FILENAME})")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise ValueError(f"checkpoint {path} is damaged ({damage}); resume from an earlier checkpoint "
                         f"(--resume FOLDER, or --resume for the newest readable one) or train from scratch")
    return path


def checkpoint_damage(path: Path) -> str | None:
    """None when every file of checkpoint ``path`` reads (safetensors, torch, JSON), else which file fails and how
    (a truncated or half-written file)."""
    from safetensors.torch import load_file

    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                load_file(file)
            elif file.suffix == ".pt":
                torch.load(file, map_location="cpu", weights_only=True)
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as err:  # noqa: BLE001  (any failure to read it is damage; the message says which)
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"{file} cannot be read: {text}"
    return None


def finished_run(output_path: str | os.PathLike, checkpoint_root: str | os.PathLike) -> list[Path]:
    """The SAE file(s) and complete checkpoints a run left in ``output_path`` / ``checkpoint_root``."""
    out = Path(output_path)
    saes = [out / "sae_weights.safetensors"] + sorted(out.glob("*/sae_weights.safetensors"))
    return [p for p in saes if p.is_file()] + committed_checkpoints(checkpoint_root)


def check_output_free(output_path: str | os.PathLike, checkpoint_root: str | os.PathLike, resume: bool,
                      overwrite: bool) -> None:  # fmt: skip
    """Refuse (``FileExistsError``, one line) to start a new run where one already left an SAE or checkpoints,
    unless it is resumed (``--resume``) or replaced (``--overwrite``)."""
    if resume or overwrite:
        return
    found = finished_run(output_path, checkpoint_root)
    if found:
        n_checkpoints = len(committed_checkpoints(checkpoint_root))
        what = [f"the SAE {p}" for p in found if p.name == "sae_weights.safetensors"][:1]
        what += [f"{n_checkpoints} checkpoint(s) in {checkpoint_root}"] if n_checkpoints else []
        raise FileExistsError(f"{output_path} already holds a run ({' and '.join(what)}): add --resume to continue "
                              "it, or --overwrite to replace it (nothing was changed)")  # fmt: skip


def remove_previous_run(output_path: str | os.PathLike, checkpoint_root: str | os.PathLike) -> list[Path]:
    """``--overwrite``: remove what an earlier run wrote (its SAE files, per-hook SAE folders, complete
    checkpoints, staging folders, run id); any other file stays. Returns what was removed."""
    out, root = Path(output_path), Path(checkpoint_root)
    removed = []
    folders = [out] + sorted(p.parent for p in out.glob("*/sae_weights.safetensors") if (p.parent / "cfg.json").exists())
    for folder in folders:
        for name in OUTPUT_FILENAMES:
            if (folder / name).is_file():
                (folder / name).unlink()
                removed.append(folder / name)
        if folder != out:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when nothing else is in it
    ours = committed_checkpoints(root)
    if root.is_dir():
        ours += [p for p in root.iterdir() if p.name == STAGING_DIRNAME or p.name.startswith(".replaced-")]
    for path in ours:
        shutil.rmtree(path)
        removed.append(path)
    if (root / RUN_ID_FILENAME).is_file():
        (root / RUN_ID_FILENAME).unlink()
        removed.append(root / RUN_ID_FILENAME)
    return removed


def current_run_id(checkpoint_root: str | os.PathLike) -> str | None:
    """The id of the run last started with this checkpoint folder (None: none recorded)."""
    try:
        return json.loads((Path(checkpoint_root) / RUN_ID_FILENAME).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _make_training_sae(sae_cfg: Any):
    from sae_lens.registry import get_sae_training_class

    import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)

    sae_cls, _ = get_sae_training_class(sae_cfg.architecture())
    return sae_cls(sae_cfg)


def load_model_for(cfg: VisionSAERunnerConfig) -> tuple[Any, Any, dict[str, Any]]:
    """``(hooked model, preprocess, weights record)`` for ``cfg``: its weights file, else pretrained weights
    (downloaded when needed; ``PretrainedWeightsUnavailable`` when they cannot be had), else (``pretrained=False``)
    a random init drawn from ``cfg.seed``."""
    from sae_vision_ext.vision.load import load_vision_model_with_record

    return load_vision_model_with_record(cfg.model_name, weights=cfg.model_weights, pretrained=cfg.pretrained,
                                         seed=cfg.seed, device=cfg.model_device or cfg.device,
                                         img_size=cfg.img_size)  # fmt: skip


def vision_metadata(
    cfg: VisionSAERunnerConfig, hook: str, model: Any | None, weights: str, cache_meta: dict | None
) -> dict[str, Any]:
    """The facts stored in the SAE's ``cfg.metadata`` so a loaded SAE knows where it belongs."""
    meta: dict[str, Any] = {
        "modality": "vision",
        "model_name": cfg.model_name,
        "hook_name": hook,
        "token_selection": cfg.token_selection,
        "weights": weights,
        "dataset_path": cfg.dataset_path or None,
        "augment": cfg.augment,
    }
    if model is not None:
        layout = model.token_layout
        meta.update(
            image_size=list(model.cfg.image_size),
            context_size=_tokens_per_image(model, hook, cfg.token_selection),
            token_layout={
                "n_cls": layout.n_cls,
                "n_registers": layout.n_registers,
                "grid_size": list(layout.grid_size),
                "n_patches": layout.n_patches,
                "n_prefix": layout.n_prefix,
            },
        )
    if cache_meta:
        for key in ("model_name", "weights", "token_selection", "image_size", "token_layout", "dataset_path", "augment"):
            if cache_meta.get(key) is not None:
                meta[key] = cache_meta[key]
        meta["context_size"] = cache_meta.get("context_size")
        meta["cached_activations_path"] = cfg.cached_activations_path
    return meta


def _tokens_per_image(model: Any, hook: str, selection: str) -> int:
    from sae_vision_ext.activations.source import tokens_per_image

    return tokens_per_image(model, hook, selection)


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate_rows(sae: Any, rows: torch.Tensor, scaler: Any = None, batch_size: int = 4096,
                  encode_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """FVU, cosine, L0, dead fraction (``evals.reconstruction.evaluate_sae``) of ``sae`` on ``rows``.

    ``scaler`` (SAELens ``ActivationScaler``) maps raw rows to what the SAE is trained on, while training;
    ``encode_kwargs`` go to ``sae.encode`` (``{"k": 64}`` for a Matryoshka SAE).
    """
    from sae_vision_ext.evals.reconstruction import evaluate_sae

    def batches():
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size]
            yield scaler(batch) if scaler is not None else batch

    was_training = sae.training
    sae.eval()
    try:
        return evaluate_sae(sae, batches(), encode_kwargs=encode_kwargs, progress=False)  # the run has its own bar
    finally:
        sae.train(was_training)


class VisionSAEEvaluator:
    """SAELens evaluator (``SAETrainer``'s and ``MultiSAETrainer``'s protocols) on fixed held-out rows.

    ``eval_rows``: ``{hook: [N, d_in]}``. Usable with wandb off: call :meth:`metrics` directly.
    """

    def __init__(self, eval_rows: dict[str, torch.Tensor], source: str = "held-out images"):
        # rows with a non-finite value (or squared norm) are left out, as in training: one would make every metric NaN
        self.eval_rows = {h: rows[torch.isfinite(rows.float().square().sum(-1))] for h, rows in eval_rows.items()}
        self.source = source

    def metrics(self, sae: Any, hook: str, scaler: Any = None, encode_kwargs: dict | None = None) -> dict:
        return evaluate_rows(sae, self.eval_rows[hook], scaler, encode_kwargs=encode_kwargs)

    def __call__(self, sae=None, data_provider=None, activation_scaler=None, *, saes=None, activation_scalers=None,
                 hook_names=None) -> dict[str, Any]:  # fmt: skip
        if saes is not None:  # MultiSAETrainer protocol
            out = {}
            for name, one in saes.items():
                scaler = activation_scalers.get(name) if activation_scalers else None
                for key, value in self.metrics(one, hook_names[name], scaler).items():
                    out[f"{name}/eval/{key}"] = value
            return out
        hook = next(iter(self.eval_rows))
        return {f"eval/{k}": v for k, v in self.metrics(sae, hook, activation_scaler).items()}


# ----------------------------------------------------------------------------------------------- progress


class _ProgressProvider:
    """Shows rows/s as training advances (reads the trainer's sample count), then hands out the next batch.

    The postfix (refreshed at most once a second) is ``status()`` (``TrainingMonitor.postfix``: loss, MSE, L0,
    dead fraction) plus the images read and skipped when training from images.
    """

    def __init__(self, provider: Any, total: int, samples_fn, counters: dict[str, int], enabled: bool = True,
                 status=None, health=None):  # fmt: skip
        from tqdm.auto import tqdm

        self.provider = provider
        self.samples_fn = samples_fn
        self.counters = counters
        self.status = status
        # health(): a scalar tensor, non-finite when the last step's loss or weights were (None: no step yet);
        # read together with the batch's count of non-finite rows: one host sync per step
        self.health = health
        self.skipped_in_batch = 0  # non-finite rows left out of the last batch handed out
        self.non_finite_rows = 0  # all of this run's (a resumed run starts from the checkpoint's count)
        self.bar = tqdm(total=total, initial=samples_fn(), unit="rows", unit_scale=True, desc="training SAE",
                        disable=not enabled, mininterval=0.5, dynamic_ncols=True, smoothing=0.1)  # fmt: skip
        self._last_postfix = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._finite_batch()
        done = self.samples_fn()
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if time.monotonic() - self._last_postfix > 1.0:
            self._show_postfix()
        return batch

    def _finite_batch(self):
        """The next batch without its non-finite rows (NaN, inf, or a squared norm that overflows float32, as one
        1e30 value does), counted in ``non_finite_rows``; a batch with no finite row is skipped whole.
        Raises :class:`NonFiniteTrainingError` when the previous step left a non-finite loss or weight."""
        skipped = 0
        while True:
            batch = next(self.provider)
            parts = list(batch.values()) if isinstance(batch, dict) else [batch]
            bad = None
            for part in parts:  # a row is dropped from every hook when it is bad at one
                row_bad = ~torch.isfinite(part.float().square().sum(-1))
                bad = row_bad if bad is None else bad | row_bad.to(bad.device)
            health = self.health() if self.health is not None else None
            n_bad, healthy = _read_scalars(bad.sum(), health)
            if not healthy:
                raise NonFiniteTrainingError("a training step gave a non-finite loss or weight")  # worded by the runner
            if n_bad:
                keep = ~bad
                batch = {h: t[keep.to(t.device)] for h, t in batch.items()} if isinstance(batch, dict) else batch[keep]
                skipped += n_bad
                self.non_finite_rows += n_bad
            if n_bad < bad.shape[0]:
                self.skipped_in_batch = skipped
                return batch

    def _show_postfix(self):
        if self.bar.disable:
            return
        self._last_postfix = time.monotonic()
        parts = [self.status()] if self.status is not None else []
        if "images_ok" in self.counters:
            parts.append(f"images={self.counters['images_ok']} skipped={self.counters['images_failed']}")
        text = " ".join(p for p in parts if p)
        if text:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self, final: int | None = None):
        self._show_postfix()  # the bar's last line shows the last values
        if final is not None and final > self.bar.n:
            self.bar.update(final - self.bar.n)
        self.bar.close()


def _read_scalars(count: torch.Tensor, health: torch.Tensor | None) -> tuple[int, bool]:
    """``(count, health is finite)`` in one host sync (two when the tensors live on different devices)."""
    if health is None:
        return int(count), True
    if health.device == count.device:
        n, h = torch.stack([count.float(), health.float()]).tolist()
        return int(n), math.isfinite(h)
    return int(count), math.isfinite(float(health))


@contextlib.contextmanager
def _quiet_saelens_bars():
    """SAELens's trainers draw a bar that moves every 100 steps; ours shows rows/s instead, so theirs is muted."""
    from functools import partial

    import sae_lens.training.multi_sae_trainer as multi_module
    import sae_lens.training.sae_trainer as single_module
    from tqdm.auto import tqdm

    saved = (single_module.tqdm, multi_module.tqdm)
    single_module.tqdm = multi_module.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        single_module.tqdm, multi_module.tqdm = saved


# ----------------------------------------------------------------------------------------------- result


@dataclass
class TrainingResult:
    """What a run produced: the trained SAE(s) by hook, where they were written, and their metrics."""

    saes: dict[str, Any]
    output_path: Path
    sae_paths: dict[str, Path]
    metrics: dict[str, dict[str, Any]]
    n_training_rows: int
    seconds: float
    interrupted: bool = False
    checkpoint: Path | None = None
    counters: dict[str, int] = field(default_factory=dict)
    weights: dict[str, Any] | None = None  # vision.load.weights_record of the model (None: trained from a cache)
    eval_source: str = ""
    metrics_log: Path | None = None  # metrics.jsonl (training.monitor)
    plots: list[Path] = field(default_factory=list)  # training_curves.png, fvu_vs_k.png
    rows_this_run: int | None = None  # rows trained by this call (less than n_training_rows after a resume)

    @property
    def sae(self):
        return next(iter(self.saes.values()))

    def _rows_line(self) -> str:
        """Rows and rows/s, the rate over the rows this call trained (never a division by ~0 seconds)."""
        total, new = self.n_training_rows, self.n_training_rows if self.rows_this_run is None else self.rows_this_run
        rate = f"{new / self.seconds:,.0f} rows/s" if new > 0 and self.seconds >= 1e-3 else ""
        if new <= 0:
            return f"trained on {total:,} rows (none in this run: the checkpoint was at the end)"
        if new == total:
            return f"trained on {total:,} rows in {self.seconds:.1f} s" + (f" ({rate})" if rate else "")
        return f"trained on {total:,} rows ({new:,} of them in this run, {self.seconds:.1f} s" + (
            f", {rate})" if rate else ")")

    def summary(self) -> str:
        lines = []
        if self.interrupted:
            lines.append(f"interrupted after {self.n_training_rows:,} rows; checkpoint: {self.checkpoint}")
            lines.append("resume with the same command plus --resume (or resume_from_checkpoint='latest')")
            if self.metrics_log is not None:
                lines.append(f"training curve so far: {self.metrics_log}")
            return "\n".join(lines)
        lines.append(self._rows_line())
        if self.counters.get("non_finite_rows"):
            lines.append(f"non-finite input rows skipped: {self.counters['non_finite_rows']:,} (NaN, inf or too large; "
                         "they count in the rows above)")  # fmt: skip
        if "images_ok" in self.counters:
            lines.append(f"images: {self.counters['images_ok']:,} read, {self.counters['images_failed']:,} skipped")
        if self.weights:
            lines.append(f"model weights: {describe_weights(self.weights)}")
            if self.weights.get("source") == "random-init":
                lines.append(RANDOM_WEIGHTS_BANNER)
        for hook, path in self.sae_paths.items():
            lines.append(f"SAE for {hook}: {path}")
            m = self.metrics.get(hook)
            if m:
                lines.append(
                    f"  {self.eval_source} ({m['n_rows']:,} rows): FVU {m['fvu']:.4f} | cosine {m['cosine']:.4f} | "
                    f"L0 {m['l0']:.1f} of {m['d_sae']} (zeros {m['fraction_zero']:.1%})"
                )
                if "dead_fraction_train" in m:
                    lines.append(
                        f"  dead latents (firing rate < 10^-5.5 over the last {m['dead_window_rows']:,} training rows):"
                        f" {m['dead_fraction_train']:.1%}"
                    )
                if m.get("per_k"):
                    from sae_vision_ext.training.monitor import per_k_table

                    lines.append(f"  at each k of the Matryoshka levels (same {m['n_rows']:,} rows):")
                    lines.extend(per_k_table(m["per_k"], indent="    "))
        if self.metrics_log is not None:
            lines.append(f"training curve: {self.metrics_log}")
        if self.plots:
            lines.append("plots: " + ", ".join(str(p) for p in self.plots))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- runner


class VisionSAETrainingRunner:
    """Trains one SAE per hook of ``cfg`` (see the module docstring).

    ``images`` / ``eval_images`` override ``cfg.dataset_path`` / ``cfg.eval_dataset_path`` (a list of PIL images, a
    folder, a dataset); ``model`` + ``preprocess`` override loading ``cfg.model_name``.
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
        # which weights the model has (vision.load.weights_record); given with a model, else found when loading
        self.weights = weights
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stop = threading.Event()
        self.store: Any = None
        self.trainer: Any = None
        self.hooks = cfg.hook_names
        self.output_path = Path(cfg.output_path)
        self.checkpoint_root = Path(cfg.checkpoint_path)
        self.staging = self.checkpoint_root / STAGING_DIRNAME
        self.run_id: str | None = None
        self.progress: _ProgressProvider | None = None
        self._health: dict[str, torch.Tensor] = {}  # per hook: the last step's loss + the sum of its weights

    # ------------------------------------------------------------------ preflight
    def _preflight(self) -> tuple[dict[str, int], dict | None]:
        cfg = self.cfg
        if cfg.sae is None:
            raise ValueError("the config has no sae section: nothing to train")
        if self.overwrite and cfg.resume_from_checkpoint is not None:
            raise ValueError("--overwrite and --resume contradict each other: give one")
        check_output_free(self.output_path, self.checkpoint_root, cfg.resume_from_checkpoint is not None,
                          self.overwrite)  # fmt: skip
        check_writable(self.output_path, "output folder")
        check_writable(self.checkpoint_root, "checkpoint folder")
        if cfg.use_cached_activations:
            cache = CachedActivations(cfg.cached_activations_path)
            missing = [h for h in self.hooks if h not in cache.hook_widths]
            if missing:
                raise ValueError(f"cache {cache.path} has no activations for {missing}; it holds {cache.hook_names}")
            widths = {h: cache.hook_widths[h] for h in self.hooks}
            check_widths(cfg.sae, widths)
            self._cache = cache
            return widths, cache.metadata
        self._ensure_model()
        widths = {h: int(self.model.hook_width(h)) for h in self.hooks}
        check_widths(cfg.sae, widths)
        return widths, None

    def _ensure_model(self) -> None:
        if self.model is None:
            self.model, self.preprocess, self.weights = load_model_for(self.cfg)
        if self.preprocess is None:
            self.preprocess = getattr(self.model, "preprocess", None)
            if self.preprocess is None:
                raise ValueError("a model passed to the runner needs its preprocess transform")

    def held_out_rows(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """``({hook: rows}, source)``: the rows this run's final metrics are computed on (same images, views and
        order), so a saved SAE can be re-evaluated exactly; ``(None, "")`` when the run holds nothing out."""
        if self.cfg.use_cached_activations:
            return self._eval_rows(None)
        self._ensure_model()
        _, eval_images = self._collections()
        return self._eval_rows(eval_images)

    # ------------------------------------------------------------------ data
    def _collections(self):
        from sae_vision_ext.activations.images import SubsetImages, open_images

        cfg = self.cfg
        source = self.images if self.images is not None else cfg.dataset_path
        if source is None or (isinstance(source, str) and not source):
            raise ValueError("no images: set dataset_path (a hub dataset, a dataset folder or an image folder)")
        train = open_images(source, split=cfg.dataset_split, image_column=cfg.image_column)
        evaluation = None
        if self.eval_images is not None or cfg.eval_dataset_path:
            target = self.eval_images if self.eval_images is not None else cfg.eval_dataset_path
            evaluation = open_images(target, split=cfg.eval_dataset_split, image_column=cfg.image_column)
        elif cfg.eval_holdout_images > 0:
            import numpy as np

            n = len(train)
            if cfg.eval_holdout_images >= n:
                raise ValueError(f"eval_holdout_images={cfg.eval_holdout_images} leaves no training images (of {n})")
            order = np.random.default_rng([cfg.seed, 3]).permutation(n)
            held = sorted(order[: cfg.eval_holdout_images].tolist())
            kept = sorted(order[cfg.eval_holdout_images :].tolist())
            evaluation, train = SubsetImages(train, held), SubsetImages(train, kept)
        return train, evaluation

    def _image_source(self, images: Any, seed: int, augment: str, num_workers: int | None = None):
        from sae_vision_ext.activations.source import ImageActivationSource

        cfg = self.cfg
        return ImageActivationSource(
            self.model,
            self.preprocess,
            images,
            self.hooks,
            token_selection=cfg.token_selection,
            model_batch_size=cfg.model_batch_size,
            num_workers=cfg.num_workers if num_workers is None else num_workers,
            seed=seed,
            augment=augment,
            crop_scale=cfg.crop_scale,
            shuffle=cfg.shuffle_images,
            dtype=getattr(torch, cfg.dtype),
            autocast=cfg.autocast_model,
        )

    def _eval_rows(self, eval_images: Any) -> tuple[dict[str, torch.Tensor] | None, str]:
        cfg = self.cfg
        if cfg.use_cached_activations:
            if not cfg.eval_dataset_path:
                return None, ""
            cache = CachedActivations(cfg.eval_dataset_path)
            limit = cfg.n_eval_images * (cache.context_size or 1)
            rows = {}
            for hook in self.hooks:
                pieces, have = [], 0
                for block in cache.iter_rows(hook):
                    pieces.append(torch.from_numpy(block[: limit - have].astype("float32")))
                    have += pieces[-1].shape[0]
                    if have >= limit:
                        break
                rows[hook] = torch.cat(pieces)
            return rows, "held-out cache"
        if eval_images is None:
            return None, ""
        source = self._image_source(eval_images, seed=cfg.seed + 1, augment=cfg.eval_augment or cfg.augment)
        pieces: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        for chunk in source.iter_chunks(0, cfg.n_eval_images):
            for h in self.hooks:
                pieces[h].append(chunk.rows[h])
        rows = {h: torch.cat(p).float() for h, p in pieces.items()}
        if next(iter(rows.values())).shape[0] == 0:
            raise RuntimeError("none of the evaluation images could be read")
        return rows, "held-out images"

    def _buffer_rows(self) -> int:
        """The mixing buffer, capped at the run's length: a larger one would only delay the first step."""
        cfg = self.cfg
        return max(cfg.train_batch_size_rows, min(cfg.buffer_size_rows, cfg.training_rows))

    def _make_store(self, train_images: Any, position: dict | None):
        cfg = self.cfg
        if cfg.use_cached_activations:
            return CachedActivationStore(
                self._cache, cfg.train_batch_size_rows, self.hooks, seed=cfg.seed, position=position,
                dtype=getattr(torch, cfg.dtype),
            )  # fmt: skip
        source = self._image_source(train_images, seed=cfg.seed, augment=cfg.augment)
        return ImageActivationStore(
            source,
            cfg.train_batch_size_rows,
            buffer_rows=self._buffer_rows(),
            mix_fraction=cfg.activations_mixing_fraction,
            images_per_segment=cfg.images_per_segment,
            seed=cfg.seed,
            prefetch=cfg.prefetch_batches,
            position=position,
        )

    # ------------------------------------------------------------------ checkpoints
    def _resume_fingerprint(self) -> dict[str, Any]:
        cfg_dict = self.cfg.to_dict()
        out = {k: cfg_dict.get(k) for k in RESUME_KEYS}
        # the whole sae section (k, k_levels, level_weighting, ...); where it lives and its free-form notes aside
        out["sae"] = {k: v for k, v in cfg_dict["sae"].items() if k not in ("metadata", "device")}
        out["effective_buffer_rows"] = self._buffer_rows()
        return json.loads(json.dumps(out, default=str))

    def _unhealthy_hooks(self) -> list[str]:
        """Hooks whose last step left a non-finite loss or weight (one host sync; only called when it matters)."""
        return [h for h, value in self._health.items() if not math.isfinite(float(value))]

    def _non_finite_error(self, hooks: list[str]) -> NonFiniteTrainingError:
        rows = self.trainer.n_training_samples
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
                else "no checkpoint was written")  # fmt: skip
        return NonFiniteTrainingError(
            f"training stopped at {rows:,} rows: a step gave the SAE for {', '.join(hooks)} a non-finite loss or "
            f"weight (NaN/inf) although non-finite input rows are skipped; the SAE was not saved and {kept}. "
            "Lower --lr (a new run: --overwrite) or check the activations"
        )

    def _commit_checkpoint(self, checkpoint_path: Path | None) -> None:
        """SAELens's ``save_checkpoint_fn``: add our state next to its files, then publish the folder atomically."""
        if checkpoint_path is None:
            return
        checkpoint_path = Path(checkpoint_path)
        unhealthy = self._unhealthy_hooks()
        if unhealthy:  # never publish a checkpoint of a broken SAE: the last good one stays the latest
            shutil.rmtree(checkpoint_path, ignore_errors=True)
            raise self._non_finite_error(unhealthy)
        trainer = self.trainer
        samples = trainer.n_training_samples
        state = {
            "format": 1,
            "n_training_samples": samples,
            "n_training_steps": samples // self.cfg.train_batch_size_rows,
            "data_position": self.store.state_dict(),
            "counters": dict(self.store.counters),
            "hooks": self.hooks,
            "resume_fingerprint": self._resume_fingerprint(),
            "run_id": self.run_id,
            "non_finite_rows": self.progress.non_finite_rows if self.progress is not None else 0,
            "saved_unix": time.time(),
        }
        torch.save({"torch_cpu": torch.random.get_rng_state()}, checkpoint_path / RNG_STATE_FILENAME)
        with open(checkpoint_path / RUNNER_CFG_FILENAME, "w") as f:
            json.dump(self.cfg.to_dict(), f, default=str)
        write_json_atomic(checkpoint_path / VISION_STATE_FILENAME, state)
        _fsync_tree(checkpoint_path)
        final = self.checkpoint_root / checkpoint_path.name
        if final.exists():
            aside = self.checkpoint_root / f".replaced-{final.name}-{os.getpid()}"
            os.rename(final, aside)
            os.rename(checkpoint_path, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(checkpoint_path, final)
        fsync_dir(self.checkpoint_root)
        self.last_checkpoint = final
        if self.cfg.verbose:
            self.say(f"checkpoint: {final}")

    def _checkpoint_state(self, path: Path) -> dict[str, Any]:
        """The checkpoint's ``vision_state.json``, after checking that it belongs to the run last started in its
        folder and was made with this run's config (every setting that changes the result)."""
        state = json.loads((path / VISION_STATE_FILENAME).read_text())
        current = current_run_id(path.parent)
        if state.get("run_id") != current:
            raise ValueError(
                f"checkpoint {path} belongs to another run (run id {state.get('run_id')}) than the one last started "
                f"in {path.parent} (run id {current}), which wrote no checkpoint: refusing to continue the other "
                "run; train from scratch with --overwrite"
            )
        expected, saved = _flat(self._resume_fingerprint()), _flat(state.get("resume_fingerprint", {}))
        changed = sorted(k for k in expected.keys() | saved.keys() if saved.get(k) != expected.get(k))
        if changed:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {expected.get(k)!r}" for k in changed)
            raise ValueError(
                f"checkpoint {path} was made with a different config (differs in: {', '.join(changed)}) ({details}); "
                "resume with the same config, or train from scratch with --overwrite"
            )
        return state

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = self._checkpoint_state(path)
        trainer = self.trainer
        samples = int(state["n_training_samples"])
        steps = int(state["n_training_steps"])
        if len(self.hooks) == 1:
            trainer.load_trainer_state(path)
            trainer.sae.load_weights_from_checkpoint(path)
            trainer.n_training_steps = steps  # SAELens saves mid-step, before its step counter moves on
            thresholds = trainer.checkpoint_thresholds
        else:
            trainer.load_checkpoint(path)
            trainer.n_training_steps = steps
            for sub in trainer.trainers.values():
                sub.n_training_steps = steps
            thresholds = trainer.checkpoint_thresholds
        while thresholds and thresholds[0] < samples:
            thresholds.pop(0)
        rng = torch.load(path / RNG_STATE_FILENAME, weights_only=True)
        torch.random.set_rng_state(rng["torch_cpu"])
        return state

    # ------------------------------------------------------------------ outputs
    def _write_outputs(self, saes: dict[str, Any], sparsities: dict[str, torch.Tensor], metrics: dict) -> dict:
        from safetensors.torch import save_file

        tmp = self.output_path / f".writing-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        sae_paths = {}
        for hook, sae in saes.items():
            folder = tmp if len(saes) == 1 else tmp / hook
            sae.save_inference_model(folder)
            if hook in sparsities:
                save_file({"sparsity": sparsities[hook]}, folder / "sparsity.safetensors")
            if metrics.get(hook):
                (folder / EVAL_METRICS_FILENAME).write_text(json.dumps(metrics[hook], indent=2))
            sae_paths[hook] = self.output_path if len(saes) == 1 else self.output_path / hook
        (tmp / RUNNER_CFG_FILENAME).write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        _fsync_tree(tmp)
        for src in sorted(tmp.rglob("*"), key=lambda p: len(p.parts)):
            dest = self.output_path / src.relative_to(tmp)
            if src.is_dir():
                dest.mkdir(exist_ok=True)
            else:
                os.replace(src, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(self.output_path)
        return sae_paths

    # ------------------------------------------------------------------ run
    def run(self) -> TrainingResult:
        cfg = self.cfg
        started = time.perf_counter()
        widths, cache_meta = self._preflight()
        if cfg.use_cached_activations:
            train_images = eval_images = None
        else:
            train_images, eval_images = self._collections()
        if self.overwrite:
            removed = remove_previous_run(self.output_path, self.checkpoint_root)
            if removed:
                self.say(f"--overwrite: removed the earlier run in {self.output_path} ({len(removed)} files and "
                         "checkpoint folders; other files are kept)")  # fmt: skip
        shutil.rmtree(self.staging, ignore_errors=True)
        checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, self.checkpoint_root, say=self.say)
        if cfg.resume_from_checkpoint == "latest" and checkpoint is None:
            self.say(f"no checkpoint in {self.checkpoint_root} yet: starting from scratch")
        resumed_state = self._checkpoint_state(checkpoint) if checkpoint is not None else None
        position = resumed_state["data_position"] if resumed_state is not None else None
        # a new run gets a new id: checkpoints of any earlier run in this folder can no longer be resumed
        self.run_id = resumed_state.get("run_id") if resumed_state is not None else uuid.uuid4().hex
        if self.run_id is not None and current_run_id(self.checkpoint_root) != self.run_id:
            write_json_atomic(self.checkpoint_root / RUN_ID_FILENAME, {"run_id": self.run_id, "started_unix": time.time()})

        torch.manual_seed(cfg.seed)
        saes = {}
        for hook in self.hooks:
            sae_cfg = copy.deepcopy(cfg.sae)
            sae_cfg.device = cfg.device
            sae_cfg.dtype = cfg.dtype
            for key, value in vision_metadata(cfg, hook, self.model, self.weights, cache_meta).items():
                sae_cfg.metadata[key] = value
            saes[hook] = _make_training_sae(sae_cfg)

        eval_rows, eval_source = self._eval_rows(eval_images)

        trainer_cfg = cfg.to_sae_trainer_config(checkpoint_path=str(self.staging))
        evaluator = VisionSAEEvaluator(eval_rows, eval_source) if eval_rows is not None else None
        self.store = self._make_store(train_images, position)
        if repetition := self.store.repetition_message(cfg.training_rows):
            self.say(repetition)
        provider = StoppableProvider(self.store, self.stop)
        if len(self.hooks) == 1:
            from sae_lens.training.sae_trainer import SAETrainer

            hook = self.hooks[0]
            self.trainer = SAETrainer(trainer_cfg, saes[hook], provider, evaluator=evaluator,
                                      save_checkpoint_fn=self._commit_checkpoint)  # fmt: skip
        else:
            from sae_lens.training.multi_sae_trainer import MultiSAETrainer

            self.trainer = MultiSAETrainer(trainer_cfg, saes, {h: h for h in self.hooks}, provider,
                                           evaluator=evaluator, save_checkpoint_fn=self._commit_checkpoint)  # fmt: skip
        self.last_checkpoint = None
        if checkpoint is not None:
            state = self._load_checkpoint(checkpoint)
            self.say(f"resumed from {checkpoint} at {state['n_training_samples']:,} rows")
        self._watch_health()
        # wraps each trainer's step(): metrics.jsonl in the output folder, the bar's loss/MSE/L0/dead postfix
        resumed_step = state["n_training_steps"] if checkpoint is not None else None
        monitor = TrainingMonitor(self.output_path, self._sub_trainers(), cfg.training_rows,
                                  cfg.train_batch_size_rows, resumed_step=resumed_step, live=cfg.verbose)  # fmt: skip
        progress = _ProgressProvider(provider, cfg.training_rows, lambda: self.trainer.n_training_samples,
                                     self.store.counters, enabled=cfg.verbose, status=monitor.postfix,
                                     health=self._health_value)  # fmt: skip
        if checkpoint is not None:
            progress.non_finite_rows = int(state.get("non_finite_rows", 0))
        self.progress = progress
        self.trainer.data_provider = progress

        if cfg.logger.log_to_wandb:
            import wandb

            wandb.init(project=cfg.logger.wandb_project, entity=cfg.logger.wandb_entity, name=cfg.logger.run_name,
                       id=cfg.logger.wandb_id, config=cfg.to_dict())  # fmt: skip
        interrupted = False
        train_started = time.perf_counter()
        if checkpoint is None:
            self._fit_input_statistics(saes, progress)
        resumed_rows = self.trainer.n_training_samples
        try:
            with self._signals_stop_training(), _quiet_saelens_bars():
                self.trainer.fit()
        except TrainingInterrupted:
            interrupted = True
        except NonFiniteTrainingError:  # from the batch check or a checkpoint: the message names the hook(s)
            raise self._non_finite_error(self._unhealthy_hooks() or list(self.hooks)) from None
        finally:
            progress.close(final=self.trainer.n_training_samples)
            monitor.close()
            self.store.close()
            with contextlib.suppress(OSError):
                self.staging.rmdir()  # only when empty
        train_seconds = time.perf_counter() - train_started
        unhealthy = self._unhealthy_hooks()  # the last step is checked here (the others at the next batch)
        if unhealthy:
            raise self._non_finite_error(unhealthy)
        counters = {**self.store.counters, "non_finite_rows": progress.non_finite_rows}

        if interrupted:
            if self.trainer.n_training_samples > 0:
                self.trainer.save_checkpoint(checkpoint_name=str(self.trainer.n_training_samples))
                with contextlib.suppress(OSError):
                    self.staging.rmdir()
            self.say(f"stopped at {self.trainer.n_training_samples:,} rows; checkpoint: {self.last_checkpoint}")
            return TrainingResult(saes, self.output_path, {}, {}, self.trainer.n_training_samples,
                                  time.perf_counter() - started, interrupted=True, checkpoint=self.last_checkpoint,
                                  counters=counters, weights=self.weights, metrics_log=monitor.path)  # fmt: skip

        metrics: dict[str, dict[str, Any]] = {}
        if evaluator is None:
            eval_source = "training stream (not held out)"
            eval_rows = self._stream_rows(train_images, position=self.store.state_dict())
            evaluator = VisionSAEEvaluator(eval_rows, eval_source)
        for hook, sae in saes.items():
            metrics[hook] = {**evaluator.metrics(sae, hook), "source": eval_source}
            if matryoshka_levels(sae):  # the same rows at each k of the levels (and ReLU)
                at_k = lambda kw, s=sae, h=hook: evaluator.metrics(s, h, encode_kwargs=kw)  # noqa: E731
                metrics[hook]["per_k"] = per_k_metrics(sae, at_k)
        for hook, sub in self._sub_trainers().items():
            if sub.n_frac_active_samples:
                from sae_vision_ext.evals.reconstruction import dead_latents

                dead = dead_latents(sub.act_freq_scores.detach().cpu(), int(sub.n_frac_active_samples))
                metrics[hook]["dead_fraction_train"] = float(dead.double().mean())
                metrics[hook]["dead_window_rows"] = int(sub.n_frac_active_samples)
        sparsities = self._sparsities()
        sae_paths = self._write_outputs(saes, sparsities, metrics)
        plots = monitor.write_plots(metrics)
        if cfg.logger.log_to_wandb:
            import wandb

            final = {f"final/{h}/{k}": v for h, m in metrics.items() for k, v in m.items()
                     if k not in ("source", "per_k")}  # fmt: skip
            for h, m in metrics.items():
                for r in m.get("per_k", ()):
                    final.update({f"final/{h}/{key}_k{r['k']}": r[key] for key in ("fvu", "cosine", "l0")})
            wandb.log(final)
            wandb.finish()
        trained = self.trainer.n_training_samples - resumed_rows
        return TrainingResult(saes, self.output_path, sae_paths, metrics, self.trainer.n_training_samples,
                              train_seconds, counters=counters, weights=self.weights, eval_source=eval_source,
                              checkpoint=self.last_checkpoint, metrics_log=monitor.path, plots=plots,
                              rows_this_run=trained)  # fmt: skip

    def _watch_health(self) -> None:
        """Wrap each trainer's ``step``: count the rows its batch lost as non-finite in the run's rows (so the
        schedule, checkpoints and resume stay those of the stream), and keep the step's loss + the sum of the SAE's
        weights as a device scalar (non-finite when any of them is), read at the next batch: no extra sync."""
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

    def _fit_input_statistics(self, saes: dict[str, Any], provider: Any) -> None:
        """Architectures that standardise their input (MSAE ``standardize_input``) estimate mean and scale first.

        Uses ``n_batches_for_norm_estimate`` batches of the stream (they count in the data position, like SAELens's
        own norm estimate); the statistics are SAE buffers, so checkpoints carry them.
        """
        needing = [h for h, sae in saes.items() if getattr(sae, "input_standardization_is_set", True) is False]
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



# ----------------------------------------------------------------------------------------------- caching


def cache_activations(
    cfg: VisionSAERunnerConfig,
    path: str | os.PathLike,
    n_images: int,
    images: Any = None,
    model: Any = None,
    preprocess: Any = None,
    overwrite: bool = False,
    say=None,
    progress: bool = True,
    allow_repeat: bool = False,
    weights: dict[str, Any] | None = None,
):
    """Write the activations of ``n_images`` image positions (views) at ``cfg``'s hooks to an on-disk cache.

    Settings come from ``cfg`` (model, hooks, token selection, dataset, augmentation, seed, ``images_per_shard``,
    ``cache_dtype``); ``weights`` is the ``weights_record`` of a ``model`` passed in (else it is loaded from
    ``cfg`` and recorded). Running it again after an interruption reuses the finished shards. Returns
    :class:`~sae_vision_ext.activations.cache.CachedActivations`.

    More positions than the dataset holds images cycle through it: with ``augment="none"`` that caches the same
    views again and is refused unless ``allow_repeat``; either way the number of passes is said.
    """
    from tqdm.auto import tqdm

    from sae_vision_ext.activations.cache import (
        ActivationCacheWriter,
        cache_metadata,
        check_replaceable,
        nothing_readable_error,
    )

    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    runner = VisionSAETrainingRunner(cfg, images=images, model=model, preprocess=preprocess, say=say, weights=weights)
    check_writable(Path(path).parent, "cache folder")
    if Path(path).exists() or Path(path).is_symlink():  # refuse a folder that is not ours before any work
        check_replaceable(Path(path), overwrite=True)  # our complete cache: compared with this one below
    train_images, _ = runner._collections()
    n_dataset = len(train_images)
    passes = f"{n_images / n_dataset:.1f} passes over the same images"
    if n_images > n_dataset and cfg.augment == "none" and not allow_repeat:
        raise ValueError(
            f"cache_activations asks for {n_images:,} image positions but the dataset holds {n_dataset:,} images: "
            f"that is {passes}; pass allow_repeat (--allow-repeat) to cache repeated views, augment='crop_flip' "
            f"(--augment crop_flip) for new random views, or ask for at most {n_dataset:,}"
        )
    if runner.model is None:
        runner.model, runner.preprocess, runner.weights = load_model_for(cfg)
    elif runner.preprocess is None:
        runner.preprocess = runner.model.preprocess
    source = runner._image_source(train_images, seed=cfg.seed, augment=cfg.augment)
    model_ = runner.model
    layout = model_.token_layout
    settings = {
        "model_name": cfg.model_name,
        "weights": runner.weights,
        "img_size": cfg.img_size,
        "hook_names": source.hook_names,
        "token_selection": cfg.token_selection,
        "dataset_path": cfg.dataset_path if images is None else getattr(train_images, "name", "in-memory"),
        "dataset_split": cfg.dataset_split,
        "image_column": cfg.image_column,
        "n_dataset_images": source.n_images,
        "augment": cfg.augment,
        "crop_scale": list(cfg.crop_scale),
        "shuffle_images": cfg.shuffle_images,
        "eval_holdout_images": cfg.eval_holdout_images,
    }
    metadata = {
        **settings,
        "modality": "vision",
        "image_size": list(model_.cfg.image_size),
        "token_layout": {"n_cls": layout.n_cls, "n_registers": layout.n_registers,
                         "grid_size": list(layout.grid_size), "n_patches": layout.n_patches,
                         "n_prefix": layout.n_prefix},  # fmt: skip
    }
    m = max(cfg.model_batch_size, cfg.images_per_shard // cfg.model_batch_size * cfg.model_batch_size)
    writer = ActivationCacheWriter(path, n_images, m, settings, metadata=metadata, dtype=cfg.cache_dtype,
                                   seed=cfg.seed, overwrite=overwrite)  # fmt: skip
    if (Path(path) / "state.json").exists() and not overwrite:  # the same command again on a finished cache
        stored = json.loads(json.dumps(cache_metadata(path), default=str))
        wanted = json.loads(json.dumps({**writer.settings, "n_images": n_images}, default=str))
        differs = sorted(key for key, value in wanted.items() if stored.get(key) != value)
        if differs:
            raise FileExistsError(f"{path} already holds a complete cache made with other settings (differs in: "
                                  f"{', '.join(differs)}); pass overwrite (--overwrite) to replace it, or choose "
                                  "another output folder")  # fmt: skip
        say(f"{path} already holds this cache, complete (same settings): nothing to do")
        return CachedActivations(path)
    from sae_vision_ext.training.distributed import current_context

    context = current_context()
    if m != cfg.images_per_shard and context.is_main:
        say(f"images per shard: {m:,} instead of {cfg.images_per_shard:,} (--shard-images): a shard holds "
            f"whole model batches of {cfg.model_batch_size:,} (--model-batch-size)")  # fmt: skip
    if n_images > n_dataset and context.is_main:
        views = "the same views (allow_repeat)" if cfg.augment == "none" else f"new random views ({cfg.augment})"
        say(f"caching {n_images:,} image positions from {n_dataset:,} images: {passes}, {views}")
    if context.is_distributed:  # torchrun: rank 0 lists the missing shards, each rank writes its share
        from sae_vision_ext.activations.distributed_cache import claim_shards

        todo = claim_shards(writer, context)
        if not context.is_main:
            say, progress = (lambda msg: None), False
        bar = tqdm(total=sum(writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in todo), unit="img",
                   desc=f"caching activations (rank 0 of {context.world_size})", disable=not progress,
                   dynamic_ncols=True)  # fmt: skip
    else:
        todo = writer.prepare()
        done = writer.n_shards - len(todo)
        if done:
            say(f"resuming the cache in {writer.work}: {done} of {writer.n_shards} shards already written")
        bar = tqdm(total=n_images, unit="img", desc="caching activations", disable=not progress, dynamic_ncols=True)
        bar.update(sum(writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in range(writer.n_shards) if i not in todo))
    runs: list[list[int]] = []
    for index in todo:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    from sae_lens.training.prefetch import PrefetchingIterator

    try:
        for run in runs:
            start, end = writer.shard_range(run[0])[0], writer.shard_range(run[-1])[1]
            chunks = PrefetchingIterator(source.iter_chunks(start, end, boundary=m), prefetch=max(1, cfg.prefetch_batches))
            try:
                pending: dict[str, list[torch.Tensor]] = {h: [] for h in source.hook_names}
                ok = failed = 0
                for chunk in chunks:
                    for h in source.hook_names:
                        pending[h].append(chunk.rows[h])
                    ok, failed = ok + chunk.n_images_ok, failed + chunk.n_images_failed
                    bar.update(chunk.end - chunk.start)
                    bar.set_postfix(skipped=source.n_failed, refresh=False)
                    index = chunk.start // m
                    if chunk.end == writer.shard_range(index)[1]:
                        rows = {h: torch.cat(p) for h, p in pending.items()}
                        writer.write_shard(index, rows, source.tokens_per_image,
                                           {"n_images_ok": ok, "n_images_failed": failed})  # fmt: skip
                        pending = {h: [] for h in source.hook_names}
                        ok = failed = 0
            finally:
                chunks.close()
    except RuntimeError:  # the source gives up when none of the first images can be read
        if source.n_ok or not source.n_failed or not writer.discard_if_empty():
            raise
        error = nothing_readable_error(settings["dataset_path"], source.n_failed, n_dataset, source.failures)
        raise error from None
    finally:
        bar.close()
    if not context.is_distributed and not source.n_ok and source.n_failed and writer.discard_if_empty():
        raise nothing_readable_error(settings["dataset_path"], source.n_failed, n_dataset, source.failures)
    if context.is_distributed:
        from sae_vision_ext.activations.distributed_cache import commit_distributed

        cache = commit_distributed(writer, context)
    else:
        cache = writer.commit()
    meta = cache.metadata
    say(f"cache written: {cache.path} ({meta['n_rows']:,} rows of {meta['hook_widths']}, "
        f"{meta['n_images_ok']:,} images read, {meta['n_images_failed']:,} skipped)")  # fmt: skip
    return cache
