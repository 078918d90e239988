"""timm CNN adapter: hooks on an unmodified ``timm`` ResNet (every depth) or ConvNeXt (every size).

A feature map ``[B, C, H, W]`` reaches its hook as spatial tokens ``[B, H*W, C]`` (row-major over the
grid, a view of the map): what a hook returns is folded back to ``[B, C, H, W]`` in place of the map, so
SAEs, caches, token selection (``spatial`` = every position) and steering treat a CNN like a ViT
without prefix tokens. The forward re-runs timm's ``forward_features`` + ``forward_head`` step by step
with timm's own modules, in timm's order (outputs are bit-identical in eval mode)::

    x = stem(images)                                 -> hook_stem  (ResNet: conv1, bn1, act1, maxpool)
    for s, stage in enumerate(stages):               (ResNet: layer1..layer4)
        x = stage.downsample(x)                      (ConvNeXt; a ResNet block downsamples itself)
        for b, block in enumerate(stage.blocks):
            x = block(x)                             -> stages.{s}.blocks.{b}.hook_out
        (the stage's output)                         -> stages.{s}.hook_out
    x = norm_pre(x)                                  (ConvNeXt; identity unless the head norms first)
    pooled = forward_head(x, pre_logits=True)        -> hook_pooled: [B, d], the classifier's input
    logits = fc(pooled)

``stop_at_layer=L`` runs the stem and stages ``0..L-1``. Feature maps differ in size from stage to
stage, so a CNN has no single ``token_layout``: ``layout_at(hook_name)`` gives each map's grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.layers import NormMlpClassifierHead
from timm.models.convnext import ConvNeXt, ConvNeXtStage
from timm.models.resnet import ResNet
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from sae_vision_ext.vision.hooked_vision_model import (
    BlockHooks,
    HookedVisionModel,
    TokenLayout,
    VisionModelConfig,
)
from sae_vision_ext.vision.timm import timm_spec

CNN_CLASSES = (ResNet, ConvNeXt)


class StageHooks(nn.Module):
    """``stages.{s}``: ``hook_out`` and one ``blocks.{b}.hook_out`` per block (HookPoints only)."""

    def __init__(self, n_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(BlockHooks(("hook_out",)) for _ in range(n_blocks))
        self.hook_out = HookPoint()


def check_timm_cnn(model: nn.Module) -> None:
    """Accept a timm ResNet / ConvNeXt whose forward path is timm's own (subclass overrides change it)."""
    if not isinstance(model, CNN_CLASSES):
        raise TypeError(
            f"expected a timm ResNet or ConvNeXt, got {type(model).__module__}.{type(model).__name__}"
        )
    base = ResNet if isinstance(model, ResNet) else ConvNeXt
    for method in ("forward", "forward_features", "forward_head"):
        if getattr(type(model), method) is not getattr(base, method):
            raise NotImplementedError(
                f"{type(model).__name__} overrides {base.__name__}.{method}; its forward cannot be "
                "reproduced exactly by the hooked wrapper"
            )
    if isinstance(model, ConvNeXt):
        if not isinstance(model.head, NormMlpClassifierHead):
            raise NotImplementedError(
                f"{type(model.head).__name__} head (head_norm_first=True?): only the default "
                "NormMlpClassifierHead of timm's ConvNeXt is supported"
            )
        odd = [type(s).__name__ for s in model.stages if type(s).forward is not ConvNeXtStage.forward]
        if odd:
            raise NotImplementedError(f"ConvNeXt stages of classes {odd} override ConvNeXtStage.forward")
    elif model.global_pool.is_identity():
        raise NotImplementedError("a ResNet without global pooling (global_pool='') has no pooled vector")


def timm_cnn_family(model: nn.Module) -> str:
    return "resnet" if isinstance(model, ResNet) else "convnext"


