"""Checkpoints saved by the ``overcomplete`` toolbox (Fel et al.), including the RA-SAE DINOv2 release.

Layout, established from overcomplete's public source and two independent readers of the published
``matybohacek/RA-SAE-DINOv2-32k`` files:

- ``RA-SAE-DINOv2-32k.pth``: a pickled module graph ``DataParallel(BatchTopKSAE)`` (not a state dict),
  32,000 concepts over the 768-d tokens (CLS, 4 registers, 256 patches) of DINOv2 ViT-B/14 with
  registers, taken AFTER the backbone's final LayerNorm. ``config.json`` beside it holds
  ``running_threshold`` (the BatchTopK eval threshold; the pickled module stores None).
- State dict keys (``module.`` prefix from DataParallel): ``encoder.final_block.0.{weight,bias}``
  (Linear d_in -> d_sae), ``encoder.final_block.1.*`` (LayerNorm or BatchNorm1d over the d_sae
  pre-activations), and for an archetypal dictionary ``dictionary.{W [d_sae, n'], C [n', d_in],
  Relax [d_sae, d_in], multiplier []}`` plus the attribute ``delta``; a plain dictionary is
  ``dictionary.{_weights [d_sae, d_in], multiplier []}``, row-normalised (l2) when read. The default
  encoder of overcomplete 0.3 is ``MLPEncoder(nb_blocks=0)`` with an identity norm (``final_block.*``
  keys again); an encoder ``nn.Sequential(Linear, BatchNorm1d, ReLU)`` stores ``encoder.0.*`` /
  ``encoder.1.*``.

Inference in overcomplete (eval mode)::

    pre = Norm(x W^T + b)            Norm = LayerNorm | BatchNorm1d (running stats) | identity
    a   = ReLU(pre)
    z   = a * (a >= t)               BatchTopKSAE (t = running threshold)
        = TopK_k(a) per row          TopKSAE, RATopKSAE
        = a                          plain SAE
    x_hat = z D                      no decoder bias
    D   = exp(m) (rowstoch(ReLU(W)) C + Relax * min(1, delta / ||Relax_i||))     archetypal
        = exp(m) _weights / (||_weights_i|| + 1e-8)                             plain, l2

BatchNorm in eval is affine, so it is folded into the Linear layer; LayerNorm is not, so the plugin's
inference-only architecture ``overcomplete`` (:class:`OvercompleteSAE`) keeps it. Reading a pickled module
graph binds every class name on :data:`MODULE_CLASSES` to an inert record (see ``safe_load``): no
overcomplete code is needed and none of the file's classes is instantiated. The tests check all of this
against overcomplete 0.3.0 itself (``tests/loading/test_loading_overcomplete.py``).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from sae_lens import __version__ as sae_lens_version
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAE, SAEConfig
from torch import nn
from typing_extensions import override

from sae_vision_ext._registration import resume_registration
from sae_vision_ext.loading.hf_files import cast_state, fetch_checkpoint
from sae_vision_ext.loading.safe_load import (
    NUMPY_SCALAR_GLOBALS,
    PickledModule,
    module_graph_globals,
    safe_torch_load,
)

ARCHITECTURE = "overcomplete"

# Every class (or function, e.g. a dictionary normalisation) a pickled overcomplete SAE may name.
MODULE_CLASSES = (
    "overcomplete.sae.base.SAE",
    "overcomplete.sae.topk_sae.TopKSAE",
    "overcomplete.sae.batchtopk_sae.BatchTopKSAE",
    "overcomplete.sae.rasae.RATopKSAE",
    "overcomplete.sae.modules.MLPEncoder",
    "overcomplete.sae.archetypal_dictionary.RelaxedArchetypalDictionary",
    "overcomplete.sae.dictionary.DictionaryLayer",
    "overcomplete.sae.dictionary.normalize_l2",
    "overcomplete.sae.dictionary.normalize_identity",
    "torch.nn.parallel.data_parallel.DataParallel",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.normalization.LayerNorm",
    "torch.nn.modules.batchnorm.BatchNorm1d",
    "torch.nn.modules.activation.ReLU",
)
SPARSITY_OF_CLASS = {
    "overcomplete.sae.batchtopk_sae.BatchTopKSAE": "threshold",
    "overcomplete.sae.topk_sae.TopKSAE": "topk",
    "overcomplete.sae.rasae.RATopKSAE": "topk",
    "overcomplete.sae.base.SAE": "relu",
}
Sparsity = Literal["relu", "topk", "threshold"]


@dataclass
class OvercompleteSAEConfig(SAEConfig):
    """``encoder_norm``: LayerNorm over the d_sae pre-activations, or none; ``sparsity``: see the module."""

    apply_b_dec_to_input: bool = False
    encoder_norm: Literal["none", "layer_norm"] = "none"
    norm_eps: float = 1e-5
    sparsity: Sparsity = "relu"
    k: int | None = None
    threshold: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity not in ("relu", "topk", "threshold"):
            raise ValueError(f"sparsity must be relu, topk or threshold, got {self.sparsity!r}")
        if self.sparsity == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise ValueError(f"sparsity='topk' needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.encoder_norm not in ("none", "layer_norm"):
            raise ValueError(f"encoder_norm must be 'none' or 'layer_norm', got {self.encoder_norm!r}")

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class OvercompleteSAE(SAE[OvercompleteSAEConfig]):
    """Inference-only SAE reproducing overcomplete's eval forward pass (see the module docstring)."""

    b_enc: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        d_sae = self.cfg.d_sae
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=self.device))
        if self.cfg.encoder_norm == "layer_norm":
            self.norm_weight = nn.Parameter(torch.ones(d_sae, dtype=self.dtype, device=self.device))
            self.norm_bias = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=self.device))

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        pre = sae_in @ self.W_enc + self.b_enc
        if self.cfg.encoder_norm == "layer_norm":
            pre = F.layer_norm(pre, (self.cfg.d_sae,), self.norm_weight, self.norm_bias, self.cfg.norm_eps)
        acts = F.relu(self.hook_sae_acts_pre(pre))
        if self.cfg.sparsity == "threshold":
            acts = acts * (acts >= self.cfg.threshold)
        elif self.cfg.sparsity == "topk":
            top = acts.topk(self.cfg.k, dim=-1)
            acts = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return self.hook_sae_acts_post(acts)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    @override
    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(
            "decoder norms cannot be folded exactly into an encoder with a normalisation layer and a "
            "global threshold or TopK; use the SAE as converted"
        )


