"""ViT-Prisma's released vision SAEs (``Prisma-Multimodal/*`` on the Hugging Face Hub) as SAELens SAEs.

Published layout, one Hub repo per SAE (facts and their sources: ``docs/notes/issue-18-prisma.md``):

- ``config.json``: ViT-Prisma's ``VisionModelSAERunnerConfig`` as JSON. Keys the converter reads:
  ``d_in``, ``expansion_factor`` (and, in the older files, ``d_sae = d_in * expansion_factor``),
  ``architecture`` (``standard`` | ``gated``), ``activation_fn_str`` (``relu`` | ``topk``; ``tanh-relu``
  exists in their code), ``activation_fn_kwargs`` (``{"k": 64}`` for TopK), ``normalize_activations``
  (``none`` | ``layer_norm`` | ``constant_norm_rescale``), ``hook_point_layer`` + ``layer_subtype`` (hook
  ``blocks.{layer}.{subtype}``, TransformerLens names), ``hook_point_head_index``, ``cls_token_only`` /
  ``use_patches_only`` (which tokens were training rows; neither: all tokens), ``model_name`` (e.g.
  ``open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K``), ``is_transcoder``, ``image_size``,
  ``context_size``, ``l1_coefficient``. Older files store ``device`` / ``dtype`` as
  ``{"__type__": ..., "value": ...}`` records.
- the weights, ``weights.pt`` or ``n_images_<N>.pt`` (the training checkpoint, e.g.
  ``n_images_2600058.pt``): either a plain state dict or ``{"cfg": VisionModelSAERunnerConfig,
  "state_dict": {...}}`` (their ``save_model``), a pickled dataclass that the restricted unpickler reads
  as an inert record (:func:`~sae_vision_ext.loading.safe_load.module_graph_globals`), never by importing
  ViT-Prisma. State dict: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_dec [d_in]``; a gated SAE adds ``b_gate``, ``r_mag``, ``b_mag`` ``[d_sae]`` (its ``b_enc`` is unused).

ViT-Prisma's forward pass (``StandardSparseAutoencoder`` / ``GatedSparseAutoencoder``), with N the run-time
input normalisation chosen by ``normalize_activations``::

    u = N(x) - b_dec
    z = ReLU(u W_enc + b_enc)                                  standard, relu
      = TopK_k(u W_enc + b_enc), ReLU on the k kept values     standard, topk
      = 1[u W_enc + b_gate > 0] * ReLU(u (W_enc * exp(r_mag)) + b_mag)      gated
    x_hat = N^-1(z W_dec + b_dec)

    N = identity                                                       none
      = x * sqrt(d_in) / ||x||, undone by dividing by the same factor   constant_norm_rescale
      = (x - mean(x)) / (std(x) + 1e-5) (unbiased std), undone as y * std(x) + mean(x)   layer_norm

This is SAELens's ``standard`` / ``topk`` / ``gated`` SAE term for term (``apply_b_dec_to_input=True``),
and SAELens 6 implements the same two run-time normalisations with the same formulas (same eps, same
unbiased std), so the weights are copied unchanged and ``normalize_activations`` is passed through. The
normalisation is per input row, not a constant, so it cannot be folded into the weights; there is nothing
else to fold. Anything that has no exact SAELens counterpart is refused with the reason: transcoders (the
published ones are TopK and SAELens 6.54's transcoders are ReLU / JumpReLU), gated SAEs with TopK,
``tanh-relu``, per-head hooks, other normalisations.

Which activations: the vanilla CLIP SAEs were on the Hub by 2024-11-06, when ViT-Prisma loaded open_clip
models without LayerNorm folding or weight centring (2024-09-12 to 2025-02-21), i.e. they saw the raw
activations the plugin's hooked open_clip model gives. Later ViT-Prisma versions centre the weights
writing to the residual stream, which moves each token only along the all-ones direction; a
``layer_norm`` SAE removes that direction before encoding and restores it after decoding, so its latents
are the same either way.

Hub locations: every Prisma SAE is its own repo, while a SAELens release has one ``repo_id``. The plugin's
Prisma releases therefore use the namespace ``Prisma-Multimodal`` as ``repo_id`` and ``<repo name>`` (or
``<repo name>/<file>``) as each SAE's path; :func:`prisma_huggingface_loader` joins them back. A full repo
id (``org/name``) with the weights file as ``folder_name`` works too (``SAE.from_pretrained(repo, file,
converter=prisma_huggingface_loader)``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import __version__ as sae_lens_version
from sae_lens.saes.sae import SAEConfig

from sae_vision_ext.loading.hf_files import cast_state, download_file, split_overrides
from sae_vision_ext.loading.releases import release_metadata
from sae_vision_ext.loading.safe_load import (
    NUMPY_SCALAR_GLOBALS,
    PickledModule,
    module_graph_globals,
    safe_torch_load,
)

PRISMA_NAMESPACE = "Prisma-Multimodal"
CONFIG_FILE = "config.json"
# the weights file names ViT-Prisma's repos use, tried in this order when a path names only the repo
WEIGHT_FILES = ("weights.pt", "n_images_2600058.pt")
# classes a ``{"cfg": ..., "state_dict": ...}`` checkpoint may pickle; read as inert records
CONFIG_CLASSES = (
    "vit_prisma.sae.config.VisionModelSAERunnerConfig",
    "vit_prisma.configs.HookedViTConfig.HookedViTConfig",
    "transformers.models.vit.configuration_vit.ViTConfig",
)
# ViT-Prisma model names -> the plugin's model specs (same weights)
MODEL_SPECS = {
    "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K": "open_clip:ViT-B-32/datacomp_xl_s13b_b90k",
    "facebook/dino-vitb16": "timm:vit_base_patch16_224.dino",
    "facebook/dino-vitb8": "timm:vit_base_patch8_224.dino",
}
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
STANDARD_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
GATED_KEYS = ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")
TRANSCODER_KEYS = ("W_skip", "b_dec_out")


@dataclass
class PrismaSAE:
    """A Prisma checkpoint read and checked: the SAELens architecture it is, and its tensors."""

    architecture: str  # SAELens architecture: standard | topk | gated
    d_in: int
    d_sae: int
    k: int | None
    normalize_activations: str
    hook_name: str
    token_selection: str  # all | cls | patches
    prisma_model_name: str
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]  # training facts kept as metadata


def _plain(value: Any) -> Any:
    """Values of config.json or of a pickled config record, as plain Python (devices, dtypes as text)."""
    if isinstance(value, dict) and "__type__" in value and "value" in value:
        return value["value"]
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, PickledModule):
        return {k: _plain(v) for k, v in value.__dict__.items()}
    return value


def config_from_checkpoint(cfg_obj: Any) -> dict[str, Any]:
    """The pickled ``cfg`` of a ``{"cfg", "state_dict"}`` checkpoint as a dict (config.json's keys)."""
    if isinstance(cfg_obj, PickledModule):
        return {k: _plain(v) for k, v in cfg_obj.__dict__.items()}
    if isinstance(cfg_obj, dict):
        return {k: _plain(v) for k, v in cfg_obj.items()}
    raise ValueError(f"the checkpoint's 'cfg' is a {type(cfg_obj).__name__}, not a ViT-Prisma config")


def _int(cfg: dict[str, Any], key: str, source: str) -> int:
    value = cfg.get(key)
    if isinstance(value, list) and len(value) == 1:  # hook_point_layer is sometimes [layer]
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source}: {key!r} must be an integer, got {value!r}")
    return value


