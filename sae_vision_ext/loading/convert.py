"""Convert a foreign SAE checkpoint once into a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

Sources: a local ``.pth`` file, a Hub file ``hf://org/repo/path/in/repo.pth``, or a named release with
``--sae-id``. Formats: the MSAE authors' layout (``msae``) and the overcomplete toolbox (``overcomplete``);
``auto`` tells them apart from the file's contents. Every file is read with the restricted unpickler.
The result loads with ``SAE.load_from_disk(out_dir)`` after ``import sae_vision_ext``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEConfig

from sae_vision_ext.loading.checks import warn_if_not_finite
from sae_vision_ext.loading.hf_files import fetch_checkpoint
from sae_vision_ext.loading.msae import msae_to_sae_components, read_msae_checkpoint
from sae_vision_ext.loading.overcomplete import (
    MODULE_CLASSES,
    overcomplete_cfg_dict,
    overcomplete_to_sae_components,
    read_overcomplete_checkpoint,
    register_overcomplete_architecture,
)
from sae_vision_ext.loading.pretrained import load_pretrained
from sae_vision_ext.loading.safe_load import NUMPY_SCALAR_GLOBALS, module_graph_globals, safe_torch_load

FORMATS = ("auto", "msae", "overcomplete")


def build_sae(cfg_dict: dict[str, Any], state_dict: dict[str, torch.Tensor]):
    """Instantiate the registered architecture ``cfg_dict["architecture"]``; load ``state_dict`` strictly."""
    sae_cls, cfg_cls = get_sae_class(cfg_dict["architecture"])
    sae = sae_cls(cfg_cls.from_dict(cfg_dict))
    sae.load_state_dict(state_dict, strict=True)
    return sae


def _detect_format(path: Path) -> str:
    # mmap (no copy of the tensors) works only for torch's zip format, not for legacy checkpoints
    obj = safe_torch_load(
        path, NUMPY_SCALAR_GLOBALS + module_graph_globals(MODULE_CLASSES), mmap=zipfile.is_zipfile(path)
    )
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "encoder" in obj["model"]:
        return "msae"
    return "overcomplete"


def convert_file(
    path: str | os.PathLike, format: str = "auto", metadata: dict[str, Any] | None = None, **options: Any
):
    """The SAE (plugin class) equal to the checkpoint at ``path``; ``options`` go to the format's converter.

    msae: ``k`` (inference TopK, default ReLU). overcomplete: ``sparsity``, ``k``, ``threshold``, ``delta``,
    ``dictionary_normalization``.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if format == "auto":
        format = _detect_format(path)
    metadata = {"source": str(path), **(metadata or {})}
    if format == "msae":
        cfg, state = msae_to_sae_components(read_msae_checkpoint(path), metadata, k=options.get("k"))
        return build_sae(cfg, state)
    register_overcomplete_architecture()
    ckpt = read_overcomplete_checkpoint(path)
    fields, state = overcomplete_to_sae_components(
        ckpt, **{k: v for k, v in options.items() if v is not None}
    )
    return build_sae(overcomplete_cfg_dict(fields, {"source_class": ckpt.sae_class, **metadata}), state)


def convert_checkpoint(
    source: str,
    out_dir: str | os.PathLike,
    sae_id: str | None = None,
    format: str = "auto",
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Convert ``source`` (file, ``hf://org/repo/path``, or release name with ``sae_id``) into ``out_dir``."""
    metadata = {k: v for k, v in (metadata or {}).items() if v is not None}
    source = str(source)
    if Path(source).is_file():
        sae = convert_file(source, format, metadata, **options)
    elif source.startswith("hf://"):
        parts = source.removeprefix("hf://").split("/", 2)
        if len(parts) != 3:
            raise ValueError(f"expected hf://org/repo/path/in/repo, got {source!r}")
        src = fetch_checkpoint("/".join(parts[:2]), parts[2], "cpu", False, None, SAEConfig)
        sae = convert_file(src.local_path, format, {**src.metadata, **metadata}, **options)
    elif Path(source).suffix in (".pth", ".pt", ".ckpt", ".bin"):
        raise FileNotFoundError(f"checkpoint not found: {source}")
    else:
        if sae_id is None:
            raise ValueError(f"{source!r} is not a file; to convert a named release pass --sae-id")
        sae = load_pretrained(
            source, sae_id, **{k: v for k, v in options.items() if k == "k" and v is not None}
        )
        for key, value in metadata.items():
            sae.cfg.metadata[key] = value
    out = Path(out_dir)
    warn_if_not_finite(sae, f"converting {source}")
    sae.save_model(out)
    return out
