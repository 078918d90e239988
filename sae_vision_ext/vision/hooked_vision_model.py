"""HookedVisionModel: a TransformerLens ``HookedRootModule`` over an unmodified timm or open_clip ViT.

The wrapped model (``model.model``) keeps its own modules, parameters and state dict. The wrapper owns
only ``HookPoint`` modules, placed so that every hook name is the real attribute path of a HookPoint that
the forward pass calls (``model.blocks[3].hook_resid_post`` is ``"blocks.3.hook_resid_post"``), so
SAELens's ``add_sae`` splice (``set_deep_attr`` + ``setup()``) works unchanged.

The forward pass re-runs the library's own forward, step by step, calling the library's own submodules
in the library's order (same ops, same order: outputs are bit-identical in eval mode). Per block
(pre-norm ViT, ``ls`` = layer scale, ``dp`` = drop path, both identity when absent or in eval mode)::

    resid_pre  = x
    attn_out   = dp1(ls1(attn(norm1(resid_pre))))
    resid_mid  = resid_pre + attn_out
    mlp_out    = dp2(ls2(mlp(norm2(resid_mid))))
    resid_post = resid_mid + mlp_out

Hook names (token hooks are always batch-first ``[B, T, d_model]``, whatever the library's layout):

- ``hook_embed``: patch embeddings with the prefix tokens (CLS, registers) concatenated and the position
  embeddings added (and patch dropout, a no-op in eval), BEFORE the pre-transformer norm (CLIP's
  ``ln_pre``, timm's ``norm_pre``). For models without a pre-norm it equals ``blocks.0.hook_resid_pre``.
- ``blocks.{i}.hook_resid_pre|hook_attn_out|hook_resid_mid|hook_mlp_out|hook_resid_post`` as above.
  Blocks whose class the wrapper does not know are run whole and expose only ``hook_resid_pre`` and
  ``hook_resid_post``.
- ``hook_normed``: ``[B, T, d_model]`` every token after the final norm (timm's ``norm``, CLIP's ``ln_post``),
  before pooling: what DINOv2 users call its output tokens. Only where the library norms the tokens before
  pooling (every timm tower; open_clip ViTs without attention pooling or ``final_ln_after_pool``).
- ``hook_pooled``: ``[B, d]`` after the final norm and pooling (CLS token, mean, or attention pool),
  before any projection or classifier head.
- ``hook_image_embed`` (CLIP / SigLIP only): ``[B, d_embed]`` the joint image-text embedding
  (unnormalised), i.e. what ``encode_image`` returns.

A hook that returns a tensor replaces the activation downstream (TransformerLens semantics).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from sae_vision_ext.vision.splice import SAESplicingMixin

BLOCK_HOOKS_FULL = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
BLOCK_HOOKS_COARSE = ("hook_resid_pre", "hook_resid_post")
TOKEN_SELECTIONS = ("cls", "registers", "prefix", "patches", "spatial", "all")


class UnknownHookError(KeyError):
    """An unknown hook name; the message lists the valid ones. A KeyError (as TransformerLens raises)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class VisionActivationCache(ActivationCache):
    """TransformerLens ``ActivationCache`` whose missing-key error lists the cached names."""

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, str) and key not in self.cache_dict:
            raise UnknownHookError(
                f"{key!r} is not in this cache. Cached names: {describe_hook_names(list(self.cache_dict))}"
            )
        return super().__getitem__(key)