def _hook_name(cfg: dict[str, Any], source: str) -> str:
    if cfg.get("hook_point_head_index") is not None:
        raise ValueError(
            f"{source}: hook_point_head_index={cfg['hook_point_head_index']} (an SAE on one attention head) "
            "is not supported: the plugin's hooked models have no per-head hooks"
        )
    if "layer_subtype" in cfg and "hook_point_layer" in cfg:
        return f"blocks.{_int(cfg, 'hook_point_layer', source)}.{cfg['layer_subtype']}"
    if isinstance(cfg.get("hook_point"), str):
        return cfg["hook_point"]
    raise ValueError(f"{source}: no hook in the config (needs hook_point_layer and layer_subtype)")


def _token_selection(cfg: dict[str, Any]) -> str:
    if cfg.get("cls_token_only"):
        return "cls"
    if cfg.get("use_patches_only"):
        return "patches"
    return "all"


def _architecture(cfg: dict[str, Any], source: str) -> tuple[str, int | None]:
    """(SAELens architecture, k) or ValueError naming why there is no exact SAELens counterpart."""
    if cfg.get("is_transcoder"):
        raise ValueError(
            f"{source} is a ViT-Prisma transcoder; not supported: ViT-Prisma's transcoders are TopK, SAELens "
            "6.54's transcoders are ReLU or JumpReLU only, and the plugin's hooked models splice SAEs at one "
            "hook (a transcoder reads one hook and writes another)"
        )
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", "relu")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch not in ("standard", "gated"):
        raise ValueError(f"{source}: architecture {arch!r} is not supported (standard and gated are)")
    if act == "relu":
        return arch, None
    if act == "topk" and arch == "standard":
        k = kwargs.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"{source}: activation_fn_str='topk' needs a positive integer k, got {k!r}")
        post = kwargs.get("postact_fn")
        if post not in (None, "relu", "ReLU", "ReLU()"):
            raise ValueError(f"{source}: TopK with post-activation {post!r} is not supported (ReLU is)")
        return "topk", k
    raise ValueError(
        f"{source}: activation {act!r} with architecture {arch!r} has no exact SAELens counterpart "
        "(supported: standard+relu, standard+topk, gated+relu)"
    )