def register_overcomplete_architecture() -> None:
    """Register the inference architecture ``overcomplete`` with SAELens (idempotent)."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, OvercompleteSAE, OvercompleteSAEConfig)


# ----------------------------------------------------------------------------------------- reading


@dataclass
class OvercompleteCheckpoint:
    """Tensors and hyperparameters read from an overcomplete checkpoint (nothing folded yet)."""

    state_dict: dict[str, torch.Tensor]
    sae_class: str | None = None  # fully qualified class name, when the file is a pickled module
    attributes: dict[str, Any] | None = None  # delta, top_k, running_threshold, norm eps, normalisation


def read_overcomplete_checkpoint(path: str | Path) -> OvercompleteCheckpoint:
    """Load a state dict or a pickled overcomplete module graph with the restricted unpickler."""
    path = Path(path)
    safe_globals = NUMPY_SCALAR_GLOBALS + module_graph_globals(MODULE_CLASSES)
    obj = safe_torch_load(path, safe_globals, mmap=zipfile.is_zipfile(path))
    if isinstance(obj, PickledModule):
        sae = obj.module if obj.class_name.endswith("DataParallel") else obj
        return OvercompleteCheckpoint(sae.state_dict(), sae.class_name, _attributes(sae))
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return OvercompleteCheckpoint({k.removeprefix("module."): v for k, v in tensors.items()})
    raise ValueError(
        f"{path} is neither an overcomplete state dict nor a pickled overcomplete SAE "
        f"(got {type(obj).__name__})"
    )


def _attributes(sae: PickledModule) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for name in ("top_k", "running_threshold"):
        value = sae.__dict__.get(name)
        if value is not None:
            attrs[name] = float(value) if name == "running_threshold" else int(value)
    dictionary = (sae.__dict__.get("_modules") or {}).get("dictionary")
    if isinstance(dictionary, PickledModule):
        if "delta" in dictionary.__dict__:
            attrs["delta"] = float(dictionary.__dict__["delta"])
        normalization = dictionary.__dict__.get("normalization")
        if normalization is not None:
            attrs["dictionary_normalization"] = getattr(normalization, "class_name", "?").rpartition("_")[2]
    for module in _walk(sae):
        if module.class_name.endswith(("LayerNorm", "BatchNorm1d")) and "eps" in module.__dict__:
            attrs["norm_eps"] = float(module.__dict__["eps"])
    return attrs


def _walk(module: PickledModule):
    yield module
    for child in (module.__dict__.get("_modules") or {}).values():
        if isinstance(child, PickledModule):
            yield from _walk(child)


# ----------------------------------------------------------------------------------------- folding


def fuse_archetypal_dictionary(
    W: torch.Tensor,
    C: torch.Tensor,
    relax: torch.Tensor | None,
    multiplier: torch.Tensor | float,
    delta: float,
    block_rows: int = 1024,
) -> torch.Tensor:
    """D = exp(m) (rowstoch(ReLU(W)) C + Relax * min(1, delta/||Relax_i||)), in row blocks (W may be huge)."""
    scale = torch.exp(torch.as_tensor(multiplier, dtype=torch.float32)).item()
    out = torch.empty(W.shape[0], C.shape[1], dtype=torch.float32)
    C = C.float()
    for start in range(0, W.shape[0], block_rows):
        rows = torch.relu(W[start : start + block_rows].float())
        rows = rows / (rows.sum(dim=-1, keepdim=True) + 1e-8)
        block = rows @ C
        if relax is not None:
            lam = relax[start : start + block_rows].float()
            norm = lam.norm(dim=-1, keepdim=True)
            block += lam * torch.where(norm > delta, delta / norm.clamp_min(1e-12), torch.ones_like(norm))
        out[start : start + block_rows] = block * scale
    return out


def overcomplete_to_sae_components(
    ckpt: OvercompleteCheckpoint,
    sparsity: Sparsity | None = None,
    k: int | None = None,
    threshold: float | None = None,
    delta: float | None = None,
    dictionary_normalization: Literal["l2", "identity"] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config fields, state dict) of an :class:`OvercompleteSAE` equal to the checkpoint in eval mode.

    Arguments override what the file says; a state-dict file says nothing about sparsity, so pass it.
    """
    sd = {key.removeprefix("module."): value for key, value in ckpt.state_dict.items()}
    attrs = ckpt.attributes or {}
    if any(key.startswith("encoder.mlp_blocks.") for key in sd):
        raise ValueError("overcomplete MLPEncoder with nb_blocks > 1 (hidden MLP blocks) is not supported")
    prefix = "encoder.final_block." if "encoder.final_block.0.weight" in sd else "encoder."
    if f"{prefix}0.weight" not in sd:
        raise ValueError(
            "no encoder Linear layer found (expected 'encoder.final_block.0.weight'); "
            f"keys: {sorted(sd)[:12]}"
        )
    W_lin = sd[f"{prefix}0.weight"].float()  # [d_sae, d_in]
    b_lin = sd.get(f"{prefix}0.bias", torch.zeros(W_lin.shape[0])).float()
    d_sae, d_in = W_lin.shape
    eps = float(attrs.get("norm_eps", 1e-5))
    fields: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "encoder_norm": "none", "norm_eps": eps}
    state: dict[str, torch.Tensor] = {}
    norm = f"{prefix}1."
    if f"{norm}running_mean" in sd:  # BatchNorm1d in eval: an affine map, folded into the Linear layer
        gain = sd.get(f"{norm}weight", torch.ones(d_sae)).float() / torch.sqrt(
            sd[f"{norm}running_var"].float() + eps
        )
        b_lin = (b_lin - sd[f"{norm}running_mean"].float()) * gain + sd.get(
            f"{norm}bias", torch.zeros(d_sae)
        ).float()
        W_lin = W_lin * gain[:, None]
    elif f"{norm}weight" in sd:
        fields["encoder_norm"] = "layer_norm"
        state["norm_weight"] = sd[f"{norm}weight"].float()
        state["norm_bias"] = sd.get(f"{norm}bias", torch.zeros(d_sae)).float()
    state["W_enc"] = W_lin.T.contiguous()
    state["b_enc"] = b_lin

    if "dictionary.W" in sd:
        missing = [k for k in ("dictionary.C",) if k not in sd]
        if missing:
            raise ValueError(f"archetypal dictionary without {missing}")
        delta = float(delta if delta is not None else attrs.get("delta", 1.0))
        D = fuse_archetypal_dictionary(
            sd["dictionary.W"],
            sd["dictionary.C"],
            sd.get("dictionary.Relax"),
            sd.get("dictionary.multiplier", torch.tensor(0.0)),
            delta,
        )
    elif "dictionary._weights" in sd:
        D = sd["dictionary._weights"].float()
        normalization = dictionary_normalization or attrs.get("dictionary_normalization", "l2")
        if normalization == "l2":
            D = D / (D.norm(dim=1, keepdim=True) + 1e-8)
        elif normalization != "identity":
            raise ValueError(
                f"unsupported dictionary normalisation {normalization!r} (supported: l2, identity)"
            )
        D = D * torch.exp(sd.get("dictionary.multiplier", torch.tensor(0.0)).float())
    else:
        raise ValueError(
            "no dictionary found (expected 'dictionary.W'/'dictionary.C' or 'dictionary._weights')"
        )
    if D.shape != (d_sae, d_in):
        raise ValueError(f"dictionary shape {tuple(D.shape)} does not match the encoder's ({d_sae}, {d_in})")
    state["W_dec"] = D
    state["b_dec"] = torch.zeros(d_in)

    sparsity = sparsity or SPARSITY_OF_CLASS.get(ckpt.sae_class or "")
    if sparsity is None:
        raise ValueError(
            f"cannot tell the sparsity rule of {ckpt.sae_class or 'a state-dict checkpoint'}; pass "
            f"sparsity='topk' (with k), 'threshold' (with threshold) or 'relu'. Supported overcomplete "
            f"classes: {', '.join(sorted(SPARSITY_OF_CLASS))}"
        )
    fields["sparsity"] = sparsity
    if sparsity == "topk":
        fields["k"] = int(k if k is not None else attrs.get("top_k", 0)) or None
    if sparsity == "threshold":
        threshold = threshold if threshold is not None else attrs.get("running_threshold")
        if threshold is None:
            raise ValueError(
                "this BatchTopK SAE has no running threshold (overcomplete stores None until it is set); "
                "pass threshold=... (the RA-SAE DINOv2 release keeps it in config.json as running_threshold)"
            )
        fields["threshold"] = float(threshold)
    return fields, state