@dataclass(frozen=True)
class TokenLayout:
    """Token order of a ViT sequence: ``[cls?, registers..., patches...]`` (patches row-major over the grid).

    ``n_prefix = n_cls + n_registers``; ``n_tokens = n_prefix + n_patches``; ``n_patches = gh * gw``.
    """

    n_cls: int
    n_registers: int
    grid_size: tuple[int, int]
    n_patches: int
    n_prefix: int

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def token_slice(self, which: str) -> slice:
        """Positions of ``which`` in the sequence: cls | registers | prefix | patches (= spatial) | all."""
        if which == "cls":
            if self.n_cls == 0:
                raise ValueError(
                    "this model has no CLS token (e.g. SigLIP pools with attention); "
                    "select 'patches' or use hook_pooled"
                )
            return slice(0, self.n_cls)
        if which == "registers":
            if self.n_registers == 0:
                raise ValueError("this model has no register tokens (only DINOv2 *_reg4 variants have them)")
            return slice(self.n_cls, self.n_prefix)
        if which == "prefix":
            return slice(0, self.n_prefix)
        if which in ("patches", "spatial"):
            return slice(self.n_prefix, self.n_tokens)
        if which == "all":
            return slice(0, self.n_tokens)
        raise ValueError(f"unknown token selection {which!r}; choose one of {', '.join(TOKEN_SELECTIONS)}")

    def select(self, acts: Tensor, which: str) -> Tensor:
        """``acts[..., T, d] -> acts[..., n, d]`` keeping the tokens named by ``which`` (a view)."""
        if acts.dim() < 2 or acts.shape[-2] != self.n_tokens:
            raise ValueError(
                f"expected token activations [..., {self.n_tokens}, d] ({self.n_prefix} prefix + "
                f"{self.n_patches} patches), got shape {list(acts.shape)}; pooled hooks have no tokens"
            )
        return acts[..., self.token_slice(which), :]

    def to_grid(self, patch_acts: Tensor) -> Tensor:
        """``[..., n_patches, d] -> [..., gh, gw, d]`` (patch tokens only: ``select(.., 'patches')``)."""
        if patch_acts.shape[-2] != self.n_patches:
            raise ValueError(f"expected {self.n_patches} patch tokens, got shape {list(patch_acts.shape)}")
        return patch_acts.reshape(*patch_acts.shape[:-2], *self.grid_size, patch_acts.shape[-1])


@dataclass
class VisionModelConfig:
    """What callers need to know about a hooked vision model (``model.cfg``)."""

    model_name: str
    library: str
    family: str
    d_model: int
    n_layers: int
    n_heads: int | None
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    d_pooled: int
    d_image_embed: int | None
    token_layout: TokenLayout
    extra: dict[str, Any] = field(default_factory=dict)


class BlockHooks(nn.Module):
    """Per-block container of HookPoints (owns no parameters; references no library module)."""

    def __init__(self, names: Sequence[str]):
        super().__init__()
        for name in names:
            setattr(self, name, HookPoint())
        self.hook_names = tuple(names)