def _tensor(state: dict[str, Any], key: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{source}: the state dict lacks {key!r} (has {sorted(state)})")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{source}: {key} has shape {list(value.shape)}, expected {list(shape)} "
            "(from the config's d_in and d_sae = d_in * expansion_factor)"
        )
    return value.detach().float().contiguous()


def parse_prisma(cfg: dict[str, Any], state: dict[str, Any], source: str = "checkpoint") -> PrismaSAE:
    """Check a Prisma config + state dict (see the module docstring) and return what SAELens needs."""
    if not isinstance(state, dict):
        raise ValueError(f"{source}: the weights are a {type(state).__name__}, not a state dict")
    if any(key in state for key in TRANSCODER_KEYS):
        cfg = {**cfg, "is_transcoder": True}
    arch, k = _architecture(cfg, source)
    d_in = _int(cfg, "d_in", source)
    if "expansion_factor" in cfg:
        d_sae = d_in * _int(cfg, "expansion_factor", source)
        if cfg.get("d_sae") not in (None, d_sae):
            raise ValueError(f"{source}: d_sae={cfg['d_sae']} but d_in * expansion_factor = {d_sae}")
    else:
        d_sae = _int(cfg, "d_sae", source)
    if k is not None and k > d_sae:
        raise ValueError(f"{source}: k={k} exceeds d_sae={d_sae}")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in NORMALIZATIONS:
        raise ValueError(
            f"{source}: normalize_activations={norm!r} is not supported "
            f"(supported: {', '.join(NORMALIZATIONS)})"
        )
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    keys = GATED_KEYS if arch == "gated" else STANDARD_KEYS
    tensors = {key: _tensor(state, key, shapes.get(key, (d_sae,)), source) for key in keys}
    model = str(cfg.get("model_name") or "")
    extra = {
        key: _plain(cfg[key])
        for key in ("image_size", "context_size", "l1_coefficient", "expansion_factor", "dataset_name")
        if key in cfg
    }
    return PrismaSAE(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        normalize_activations=norm,
        hook_name=_hook_name(cfg, source),
        token_selection=_token_selection(cfg),
        prisma_model_name=model,
        state_dict=tensors,
        extra=extra,
    )


def read_prisma_checkpoint(weights_path: str | Path, config: dict[str, Any] | None = None) -> PrismaSAE:
    """Read ``weights_path`` with the restricted unpickler; ``config`` is config.json's content (None: use
    the config pickled in the checkpoint)."""
    source = str(weights_path)
    obj = safe_torch_load(weights_path, NUMPY_SCALAR_GLOBALS + module_graph_globals(CONFIG_CLASSES))
    if isinstance(obj, dict) and "state_dict" in obj:
        state = obj["state_dict"]
        if config is None and "cfg" in obj:
            config = config_from_checkpoint(obj["cfg"])
    else:
        state = obj
    if config is None:
        raise ValueError(f"{source}: no config.json beside the weights and no config inside the checkpoint")
    return parse_prisma({k: _plain(v) for k, v in config.items()}, state, source)


