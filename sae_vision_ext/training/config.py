"""``VisionSAERunnerConfig``: everything a vision SAE training run needs, in SAELens's style.

The ``sae`` field takes any registered training architecture config (SAELens's built-ins and the plugin's),
e.g. ``MatryoshkaTopKTrainingSAEConfig`` or ``TopKTrainingSAEConfig``. The other defaults are the MSAE paper's
setting (Zaigrajew et al. 2025): CLIP ViT-L/14's projected image embedding, batch 4096, lr 1e-4, constant
learning rate then linear decay to zero over the last 20% of steps, one pass over CC3M's 2,905,936 images.
Small runs override them (see ``sae_vision_ext.quickstart``).

Config files are YAML or JSON with the same field names; ``sae`` is a mapping with an ``architecture`` key
plus that architecture's fields. ``apply_overrides`` takes ``key=value`` strings (``sae.d_sae=4096``,
``lr=3e-4``).
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from simple_parsing.helpers import field as _simple_parsing_field

from sae_vision_ext.activations.options import ALL_SELECTIONS, AUGMENTATIONS, resolve_hooks

# CC3M train images: the MSAE paper's training set (the count appears in the released checkpoints' names)
CC3M_TRAIN_IMAGES = 2_905_936


def option(default: Any, *aliases: str, help: str = "", cmd: bool = True, **argparse_kwargs: Any) -> Any:
    """A config field that is also a command-line flag (``--field-name``, plus ``aliases``), via
    simple_parsing."""
    if isinstance(default, (list, dict)):
        argparse_kwargs["default_factory"] = lambda: type(default)(default)
    else:
        argparse_kwargs["default"] = default
    return _simple_parsing_field(alias=list(aliases) or None, help=help, cmd=cmd, **argparse_kwargs)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; any other device as given."""
    if device != "auto":
        return device
    # heavy: torch is imported when a config is built, so `sae-vision <command> --help` stays instant
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _logging_config(**kwargs: Any):
    # heavy: SAELens is imported when a config is built, so `sae-vision <command> --help` stays instant
    from sae_lens.config import LoggingConfig

    kwargs.setdefault("log_to_wandb", False)
    return LoggingConfig(**kwargs)