def describe_hook_names(names: Sequence[str]) -> str:
    """Compact listing: names that differ only in their last index as ``blocks.{0..11}.hook_x``
    (``stages.2.blocks.{0..5}.hook_out``), others verbatim, in order of first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    order: list[str | tuple[str, str]] = []
    for name in names:
        match = re.fullmatch(r"(.+)\.(\d+)\.([^.]+)", name)
        if match is None:
            order.append(name)
            continue
        key = (match.group(1), match.group(3))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(match.group(2)))
    parts = []
    for item in order:
        if isinstance(item, str):
            parts.append(item)
            continue
        layers = sorted(set(groups[item]))
        if len(layers) == 1:
            idx = str(layers[0])
        elif layers == list(range(layers[0], layers[-1] + 1)):
            idx = f"{{{layers[0]}..{layers[-1]}}}"
        else:
            idx = "{" + ",".join(map(str, layers)) + "}"
        parts.append(f"{item[0]}.{idx}.{item[1]}")
    return ", ".join(parts) if parts else "(none)"


class HookedVisionModel(SAESplicingMixin, HookedRootModule):
    """TransformerLens-style hooked ViT over an unmodified timm / open_clip model.

    Build one with :func:`sae_vision_ext.vision.load.load_vision_model` or
    :func:`sae_vision_ext.vision.load.wrap_model`. Subclasses
    (``vision/timm.py``, ``vision/open_clip.py``) provide the library-specific steps: ``_embed``,
    ``_pre_norm``, ``_library_blocks``, ``_head`` and per-block branch functions.
    """

    batch_first: bool = True
    layer_noun: str = "blocks"  # what ``stop_at_layer`` counts

    def __init__(self, model: nn.Module, spec: str, family: str):
        super().__init__()
        self.model = model
        self.spec = spec
        self.family = family
        self.__dict__["_preprocess"] = None
        self._build_hooks()
        self.token_layout = self._token_layout()
        self.cfg = self._make_cfg()
        self._hook_widths = self._compute_hook_widths()
        self.setup()

    def _build_hooks(self) -> None:
        """The wrapper's HookPoints, at the attribute paths that are their names."""
        blocks = list(self._library_blocks())
        self._block_kinds = [self._block_kind(block) for block in blocks]
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(
            BlockHooks(BLOCK_HOOKS_COARSE if kind == "opaque" else BLOCK_HOOKS_FULL)
            for kind in self._block_kinds
        )
        if self.has_normed:
            self.hook_normed = HookPoint()
        self.hook_pooled = HookPoint()
        if self.has_image_embed:
            self.hook_image_embed = HookPoint()

    def setup(self):
        """Index the wrapper's own HookPoints (never touches the wrapped model's modules)."""
        self.mod_dict = {}
        self.hook_dict = {}
        for name, module in self.named_modules():
            if name in ("", "model") or name.startswith("model."):
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    # ------------------------------------------------------------------ library-specific parts
    @property
    def has_image_embed(self) -> bool:
        return self.family in ("clip", "siglip")

    @property
    def has_normed(self) -> bool:
        """Whether the library norms every token before pooling (then ``hook_normed`` exists)."""
        return True

    def _library_blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _block_kind(self, block: nn.Module) -> str:
        raise NotImplementedError

    def _embed(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _pre_norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _attn_branch(self, kind: str, block: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _mlp_branch(self, kind: str, block: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _head(self, x: Tensor) -> Any:
        raise NotImplementedError

    def _token_layout(self) -> TokenLayout:
        raise NotImplementedError

    def _make_cfg(self) -> VisionModelConfig:
        raise NotImplementedError

    # ------------------------------------------------------------------ public helpers
    @property
    def preprocess(self) -> Callable | None:
        """The model's own eval transform ``PIL.Image -> [3, H, W]`` (set by load_vision_model)."""
        return self.__dict__["_preprocess"]

    @preprocess.setter
    def preprocess(self, transform: Callable | None) -> None:
        self.__dict__["_preprocess"] = transform

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "preprocess":  # a transform may be an nn.Module: never register it as a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def _compute_hook_widths(self) -> dict[str, int]:
        widths = {"hook_embed": self.cfg.d_model}
        for i, hooks in enumerate(self.blocks):
            for name in hooks.hook_names:
                widths[f"blocks.{i}.{name}"] = self.cfg.d_model
        if self.has_normed:
            widths["hook_normed"] = self.cfg.d_model
        widths["hook_pooled"] = self.cfg.d_pooled
        if self.has_image_embed:
            widths["hook_image_embed"] = self.cfg.d_image_embed
        return widths

    def hook_width(self, name: str) -> int:
        """Last dimension ``d`` of the activation at hook ``name``."""
        if name not in self._hook_widths:
            raise self._unknown_hook(name, list(self._hook_widths))
        return self._hook_widths[name]

    def is_token_hook(self, name: str) -> bool:
        """True for ``[B, T, d]`` token activations, False for pooled ``[B, d]`` ones."""
        self.hook_width(name)
        return name not in ("hook_pooled", "hook_image_embed")

    def layout_at(self, name: str) -> TokenLayout:
        """Token layout of the activation at token hook ``name`` (the same for every hook of a ViT)."""
        if not self.is_token_hook(name):
            raise ValueError(f"{name!r} is pooled ([batch, d], one vector per image): it has no tokens")
        return self.token_layout

    def layer_of(self, name: str) -> int | None:
        """Block index whose run computes hook ``name`` (-1 before the first block); None when only the
        full forward does (final norm, pooling, head). ``stop_at_layer=layer_of(name) + 1`` reaches it."""
        if name.partition(".")[0] == "hook_embed":  # also the hooks of an SAE spliced there
            return -1
        match = re.match(r"blocks\.(\d+)\.", name)
        return int(match.group(1)) if match else None

    def _unknown_hook(self, name: Any, valid: Sequence[str] | None = None) -> UnknownHookError:
        valid = list(self.hook_dict) if valid is None else list(valid)
        message = f"unknown hook name {name!r} for {self.spec} ({self.n_layers} {self.layer_noun})."
        close = difflib.get_close_matches(str(name), valid, n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
        message += f" Valid names: {describe_hook_names(valid)}"
        return UnknownHookError(message)

    def _check_names(self, names: Any) -> None:
        if isinstance(names, str):
            names = [names]
        if isinstance(names, (list, tuple, set)):
            for name in names:
                if name not in self.hook_dict:
                    raise self._unknown_hook(name)

    def check_images(self, images: Any) -> None:
        """Raise a readable error unless ``images`` is a float tensor ``[B, C, H, W]`` of the model's size."""
        c = self.cfg.in_chans
        h, w = self.cfg.image_size
        expected = f"a float tensor [B, {c}, {h}, {w}]"
        hint = "; the `preprocess` returned by load_vision_model turns a PIL image into [3, H, W]"
        if not isinstance(images, Tensor):
            raise TypeError(f"{self.spec} expects {expected}, got {type(images).__name__}{hint}")
        shape = list(images.shape)
        if images.dim() == 3 and shape[0] == c:
            raise ValueError(
                f"{self.spec} expects {expected}, got {shape}: add a batch dimension (images.unsqueeze(0))"
            )
        if images.dim() != 4:
            raise ValueError(f"{self.spec} expects {expected}, got shape {shape}{hint}")
        if shape[1] != c:
            extra = " (channels-last? use images.permute(0, 3, 1, 2))" if shape[3] == c else ""
            raise ValueError(f"{self.spec} expects {c} channels, {expected}, got shape {shape}{extra}")
        if (shape[2], shape[3]) != (h, w):
            raise ValueError(
                f"{self.spec} expects images of size {h}x{w}, {expected}, got shape {shape}"
                f"{hint} (load with img_size=... for another resolution)"
            )
        if not images.is_floating_point():
            raise TypeError(f"{self.spec} expects {expected}, got dtype {images.dtype}{hint}")
        if images.dtype != self.dtype and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(
                f"{self.spec} runs in {self.dtype}, got images in {images.dtype}: pass images.to(model.dtype)"
            )

    # ------------------------------------------------------------------ forward
    def _token_hook(self, hook: nn.Module, x: Tensor) -> Tensor:
        """Call a token hook with a batch-first view; hand the result back in the library's layout."""
        if self.batch_first:
            return hook(x)
        return hook(x.transpose(0, 1)).transpose(0, 1)

    def _enter_blocks(self, x: Tensor) -> Tensor:
        return x

    def _exit_blocks(self, x: Tensor) -> Tensor:
        return x

    def _resolve_stop(self, stop_at_layer: int | None) -> int | None:
        if stop_at_layer is None:
            return None
        n = self.n_layers
        stop = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
        if not 0 <= stop <= n:
            raise ValueError(
                f"stop_at_layer={stop_at_layer} is out of range for {n} {self.layer_noun} "
                f"(use 0..{n}, or a negative index)"
            )
        return stop

    def forward(self, images: Tensor, stop_at_layer: int | None = None) -> Any:
        """The wrapped model's own output (``encode_image`` for CLIP/SigLIP, the timm head output).

        ``stop_at_layer=L`` runs the embedding and blocks ``0..L-1`` only (nothing after) and returns None;
        the activations are in the hooks (use ``run_with_cache``). Negative ``L`` counts from the end.
        """
        self.check_images(images)
        stop = self._resolve_stop(stop_at_layer)
        x = self.hook_embed(self._embed(images))
        if not self.training and x.shape[1] != self.token_layout.n_tokens:
            raise RuntimeError(
                f"{self.spec}: embedding gave {x.shape[1]} tokens, token_layout expects "
                f"{self.token_layout.n_tokens}; this model variant is not supported"
            )
        x = self._enter_blocks(self._pre_norm(x))
        library_blocks = self._library_blocks()
        n_run = self.n_layers if stop is None else stop
        for i in range(n_run):
            block, kind, hooks = library_blocks[i], self._block_kinds[i], self.blocks[i]
            x = self._token_hook(hooks.hook_resid_pre, x)
            if kind == "opaque":
                x = block(x)
            else:
                attn_out = self._token_hook(hooks.hook_attn_out, self._attn_branch(kind, block, x))
                x = self._token_hook(hooks.hook_resid_mid, x + attn_out)
                mlp_out = self._token_hook(hooks.hook_mlp_out, self._mlp_branch(kind, block, x))
                x = x + mlp_out
            x = self._token_hook(hooks.hook_resid_post, x)
        if stop is not None:
            return None
        return self._head(self._exit_blocks(x))

    # ------------------------------------------------------------------ TransformerLens API, checked
    def _enable_hook_with_name(self, name: str, hook: Callable, dir):
        self._check_names(name)
        return super()._enable_hook_with_name(name, hook, dir)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        self._check_names(name)
        return super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def run_with_cache(self, *model_args: Any, names_filter=None, **kwargs: Any):
        """``(output_or_None, cache)``; ``names_filter``: a name, a list of names, or a predicate.

        Unknown names raise (listing the valid ones); with ``stop_at_layer=L`` a requested name that
        the truncated run never reaches raises too.
        """
        self._check_names(names_filter)
        stop = kwargs.get("stop_at_layer")
        if stop is not None and isinstance(names_filter, (str, list, tuple)):
            stop = self._resolve_stop(stop)
            names = [names_filter] if isinstance(names_filter, str) else names_filter
            for name in names:
                layer = self.layer_of(name)
                if layer is None or layer >= stop:
                    raise ValueError(
                        f"{name!r} is not computed with stop_at_layer={kwargs['stop_at_layer']} "
                        f"(blocks 0..{stop - 1} run)"
                    )
        if isinstance(names_filter, tuple):
            names_filter = list(names_filter)
        out, cache = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        return out, VisionActivationCache(cache, self)