def prisma_to_sae_components(
    sae: PrismaSAE, metadata: dict[str, Any] | None = None, device: str = "cpu", dtype: str = "float32"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(SAELens cfg dict, state dict): the same weights and normalisation (see the module docstring)."""
    meta = dict(metadata or {})
    spec = MODEL_SPECS.get(sae.prisma_model_name)
    expected = meta.get("model_name")
    if spec and expected and expected != spec:
        raise ValueError(
            f"{meta.get('source', 'checkpoint')} was trained on {sae.prisma_model_name} ({spec}), not on "
            f"{expected} as the release says"
        )
    selection = meta.get("token_selection")
    if selection and selection != sae.token_selection:
        warnings.warn(
            f"{meta.get('source', 'checkpoint')}: its config trained on token_selection "
            f"{sae.token_selection!r} (cls_token_only / use_patches_only), the release says {selection!r}; "
            "keeping the release's",
            stacklevel=2,
        )
    if not spec and not expected:
        warnings.warn(
            f"ViT-Prisma model {sae.prisma_model_name!r} has no known plugin model spec; "
            "cfg.metadata.model_name keeps ViT-Prisma's name",
            stacklevel=2,
        )
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype,
        "device": device,
        "apply_b_dec_to_input": True,
        "normalize_activations": sae.normalize_activations,
        "metadata": {
            "sae_lens_version": sae_lens_version,
            "modality": "vision",
            "hook_name": sae.hook_name,
            "token_selection": sae.token_selection,
            "prisma_model_name": sae.prisma_model_name,
            **sae.extra,
            **{key: value for key, value in meta.items() if value not in (None, "")},
        },
    }
    cfg["metadata"].setdefault("model_name", spec or sae.prisma_model_name)
    if sae.k is not None:
        cfg["k"] = sae.k
    return cfg, dict(sae.state_dict)


def split_location(repo_id: str, folder_name: str) -> tuple[str, str | None]:
    """(Hub repo id, weights file or None to try :data:`WEIGHT_FILES`) of a release path or a repo + file."""
    folder_name = (folder_name or "").strip("/")
    if "/" in repo_id:
        return repo_id, folder_name or None
    name, _, file = folder_name.partition("/")
    if not name:
        raise ValueError(f"namespace {repo_id!r} needs a path '<repo name>[/<file>]', got {folder_name!r}")
    return f"{repo_id}/{name}", file or None


def _download_weights(repo: str, file: str | None, force_download: bool) -> tuple[str, Path]:
    if file is not None:
        return file, download_file(repo, file, force_download)
    errors = []
    for candidate in WEIGHT_FILES:
        try:
            return candidate, download_file(repo, candidate, force_download)
        except FileNotFoundError as err:
            errors.append(str(err))
    raise FileNotFoundError(
        f"none of ViT-Prisma's weight files {list(WEIGHT_FILES)} found: {'; '.join(errors)}"
    )


def _read_config(repo: str, weights_file: str, force_download: bool) -> dict[str, Any] | None:
    folder = weights_file.rpartition("/")[0]
    try:
        path = download_file(repo, f"{folder}/{CONFIG_FILE}" if folder else CONFIG_FILE, force_download)
    except FileNotFoundError:
        return None  # a {"cfg", "state_dict"} checkpoint carries its own config
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{repo}/{CONFIG_FILE} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{repo}/{CONFIG_FILE} is not a JSON object")
    return config


def _load_from_hf(
    repo_id: str, folder_name: str, device: str, force_download: bool, cfg_overrides: dict[str, Any] | None
):
    repo, file = split_location(repo_id, folder_name)
    file, weights_path = _download_weights(repo, file, force_download)
    sae = read_prisma_checkpoint(weights_path, _read_config(repo, file, force_download))
    overrides, metadata = split_overrides(cfg_overrides, SAEConfig)
    device = overrides.pop("device", device)
    dtype = overrides.pop("dtype", "float32")
    meta = {
        **release_metadata(repo_id, folder_name),
        "prisma_repo": repo,
        "source": f"hf://{repo}/{file}",
        **metadata,
    }
    cfg, state = prisma_to_sae_components(sae, meta, device=device, dtype=dtype)
    cfg.update(overrides)
    return cfg, state


def prisma_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
):
    """SAELens converter for ViT-Prisma's SAEs: ``(cfg_dict, state_dict, None)``.

    ``repo_id`` is ``Prisma-Multimodal`` with ``folder_name`` = ``<repo name>[/<weights file>]`` (how the
    plugin's releases store them), or a full repo id with ``folder_name`` = the weights file (empty: try
    ``weights.pt`` then ``n_images_2600058.pt``). ``config.json`` is read from beside the weights.
    """
    cfg, state = _load_from_hf(repo_id, folder_name, device, force_download, cfg_overrides)
    return cfg, cast_state(state, cfg["device"], cfg["dtype"]), None


def get_prisma_config_from_hf(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
):
    """SAELens config getter for the same SAEs (reads the checkpoint too: the shapes are checked there)."""
    return _load_from_hf(repo_id, folder_name, device or "cpu", force_download, cfg_overrides)[0]


__all__ = [
    "PRISMA_NAMESPACE",
    "PrismaSAE",
    "get_prisma_config_from_hf",
    "parse_prisma",
    "prisma_huggingface_loader",
    "prisma_to_sae_components",
    "read_prisma_checkpoint",
    "split_location",
]
