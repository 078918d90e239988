"""The MSAE authors' released checkpoints (``WolodjaZ/MSAE``) converted into the plugin's MSAE class.

Published layout (a ``torch.save`` pickle, one file per SAE)::

    {"model": {"pre_bias": [d], "encoder": [d, n], "latent_bias": [n], "decoder": [n, d],
               + frequency-counter buffers (dropped)},
     "mean_center": [d]  (zeros or absent for the uncentred SAEs),
     "scaling_factor": float s,
     "target_norm": numpy float}

The authors standardise an embedding before their SAE and undo it after::

    x' = (x - mu) s ;  pre = (x' - pre_bias) encoder + latent_bias ;  z = ReLU(pre) (or TopK of it)
    x_hat = (z decoder + pre_bias) / s + mu

Since (x' - pre_bias) encoder + latent_bias = s [(x - (mu + pre_bias/s)) encoder + latent_bias/s] and
ReLU / TopK commute with a positive scale, the same map on RAW embeddings is the plugin's MSAE with::

    W_enc = encoder,  W_dec = decoder,  b_enc = latent_bias / s,  b_dec = mu + pre_bias / s

whose latents are the authors' latents divided by s (``cfg.metadata.latent_scale`` records s) and whose
reconstruction is exactly the authors' de-standardised one. Decoder rows keep the authors' unit norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import __version__ as sae_lens_version

from sae_vision_ext.loading.hf_files import cast_state, fetch_checkpoint
from sae_vision_ext.loading.safe_load import NUMPY_SCALAR_GLOBALS, safe_torch_load
from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAEConfig, default_k_levels

ARCHITECTURE = "matryoshka_topk"
MODEL_KEYS = ("pre_bias", "encoder", "latent_bias", "decoder")


@dataclass
class MSAECheckpoint:
    """The parts of an authors' MSAE file the plugin uses (validated shapes, float32)."""

    pre_bias: torch.Tensor  # [d]
    encoder: torch.Tensor  # [d, n]
    latent_bias: torch.Tensor  # [n]
    decoder: torch.Tensor  # [n, d]
    mean_center: torch.Tensor  # [d]
    scaling_factor: float
    target_norm: float | None

    @property
    def d_in(self) -> int:
        return self.encoder.shape[0]

    @property
    def d_sae(self) -> int:
        return self.encoder.shape[1]


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be a number, got {type(value).__name__}")


def parse_msae_checkpoint(obj: Any, source: str = "checkpoint") -> MSAECheckpoint:
    """Validate the authors' layout (see the module docstring) and return its tensors."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{source} is not an MSAE checkpoint: expected a dict with a 'model' state dict, found {found}"
        )
    model = obj["model"]
    missing = [k for k in MODEL_KEYS if not isinstance(model.get(k), torch.Tensor)]
    if missing:
        raise ValueError(f"{source} is not an MSAE checkpoint: 'model' lacks {missing} (has {sorted(model)})")
    if "scaling_factor" not in obj:
        raise ValueError(f"{source} is not an MSAE checkpoint: no 'scaling_factor' (has {sorted(obj)})")
    pre_bias, encoder, latent_bias, decoder = (model[k].detach().float() for k in MODEL_KEYS)
    if encoder.ndim != 2:
        raise ValueError(f"{source}: encoder must be 2-D [d, n], got shape {list(encoder.shape)}")
    d, n = encoder.shape
    expected = {"pre_bias": (d,), "latent_bias": (n,), "decoder": (n, d)}
    for name, tensor in (("pre_bias", pre_bias), ("latent_bias", latent_bias), ("decoder", decoder)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{source}: {name} has shape {list(tensor.shape)}, expected {list(expected[name])} "
                f"for an encoder of shape [{d}, {n}] (d_in={d}, d_sae={n})"
            )
    mean = obj.get("mean_center")
    mean = torch.zeros(d) if mean is None else torch.as_tensor(mean).detach().float().reshape(-1)
    if tuple(mean.shape) != (d,):
        raise ValueError(f"{source}: mean_center has shape {list(mean.shape)}, expected [{d}]")
    scale = _as_float(obj["scaling_factor"], "scaling_factor")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{source}: scaling_factor must be a positive finite number, got {scale}")
    target = obj.get("target_norm")
    target = None if target is None else _as_float(target, "target_norm")
    return MSAECheckpoint(pre_bias, encoder, latent_bias, decoder, mean, scale, target)


def read_msae_checkpoint(path: str | Path) -> MSAECheckpoint:
    """Load an authors' ``.pth`` with the restricted unpickler (tensors + numpy float scalars only)."""
    return parse_msae_checkpoint(safe_torch_load(path, NUMPY_SCALAR_GLOBALS), str(path))


