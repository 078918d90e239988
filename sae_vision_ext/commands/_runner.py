"""Flags -> ``VisionSAERunnerConfig`` for the commands that run the runner (``train``, ``cache``).

The config's fields are the flags (one vocabulary with every other command); ``--config FILE`` gives the
defaults, flags override it. Training from a cache takes the hook, token selection, model identity and width
from the cache itself; a flag that contradicts the cache is an error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import simple_parsing

from sae_vision_ext.commands._common import (
    CONFIG_DEST,
    UserError,
    add_config,
    config_file_defaults,
    flag_value,
    given_fields,
    new_parser,
    refuse_hidden,
    sae_section,
    say,
)
from sae_vision_ext.training.config import VisionSAERunnerConfig, option

OPTIONS_DEST = "options"


@dataclass
class RunOptions:
    """How the command reads its config and reports."""

    config: str | None = option(None, help="YAML / JSON file of the config's fields (flags override it)")
    random_init: bool = option(
        False, help="random model weights drawn from --seed (a deliberate random model)"
    )
    wandb: bool = option(
        False, help="log to Weights & Biases (off by default; metrics.jsonl is always written)"
    )
    quiet: bool = option(False, help="no progress bars")


@dataclass
class SAEOptions:
    """The SAE to train: any registered SAELens training architecture and its fields."""

    architecture: str = option(
        "matryoshka_topk",
        help="registered training architecture: matryoshka_topk, ra_sae, "
        "a_sae, archetypal_matryoshka_topk, or SAELens's (topk, standard, ...)",
    )
    sae: list[str] = option(
        [],
        nargs="+",
        action="extend",
        required=False,
        metavar="KEY=VALUE",
        help="SAE config fields, e.g. --sae k=32 level_weighting=reverse (values read as YAML)",
    )
    expansion: int | None = option(None, help="d_sae = expansion x d_in (default 8; or --sae d_sae=N)")


def runner_parser(
    argv: Sequence[str], prog: str, description: str, epilog: str, hide: Sequence[str], with_sae: bool
) -> tuple[simple_parsing.ArgumentParser, dict[str, Any]]:
    """The parser (its defaults from ``--config``) and the config file's mapping."""
    file = config_file_defaults(argv)
    parser = new_parser(prog, description, epilog, hidden=hide)
    parser.add_arguments(RunOptions, dest=OPTIONS_DEST)
    if with_sae:
        sae_file = file.get("sae") or {}
        defaults = SAEOptions(architecture=sae_file.get("architecture", "matryoshka_topk"))
        parser.add_arguments(SAEOptions, dest="sae_options", default=defaults)
    fields = {k: v for k, v in file.items() if k not in ("sae", "logger")}
    cache = flag_value(argv, "--cache", "--cached-activations-path") or fields.get("cached_activations_path")
    if (
        cache
    ):  # a cache knows its hook, tokens and model: they become the defaults (contradictions checked later)
        fields = {**settings_of_cache(cache), **fields}
    try:
        defaults = VisionSAERunnerConfig(sae=None, **fields) if fields else None
    except TypeError as err:
        raise UserError(f"config file: {err}") from err
    if defaults is not None:  # fields derived from others are derived again from the final values
        for derived in ("checkpoint_path", "lr_end"):
            setattr(defaults, derived, fields.get(derived))
    add_config(parser, VisionSAERunnerConfig, defaults=defaults)
    return parser, file


def runner_config_data(
    args: argparse.Namespace,
    argv: Sequence[str],
    parser: argparse.ArgumentParser,
    file: dict[str, Any],
    command: str,
    hide: Sequence[str],
) -> dict[str, Any]:
    """The config mapping: config file < flags; the ``sae`` section from the file, ``--architecture``,
    ``--sae``."""
    refuse_hidden(parser, argv, hide, command)
    options: RunOptions = getattr(args, OPTIONS_DEST)
    data = getattr(args, CONFIG_DEST).to_dict()
    data["use_cached_activations"] = bool(data.get("cached_activations_path"))
    data["logger"] = dict(file.get("logger") or {})
    if options.wandb:
        data["logger"]["log_to_wandb"] = True
    if options.random_init:
        if data.get("model_weights"):
            raise UserError("--random-init and --weights contradict each other; give one")
        data["pretrained"] = False
    data["verbose"] = not options.quiet
    explicit = {**{name: f"{name}: (--config)" for name in file}, **given_fields(parser, argv)}
    if data["use_cached_activations"]:
        _take_from_cache(data, explicit)
    sae_options = getattr(args, "sae_options", None)
    if sae_options is not None:
        data["sae"], data["_expansion"] = sae_section(
            sae_options.architecture, sae_options.sae, sae_options.expansion, base=file.get("sae")
        )
    return data


