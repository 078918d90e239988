"""One loader for hooked vision models: ``load_vision_model(spec) -> (HookedVisionModel, preprocess)``.

Spec forms::

    timm:<model_name>[.<tag>]          timm:vit_base_patch14_reg4_dinov2.lvd142m
    open_clip:<arch>[/<pretrained_tag>] open_clip:ViT-B-32/laion2b_s34b_b79k
    open_clip:hf-hub:<org>/<repo>      open_clip:local-dir:/path/to/folder

``pretrained=False`` builds the real architecture with random weights (no download; the tag still picks
the preprocessing and, for open_clip, the QuickGELU variant the tag was trained with). ``weights=path``
loads a local checkpoint (timm: through timm's own checkpoint filter; open_clip: a full CLIP state dict).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from timm.data import create_transform, resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sae_vision_ext.errors import UserError
from sae_vision_ext.vision.hooked_vision_model import HookedVisionModel
from sae_vision_ext.vision.open_clip import OpenClipHookedVisionModel
from sae_vision_ext.vision.timm import TimmHookedVisionModel
from sae_vision_ext.vision.timm_cnn import CNN_CLASSES, TimmHookedConvNet

SPEC_EXAMPLES = "'timm:vit_base_patch14_reg4_dinov2.lvd142m' or 'open_clip:ViT-B-32/laion2b_s34b_b79k'"


def parse_spec(spec: str) -> tuple[str, str]:
    """``'timm:name' -> ('timm', 'name')``; ``'open_clip:arch/tag' -> ('open_clip', 'arch/tag')``."""
    library, sep, name = spec.partition(":")
    library = library.strip().lower().replace("-", "_")
    if library == "openclip":
        library = "open_clip"
    if not sep or library not in ("timm", "open_clip") or not name:
        raise ValueError(
            f"model spec {spec!r} must be 'timm:<name>' or 'open_clip:<arch>/<tag>', e.g. {SPEC_EXAMPLES}"
        )
    return library, name


def wrap_model(model: nn.Module, spec: str | None = None) -> HookedVisionModel:
    """Hook a bare timm ``VisionTransformer`` / ResNet / ConvNeXt or an open_clip model / visual tower (not
    copied)."""
    module = type(model).__module__
    if module.startswith("open_clip"):
        return OpenClipHookedVisionModel(model, spec=spec)
    if isinstance(model, CNN_CLASSES):
        return TimmHookedConvNet(model, spec=spec)
    if isinstance(model, VisionTransformer):
        return TimmHookedVisionModel(model, spec=spec)
    raise TypeError(
        f"cannot hook a {module}.{type(model).__name__}: expected a timm VisionTransformer, ResNet or "
        "ConvNeXt, or an open_clip CLIP / CustomTextCLIP / VisionTransformer / TimmModel"
    )


def load_vision_model(
    spec: str,
    pretrained: bool = True,
    device: str = "cpu",
    img_size: int | tuple[int, int] | None = None,
    weights: str | os.PathLike | None = None,
    **library_kwargs: Any,
) -> tuple[HookedVisionModel, Callable]:
    """Build the model named by ``spec``, hook it, and return ``(hooked_model_in_eval_mode, preprocess)``.

    ``preprocess`` is the model's own eval transform: ``PIL.Image -> float tensor [3, H, W]``.
    ``img_size`` changes the input resolution (position embeddings resampled by the library).
    ``library_kwargs`` go to ``timm.create_model`` / ``open_clip.create_model``.
    """
    library, name = parse_spec(spec)
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    if library == "timm":
        hooked, preprocess = _load_timm(spec, name, pretrained, device, img_size, weights, library_kwargs)
    else:
        hooked, preprocess = _load_open_clip(
            spec, name, pretrained, device, img_size, weights, library_kwargs
        )
    hooked.eval()
    hooked.preprocess = preprocess
    return hooked, preprocess


def weights_record(
    spec: str, *, weights: str | os.PathLike | None = None, pretrained: bool = True, seed: int | None = None
) -> dict[str, Any]:
    """Exactly which weights a model was built with, as stored in an SAE's ``metadata.weights``.

    ``{"source": "file", "path", "sha256"}`` | ``{"source": "pretrained", "spec", "tag"}`` |
    ``{"source": "random-init", "seed"}``; :func:`load_model_for_sae` rebuilds the model from it.
    """
    if weights:
        path = Path(weights).expanduser().resolve()
        return {"source": "file", "path": str(path), "sha256": file_sha256(path)}
    if pretrained:
        library, name = parse_spec(spec)
        tag = name.partition("/")[2] if library == "open_clip" else name.partition(".")[2]
        return {"source": "pretrained", "spec": spec, "tag": tag or None}
    return {"source": "random-init", "seed": int(seed or 0)}


def describe_weights(record: dict[str, Any] | str | None) -> str:
    """One phrase for people: ``pretrained weights (lvd142m)``, ``weights file /x``, ``RANDOM weights (seed
    0)``."""
    record = _as_record(record)
    if record is None:
        return "unknown weights"
    if record["source"] == "file":
        return f"weights file {record['path']}"
    if record["source"] == "pretrained":
        return f"pretrained weights ({record.get('tag') or 'default tag'})"
    return f"RANDOM weights (seed {record['seed']})"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_record(weights: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """Records written before ``weights_record`` existed were strings: "pretrained",
    "random-init(seed=N)", a path."""
    if weights is None or isinstance(weights, dict):
        return weights
    match = re.fullmatch(r"random-init\(seed=(\d+)\)", weights)
    if match:
        return {"source": "random-init", "seed": int(match.group(1))}
    if weights == "pretrained":
        return {"source": "pretrained", "tag": None}
    if weights in ("", "given"):
        return None
    return {"source": "file", "path": weights, "sha256": None}


def load_vision_model_with_record(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[HookedVisionModel, Callable, dict[str, Any]]:
    """``(model, preprocess, weights_record)``: a weights file if given, else pretrained weights (downloaded
    when needed; :class:`PretrainedWeightsUnavailable` when they cannot be had), else a random init drawn from
    ``seed`` (reproducible: the same seed gives the same weights)."""
    if weights:
        model, preprocess = load_vision_model(spec, pretrained=False, weights=weights, **kwargs)
    elif pretrained:
        model, preprocess = load_vision_model(spec, pretrained=True, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, preprocess = load_vision_model(spec, pretrained=False, **kwargs)
    return model, preprocess, weights_record(spec, weights=weights, pretrained=pretrained, seed=seed)


def load_vision_model_or_random(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    seed: int = 0,
    say: Callable[[str], Any] = print,
    **kwargs: Any,
) -> tuple[HookedVisionModel, Callable, dict[str, Any]]:
    """Like :func:`load_vision_model_with_record`, for demos that must run on any machine: when pretrained
    weights cannot be had, it says so through ``say`` and uses the random init drawn from ``seed`` instead."""
    try:
        return load_vision_model_with_record(
            spec, weights=weights, pretrained=pretrained, seed=seed, **kwargs
        )
    except PretrainedWeightsUnavailable as err:
        say(
            f"note: {err.reason}; using the same architecture with RANDOM weights (seed {seed}): "
            "its features carry no learned meaning"
        )
        return load_vision_model_with_record(spec, pretrained=False, seed=seed, **kwargs)


def load_model_for_sae(
    sae_or_metadata: Any,
    *,
    device: str = "cpu",
    model_name: str | None = None,
    weights: str | os.PathLike | None = None,
    say: Callable[[str], Any] = print,
) -> tuple[HookedVisionModel, Callable, dict[str, Any]]:
    """Rebuild the vision model an SAE was trained on, from its metadata.

    Returns ``(model, preprocess, weights_record)``.

    Reads ``model_name``, ``weights`` (the :func:`weights_record` of the training run: the pretrained tag, the
    weights file, checked by hash, or the random seed) and ``image_size``. ``model_name`` / ``weights``
    override the metadata; every difference from what the SAE was trained on is said through ``say``.
    """
    meta = getattr(getattr(sae_or_metadata, "cfg", None), "metadata", sae_or_metadata)
    trained_on = meta.get("model_name")
    spec = model_name or trained_on
    if not spec:
        raise ValueError(
            "the SAE's metadata names no model (metadata.model_name); give the model spec explicitly"
        )
    if model_name and trained_on and model_name != trained_on:
        say(f"warning: the SAE was trained on {trained_on}, not on {model_name}")
    record = _as_record(meta.get("weights"))
    image_size = meta.get("image_size")
    kwargs: dict[str, Any] = dict(device=device, img_size=tuple(image_size) if image_size else None)
    if weights:
        if record is not None and record.get("source") != "file":
            say(f"warning: the SAE was trained with {describe_weights(record)}, loading {weights} instead")
        elif record is not None and record.get("sha256") and file_sha256(weights) != record["sha256"]:
            say(f"warning: {weights} is not the weights file the SAE was trained with ({record['path']})")
        return load_vision_model_with_record(spec, weights=weights, **kwargs)
    if record is None:
        say(
            f"note: the SAE's metadata does not say which weights of {spec} it was trained on; "
            "using pretrained"
        )
        return load_vision_model_with_record(spec, **kwargs)
    if record["source"] == "file":
        path = record["path"]
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"the SAE was trained with the weights file {path}, which is not here; "
                "pass it with --weights FILE"
            )
        if record.get("sha256") and file_sha256(path) != record["sha256"]:
            say(f"warning: {path} changed since the SAE was trained (other sha256)")
        return load_vision_model_with_record(spec, weights=path, **kwargs)
    if record["source"] == "random-init":
        say(
            f"note: the SAE was trained on {spec} with RANDOM weights (seed {record['seed']}); "
            "rebuilding them"
        )
        return load_vision_model_with_record(spec, pretrained=False, seed=int(record["seed"]), **kwargs)
    return load_vision_model_with_record(spec, **kwargs)


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights could not be had (offline, no local copy, unknown tag). ``reason`` is one line."""

    def __init__(self, spec: str, err: BaseException):
        self.spec = spec
        self.reason = f"no pretrained weights for {spec} ({type(err).__name__}: {_first_line(err)})"
        super().__init__(
            f"{self.reason}. Pass a local checkpoint (--weights FILE, weights=FILE) or ask for a random "
            "model (--random-init, pretrained=False); offline, pretrained weights must already be in the "
            "local cache"
        )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""


