"""timm `VisionTransformerRelPos`: ViTs whose only position information is an attention bias.

Covers: pre-norm `RelPosBlock` (LayerScale `ls1` / `ls2` or none) and post-norm
`ResPostRelPosBlock` (METHOD §1: the sub-layer streams are taken after the block's own
post-norm, `norm1` after attention, `norm2` after the MLP), `RelPosAttention` with or
without `q_norm` / `k_norm`, the relative position bias of a per-block `rel_pos` module or of
the model-wide `shared_rel_pos` (`RelPosBias`: a Swin-style table; `RelPosMlp`: the
log-coordinate MLP of Swin-V2, zero bias to and from the CLS token), with or without a
class token (`num_prefix_tokens` 1 or 0; the model has no register tokens and no absolute
position embedding), CLS pooling, average pooling of the image tokens with the norm before
pooling (`norm`) or after it (`fc_norm`). The bias is the model's own `get_bias()`, passed to
`attend(..., bias=...)`, so METHOD §4's perturbations act on the same post-softmax attention
as timm's; token removal is key masking at full length (a shortened sequence would shift the
relative positions), and deletion uses the generic `logits_keeping`.

Refused with a reason: `global_pool=''` (the head classifies every token), blocks /
attention / position-bias modules / MLPs other than the ones above, a bias window that is
not the token grid.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp, RelPosBias, RelPosMlp
from timm.models.vision_transformer_relpos import (
    RelPosAttention,
    RelPosBlock,
    ResPostRelPosBlock,
    VisionTransformerRelPos,
)

from vitlens.errors import UserError
from vitlens.lens.families.base import ViTAnatomy
from vitlens.lens.families.common import (
    TOKEN_OR_AVG,
    BiasedAttentionAdapter,
    Scale,
    check_blocks,
    check_pool,
    require_type,
    timm_anatomy,
)

BLOCK_TYPES = (RelPosBlock, ResPostRelPosBlock)
REL_POS_TYPES = (RelPosBias, RelPosMlp)


class RelPosAdapter(BiasedAttentionAdapter):
    """timm `VisionTransformerRelPos` (every option of the class)."""

    family = "relpos"
    model_classes = (VisionTransformerRelPos,)
    qk_norm = True

    model: VisionTransformerRelPos

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        check_pool(model, TOKEN_OR_AVG)
        check_blocks(model.blocks, BLOCK_TYPES, (RelPosAttention,), mlp_types=(Mlp,))
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        rel_pos = [("the shared rel_pos", model.shared_rel_pos)] if model.shared_rel_pos is not None else []
        rel_pos += [(f"block {index}'s rel_pos", block.attn.rel_pos)
                    for index, block in enumerate(model.blocks, start=1) if block.attn.rel_pos is not None]
        for name, module in rel_pos:
            require_type(module, REL_POS_TYPES, "relative position module", name)
            if tuple(int(w) for w in module.window_size) != grid or module.prefix_tokens != model.num_prefix_tokens:
                raise UserError(f"{name} has window {tuple(module.window_size)} and {module.prefix_tokens} prefix "
                                f"token(s) but the sequence is {model.num_prefix_tokens} prefix token(s) and a "
                                f"{grid} token grid: its bias does not fit the sequence")

    def describe(self) -> ViTAnatomy:
        return timm_anatomy(self, post_norm=any(isinstance(block, ResPostRelPosBlock) for block in self.model.blocks))

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches, with the CLS token in front where the model has one (no position embedding:
        positions enter every block as the attention bias).

        # images: [B, 3, H, W] -> hidden: [B, P+N, d]
        """
        model = self.model
        x = model.patch_embed(images)  # [B, N, d]
        if model.cls_token is not None:
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def attention_bias(self, index: int) -> torch.Tensor | None:
        """The additive bias of block `index`'s attention scores, as timm chooses it: the
        block's own `rel_pos`, else the shared one.

        # -> bias: [1, H, T, T] | None
        """
        attn, shared = self.model.blocks[index - 1].attn, self.model.shared_rel_pos
        if attn.rel_pos is not None:
            return attn.rel_pos.get_bias()
        return shared.get_bias() if shared is not None else None

    def scales(self, block: RelPosBlock | ResPostRelPosBlock) -> tuple[Scale, Scale] | None:
        """A pre-norm block's layer scales `ls1` / `ls2`; None for a post-norm block."""
        return None if isinstance(block, ResPostRelPosBlock) else (block.ls1, block.ls2)
