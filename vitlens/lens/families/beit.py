"""timm `Beit` (BEiT, BEiT v2): pre-norm blocks with relative position biases.

Covers: BEiT's own `Block` (LayerScale as the `gamma_1` / `gamma_2` vectors, or none) and
its own `Attention` (a `qkv` without bias plus separate `q_bias` / `v_bias`, a zero `k_bias`;
a per-block relative position bias table, the model-wide shared `rel_pos_bias`, both summed
or neither), an optional absolute position embedding, GELU `Mlp` or `SwiGLU` (with the
`scale_mlp` norm), average pooling of the image tokens with `fc_norm` (every BEiT checkpoint)
or CLS pooling with `norm`. The relative position bias enters the attention scores through
`attend(..., bias=...)`, computed by the model's own modules (`_get_rel_pos_bias`,
`rel_pos_bias()`), so the perturbations of METHOD §4 act on the same post-softmax attention
as timm's; token removal is key masking at full length (the bias of every kept pair of
positions is the bias of the full image), and deletion uses the generic `logits_keeping`.

The CLS token always exists (`num_prefix_tokens = 1`) and is a prefix token; under average
pooling the head reads only the image tokens, so explainability (the CLS token's gradient)
is skipped for those models.

Refused with a reason: `global_pool=''` (the head classifies every token: there is no one
output to match), blocks / attention / MLPs other than BEiT's own, a relative position
table whose window is not the token grid.
"""

from __future__ import annotations

import torch
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock

from vitlens.errors import UserError
from vitlens.lens.families.base import ViTAnatomy
from vitlens.lens.families.common import (
    TOKEN_OR_AVG,
    BiasedAttentionAdapter,
    Scale,
    bias_qkv,
    check_blocks,
    check_pool,
    layer_scale,
    timm_anatomy,
)

class BeitAdapter(BiasedAttentionAdapter):
    """timm `Beit` (BEiT and BEiT v2, every option of the class)."""

    family = "beit"
    model_classes = (Beit,)

    model: Beit

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        check_pool(model, TOKEN_OR_AVG)
        check_blocks(model.blocks, (BeitBlock,), (BeitAttention,), block_note="supported: BEiT's Block",
                     attention_note="supported: BEiT's Attention")
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        tables = [("the shared rel_pos_bias", model.rel_pos_bias)] if model.rel_pos_bias is not None else []
        tables += [(f"block {index}'s relative position table", block.attn)
                   for index, block in enumerate(model.blocks, start=1)
                   if block.attn.relative_position_bias_table is not None]
        for name, module in tables:
            if tuple(int(w) for w in module.window_size) != grid:
                raise UserError(f"{name} has window {tuple(module.window_size)} but the token grid is {grid}: "
                                "its bias does not fit the sequence")

    def describe(self) -> ViTAnatomy:
        return timm_anatomy(self)

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches, the CLS token in front, the absolute position embedding where the model
        has one, `pos_drop` (`Beit.forward_features` up to the blocks).

        # images: [B, 3, H, W] -> hidden: [B, 1+N, d]
        """
        model = self.model
        x = model.patch_embed(images)  # [B, N, d]
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x)

    def attention_bias(self, index: int) -> torch.Tensor | None:
        """The additive relative position bias of block `index`'s attention scores, from the
        model's own modules: the block's table plus the shared one, as timm's fused path sums them.

        # -> bias: [1, H, T, T] | None
        """
        attn, shared = self.model.blocks[index - 1].attn, self.model.rel_pos_bias
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        if shared is not None:
            shared_bias = shared()[None]  # [H, T, T] -> [1, H, T, T]
            bias = shared_bias if bias is None else bias + shared_bias
        return bias

    def qkv(self, attn: BeitAttention, x: torch.Tensor) -> torch.Tensor:
        """`qkv` with BEiT's `q_bias`, zero `k_bias`, `v_bias` (`common.bias_qkv`).

        # x: [B, T, d] -> qkv: [B, T, 3·H·hd]
        """
        return bias_qkv(attn, x)

    def scales(self, block: BeitBlock) -> tuple[Scale, Scale]:
        """BEiT's layer scales `gamma_1` / `gamma_2` (or none) as functions."""
        return layer_scale(block.gamma_1), layer_scale(block.gamma_2)