class TimmHookedConvNet(HookedVisionModel):
    """Hooked timm ResNet / ConvNeXt; ``model.model`` is the bare timm model.

    ``image_size`` is the input size the model is run at (default: the pretrained config's); a CNN takes
    any size, but its feature-map grids, and so every layout, follow from it.
    """

    layer_noun = "stages"

    def __init__(self, model: nn.Module, spec: str | None = None, image_size: tuple[int, int] | None = None):
        check_timm_cnn(model)
        input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
        self.__dict__["_image_size"] = tuple(int(s) for s in (image_size or input_size[-2:]))
        spec = spec or timm_spec(model)
        super().__init__(model, spec=spec, family=timm_cnn_family(model))

    # ------------------------------------------------------------------ library-specific parts
    @property
    def has_image_embed(self) -> bool:
        return False

    @property
    def has_normed(self) -> bool:
        return False

    def _library_stages(self) -> list[nn.Module]:
        model = self.model
        if isinstance(model, ResNet):
            return [model.layer1, model.layer2, model.layer3, model.layer4]
        return list(model.stages)

    def _stage_blocks(self, stage: nn.Module) -> list[nn.Module]:
        return list(stage.blocks if isinstance(stage, ConvNeXtStage) else stage)

    def _stem(self, images: Tensor) -> Tensor:
        model = self.model
        if isinstance(model, ResNet):
            return model.maxpool(model.act1(model.bn1(model.conv1(images))))
        return model.stem(images)

    def _pre_logits(self, x: Tensor) -> Tensor:
        model = self.model
        if isinstance(model, ConvNeXt):
            x = model.norm_pre(x)
        return model.forward_head(x, pre_logits=True)

    def _classifier(self) -> Callable[[Tensor], Tensor]:
        model = self.model
        return model.fc if isinstance(model, ResNet) else model.head.fc

    def _build_hooks(self) -> None:
        self.hook_stem = HookPoint()
        self.stages = nn.ModuleList(StageHooks(len(self._stage_blocks(s))) for s in self._library_stages())
        self.hook_pooled = HookPoint()
        self.__dict__["_map_shapes"] = self._probe_map_shapes()

    def _token_layout(self) -> None:
        return None

    def _make_cfg(self) -> VisionModelConfig:
        model = self.model
        return VisionModelConfig(
            model_name=self.spec,
            library="timm",
            family=self.family,
            d_model=int(model.num_features),
            n_layers=len(self.stages),
            n_heads=None,
            image_size=self.__dict__["_image_size"],
            patch_size=self._final_stride(),
            in_chans=int(self._in_chans()),
            d_pooled=int(model.head_hidden_size),
            d_image_embed=None,
            token_layout=None,
            extra={
                "stage_widths": [
                    self._map_shapes[f"stages.{s}.hook_out"][0] for s in range(len(self.stages))
                ],
                "depths": [len(stage.blocks) for stage in self.stages],
            },
        )

    def _in_chans(self) -> int:
        first_conv = self.model.conv1 if isinstance(self.model, ResNet) else self.model.stem[0]
        while not isinstance(first_conv, nn.Conv2d):  # deep stems: a Sequential of convs
            first_conv = first_conv[0]
        return first_conv.in_channels

    def _final_stride(self) -> tuple[int, int]:
        """Input pixels per position of the last feature map (ViTs: the patch size)."""
        _, gh, gw = self._map_shapes[f"stages.{len(self.stages) - 1}.hook_out"]
        h, w = self.__dict__["_image_size"]
        return (h // gh, w // gw)

    # ------------------------------------------------------------------ hooks and layouts
    @property
    def n_layers(self) -> int:
        return len(self.stages)

    def _compute_hook_widths(self) -> dict[str, int]:
        widths = {name: shape[0] for name, shape in self._map_shapes.items()}
        widths["hook_pooled"] = self.cfg.d_pooled
        return widths

    def is_token_hook(self, name: str) -> bool:
        self.hook_width(name)
        return name != "hook_pooled"

    def layout_at(self, name: str) -> TokenLayout:
        """Spatial layout of the feature map at ``name``: ``H*W`` positions on an ``(H, W)`` grid."""
        if not self.is_token_hook(name):
            raise ValueError(f"{name!r} is pooled ([batch, d], one vector per image): it has no positions")
        _, h, w = self._map_shapes[name]
        return TokenLayout(n_cls=0, n_registers=0, grid_size=(h, w), n_patches=h * w, n_prefix=0)

    def layer_of(self, name: str) -> int | None:
        """Stage whose run computes ``name`` (-1 for the stem); None for ``hook_pooled``."""
        root, _, rest = name.partition(".")
        if root == "hook_stem":
            return -1
        if root == "stages":
            return int(rest.partition(".")[0])
        return None

    # ------------------------------------------------------------------ forward
    def _spatial(self, hook: nn.Module, x: Tensor) -> Tensor:
        """Call a hook on the map ``[B, C, H, W]`` as tokens ``[B, H*W, C]``; fold its result back."""
        b, c, h, w = x.shape
        return hook(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, images: Tensor, stop_at_layer: int | None = None) -> Any:
        """timm's logits; with ``stop_at_layer=L`` only the stem and stages ``0..L-1`` run (returns None)."""
        self.check_images(images)
        stop = self._resolve_stop(stop_at_layer)
        x = self._spatial(self.hook_stem, self._stem(images))
        library_stages = self._library_stages()
        for s in range(self.n_layers if stop is None else stop):
            stage, hooks = library_stages[s], self.stages[s]
            if isinstance(stage, ConvNeXtStage):
                x = stage.downsample(x)
            for block, block_hooks in zip(self._stage_blocks(stage), hooks.blocks, strict=True):
                x = self._spatial(block_hooks.hook_out, block(x))
            x = self._spatial(hooks.hook_out, x)
        if stop is not None:
            return None
        return self._classifier()(self.hook_pooled(self._pre_logits(x)))

    def _probe_map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``{hook: (C, H, W)}`` of every feature map at the model's input size, from one pass on the meta
        device (no compute, no change to the model: BatchNorm statistics included)."""
        model = self.model
        meta = {name: t.to("meta") for name, t in [*model.named_parameters(), *model.named_buffers()]}
        shapes: dict[str, tuple[int, int, int]] = {}

        def record(name: str, x: Tensor) -> Tensor:
            shapes[name] = tuple(int(s) for s in x.shape[1:])
            return x

        def features(images: Tensor) -> Tensor:
            x = record("hook_stem", self._stem(images))
            for s, stage in enumerate(self._library_stages()):
                x = stage.downsample(x) if isinstance(stage, ConvNeXtStage) else x
                for b, block in enumerate(self._stage_blocks(stage)):
                    x = record(f"stages.{s}.blocks.{b}.hook_out", block(x))
                record(f"stages.{s}.hook_out", x)
            return x

        probe = _Call(features)
        probe.model = model  # functional_call swaps the parameters found under this name
        meta = {f"model.{name}": t for name, t in meta.items()}
        images = torch.empty(1, self._in_chans(), *self.__dict__["_image_size"], device="meta")
        torch.func.functional_call(probe, meta, (images,), strict=True)
        return shapes


class _Call(nn.Module):
    """A module whose forward is ``fn`` (so ``torch.func.functional_call`` can run any function)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.__dict__["fn"] = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
