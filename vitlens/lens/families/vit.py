"""timm `VisionTransformer` in all its options, and its subclasses that keep its anatomy.

Covers: CLS / average / max / attention (`map`, SigLIP) pooling, register tokens, no class
token, pre-norm `Block`, post-norm `ResPostBlock` (METHOD §1: sub-layer streams after the
block's own post-norm), `ParallelScalingBlock` (attention and MLP read the same block input:
the MLP's input stream is the block input) with separate output projections,
`ParallelThingsBlock` (parallel branches summed; their coefficients and value vectors are
concatenated in branch order), hybrid ViTs (a CNN stem: the token grid is
`patch_embed.grid_size`, METHOD §1b), and distilled DeiTs (`VisionTransformerDistilled`:
the projection averages `head` and `head_dist`).

Refused with a reason: differential attention (`DiffAttention`, `DiffParallelScalingBlock`),
a fused attention+MLP output projection, attention pooling with its own position embedding.
"""

from __future__ import annotations

import dataclasses

import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import (
    Block,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)

from vitlens.errors import UserError
from vitlens.lens.attention import attention_sublayer, merge_heads
from vitlens.lens.families.attention_heads import AttentionHeads
from vitlens.lens.families.base import AttentionArgs, ViTAnatomy, check_sublayer
from vitlens.lens.families.common import (
    AbsolutePositionAdapter,
    check_attn_pool,
    check_pool,
    cls_values,
    kept_head_logits,
    pool_tokens,  # noqa: F401  (re-exported: the pooling helper's former home)
    pooled_parity_logits,
    require_type,
    residual_cls_branch,
    residual_trace,
    timm_anatomy,
    token_grid,  # noqa: F401  (re-exported: the grid helper's former home)
)
from vitlens.lens.mlp import check_mlp, mlp_forward, mlp_values
from vitlens.lens.trace import BlockTrace

BLOCK_TYPES = (Block, ResPostBlock, ParallelScalingBlock, ParallelThingsBlock)
#: why an attention other than timm's `Attention` is refused
OTHER_ATTENTION = "differential or other attention: METHOD §4's perturbations are not defined for it"


