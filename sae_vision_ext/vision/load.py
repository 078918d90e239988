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

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_vision_ext.vision.hooked_vision_model import HookedVisionModel

SPEC_EXAMPLES = "'timm:vit_base_patch14_reg4_dinov2.lvd142m' or 'open_clip:ViT-B-32/laion2b_s34b_b79k'"


def parse_spec(spec: str) -> tuple[str, str]:
    """``'timm:name' -> ('timm', 'name')``; ``'open_clip:arch/tag' -> ('open_clip', 'arch/tag')``."""
    library, sep, name = spec.partition(":")
    library = library.strip().lower().replace("-", "_")
    if library == "openclip":
        library = "open_clip"
    if not sep or library not in ("timm", "open_clip") or not name:
        raise ValueError(f"model spec {spec!r} must be 'timm:<name>' or 'open_clip:<arch>/<tag>', e.g. {SPEC_EXAMPLES}")
    return library, name


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
        hooked, preprocess = _load_open_clip(spec, name, pretrained, device, img_size, weights, library_kwargs)
    hooked.eval()
    hooked.preprocess = preprocess
    return hooked, preprocess


def load_vision_model_or_random(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    local_only: bool = False,
    seed: int = 0,
    say: Callable[[str], Any] = print,
    **kwargs: Any,
) -> tuple[HookedVisionModel, Callable, str]:
    """``(model, preprocess, weights description)`` for scripts that must run on any machine.

    ``weights`` (a file) wins; else pretrained weights (``local_only``: only from local caches, no network),
    and when those cannot be loaded, or ``pretrained=False``, the same architecture with random weights drawn
    from ``seed`` (reproducible), with a note through ``say``. The description is ``"pretrained"``, the weights
    path, or ``"random-init(seed=N)"``.
    """
    if weights:
        model, preprocess = load_vision_model(spec, pretrained=False, weights=weights, **kwargs)
        return model, preprocess, str(weights)
    if pretrained:
        reason = "no weight caches on this machine"
        if not local_only or _weight_caches_exist():
            try:
                with _offline_hub() if local_only else contextlib.nullcontext():
                    model, preprocess = load_vision_model(spec, pretrained=True, **kwargs)
                return model, preprocess, "pretrained"
            except (RuntimeError, OSError, ValueError) as err:
                reason = type(err.__cause__ or err).__name__
        say(f"note: no pretrained weights for {spec} ({reason}); using the same architecture with RANDOM weights "
            "(features carry no learned meaning). Pass a weights file or put the weights in the local Hugging Face "
            "cache for a real run.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, preprocess = load_vision_model(spec, pretrained=False, **kwargs)
    return model, preprocess, f"random-init(seed={seed})"


@contextlib.contextmanager
def _offline_hub():
    """Make Hugging Face hub look-ups local-only for the duration (pretrained weights 'when present locally')."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        saved_constant = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        hub_constants, saved_constant = None, None
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_constant
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _weight_caches_exist() -> bool:
    """Whether any local cache could hold pretrained weights (HF hub, torch hub, open_clip's ~/.cache/clip).

    When none exists, trying a pretrained load would only build the model twice before falling back.
    """
    folders = [Path(os.path.expanduser("~/.cache/clip"))]
    try:
        import huggingface_hub.constants as hub_constants

        folders.append(Path(hub_constants.HF_HUB_CACHE))
    except (ImportError, AttributeError):
        pass
    try:
        folders.append(Path(torch.hub.get_dir()) / "checkpoints")
    except (RuntimeError, AttributeError):
        pass
    return any(folder.is_dir() and any(folder.iterdir()) for folder in folders)


def _not_available(spec: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load pretrained weights for {spec} ({type(err).__name__}: {err}). Offline, weights must "
        "already be in the Hugging Face / open_clip cache; otherwise pass pretrained=False (random init of "
        "the same architecture) or weights=<local checkpoint>"
    )


def _load_timm(spec, name, pretrained, device, img_size, weights, kwargs):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from sae_vision_ext.vision.timm import TimmHookedVisionModel

    kwargs = dict(kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if weights is not None:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise
            raise _not_available(spec, err) from err
        except OSError as err:  # hub errors (LocalEntryNotFoundError, ...) are OSErrors
            raise _not_available(spec, err) from err
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    model = model.to(device).eval()
    data_cfg = resolve_model_data_config(model)
    # the pretrained cfg keeps the default resolution; the transform must produce the model's input size
    data_cfg["input_size"] = (model.in_chans, *(int(s) for s in model.patch_embed.img_size))
    preprocess = create_transform(**data_cfg, is_training=False)
    return TimmHookedVisionModel(model, spec=spec), preprocess


def _load_open_clip(spec, name, pretrained, device, img_size, weights, kwargs):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from sae_vision_ext.vision.open_clip import OpenClipHookedVisionModel

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
            raise ValueError(f"unknown pretrained tag {tag!r} for {arch}; known tags: "
                             f"{', '.join(open_clip.list_pretrained_tags_by_model(arch))}")
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