def fold_msae(ckpt: MSAECheckpoint) -> dict[str, torch.Tensor]:
    """Weights of the plugin's MSAE taking raw embeddings (exact fold, see the module docstring)."""
    s = ckpt.scaling_factor
    return {
        "W_enc": ckpt.encoder.contiguous(),
        "b_enc": ckpt.latent_bias / s,
        "W_dec": ckpt.decoder.contiguous(),
        "b_dec": ckpt.mean_center + ckpt.pre_bias / s,
    }


INFERENCE_K_FIELD = "inference_k"


def _authors_filename_info(name: str) -> dict[str, Any]:
    """Training facts encoded in the authors' file names, e.g. ``6144_768_TopKReLU_64_RW_...``."""
    parts = Path(name).name.split("_")
    info: dict[str, Any] = {}
    if len(parts) > 4 and parts[2] == "TopKReLU" and parts[3].isdigit():
        info["training_k_start"] = int(parts[3])
        info["training_level_weighting"] = {"RW": "reverse", "UW": "uniform"}.get(parts[4], parts[4])
    return info


def msae_to_sae_components(
    ckpt: MSAECheckpoint,
    metadata: dict[str, Any] | None = None,
    k: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(SAELens cfg dict, state dict) of the plugin's MSAE equal to the authors' checkpoint on raw inputs.

    ``k`` is the default inference TopK (None: ReLU, the authors' default); any k can also be passed to
    ``encode(x, k=...)`` later. ``metadata`` is merged into ``cfg.metadata`` (model, hook, source, ...).
    """
    meta = {**_authors_filename_info(str((metadata or {}).get("source", ""))), **(metadata or {})}
    cfg = {
        "architecture": ARCHITECTURE,
        "d_in": ckpt.d_in,
        "d_sae": ckpt.d_sae,
        "dtype": dtype,
        "device": device,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "k_levels": default_k_levels(ckpt.d_sae, meta.get("training_k_start", 64)),
        INFERENCE_K_FIELD: k,
        "standardize_input": False,
        "metadata": {
            "sae_lens_version": sae_lens_version,
            "modality": "vision",
            "latent_scale": ckpt.scaling_factor,  # authors' latents = these latents * latent_scale
            "target_norm": ckpt.target_norm,
            **meta,
        },
    }
    return cfg, fold_msae(ckpt)


def _load_from_hf(
    repo_id: str, folder_name: str, device: str, force_download: bool, cfg_overrides: dict[str, Any] | None
):
    src = fetch_checkpoint(
        repo_id, folder_name, device, force_download, cfg_overrides, MatryoshkaTopKSAEConfig
    )
    k = src.overrides.pop(INFERENCE_K_FIELD, None)
    cfg, state = msae_to_sae_components(
        read_msae_checkpoint(src.local_path), src.metadata, k=k, device=src.device, dtype=src.dtype
    )
    cfg.update(src.overrides)
    return cfg, state


def msae_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
):
    """SAELens converter for the authors' files.

    ``SAE.from_pretrained("WolodjaZ/MSAE", path, converter=msae_huggingface_loader)``.

    ``folder_name`` is the file's path in the repo (a glob pattern is resolved to the one matching file).
    """
    cfg, state = _load_from_hf(repo_id, folder_name, device, force_download, cfg_overrides)
    return cfg, cast_state(state, cfg["device"], cfg["dtype"]), None


def get_msae_config_from_hf(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
):
    """SAELens config getter for the same files (reads the checkpoint: the shapes live there)."""
    return _load_from_hf(repo_id, folder_name, device or "cpu", force_download, cfg_overrides)[0]
