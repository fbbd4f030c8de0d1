"""timm `NaFlexVit` on fixed-size image tensors (the path vitlens feeds it).

NaFlexViT accepts variable-resolution patch dictionaries as well as `[B, 3, H, W]` images;
the job's preprocessing resizes and crops every image to the model's input size, so the
lens runs the tensor path exactly: `NaFlexEmbeds` (linear patch embedding on timm's own
`batch_patchify`, or a conv stem; learned, factorised or no position embedding, resized to
the grid as timm does; CLS and register tokens prepended, no position embedding on them),
`norm_pre`, the blocks, `norm`, then `forward_head` (pooling, `fc_norm`, `head`).

The token grid is fixed once: the model's native input size is `embeds.default_img_size`
when the model was built from `img_size` alone, else timm's nominal input size (the
`pretrained_cfg` `input_size` that `resolve_data_config` gives the job's preprocessing);
`grid_size = input // patch_size`, `token_cell = patch_size`. An image of another size is
refused in `embed` (NaFlexVit would run it, on a different grid than the lens describes).

Covers: pre-norm `Block` and post-norm `ResPostBlock` (METHOD §1: sub-layer streams after
the block's own post-norm) with timm `Attention` (qk-norm, inner `norm`) and `Mlp` /
`GluMlp` / `SwiGLU`; layer scale; CLS (`token`), average, max, avgmax and attention (`map`)
pooling, with or without the prefix tokens in the pool; `fc_norm`; register tokens; models
without a final norm (C-RADIO). Token removal on the pooled models uses timm's own masked
pooling (`forward_head(..., patch_valid=...)`).

Refused with a reason: EVA blocks (`EvaBlock`, a NaFlexVit built from an EVA config or with
rotary embeddings, gated / grouped-query attention or SwiGLU-by-config), other attention
or block types, `global_pool=''` (the head reads every token separately: no pooled
output), attention pooling with its own position embedding, and an input size that is not
a whole number of patches.
"""

from __future__ import annotations

import torch
from timm.data import resolve_data_config
from timm.layers import Attention
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import Block, ResPostBlock

from vitlens.errors import UserError
from vitlens.lens.families.base import AttentionArgs, ViTAnatomy
from vitlens.lens.families.common import (
    AbsolutePositionAdapter,
    check_attn_pool,
    check_blocks,
    check_pool,
    pooled_parity_logits,
    timm_anatomy,
)
from vitlens.lens.families.vit import OTHER_ATTENTION, timm_block_forward
from vitlens.lens.trace import BlockTrace

BLOCK_TYPES = (Block, ResPostBlock)


def native_input_size(model: NaFlexVit) -> tuple[int, int]:
    """The (H, W) the lens analyses `model` at: `embeds.default_img_size` when the position
    embedding grid was derived from `img_size`, else timm's nominal input size (what
    `resolve_data_config`, and so the job's preprocessing, resizes to)."""
    default = model.embeds.default_img_size
    if default is not None:
        return int(default[0]), int(default[1])
    _, height, width = resolve_data_config({}, model=model)["input_size"]
    return int(height), int(width)


class NaFlexAdapter(AbsolutePositionAdapter):
    """`NaFlexVit` with timm `Block` / `ResPostBlock` blocks, on `[B, 3, H, W]` images."""

    family = "naflex"
    model_classes = (NaFlexVit,)

    model: NaFlexVit

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        check_pool(model)
        check_attn_pool(model)
        check_blocks(model.blocks, BLOCK_TYPES, (Attention,), block_what="NaFlexVit block",
                     block_note="supported: Block, ResPostBlock; EVA-style NaFlexVit blocks with rotary / gated / "
                                "grouped-query attention are not covered", attention_note=OTHER_ATTENTION)
        if model.rope is not None:  # only EVA blocks read it; kept as a guard against new block types
            raise UserError("rotary position embeddings (NaFlexVit rope_type): not covered by the naflex adapter")
        self.input_size = native_input_size(model)
        patch = model.embeds.patch_size
        if any(size % step for size, step in zip(self.input_size, patch)):
            raise UserError(f"input size {self.input_size} is not a whole number of {tuple(patch)} patches")

    def describe(self) -> ViTAnatomy:
        model = self.model
        patch = tuple(int(p) for p in model.embeds.patch_size)
        grid = tuple(int(g) for g in model.embeds.dynamic_feat_size(self.input_size))
        return timm_anatomy(
            self, grid_size=(grid[0], grid[1]), token_cell=(patch[0], patch[1]),
            post_norm=any(isinstance(block, ResPostBlock) for block in model.blocks),
        )

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """timm's own `_forward_embeds` on the image tensor: patches (+ learned / factorised
        position embedding on the grid), then CLS / registers prepended, `norm_pre`.

        # images: [B, 3, H, W] -> hidden: [B, P+N, d]
        """
        if tuple(images.shape[-2:]) != self.input_size:
            height, width = self.input_size
            raise UserError(f"images are {tuple(images.shape[-2:])}, but the lens describes this NaFlexVit "
                            f"at its input size ({height}, {width}): resize the images to it")
        return self.model._forward_embeds(images, patch_coord=None, patch_valid=None, attn_mask=None)["patches"]

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """`Block.forward` / `ResPostBlock.forward` in timm's order, every stream exposed.

        # resid_pre: [B, T, d] -> BlockTrace
        """
        return timm_block_forward(self.model.blocks[index - 1], index, resid_pre, args)

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))` as timm does; with `key_keep`, timm's own masked pooling
        (`patch_valid` = the kept image tokens; CLS pooling reads the CLS token either way).

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        model = self.model
        patch_valid = None if key_keep is None else key_keep[:, model.num_prefix_tokens:]  # [B, N]
        return model.forward_head(model.norm(resid_final), patch_valid=patch_valid)

    # ---- projection ----------------------------------------------------------------------
    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """What the pooling reads (`common.pooled_parity_logits`), prefix included when timm's
        pool includes it.

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        model = self.model
        return pooled_parity_logits(self, resid_final, 0 if model.pool_include_prefix else model.num_prefix_tokens)
