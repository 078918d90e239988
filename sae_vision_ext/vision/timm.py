"""timm adapter: hooks on an unmodified ``timm.models.vision_transformer.VisionTransformer``.

Covers CLIP (``vit_*_clip_*``), SigLIP (``vit_*_siglip_*``: attention-pool head, no CLS), DINOv2
(``vit_*_patch14_dinov2`` and ``*_reg4_*`` with 4 registers, layer scale, no_embed_class) and plain ViT /
DeiT-3 (``token`` / ``avg`` pooling, fc_norm, norm_pre). The forward mirrors timm's
``forward_features`` + ``forward_head``::

    x = patch_drop(_pos_embed(patch_embed(images)))   -> hook_embed
    x = norm_pre(x)                                   -> blocks.0.hook_resid_pre
    x = blocks(x); x = norm(x)                        -> hook_normed
    pooled = fc_norm(pool(x))                         -> hook_pooled
    out = head(head_drop(pooled))                     -> hook_image_embed (CLIP / SigLIP)

The timm trunk helpers are shared with open_clip's ``TimmModel`` towers (SigLIP in open_clip).
"""

from __future__ import annotations

from collections.abc import Callable

from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from sae_vision_ext.vision.hooked_vision_model import HookedVisionModel, TokenLayout, VisionModelConfig


def check_timm_trunk(trunk: nn.Module) -> None:
    """Accept a timm VisionTransformer whose forward path is timm's own (subclass overrides change it)."""
    if not isinstance(trunk, VisionTransformer):
        raise TypeError(
            f"expected a timm VisionTransformer, got {type(trunk).__module__}.{type(trunk).__name__}"
        )
    for method in ("forward", "forward_features", "forward_head"):
        if getattr(type(trunk), method) is not getattr(VisionTransformer, method):
            raise NotImplementedError(
                f"{type(trunk).__name__} overrides VisionTransformer.{method}; its forward cannot be "
                "reproduced exactly by the hooked wrapper"
            )
    n_cls = 1 if trunk.has_class_token else 0
    if trunk.num_prefix_tokens != n_cls + trunk.num_reg_tokens:
        raise NotImplementedError(f"{type(trunk).__name__}: prefix tokens other than CLS and registers")


def timm_block_kind(block: nn.Module) -> str:
    """'timm_block' when the block runs timm's pre-norm ``Block.forward``, else 'opaque' (run whole)."""
    return "timm_block" if type(block).forward is Block.forward else "opaque"


def timm_attn_branch(block: nn.Module, x: Tensor) -> Tensor:
    """``drop_path1(ls1(attn(norm1(x))))`` as in timm ``Block.forward``."""
    return block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=None, is_causal=False)))


def timm_mlp_branch(block: nn.Module, x: Tensor) -> Tensor:
    """``drop_path2(ls2(mlp(norm2(x))))`` as in timm ``Block.forward``."""
    return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def timm_embed(trunk: nn.Module, images: Tensor) -> Tensor:
    """Tokens ``[B, T, d]`` before ``norm_pre``: patch embed, prefix tokens, position embeddings."""
    x = trunk.patch_embed(images)
    x = trunk._pos_embed(x)
    return trunk.patch_drop(x)


def timm_pool(trunk: nn.Module, x: Tensor, normed_hook: Callable[[Tensor], Tensor]) -> Tensor:
    """``fc_norm(pool(normed_hook(norm(x))))``: the pooled features before the classifier head."""
    return trunk.fc_norm(trunk.pool(normed_hook(trunk.norm(x))))


def timm_token_layout(trunk: nn.Module) -> TokenLayout:
    grid = tuple(int(g) for g in trunk.patch_embed.grid_size)
    n_cls = 1 if trunk.has_class_token else 0
    n_reg = int(trunk.num_reg_tokens)
    return TokenLayout(
        n_cls=n_cls, n_registers=n_reg, grid_size=grid, n_patches=grid[0] * grid[1], n_prefix=n_cls + n_reg
    )


def timm_head_width(trunk: nn.Module) -> int:
    head = trunk.head
    return head.out_features if isinstance(head, nn.Linear) else int(trunk.embed_dim)


def timm_family(name: str) -> str:
    """clip | siglip | dinov2 | vit, from the model name; fine-tuned towers (``*ft_*``) are classifiers."""
    name = name.lower()
    if "ft_" in name.rpartition(".")[2]:
        return "vit"
    if "siglip" in name:
        return "siglip"
    if "clip" in name:
        return "clip"
    if "dinov2" in name:
        return "dinov2"
    return "vit"


def timm_spec(trunk: nn.Module) -> str:
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(trunk).__name__
    tag = cfg.get("tag")
    return f"timm:{arch}.{tag}" if tag else f"timm:{arch}"


class TimmHookedVisionModel(HookedVisionModel):
    """Hooked timm VisionTransformer; ``model.model`` is the bare timm model."""

    def __init__(self, model: nn.Module, spec: str | None = None, family: str | None = None):
        check_timm_trunk(model)
        spec = spec or timm_spec(model)
        super().__init__(model, spec=spec, family=family or timm_family(spec))

    def _library_blocks(self):
        return self.model.blocks

    def _block_kind(self, block):
        return timm_block_kind(block)

    def _attn_branch(self, kind, block, x):
        return timm_attn_branch(block, x)

    def _mlp_branch(self, kind, block, x):
        return timm_mlp_branch(block, x)

    def _embed(self, images):
        return timm_embed(self.model, images)

    def _pre_norm(self, x):
        return self.model.norm_pre(x)

    def _head(self, x):
        trunk = self.model
        pooled = self.hook_pooled(timm_pool(trunk, x, self.hook_normed))
        out = trunk.head(trunk.head_drop(pooled))
        if self.has_image_embed:
            out = self.hook_image_embed(out)
        return out

    def _token_layout(self):
        return timm_token_layout(self.model)

    def _make_cfg(self):
        trunk = self.model
        blocks = trunk.blocks
        n_heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if len(blocks) else None
        return VisionModelConfig(
            model_name=self.spec,
            library="timm",
            family=self.family,
            d_model=int(trunk.embed_dim),
            n_layers=len(blocks),
            n_heads=n_heads,
            image_size=tuple(int(s) for s in trunk.patch_embed.img_size),
            patch_size=tuple(int(s) for s in trunk.patch_embed.patch_size),
            in_chans=int(trunk.in_chans),
            d_pooled=int(trunk.embed_dim),
            d_image_embed=timm_head_width(trunk) if self.has_image_embed else None,
            token_layout=self.token_layout,
            extra={"global_pool": trunk.global_pool},
        )