# ------------------------------------------------------------------------------ SAELens loaders


def overcomplete_cfg_dict(
    fields: dict[str, Any], metadata: dict[str, Any], device: str = "cpu", dtype: str = "float32"
) -> dict[str, Any]:
    return {
        "architecture": ARCHITECTURE,
        **fields,
        "dtype": dtype,
        "device": device,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": sae_lens_version, "modality": "vision", **metadata},
    }


def _published_threshold(repo_id: str, folder_name: str, force_download: bool) -> float | None:
    parent = folder_name.rpartition("/")[0]
    try:
        config = hf_hub_download(
            repo_id, f"{parent}/config.json" if parent else "config.json", force_download=force_download
        )
    except EntryNotFoundError:
        return None
    value = json.loads(Path(config).read_text()).get("running_threshold")
    return None if value is None else float(value)


def _load_from_hf(
    repo_id: str, folder_name: str, device: str, force_download: bool, cfg_overrides: dict[str, Any] | None
):
    src = fetch_checkpoint(repo_id, folder_name, device, force_download, cfg_overrides, OvercompleteSAEConfig)
    ckpt = read_overcomplete_checkpoint(src.local_path)
    threshold = src.overrides.pop("threshold", None)
    if threshold is None and SPARSITY_OF_CLASS.get(ckpt.sae_class or "") == "threshold":
        threshold = (ckpt.attributes or {}).get("running_threshold")
        if threshold is None:
            threshold = _published_threshold(repo_id, src.path_in_repo, force_download)
    fields, state = overcomplete_to_sae_components(
        ckpt,
        sparsity=src.overrides.pop("sparsity", None),
        k=src.overrides.pop("k", None),
        threshold=threshold,
    )
    meta = {**src.metadata, "source_class": ckpt.sae_class}
    return overcomplete_cfg_dict({**fields, **src.overrides}, meta, device=src.device, dtype=src.dtype), state


def overcomplete_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
):
    """SAELens converter: ``SAE.from_pretrained(repo_id, path_in_repo, converter=this)``."""
    register_overcomplete_architecture()
    cfg, state = _load_from_hf(repo_id, folder_name, device, force_download, cfg_overrides)
    return cfg, cast_state(state, cfg["device"], cfg["dtype"]), None


def get_overcomplete_config_from_hf(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
):
    """SAELens config getter for the same files (reads the checkpoint: the shapes live there)."""
    return _load_from_hf(repo_id, folder_name, device or "cpu", force_download, cfg_overrides)[0]


register_overcomplete_architecture()
resume_registration()