def _not_available(spec: str, err: Exception) -> PretrainedWeightsUnavailable:
    return PretrainedWeightsUnavailable(spec, err)


def _load_timm(spec, name, pretrained, device, img_size, weights, kwargs):
    if not timm.is_model(name.partition(".")[0]):
        raise ValueError(
            f"unknown timm model {name!r} in {spec!r}; see timm.list_models(), e.g. {SPEC_EXAMPLES}"
        )
    kwargs = dict(kwargs)
    is_cnn = _is_timm_cnn(name)
    if img_size is not None and not is_cnn:  # a CNN takes any size: only the transform changes
        kwargs["img_size"] = img_size
    if weights is not None:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs
        )
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except RuntimeError as err:
            raise _not_available(spec, err) from err
        except OSError as err:  # hub errors (LocalEntryNotFoundError, ...) are OSErrors
            raise _not_available(spec, err) from err
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    model = model.to(device).eval()
    data_cfg = resolve_model_data_config(model)
    if is_cnn:
        size = data_cfg["input_size"][-2:] if img_size is None else _pair(img_size)
        hooked = TimmHookedConvNet(model, spec=spec, image_size=size)
    else:
        hooked = TimmHookedVisionModel(model, spec=spec)
    # the pretrained cfg keeps the default resolution; the transform must produce the model's input size
    data_cfg["input_size"] = (hooked.cfg.in_chans, *hooked.cfg.image_size)
    return hooked, create_transform(**data_cfg, is_training=False)


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _is_timm_cnn(name: str) -> bool:
    """Whether timm builds ``name`` in its ResNet / ConvNeXt module (read from the registry, not built)."""
    entrypoint = timm.models.model_entrypoint(name.partition(".")[0])
    return entrypoint.__module__ in {cls.__module__ for cls in CNN_CLASSES}


