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

import torch
import torch.nn.functional as F
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
from vitlens.lens.anatomy import ViTAnatomy
from vitlens.lens.attention import ProbsEdit, attend, attention_sublayer, merge_heads
from vitlens.lens.families.base import ModelAdapter, check_sublayer
from vitlens.lens.mlp import check_mlp, mlp_forward, mlp_values
from vitlens.lens.trace import BlockTrace

BLOCK_TYPES = (Block, ResPostBlock, ParallelScalingBlock, ParallelThingsBlock)
POOLS = ("token", "avg", "max", "avgmax", "map")


def token_grid(patch_embed: torch.nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid_size, token_cell) from the patch embedding itself (METHOD §1b): a hybrid ViT's CNN
    stem strides before its `patch_size`, so its tokens cover img_size / grid_size pixels."""
    grid = tuple(int(g) for g in patch_embed.grid_size)
    image = tuple(int(i) for i in patch_embed.img_size)
    if any(i % g for i, g in zip(image, grid)):
        raise UserError(f"input {image} is not a whole number of tokens of the {grid} token grid")
    return (grid[0], grid[1]), (image[0] // grid[0], image[1] // grid[1])


def pool_tokens(tokens: torch.Tensor, pool: str, keep: torch.Tensor | None = None) -> torch.Tensor:
    """timm's `global_pool_nlc` over `tokens`, optionally over the kept ones only.

    # tokens: [B, T, d], keep: [B, T] bool -> pooled: [B, d]
    """
    if keep is None:
        mean, peak = tokens.mean(dim=1), (tokens.amax(dim=1) if pool != "avg" else None)
    else:
        weights = keep[..., None].to(tokens.dtype)
        mean = (tokens * weights).sum(1) / weights.sum(1)
        peak = tokens.masked_fill(~keep[..., None], float("-inf")).amax(dim=1) if pool != "avg" else None
    if pool == "avg":
        return mean
    if pool == "max":
        return peak
    return 0.5 * (peak + mean)  # avgmax


class ViTAdapter(ModelAdapter):
    """`VisionTransformer` and `VisionTransformerDistilled` (including hybrids)."""

    family = "vit"
    model_classes = (VisionTransformer, VisionTransformerDistilled)

    model: VisionTransformer

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        if model.global_pool not in POOLS:
            raise UserError(f"global_pool={model.global_pool!r} is not supported (use one of {POOLS})")
        if model.attn_pool is not None and getattr(model.attn_pool, "pos_embed", None) is not None:
            raise UserError("attention pooling with its own position embedding: a one-token projection is not defined")
        for index, block in enumerate(model.blocks, start=1):
            where = f"block {index}"
            if type(block) not in BLOCK_TYPES:
                names = ", ".join(t.__name__ for t in BLOCK_TYPES)
                raise UserError(f"{where}: unsupported transformer block {type(block).__name__} (supported: {names})")
            if isinstance(block, ParallelScalingBlock):
                if block.out_proj is not None:
                    raise UserError(
                        f"{where}: ParallelScalingBlock with a fused output projection: the attention "
                        "and MLP outputs share one bias, so the sub-layers are not separable")
                continue
            branches = list(block.attns) if isinstance(block, ParallelThingsBlock) else [block]
            for branch in branches:
                if type(branch.attn) is not Attention:
                    raise UserError(f"{where}: unsupported attention {type(branch.attn).__name__} "
                                    "(differential or other attention: METHOD §4's perturbations are not defined for it)")
            for branch in (list(block.ffns) if isinstance(block, ParallelThingsBlock) else [block]):
                check_mlp(branch.mlp, where)

    def describe(self) -> ViTAnatomy:
        model = self.model
        grid_size, token_cell = token_grid(model.patch_embed)
        block_types = {type(block) for block in model.blocks}
        anatomy = ViTAnatomy(
            family=self.family,
            num_blocks=len(model.blocks),
            num_prefix_tokens=int(model.num_prefix_tokens),
            has_class_token=bool(model.has_class_token),
            global_pool="map" if model.attn_pool is not None else model.global_pool,
            embed_dim=int(model.embed_dim),
            num_classes=int(model.num_classes),
            mlp_width=int(self.value_vectors(1, "mlp").shape[1]) if len(model.blocks) else 0,
            grid_size=grid_size,
            token_cell=token_cell,
            post_norm=ResPostBlock in block_types,
            skipped=self._skipped(block_types),
        )
        return anatomy

    def _skipped(self, block_types: set[type]) -> tuple[tuple[str, str], ...]:
        model, skipped = self.model, []
        if not model.has_class_token:
            skipped.append(("attn_no_cls", "the model has no CLS token"))
        if not (model.has_class_token and model.global_pool == "token" and model.attn_pool is None):
            pool = "map" if model.attn_pool is not None else model.global_pool
            skipped.append(("explain", f"explainability differentiates the CLS token the head reads; "
                                       f"this model pools with global_pool={pool!r}"))
        elif ParallelThingsBlock in block_types:
            skipped.append(("explain", "parallel attention branches (ParallelThingsBlock): the per-head "
                                       "CLS-attention gradients of METHOD §6 are defined for one attention"))
        return tuple(skipped)

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches (or the hybrid stem's features) + position embedding, CLS/dist/registers.

        # images: [B, 3, H, W] -> hidden: [B, P+N, d]
        """
        model = self.model
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    def block_forward(
        self,
        index: int,
        resid_pre: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        need_probs: bool = False,
        key_keep: torch.Tensor | None = None,
        probs_edit: ProbsEdit | None = None,
    ) -> BlockTrace:
        """# resid_pre: [B, T, d] -> BlockTrace"""
        block = self.model.blocks[index - 1]
        if isinstance(block, ParallelScalingBlock):
            return _parallel_scaling_forward(block, index, resid_pre, keep_mask, need_probs, key_keep, probs_edit)
        if isinstance(block, ParallelThingsBlock):
            return _parallel_things_forward(block, index, resid_pre, keep_mask, need_probs, key_keep, probs_edit)
        return timm_block_forward(block, index, resid_pre, keep_mask, need_probs, key_keep, probs_edit)

    def run_blocks(self, hidden: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """timm's own blocks (no streams kept; token removal as key masking)."""
        if key_keep is None:
            return self.model.blocks(hidden)
        return super().run_blocks(hidden, key_keep)

    def logits_keeping(self, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Absolute position embeddings are already in `hidden`, so the kept tokens are gathered
        into a shorter sequence (prefix + n, in sequence order) and run through timm's own
        blocks: the same output as key masking at about half the cost over a curve.

        # hidden: [B, T, d], kept: [B, n] sorted positions -> logits: [B, C]
        """
        prefix = self.anatomy.num_prefix_tokens
        image_tokens = hidden.gather(1, kept[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, n, d]
        sequence = torch.cat([hidden[:, :prefix], image_tokens], dim=1)  # [B, P+n, d]
        return self.model_logits(self.model.blocks(sequence))

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))` as timm does; with `key_keep`, pooling over kept tokens only.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        model = self.model
        hidden = model.norm(resid_final)
        if key_keep is None or model.global_pool == "token" or isinstance(model, VisionTransformerDistilled):
            return model.forward_head(hidden)
        start = 0 if model.pool_include_prefix else model.num_prefix_tokens
        tokens, keep = hidden[:, start:], key_keep[:, start:]
        if model.attn_pool is not None:  # an additive mask: right for timm's fused and unfused paths
            additive = torch.zeros(keep.shape, dtype=tokens.dtype, device=tokens.device).masked_fill(~keep, float("-inf"))
            pooled = model.attn_pool(tokens, attn_mask=additive[:, None, None, :])
        else:
            pooled = pool_tokens(tokens, model.global_pool, keep)
        return model.head(model.head_drop(model.fc_norm(pooled)))

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
        """CLS: the CLS token's projection; distilled: the mean of head(norm cls) and
        head_dist(norm dist); average pooling without a norm before pooling: the projection of
        the mean; with the norm before pooling: the mean of the tokens' projections (the head
        is linear); max / attention pooling: the pooled token through the head.

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        model = self.model
        if isinstance(model, VisionTransformerDistilled):
            normed = model.norm(resid_final)
            return (model.head(normed[:, 0]) + model.head_dist(normed[:, 1])) / 2
        if model.global_pool == "token" and model.attn_pool is None:
            return self.project(resid_final[:, 0])
        start = 0 if model.pool_include_prefix else model.num_prefix_tokens
        tokens = resid_final[:, start:]
        if model.attn_pool is None and model.global_pool == "avg":
            if isinstance(model.norm, torch.nn.Identity):
                return self.project(tokens.mean(dim=1))
            if isinstance(model.fc_norm, torch.nn.Identity):
                return self.project(tokens).mean(dim=1)
        normed = model.norm(tokens)
        pooled = model.attn_pool(normed) if model.attn_pool is not None else pool_tokens(normed, model.global_pool)
        weight, bias = self.class_embedding()
        return F.linear(model.fc_norm(pooled), weight, bias)

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
        post_norm = isinstance(block, ResPostBlock)
        attn = block.attn
        resid_pre = trace.resid_pre.detach()  # [B, T, d]
        attn_input = resid_pre if post_norm else block.norm1(resid_pre)
        batch, tokens, _ = attn_input.shape
        qkv = attn.qkv(attn_input).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
        values = qkv[:, :, 2].transpose(1, 2)  # [B, H, T, hd]
        heads_out = torch.einsum("bht,bhtd->bhd", attn.attn_drop(cls_row), values)  # [B, H, hd]
        coefficients = attn.norm(heads_out.reshape(batch, attn.attn_dim))  # [B, d]
        if attn.gate is not None:
            coefficients = coefficients * attn.gate(attn_input[:, 0]).sigmoid()
        output = attn.proj_drop(attn.proj(coefficients))
        attn_out = block.norm1(output) if post_norm else block.ls1(output)
        if source == "attn":
            return attn_out
        resid_mid = resid_pre[:, 0] + block.drop_path1(attn_out)
        mlp_raw, _ = mlp_forward(block.mlp, resid_mid if post_norm else block.norm2(resid_mid))
        mlp_out = block.norm2(mlp_raw) if post_norm else block.ls2(mlp_raw)
        return resid_mid + block.drop_path2(mlp_out)


def timm_block_forward(
    block: Block | ResPostBlock, index: int, resid_pre: torch.Tensor, keep_mask: torch.Tensor | None = None,
    need_probs: bool = False, key_keep: torch.Tensor | None = None, probs_edit: ProbsEdit | None = None,
) -> BlockTrace:
    """timm's pre-norm `Block` or post-norm `ResPostBlock` (its sub-layer streams after the
    block's own `norm1` / `norm2`), in timm's order, every stream exposed (also NaFlexViT's).

    # resid_pre: [B, T, d] -> BlockTrace
    """
    post_norm = isinstance(block, ResPostBlock)
    attn_input = resid_pre if post_norm else block.norm1(resid_pre)  # [B, T, d]
    attention = attention_sublayer(block.attn, attn_input, keep_mask, need_probs, key_keep, probs_edit)
    attn_out = block.norm1(attention.output) if post_norm else block.ls1(attention.output)  # [B, T, d]
    resid_mid = resid_pre + block.drop_path1(attn_out)
    mlp_raw, mlp_coefficients = mlp_forward(block.mlp, resid_mid if post_norm else block.norm2(resid_mid))
    mlp_out = block.norm2(mlp_raw) if post_norm else block.ls2(mlp_raw)  # [B, T, d]
    resid_post = resid_mid + block.drop_path2(mlp_out)
    return BlockTrace(
        index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid,
        mlp_out=mlp_out, resid_post=resid_post, attn_coefficients=attention.coefficients,
        mlp_coefficients=mlp_coefficients, attn_probs=attention.probs,
    )


def _parallel_scaling_forward(
    block: ParallelScalingBlock, index: int, resid_pre: torch.Tensor, keep_mask: torch.Tensor | None,
    need_probs: bool, key_keep: torch.Tensor | None, probs_edit: ProbsEdit | None,
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
    heads_out, probs = attend(q, k, v, block.scale, keep_mask, need_probs, key_keep, probs_edit=probs_edit)
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
    block: ParallelThingsBlock, index: int, resid_pre: torch.Tensor, keep_mask: torch.Tensor | None,
    need_probs: bool, key_keep: torch.Tensor | None, probs_edit: ProbsEdit | None,
) -> BlockTrace:
    """`num_parallel` attentions summed, then `num_parallel` MLPs summed.

    # resid_pre: [B, T, d] -> BlockTrace (coefficients concatenated over branches, probs over heads)
    """
    outputs, coefficients, probs = [], [], []
    for branch in block.attns:
        attention = attention_sublayer(branch.attn, branch.norm(resid_pre), keep_mask, need_probs, key_keep, probs_edit)
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