# the cache's metadata key for each config field it fixes
_FROM_CACHE = {
    "hook_name": "hook_names",
    "token_selection": "token_selection",
    "model_name": "model_name",
    "img_size": "img_size",
}


def settings_of_cache(path: str) -> dict[str, Any]:
    """The config fields a cache fixes, from its metadata."""
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.activations.rows import cache_metadata

    meta = cache_metadata(path)
    return {field: meta[key] for field, key in _FROM_CACHE.items() if meta.get(key) is not None}


def _take_from_cache(data: dict[str, Any], explicit: dict[str, str]) -> None:
    path = data["cached_activations_path"]
    for field, cached in settings_of_cache(path).items():
        if field not in explicit:
            data[field] = cached
            continue
        wanted = data[field]
        if field == "hook_name":
            missing = [h for h in ([wanted] if isinstance(wanted, str) else wanted) if h not in cached]
            if missing:
                raise UserError(
                    f"the cache {path} holds activations of {cached}, not of {missing}; drop --hook "
                    "to train on what the cache holds"
                )
        elif wanted != cached:
            flag = explicit[field]
            raise UserError(
                f"{flag} {wanted} contradicts the cache {path}, which was made with {field}={cached!r}; "
                f"drop {flag} (a cache knows its own settings)"
            )


def finish_config(data: dict[str, Any]) -> tuple[VisionSAERunnerConfig, Any, Any, dict | None]:
    """``(cfg, model, preprocess, weights_record)``: ``sae.d_in`` read off the cache or the hook's width (the
    model is loaded for that and handed on, not loaded twice), ``sae.d_sae = expansion x d_in`` unless
    given."""
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.activations.options import resolve_hooks
    from sae_vision_ext.activations.rows import CachedActivations
    from sae_vision_ext.training.data import load_model_for

    data = dict(data)
    expansion = data.pop("_expansion", 8)
    sae = dict(data.get("sae") or {})
    model = preprocess = weights = None
    if "d_in" not in sae:
        hooks = resolve_hooks(data.get("hook_name"), data.get("token_selection", "embed"))
        if data.get("use_cached_activations"):
            sae["d_in"] = CachedActivations(data["cached_activations_path"]).hook_widths[hooks[0]]
        else:
            probe = VisionSAERunnerConfig.from_dict({**data, "sae": None})
            model, preprocess, weights = load_model_for(probe)
            sae["d_in"] = int(model.hook_width(hooks[0]))
    sae.setdefault("d_sae", int(sae["d_in"]) * expansion)
    data["sae"] = sae
    return VisionSAERunnerConfig.from_dict(data), model, preprocess, weights


def describe_run(cfg: VisionSAERunnerConfig, weights: dict | None) -> str:
    """One line with every setting that decides what is trained (defaults included), printed at the start."""
    # heavy: imported when the command runs, so --help stays instant
    from sae_vision_ext.vision.load import describe_weights

    source = (
        f"cache {cfg.cached_activations_path}" if cfg.use_cached_activations else f"images {cfg.dataset_path}"
    )
    model = f"{cfg.model_name} ({describe_weights(weights)})" if weights else cfg.model_name
    sae = cfg.sae
    return (
        f"{model} | hook {cfg.hook_name} | tokens {cfg.token_selection} | {source}\n"
        f"  SAE {sae.architecture()} d_in={sae.d_in} d_sae={sae.d_sae} | {cfg.training_rows:,} rows, batch "
        f"{cfg.train_batch_size_rows}, lr {cfg.lr} | output {cfg.output_path}"
    )


__all__ = ["runner_parser", "runner_config_data", "finish_config", "describe_run", "say"]
