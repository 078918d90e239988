"""``VisionSAERunnerConfig``: everything a vision SAE training run needs, in SAELens's style.

The ``sae`` field takes any registered training architecture config (SAELens's built-ins and the plugin's), e.g.
``MatryoshkaTopKTrainingSAEConfig`` or ``TopKTrainingSAEConfig``. The other defaults are the MSAE paper's setting
(Zaigrajew et al. 2025): CLIP ViT-L/14's projected image embedding, batch 4096, lr 1e-4, constant learning rate
then linear decay to zero over the last 20% of steps, one pass over CC3M's 2,905,936 images. Small runs override
them (see ``sae_vision_ext.quickstart``).

Config files are YAML or JSON with the same field names; ``sae`` is a mapping with an ``architecture`` key plus that
architecture's fields. ``apply_overrides`` takes ``key=value`` strings (``sae.d_sae=4096``, ``lr=3e-4``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sae_vision_ext.activations.images import AUGMENTATIONS
from sae_vision_ext.activations.source import ALL_SELECTIONS, resolve_hooks

# CC3M train images: the MSAE paper's training set (the count appears in the released checkpoints' names)
CC3M_TRAIN_IMAGES = 2_905_936
RUNNER_CFG_FILENAME = "runner_cfg.json"


def _logging_config(**kwargs: Any):
    from sae_lens.config import LoggingConfig

    kwargs.setdefault("log_to_wandb", False)
    return LoggingConfig(**kwargs)


@dataclass
class VisionSAERunnerConfig:
    """Configuration for training SAEs on a vision model's activations.

    Model: ``model_name`` is a ``load_vision_model`` spec (``timm:<name>`` or ``open_clip:<arch>/<tag>``);
    ``pretrained=None`` uses pretrained weights when they are available locally (a path in ``model_weights`` or
    the local Hugging Face / open_clip cache) and otherwise initialises at random and says so.

    Hooks and tokens: ``hook_name`` is one hook or a list (one SAE per hook, all from one forward pass, trained
    with SAELens's ``MultiSAETrainer``). ``token_selection``: ``cls`` | ``registers`` | ``prefix`` | ``patches`` |
    ``all`` (rows are tokens of a ``[B, T, d]`` hook), or ``pooled`` / ``embed`` (one row per image from
    ``hook_pooled`` / ``hook_image_embed``).

    Data: ``dataset_path`` is a hub dataset name, a ``save_to_disk`` folder or an image folder (or pass images to
    the runner directly). ``augment="crop_flip"`` draws random resized crops and flips, seeded per image position.
    ``use_cached_activations`` trains from ``cached_activations_path`` (written by ``sae-vision cache``) without
    the model. ``buffer_size_rows`` / ``activations_mixing_fraction`` configure SAELens's mixing buffer;
    ``images_per_segment`` the stretch of stream that a resume may replay (None: about 4 buffers).

    Training (SAELens names, rows instead of tokens): ``training_rows``, ``train_batch_size_rows``, ``lr`` and
    schedule; ``lr_decay_steps=None`` decays over the last ``lr_decay_fraction`` of the steps.

    Evaluation: held-out images (``eval_dataset_path``, or ``eval_holdout_images`` images taken out of the training
    dataset), ``n_eval_images`` views of them; FVU, cosine, L0 and dead latents are computed at the end and, when
    wandb is on, during training.

    Checkpoints: ``n_checkpoints`` evenly spaced, in ``checkpoint_path`` (default ``<output_path>/checkpoints``);
    ``resume_from_checkpoint`` is a checkpoint folder or ``"latest"``.
    """

    sae: Any  # a TrainingSAEConfig, or its dict; None only for caching activations

    # model
    model_name: str = "open_clip:ViT-L-14/openai"
    pretrained: bool | None = None
    model_weights: str | None = None
    img_size: int | None = None
    model_device: str | None = None
    autocast_model: bool = False

    # hooks and tokens
    hook_name: str | list[str] = "hook_image_embed"
    token_selection: str = "embed"

    # images
    dataset_path: str = ""
    dataset_split: str = "train"
    image_column: str | None = None
    augment: str = "none"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    shuffle_images: bool = True
    model_batch_size: int = 64
    num_workers: int = 4
    prefetch_batches: int = 2

    # mixing buffer
    buffer_size_rows: int = 65536
    activations_mixing_fraction: float = 0.5
    images_per_segment: int | None = None

    # on-disk cache
    use_cached_activations: bool = False
    cached_activations_path: str | None = None
    cache_dtype: str = "float32"
    images_per_shard: int = 4096

    # evaluation on held-out images
    eval_dataset_path: str | None = None
    eval_dataset_split: str = "validation"
    eval_holdout_images: int = 0
    n_eval_images: int = 512
    eval_augment: str | None = None

    # training
    training_rows: int = CC3M_TRAIN_IMAGES
    train_batch_size_rows: int = 4096
    lr: float = 1e-4
    lr_end: float | None = None
    lr_scheduler_name: str = "constant"
    lr_warm_up_steps: int = 0
    lr_decay_steps: int | None = None
    lr_decay_fraction: float = 0.2
    n_restart_cycles: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    dead_feature_window: int = 1000
    feature_sampling_window: int = 2000
    n_batches_for_norm_estimate: int = 100
    autocast: bool = False

    # outputs, checkpoints
    output_path: str = "runs/vision_sae"
    checkpoint_path: str | None = None
    n_checkpoints: int = 0
    save_final_checkpoint: bool = False
    resume_from_checkpoint: str | None = None

    # misc
    seed: int = 42
    device: str = "cpu"
    dtype: str = "float32"
    logger: Any = field(default_factory=_logging_config)
    verbose: bool = True

    def __post_init__(self):
        if isinstance(self.sae, dict):
            self.sae = sae_config_from_dict(self.sae)
        if isinstance(self.logger, dict):
            self.logger = _logging_config(**self.logger)
        if isinstance(self.hook_name, tuple):
            self.hook_name = list(self.hook_name)
        if isinstance(self.hook_name, list) and len(self.hook_name) == 1:
            self.hook_name = self.hook_name[0]
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if self.token_selection not in ALL_SELECTIONS:
            raise ValueError(f"token_selection must be one of {', '.join(ALL_SELECTIONS)}; got {self.token_selection!r}")
        resolve_hooks(self.hook_name, self.token_selection)
        for name, value in (("augment", self.augment), ("eval_augment", self.eval_augment or "none")):
            if value not in AUGMENTATIONS:
                raise ValueError(f"{name} must be one of {AUGMENTATIONS}, got {value!r}")
        if self.use_cached_activations and not self.cached_activations_path:
            raise ValueError("use_cached_activations needs cached_activations_path (write one with `sae-vision cache`)")
        if self.train_batch_size_rows <= 0 or self.training_rows < self.train_batch_size_rows:
            raise ValueError(
                f"training_rows ({self.training_rows}) must be at least one batch ({self.train_batch_size_rows})"
            )
        if not 0.0 <= self.activations_mixing_fraction <= 1.0:
            raise ValueError("activations_mixing_fraction must be in [0, 1]")
        if self.lr_end is None:
            self.lr_end = self.lr / 10
        if self.checkpoint_path is None:
            self.checkpoint_path = str(Path(self.output_path) / "checkpoints")

    # ------------------------------------------------------------------ derived
    @property
    def hook_names(self) -> list[str]:
        return resolve_hooks(self.hook_name, self.token_selection)

    @property
    def total_training_steps(self) -> int:
        return self.training_rows // self.train_batch_size_rows

    @property
    def resolved_lr_decay_steps(self) -> int:
        if self.lr_decay_steps is not None:
            return int(self.lr_decay_steps)
        return int(self.total_training_steps * self.lr_decay_fraction)

    def to_sae_trainer_config(self, checkpoint_path: str | None = None):
        """SAELens ``SAETrainerConfig`` (``checkpoint_path`` overrides where SAELens writes checkpoints)."""
        from sae_lens.config import SAETrainerConfig

        return SAETrainerConfig(
            total_training_samples=self.training_rows,
            train_batch_size_samples=self.train_batch_size_rows,
            lr=self.lr,
            lr_end=self.lr_end,
            lr_scheduler_name=self.lr_scheduler_name,
            lr_warm_up_steps=self.lr_warm_up_steps,
            lr_decay_steps=self.resolved_lr_decay_steps,
            n_restart_cycles=self.n_restart_cycles,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            device=self.device,
            autocast=self.autocast,
            dead_feature_window=self.dead_feature_window,
            feature_sampling_window=self.feature_sampling_window,
            n_checkpoints=self.n_checkpoints,
            checkpoint_path=checkpoint_path if checkpoint_path is not None else self.checkpoint_path,
            save_final_checkpoint=self.save_final_checkpoint,
            logger=self.logger,
            n_batches_for_norm_estimate=self.n_batches_for_norm_estimate,
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sae"] = self.sae.to_dict() if self.sae is not None else None
        out["logger"] = asdict(self.logger)
        out["crop_scale"] = list(self.crop_scale)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionSAERunnerConfig:
        data = dict(data)
        if "sae" not in data:
            raise ValueError("the config needs an 'sae' section with an 'architecture' and its fields "
                             "(sae: null for a cache-only config)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> VisionSAERunnerConfig:
        return cls.from_dict(apply_overrides(load_config_file(path), overrides or []))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))


def sae_config_from_dict(data: dict[str, Any]):
    """Any registered training architecture's config from ``{"architecture": name, ...fields}``."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.saes.sae import TrainingSAEConfig

    import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)

    if "architecture" not in data:
        raise ValueError("the sae section needs an 'architecture' (e.g. matryoshka_topk, topk, standard)")
    if data["architecture"] not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"unknown SAE architecture {data['architecture']!r}; registered: {sorted(SAE_TRAINING_CLASS_REGISTRY)}"
        )
    cfg_cls = SAE_TRAINING_CLASS_REGISTRY[data["architecture"]][1]
    valid = {f.name for f in fields(cfg_cls)} | {"architecture", "metadata"}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for SAE architecture {data['architecture']!r}")
    return TrainingSAEConfig.from_dict(dict(data))


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A config mapping from a ``.yaml`` / ``.yml`` / ``.json`` file."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config fields")
    return data


def parse_value(text: str) -> Any:
    """``'3e-4' -> 0.0003``, ``'[1, 2]' -> [1, 2]``, ``'none' -> None``; anything else stays a string."""
    import yaml

    if text.strip().lower() in ("none", "null"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides; dotted keys reach into sections (``sae.d_sae=4096``)."""
    data = json.loads(json.dumps(data, default=str))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        target = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = parse_value(value)
    return data