class ViTAdapter(AbsolutePositionAdapter):
    """`VisionTransformer` and `VisionTransformerDistilled` (including hybrids)."""

    family = "vit"
    model_classes = (VisionTransformer, VisionTransformerDistilled)

    model: VisionTransformer

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        check_pool(model)
        check_attn_pool(model)
        for index, block in enumerate(model.blocks, start=1):
            where = f"block {index}"
            require_type(block, BLOCK_TYPES, "transformer block", where)
            if isinstance(block, ParallelScalingBlock):
                if block.out_proj is not None:
                    raise UserError(
                        f"{where}: ParallelScalingBlock with a fused output projection: the attention "
                        "and MLP outputs share one bias, so the sub-layers are not separable")
                continue
            for branch in list(block.attns) if isinstance(block, ParallelThingsBlock) else [block]:
                require_type(branch.attn, (Attention,), "attention", where, OTHER_ATTENTION)
            for branch in list(block.ffns) if isinstance(block, ParallelThingsBlock) else [block]:
                check_mlp(branch.mlp, where)

    def describe(self) -> ViTAnatomy:
        block_types = {type(block) for block in self.model.blocks}
        anatomy = timm_anatomy(self, post_norm=ResPostBlock in block_types)
        if ParallelThingsBlock in block_types and anatomy.skip_reason("explain") is None:
            reason = ("parallel attention branches (ParallelThingsBlock): the per-head CLS-attention "
                      "gradients of METHOD §6 are defined for one attention")
            anatomy = dataclasses.replace(anatomy, skipped=anatomy.skipped + (("explain", reason),))
        return anatomy

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches (or the hybrid stem's features) + position embedding, CLS/dist/registers.

        # images: [B, 3, H, W] -> hidden: [B, P+N, d]
        """
        model = self.model
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """# resid_pre: [B, T, d] -> BlockTrace"""
        block = self.model.blocks[index - 1]
        if isinstance(block, ParallelScalingBlock):
            return _parallel_scaling_forward(block, index, resid_pre, args)
        if isinstance(block, ParallelThingsBlock):
            return _parallel_things_forward(block, index, resid_pre, args)
        return timm_block_forward(block, index, resid_pre, args)

    def attention_heads(self, index: int) -> AttentionHeads:
        """timm's anatomy (`ModelAdapter.attention_heads`); parallel blocks are refused (a fused
        projection or several attention branches). # -> AttentionHeads"""
        block = self.model.blocks[index - 1]
        if isinstance(block, (ParallelScalingBlock, ParallelThingsBlock)):
            raise UserError(f"block {index}: {type(block).__name__} (parallel attention and MLP branches) "
                            "is not attributed per head")
        return super().attention_heads(index)

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))` as timm does; with `key_keep`, pooling over kept tokens only.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        model = self.model
        if isinstance(model, VisionTransformerDistilled):
            return model.forward_head(model.norm(resid_final))
        return kept_head_logits(self, resid_final, key_keep, self._pool_start())

    def _pool_start(self) -> int:
        """The first sequence position timm's pooling reads (`pool_include_prefix`)."""
        return 0 if self.model.pool_include_prefix else self.model.num_prefix_tokens

    # ---- projection ----------------------------------------------------------------------
    def class_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`head`, or for distilled models the average of `head` and `head_dist` (METHOD §1b)."""
        model = self.model
        if isinstance(model, VisionTransformerDistilled):
            weight = (model.head.weight + model.head_dist.weight) / 2
            biases = [h.bias for h in (model.head, model.head_dist) if h.bias is not None]
            bias = sum(biases) / 2 if biases else None
            return weight, bias
        return model.head.weight, model.head.bias

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """Distilled: the mean of head(norm cls) and head_dist(norm dist); otherwise what the
        pooling reads (`common.pooled_parity_logits`).

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        model = self.model
        if isinstance(model, VisionTransformerDistilled):
            normed = model.norm(resid_final)
            return (model.head(normed[:, 0]) + model.head_dist(normed[:, 1])) / 2
        return pooled_parity_logits(self, resid_final, self._pool_start())

    # ---- memories ------------------------------------------------------------------------
    def value_vectors(self, index: int, sublayer: str) -> torch.Tensor:
        """attn: the output projection's columns; mlp: `fc2`'s columns (parallel branches
        concatenated in branch order). # -> values: [d, M]"""
        check_sublayer(sublayer)
        block = self.model.blocks[index - 1]
        if isinstance(block, ParallelScalingBlock):
            return (block.attn_out_proj if sublayer == "attn" else block.mlp_out_proj).weight
        if isinstance(block, ParallelThingsBlock):
            if sublayer == "attn":
                return torch.cat([branch.attn.proj.weight for branch in block.attns], dim=1)
            return torch.cat([mlp_values(branch.mlp) for branch in block.ffns], dim=1)
        return block.attn.proj.weight if sublayer == "attn" else mlp_values(block.mlp)

    # ---- explainability ------------------------------------------------------------------
    def cls_branch(
        self, index: int, trace: BlockTrace, cls_row: torch.Tensor, source: str
    ) -> torch.Tensor:
        """Block `index`'s CLS stream recomputed from the leaf attention row `cls_row` (pre- and
        post-norm `Block`s: the CLS query alone, same submodules and order as `block_forward`;
        other blocks: the generic branch).

        # cls_row: [B, H, T] (leaf) -> x_cls: [B, d]
        """
        block = self.model.blocks[index - 1]
        if not isinstance(block, (Block, ResPostBlock)):
            return super().cls_branch(index, trace, cls_row, source)
        attn = block.attn

        def cls_attention(x: torch.Tensor) -> torch.Tensor:
            """# x: [B, T, d] (the attention's input) -> the CLS query's attention output [B, d]"""
            coefficients = attn.norm(cls_values(attn.attn_drop(cls_row), attn.qkv(x), attn.num_heads))
            if attn.gate is not None:
                coefficients = coefficients * attn.gate(x[:, 0]).sigmoid()
            return attn.proj_drop(attn.proj(coefficients))

        return residual_cls_branch(block, trace.resid_pre.detach(), cls_attention, _scales(block), source)


def _scales(block: Block | ResPostBlock) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """A pre-norm block's layer scales; None for a post-norm `ResPostBlock` (`residual_trace`)."""
    return None if isinstance(block, ResPostBlock) else (block.ls1, block.ls2)


def timm_block_forward(
    block: Block | ResPostBlock, index: int, resid_pre: torch.Tensor, args: AttentionArgs = AttentionArgs(),
) -> BlockTrace:
    """timm's pre-norm `Block` or post-norm `ResPostBlock` (its sub-layer streams after the
    block's own `norm1` / `norm2`), in timm's order, every stream exposed (also NaFlexViT's).

    # resid_pre: [B, T, d] -> BlockTrace
    """
    return residual_trace(block, index, resid_pre, lambda x: attention_sublayer(block.attn, x, *args), _scales(block))


def _parallel_scaling_forward(
    block: ParallelScalingBlock, index: int, resid_pre: torch.Tensor, args: AttentionArgs,
) -> BlockTrace:
    """ViT-22B's parallel block: one `in_proj` feeds attention and MLP, outputs summed.

    # resid_pre: [B, T, d] -> BlockTrace (resid_mid = resid_pre: the MLP reads the block input)
    """
    batch, tokens, width = resid_pre.shape
    x_mlp, q, k, v = torch.split(block.in_proj(block.in_norm(resid_pre)), block.in_split, dim=-1)
    if block.mlp_bias is not None:
        x_mlp = x_mlp + block.mlp_bias
    heads = (batch, tokens, block.num_heads, block.head_dim)
    q = block.q_norm(q.view(heads)).transpose(1, 2)
    k = block.k_norm(k.view(heads)).transpose(1, 2)
    v = v.view(heads).transpose(1, 2)
    heads_out, probs = args.attend(q, k, v, block.scale)
    x_attn = merge_heads(heads_out)  # [B, T, d]
    attn_raw = block.attn_out_proj(x_attn)
    mlp_raw = block.mlp_out_proj(block.mlp_drop(block.mlp_act(x_mlp)))
    resid_post = resid_pre + block.drop_path(block.ls(attn_raw + mlp_raw))
    return BlockTrace(
        index=index, resid_pre=resid_pre, attn_out=block.ls(attn_raw), resid_mid=resid_pre,
        mlp_out=block.ls(mlp_raw), resid_post=resid_post, attn_coefficients=x_attn,
        mlp_coefficients=x_mlp, attn_probs=probs,
    )


def _parallel_things_forward(
    block: ParallelThingsBlock, index: int, resid_pre: torch.Tensor, args: AttentionArgs,
) -> BlockTrace:
    """`num_parallel` attentions summed, then `num_parallel` MLPs summed.

    # resid_pre: [B, T, d] -> BlockTrace (coefficients concatenated over branches, probs over heads)
    """
    outputs, coefficients, probs = [], [], []
    for branch in block.attns:
        attention = attention_sublayer(branch.attn, branch.norm(resid_pre), *args)
        outputs.append(branch.drop_path(branch.ls(attention.output)))
        coefficients.append(attention.coefficients)
        probs.append(attention.probs)
    attn_out = torch.stack(outputs).sum(dim=0)
    resid_mid = resid_pre + attn_out
    mlp_outputs, mlp_coefficients = [], []
    for branch in block.ffns:
        raw, coefficient = mlp_forward(branch.mlp, branch.norm(resid_mid))
        mlp_outputs.append(branch.drop_path(branch.ls(raw)))
        mlp_coefficients.append(coefficient)
    mlp_out = torch.stack(mlp_outputs).sum(dim=0)
    return BlockTrace(
        index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid, mlp_out=mlp_out,
        resid_post=resid_mid + mlp_out, attn_coefficients=torch.cat(coefficients, dim=-1),
        mlp_coefficients=torch.cat(mlp_coefficients, dim=-1),
        attn_probs=None if probs[0] is None else torch.cat(probs, dim=1),
    )
