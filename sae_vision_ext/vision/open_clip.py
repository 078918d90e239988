"""open_clip adapter: hooks on an unmodified open_clip model (CLIP, CustomTextCLIP) or its visual tower.

Two visual towers exist in open_clip:

- ``VisionTransformer`` (CLIP ViT-B-32 / B-16 / L-14 ...). The forward mirrors ``_embeds`` +
  ``transformer`` + ``_pool`` + ``proj``::

      x = cat([class_embedding, conv1(images) as tokens]) + positional_embedding; patch_dropout
                                                   -> hook_embed
      x = ln_pre(x)                                -> blocks.0.hook_resid_pre
      x = resblocks(x)  (sequence-first LND inside when transformer.batch_first is False; hooks see NLD)
      pooled, tokens = _pool(x)   (ln_post + CLS / mean / attention pool)  -> hook_pooled
      embed = pooled @ proj                        -> hook_image_embed

- ``TimmModel`` (SigLIP / SigLIP2 and other ``timm_model_name`` configs): a timm trunk then an open_clip
  head; the trunk is hooked as in ``vision/timm.py`` and ``hook_image_embed`` is ``head(trunk_head(pooled))``.

The text tower stays reachable: ``model.encode_text(tokens)`` and ``model.tokenizer``.
"""

from __future__ import annotations

import open_clip
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import (
    CustomResidualAttentionBlock,
    ResidualAttentionBlock,
    Transformer,
    VisionTransformer,
)
from torch import Tensor, nn

from sae_vision_ext.vision.hooked_vision_model import HookedVisionModel, TokenLayout, VisionModelConfig
from sae_vision_ext.vision.timm import (
    check_timm_trunk,
    timm_attn_branch,
    timm_block_kind,
    timm_embed,
    timm_head_width,
    timm_mlp_branch,
    timm_pool,
    timm_token_layout,
)


def _visual_of(model: nn.Module) -> nn.Module:
    return model.visual if hasattr(model, "visual") else model