def _load_open_clip(spec, name, pretrained, device, img_size, weights, kwargs):
    if name.startswith(("hf-hub:", "local-dir:")):
        model_name, tag, arch = name, None, name
        tag_cfg: dict = {}
    else:
        arch, _, tag = name.partition("/")
        tag = tag or None
        if arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        if tag and not tag_cfg:
            raise ValueError(
                f"unknown pretrained tag {tag!r} for {arch}; known tags: "
                f"{', '.join(open_clip.list_pretrained_tags_by_model(arch))}"
            )
        model_name = arch
    overlay = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    if weights is not None:
        pretrained_arg = str(weights)
    elif pretrained and tag:
        pretrained_arg = tag
    elif pretrained and model_name == arch and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"{spec}: give a pretrained tag (open_clip:{arch}/<tag>) or pretrained=False")
    else:
        pretrained_arg = None
    create_kwargs = dict(
        pretrained=pretrained_arg,
        device=device,
        force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        force_image_size=img_size,
        force_preprocess_cfg=overlay,
        load_weights=bool(pretrained or weights is not None),
        pretrained_text=bool(pretrained),
    )
    create_kwargs.update(kwargs)
    try:
        model = open_clip.create_model(model_name, **create_kwargs)
    except RuntimeError as err:
        if pretrained_arg is not None and weights is None:
            raise _not_available(spec, err) from err
        raise
    model.eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return OpenClipHookedVisionModel(model, spec=spec, arch=arch), preprocess