@dataclass
class VisionSAERunnerConfig:
    """Configuration for training SAEs on a vision model's activations (each field is also a flag).

    Model: a load_vision_model spec, with its pretrained weights (downloaded when needed), a local weights
    file, or (pretrained=False) a random init drawn from the seed. Hooks: one or several (one SAE per hook,
    one forward pass). Tokens: cls | registers | prefix | patches | all rows of a token hook, or pooled /
    embed (one row per image). Data: a hub dataset, a save_to_disk folder or an image folder, or a cache
    written by sae-vision cache. Training and schedule use SAELens's names, counted in rows. Held-out metrics
    at the end come from eval_dataset_path or eval_holdout_images training images. Defaults: the MSAE paper's
    setting.
    """

    sae: Any = option(None, cmd=False)  # a TrainingSAEConfig or its dict; None only for caching activations

    # model
    model_name: str = option(
        "open_clip:ViT-L-14/openai",
        "--model",
        help="load_vision_model spec: timm:<name>[.<tag>] or open_clip:<arch>/<tag>",
    )
    pretrained: bool = option(
        True, help="pretrained weights (downloaded if needed); --random-init for random ones"
    )
    model_weights: str | None = option(
        None, "--weights", help="local weights file for the model (wins over the hub)"
    )
    img_size: int | None = option(None, help="input resolution (position embeddings resampled)")
    model_device: str | None = option(None, help="device of the vision model (default: --device)")
    autocast_model: bool = option(False, help="run the vision model under autocast")

    # hooks and tokens
    hook_name: str | list[str] = option(
        "hook_image_embed",
        "--hook",
        nargs="+",
        required=False,
        help="hook name(s): one SAE per hook, all from one forward pass",
    )
    token_selection: str = option(
        "embed", "--tokens", choices=ALL_SELECTIONS, help="which tokens become rows"
    )

    # images
    dataset_path: str = option(
        "",
        "--dataset",
        help="hub dataset name, save_to_disk folder, image folder, or a "
        "stream read in order: tar shards ('s-{000..009}.tar', a folder of .tar) or "
        "hf-stream:NAME[:SPLIT]",
    )
    dataset_split: str = option("train", "--split", help="dataset split")
    image_column: str | None = option(None, help="image column of a HF dataset (default: detected)")
    augment: str = option(
        "none", choices=AUGMENTATIONS, help="crop_flip: a new random view per image position"
    )
    crop_scale: tuple[float, float] = option((0.35, 1.0), help="area range of the random resized crops")
    shuffle_images: bool = option(True, help="visit the images in a seeded random order")
    model_batch_size: int = option(64, help="images per forward pass")
    num_workers: int = option(4, "--workers", help="DataLoader worker processes decoding images")
    prefetch_batches: int = option(2, help="forward passes the model may run ahead of training")
    allow_repeat: bool = option(
        False, help="allow more image positions than the dataset holds without augmentation"
    )

    # mixing buffer
    buffer_size_rows: int = option(65536, help="SAELens mixing buffer (rows)")
    activations_mixing_fraction: float = option(0.5, help="fraction of the buffer kept for mixing")
    images_per_segment: int | None = option(
        None, help="stream stretch a resume may replay (default ~4 buffers)"
    )

    # on-disk cache
    use_cached_activations: bool = option(False, cmd=False)
    cached_activations_path: str | None = option(None, "--cache", help="train from this activation cache")
    cache_dtype: str = option("float32", choices=("float32", "float16"), help="dtype of cached rows")
    images_per_shard: int = option(4096, "--shard-images", help="images per cache shard")

    # evaluation on held-out images
    eval_dataset_path: str | None = option(
        None, "--eval-dataset", help="held-out images (or cache) for the metrics"
    )
    eval_dataset_split: str = option("validation", "--eval-split", help="split of --eval-dataset")
    eval_holdout_images: int = option(
        0, "--holdout", help="hold out this many training images for the metrics"
    )
    n_eval_images: int = option(512, help="held-out views evaluated at the end")
    eval_augment: str | None = option(None, help="augmentation of the held-out views (default: --augment)")

    # training
    training_rows: int = option(CC3M_TRAIN_IMAGES, "--rows", help="training rows (activation vectors)")
    train_batch_size_rows: int = option(4096, "--batch-size", help="rows per training step")
    lr: float = option(1e-4, help="learning rate")
    lr_end: float | None = option(None, help="final learning rate of the decay (default lr / 10)")
    lr_scheduler_name: str = option("constant", help="SAELens lr scheduler")
    lr_warm_up_steps: int = option(0, help="warm-up steps")
    lr_decay_steps: int | None = option(
        None, help="decay steps (default: the last --lr-decay-fraction of steps)"
    )
    lr_decay_fraction: float = option(0.2, help="fraction of steps of the final linear decay")
    n_restart_cycles: int = option(1, help="SAELens lr restart cycles")
    adam_beta1: float = option(0.9, help="Adam beta1")
    adam_beta2: float = option(0.999, help="Adam beta2")
    dead_feature_window: int = option(1000, help="steps without firing before a latent counts as dead")
    feature_sampling_window: int = option(2000, help="steps between SAELens feature-sparsity logs")
    n_batches_for_norm_estimate: int = option(100, help="batches for input statistics / norm estimates")
    autocast: bool = option(False, help="train the SAE under autocast")

    # outputs, checkpoints
    output_path: str = option("runs/vision_sae", "--output", help="output folder (a SAELens SAE folder)")
    checkpoint_path: str | None = option(None, help="checkpoint folder (default <output>/checkpoints)")
    n_checkpoints: int = option(0, "--checkpoints", help="evenly spaced checkpoints")
    save_final_checkpoint: bool = option(False, help="also write a checkpoint at the end")
    resume_from_checkpoint: str | None = option(
        None,
        "--resume",
        nargs="?",
        const="latest",
        help="continue from the latest checkpoint (or this folder)",
    )

    # misc
    seed: int = option(42, help="seed of the SAE init, data order, augmentation and random model weights")
    device: str = option("auto", help="auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:1, mps")
    dtype: str = option("float32", help="SAE dtype")
    logger: Any = option(None, cmd=False)
    verbose: bool = option(True, cmd=False)

    def __post_init__(self):
        check_field_types(self)
        self.device = resolve_device(self.device)
        if isinstance(self.sae, dict):
            self.sae = sae_config_from_dict(self.sae)
        if self.logger is None:
            self.logger = _logging_config()
        elif isinstance(self.logger, dict):
            self.logger = _logging_config(**self.logger)
        if isinstance(self.hook_name, tuple):
            self.hook_name = list(self.hook_name)
        if isinstance(self.hook_name, list) and len(self.hook_name) == 1:
            self.hook_name = self.hook_name[0]
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if self.token_selection not in ALL_SELECTIONS:
            raise ValueError(
                f"token_selection must be one of {', '.join(ALL_SELECTIONS)}; got {self.token_selection!r}"
            )
        resolve_hooks(self.hook_name, self.token_selection)
        for name, value in (("augment", self.augment), ("eval_augment", self.eval_augment or "none")):
            if value not in AUGMENTATIONS:
                raise ValueError(f"{name} must be one of {AUGMENTATIONS}, got {value!r}")
        if self.use_cached_activations and not self.cached_activations_path:
            raise ValueError(
                "use_cached_activations needs cached_activations_path (write one with `sae-vision cache`)"
            )
        if self.train_batch_size_rows <= 0 or self.training_rows < self.train_batch_size_rows:
            raise ValueError(
                f"training_rows ({self.training_rows}) must be at least one batch "
                f"({self.train_batch_size_rows})"
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
        # heavy: SAELens is imported when a config is built, so `sae-vision <command> --help` stays instant
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
            raise ValueError(
                "the config needs an 'sae' section with an 'architecture' and its fields "
                "(sae: null for a cache-only config)"
            )
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


_SIMPLE_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def check_field_types(config: Any) -> None:
    """Fields typed int / float / str / bool (or ``| None``) must hold such a value: a config file's
    ``training_rows: 300.7`` or ``lr: fast`` is an error naming the field, not a surprise later. YAML 1.1
    reads ``1e-4`` as a string; float fields accept it."""
    for f in fields(config):
        parts = _type_names(f.type)
        value = getattr(config, f.name)
        simple = [part for part in parts if part in _SIMPLE_TYPES]
        if (
            not simple
            or len(simple) != len([p for p in parts if p != "None"])
            or (value is None and "None" in parts)
        ):
            continue  # a type this check does not cover, or an allowed None
        if "float" in simple and isinstance(value, str):
            try:
                value = float(value)
                setattr(config, f.name, value)
            except ValueError:
                pass
        if not any(_fits(value, _SIMPLE_TYPES[part]) for part in simple):
            raise ValueError(
                f"config field {f.name} must be {' or '.join(simple)}"
                f"{' or null' if 'None' in parts else ''}, got {value!r}"
            )


def _type_names(annotation: Any) -> list[str]:
    """``"int | None"`` or ``int | None`` (simple_parsing resolves the annotations in place) -> ``["int",
    "None"]``."""
    if isinstance(annotation, str):
        return [part.strip() for part in annotation.split("|")]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    return ["None" if m is type(None) else getattr(m, "__name__", str(m)) for m in members]


def _fits(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def sae_config_from_dict(data: dict[str, Any]):
    """Any registered training architecture's config from ``{"architecture": name, ...fields}``."""
    # heavy: SAELens is imported when a config is built, so `sae-vision <command> --help` stays instant
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.saes.sae import TrainingSAEConfig

    from sae_vision_ext.saes import register_architectures

    register_architectures()
    if "architecture" not in data:
        raise ValueError("the sae section needs an 'architecture' (e.g. matryoshka_topk, topk, standard)")
    if data["architecture"] not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"unknown SAE architecture {data['architecture']!r}; registered: "
            f"{sorted(SAE_TRAINING_CLASS_REGISTRY)}"
        )
    cfg_cls = SAE_TRAINING_CLASS_REGISTRY[data["architecture"]][1]
    valid = {f.name for f in fields(cfg_cls)} | {"architecture", "metadata"}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for SAE architecture {data['architecture']!r}")
    return TrainingSAEConfig.from_dict(dict(data))


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A config mapping from a ``.yaml`` / ``.yml`` / ``.json`` file; a file that is not one raises
    ValueError."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not valid {'YAML' if str(path).endswith(('.yaml', '.yml')) else 'JSON'}: "
            f"{str(err).splitlines()[0]}"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config fields")
    return data


def parse_value(text: str) -> Any:
    """``'3e-4' -> 0.0003``, ``'[1, 2]' -> [1, 2]``, ``'none' -> None``; anything else stays a string."""
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