class OpenClipHookedVisionModel(HookedVisionModel):
    """Hooked open_clip model; ``model.model`` is the bare open_clip model (whole CLIP if one was given)."""

    def __init__(self, model: nn.Module, spec: str | None = None, arch: str | None = None):
        visual = _visual_of(model)
        if isinstance(visual, TimmModel):
            check_timm_trunk(visual.trunk)
            self_kind = "timm"
        elif isinstance(visual, VisionTransformer):
            for method in ("forward", "_embeds", "_pool", "_global_pool"):
                if getattr(type(visual), method) is not getattr(VisionTransformer, method):
                    raise NotImplementedError(f"{type(visual).__name__} overrides VisionTransformer.{method}")
            if type(visual.transformer).forward is not Transformer.forward:
                raise NotImplementedError(
                    f"{type(visual.transformer).__name__} overrides Transformer.forward"
                )
            self_kind = "vit"
        else:
            raise NotImplementedError(
                f"open_clip visual tower {type(visual).__name__} is not a ViT "
                "(ModifiedResNet etc. unsupported)"
            )
        self.__dict__["_tower_kind"] = self_kind
        self.__dict__["_arch"] = arch
        self.__dict__["_tokenizer"] = None
        spec = spec or f"open_clip:{arch or type(model).__name__}"
        family = "siglip" if "siglip" in spec.lower() else "clip"
        super().__init__(model, spec=spec, family=family)

    # ------------------------------------------------------------------ towers
    @property
    def visual(self) -> nn.Module:
        return _visual_of(self.model)

    @property
    def batch_first(self) -> bool:  # type: ignore[override]
        if self._tower_kind == "timm":
            return True
        return bool(getattr(self.visual.transformer, "batch_first", True))

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """The wrapped model's own text embedding (not hooked)."""
        if not hasattr(self.model, "encode_text"):
            raise AttributeError(f"{self.spec}: only the visual tower was wrapped; there is no text tower")
        return self.model.encode_text(tokens, normalize=normalize)

    @property
    def tokenizer(self):
        """open_clip's tokenizer for this architecture (SigLIP's comes from the HF Hub: cached or online)."""
        if self._tokenizer is None:
            if not self._arch:
                raise RuntimeError(f"{self.spec}: architecture unknown, cannot pick a tokenizer")
            try:
                self.__dict__["_tokenizer"] = open_clip.get_tokenizer(self._arch)
            except Exception as err:  # noqa: BLE001 - any hub / tokenizers failure
                raise RuntimeError(
                    f"could not build the tokenizer of {self._arch} ({type(err).__name__}: {err}); SigLIP "
                    "tokenizers are downloaded from the Hugging Face Hub: run once online or pre-fill the "
                    "HF cache"
                ) from err
        return self._tokenizer

    # ------------------------------------------------------------------ library-specific steps
    def _library_blocks(self):
        visual = self.visual
        if self._tower_kind == "timm":
            return visual.trunk.blocks
        return visual.transformer.resblocks

    def _block_kind(self, block):
        if self._tower_kind == "timm":
            return timm_block_kind(block)
        forward = type(block).forward
        if forward is ResidualAttentionBlock.forward:
            return "open_clip_block"
        if forward is CustomResidualAttentionBlock.forward:
            return "open_clip_custom_block"
        return "opaque"

    def _attn_branch(self, kind, block, x):
        if kind == "timm_block":
            return timm_attn_branch(block, x)
        if kind == "open_clip_block":
            return block.ls_1(block.attention(q_x=block.ln_1(x), k_x=None, v_x=None, attn_mask=None))
        return block.ls_1(block.ln_attn(block.attn(block.ln_1(x), attn_mask=None)))

    def _mlp_branch(self, kind, block, x):
        if kind == "timm_block":
            return timm_mlp_branch(block, x)
        return block.ls_2(block.mlp(block.ln_2(x)))

    def _embed(self, images):
        visual = self.visual
        if self._tower_kind == "timm":
            return timm_embed(visual.trunk, images)
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + visual.positional_embedding.to(x.dtype)
        return visual.patch_dropout(x)

    def _pre_norm(self, x):
        if self._tower_kind == "timm":
            return self.visual.trunk.norm_pre(x)
        return self.visual.ln_pre(x)

    def _enter_blocks(self, x):
        return x if self.batch_first else x.transpose(0, 1).contiguous()

    def _exit_blocks(self, x):
        return x if self.batch_first else x.transpose(0, 1)

    def _head(self, x):
        visual = self.visual
        if self._tower_kind == "timm":
            trunk = visual.trunk
            pooled = self.hook_pooled(timm_pool(trunk, x, self.hook_normed))
            out = visual.head(trunk.head(trunk.head_drop(pooled)))
            return self.hook_image_embed(out)
        if self.has_normed:  # open_clip's _pool for this layout, with the normed tokens hooked
            pooled, tokens = visual._global_pool(self.hook_normed(visual.ln_post(x)))
        else:
            pooled, tokens = visual._pool(x)
        pooled = self.hook_pooled(pooled)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        pooled = self.hook_image_embed(pooled)
        return (pooled, tokens) if visual.output_tokens else pooled

    @property
    def has_normed(self) -> bool:
        visual = self.visual
        if self._tower_kind == "timm":
            return True
        return visual.attn_pool is None and not getattr(visual, "final_ln_after_pool", False)

    def _token_layout(self):
        visual = self.visual
        if self._tower_kind == "timm":
            return timm_token_layout(visual.trunk)
        grid = tuple(int(g) for g in visual.grid_size)
        return TokenLayout(n_cls=1, n_registers=0, grid_size=grid, n_patches=grid[0] * grid[1], n_prefix=1)

    def _image_embed_width(self) -> int:
        visual = self.visual
        if self._tower_kind == "timm":
            width = timm_head_width(visual.trunk)
            for module in visual.head.modules():
                if isinstance(module, nn.Linear):
                    width = module.out_features
            return width
        if visual.proj is not None:
            return int(visual.proj.shape[1])
        return int(visual.ln_post.normalized_shape[0])

    def _make_cfg(self):
        visual = self.visual
        blocks = self._library_blocks()
        attn = getattr(blocks[0], "attn", None) if len(blocks) else None
        n_heads = getattr(attn, "num_heads", None)
        if self._tower_kind == "timm":
            trunk = visual.trunk
            d_model = int(trunk.embed_dim)
            d_pooled = d_model
            image_size = tuple(int(s) for s in trunk.patch_embed.img_size)
            patch_size = tuple(int(s) for s in trunk.patch_embed.patch_size)
            in_chans = int(trunk.in_chans)
        else:
            d_model = int(visual.transformer.width)
            d_pooled = int(visual.ln_post.normalized_shape[0])
            image_size = tuple(int(s) for s in visual.image_size)
            patch_size = tuple(int(s) for s in visual.patch_size)
            in_chans = int(visual.conv1.in_channels)
        return VisionModelConfig(
            model_name=self.spec,
            library="open_clip",
            family=self.family,
            d_model=d_model,
            n_layers=len(blocks),
            n_heads=n_heads,
            image_size=image_size,
            patch_size=patch_size,
            in_chans=in_chans,
            d_pooled=d_pooled,
            d_image_embed=self._image_embed_width(),
            token_layout=self.token_layout,
            extra={"tower": self._tower_kind, "batch_first": self.batch_first},
        )
