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
from vitlens.lens.anatomy import ViTAnatomy
from vitlens.lens.attention import ProbsEdit, attend, merge_heads
from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.families.beit import check_pool, head_logits, pool_skipped, pooled_parity_logits
from vitlens.lens.families.vit import token_grid
from vitlens.lens.mlp import check_mlp, mlp_forward, mlp_values
from vitlens.lens.trace import BlockTrace

BLOCK_TYPES = (RelPosBlock, ResPostRelPosBlock)
REL_POS_TYPES = (RelPosBias, RelPosMlp)


class RelPosAdapter(ModelAdapter):
    """timm `VisionTransformerRelPos` (every option of the class)."""

    family = "relpos"
    model_classes = (VisionTransformerRelPos,)

    model: VisionTransformerRelPos

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        check_pool(model)
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        rel_pos = [("the shared rel_pos", model.shared_rel_pos)] if model.shared_rel_pos is not None else []
        for index, block in enumerate(model.blocks, start=1):
            where = f"block {index}"
            if type(block) not in BLOCK_TYPES:
                names = ", ".join(t.__name__ for t in BLOCK_TYPES)
                raise UserError(f"{where}: unsupported transformer block {type(block).__name__} (supported: {names})")
            if type(block.attn) is not RelPosAttention:
                raise UserError(f"{where}: unsupported attention {type(block.attn).__name__} "
                                "(supported: RelPosAttention)")
            if type(block.mlp) is not Mlp:
                raise UserError(f"{where}: unsupported MLP {type(block.mlp).__name__} (supported: Mlp)")
            check_mlp(block.mlp, where)
            if block.attn.rel_pos is not None:
                rel_pos.append((f"{where}'s rel_pos", block.attn.rel_pos))
        for name, module in rel_pos:
            if type(module) not in REL_POS_TYPES:
                names = ", ".join(t.__name__ for t in REL_POS_TYPES)
                raise UserError(f"{name}: unsupported relative position module {type(module).__name__} "
                                f"(supported: {names})")
            if tuple(int(w) for w in module.window_size) != grid or module.prefix_tokens != model.num_prefix_tokens:
                raise UserError(f"{name} has window {tuple(module.window_size)} and {module.prefix_tokens} prefix "
                                f"token(s) but the sequence is {model.num_prefix_tokens} prefix token(s) and a "
                                f"{grid} token grid: its bias does not fit the sequence")

    def describe(self) -> ViTAnatomy:
        model = self.model
        grid_size, token_cell = token_grid(model.patch_embed)
        has_class_token = model.cls_token is not None
        return ViTAnatomy(
            family=self.family,
            num_blocks=len(model.blocks),
            num_prefix_tokens=int(model.num_prefix_tokens),
            has_class_token=has_class_token,
            global_pool=model.global_pool,
            embed_dim=int(model.embed_dim),
            num_classes=int(model.num_classes),
            mlp_width=int(mlp_values(model.blocks[0].mlp).shape[1]) if len(model.blocks) else 0,
            grid_size=grid_size,
            token_cell=token_cell,
            post_norm=any(isinstance(block, ResPostRelPosBlock) for block in model.blocks),
            skipped=tuple(pool_skipped(model, has_class_token)),
        )

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

    def block_forward(
        self,
        index: int,
        resid_pre: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        need_probs: bool = False,
        key_keep: torch.Tensor | None = None,
        probs_edit: ProbsEdit | None = None,
    ) -> BlockTrace:
        """`RelPosBlock` / `ResPostRelPosBlock` with `RelPosAttention.forward` inlined.

        # resid_pre: [B, T, d] -> BlockTrace
        """
        block = self.model.blocks[index - 1]
        post_norm = isinstance(block, ResPostRelPosBlock)
        attn_raw, coefficients, probs = self._attention(
            index, resid_pre if post_norm else block.norm1(resid_pre), keep_mask, need_probs, key_keep, probs_edit)
        attn_out = block.norm1(attn_raw) if post_norm else block.ls1(attn_raw)
        resid_mid = resid_pre + block.drop_path1(attn_out)
        mlp_raw, mlp_coefficients = mlp_forward(block.mlp, resid_mid if post_norm else block.norm2(resid_mid))
        mlp_out = block.norm2(mlp_raw) if post_norm else block.ls2(mlp_raw)
        resid_post = resid_mid + block.drop_path2(mlp_out)
        return BlockTrace(
            index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid,
            mlp_out=mlp_out, resid_post=resid_post, attn_coefficients=coefficients,
            mlp_coefficients=mlp_coefficients, attn_probs=probs,
        )

    def _attention(
        self,
        index: int,
        x: torch.Tensor,
        keep_mask: torch.Tensor | None,
        need_probs: bool,
        key_keep: torch.Tensor | None,
        probs_edit: ProbsEdit | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`RelPosAttention.forward`: `qkv` → `q_norm` / `k_norm` → attention with the bias →
        `proj` → `proj_drop`.

        # x: [B, T, d] -> (output [B, T, d], coefficients [B, T, d], probs [B, H, T, T] | None)
        """
        attn = self.model.blocks[index - 1].attn
        batch, tokens, _ = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, T, hd] each
        q, k = attn.q_norm(q), attn.k_norm(k)
        heads_out, probs = attend(q, k, v, attn.scale, keep_mask, need_probs, key_keep,
                                  bias=self.attention_bias(index), probs_edit=probs_edit)
        coefficients = merge_heads(heads_out)  # [B, T, d]
        return attn.proj_drop(attn.proj(coefficients)), coefficients, probs

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))`; with `key_keep`, the average over the kept image tokens.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        return head_logits(self.model, resid_final, key_keep)

    # ---- projection ----------------------------------------------------------------------
    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """# resid_final: [B, T, d] -> logits: [B, C] (see `beit.pooled_parity_logits`)"""
        return pooled_parity_logits(self, resid_final)

    # ---- memories ------------------------------------------------------------------------
    # ---- explainability ------------------------------------------------------------------
    def cls_branch(
        self, index: int, trace: BlockTrace, cls_row: torch.Tensor, source: str
    ) -> torch.Tensor:
        """Block `index`'s CLS stream from the leaf attention row `cls_row` (pre- and post-norm):
        the CLS query alone, the same submodules and order as `block_forward`.

        # cls_row: [B, H, T] (leaf) -> x_cls: [B, d]
        """
        block = self.model.blocks[index - 1]
        attn = block.attn
        post_norm = isinstance(block, ResPostRelPosBlock)
        resid_pre = trace.resid_pre.detach()  # [B, T, d]
        x = resid_pre if post_norm else block.norm1(resid_pre)
        batch, tokens, width = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
        values = qkv[:, :, 2].transpose(1, 2)  # [B, H, T, hd]
        heads_out = torch.einsum("bht,bhtd->bhd", attn.attn_drop(cls_row), values)  # [B, H, hd]
        attn_raw = attn.proj_drop(attn.proj(heads_out.reshape(batch, width)))  # [B, d]
        attn_out = block.norm1(attn_raw) if post_norm else block.ls1(attn_raw)
        if source == "attn":
            return attn_out
        resid_mid = resid_pre[:, 0] + block.drop_path1(attn_out)
        mlp_raw, _ = mlp_forward(block.mlp, resid_mid if post_norm else block.norm2(resid_mid))
        mlp_out = block.norm2(mlp_raw) if post_norm else block.ls2(mlp_raw)
        return resid_mid + block.drop_path2(mlp_out)
