"""What the timm family adapters share, so that a family module holds only what is its own.

- checks: `require_type` (one-line refusals naming the module), `check_blocks` (the usual
  block / attention / MLP loop), `check_pool`, `check_attn_pool`;
- anatomy: `token_grid`, `pool_of`, `pool_skipped`, `timm_anatomy` (the facts a timm model
  states itself, a family giving only its own);
- blocks: `residual_trace` / `residual_cls_branch` (the two-sub-layer residual block, pre-
  or post-norm, that ViT, BEiT, RelPos and Eva blocks all are), `layer_scale`, `bias_qkv`
  (timm's q/v-bias qkv), `qkv_attention` (a fused-`qkv` attention through `attend`),
  `cls_values` (the CLS query's value mix, explainability);
- head: `pool_tokens`, `kept_head_logits` (timm's head, over the kept tokens),
  `pooled_parity_logits` (METHOD §1b parity for every timm pooling);
- partial adapters: `AbsolutePositionAdapter` (token removal as a shortened sequence through
  timm's blocks: ViT, NaFlexViT), `BiasedAttentionAdapter` (residual blocks with a position-
  biased fused-`qkv` attention: BEiT, RelPos).

This module registers no adapter (the partial adapters have no `model_classes`).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent

from vitlens.errors import UserError
from vitlens.lens.attention import AttentionResult, merge_heads
from vitlens.lens.families.base import AttentionArgs, ModelAdapter, ViTAnatomy
from vitlens.lens.mlp import check_mlp, mlp_forward
from vitlens.lens.trace import BlockTrace

#: timm's `global_pool` values with one pooled output (timm also allows '', every token classified).
POOLS = ("token", "avg", "max", "avgmax", "map")
#: the poolings of families whose head reads the CLS token or the image tokens' mean (BEiT,
#: RelPos, CaiT, XCiT)
TOKEN_OR_AVG = ("token", "avg")

Scale = Callable[[torch.Tensor], torch.Tensor]


# ---- checks ------------------------------------------------------------------------------
def names(types: tuple[type, ...]) -> str:
    """The class names of `types`, comma-separated (for refusal messages)."""
    return ", ".join(t.__name__ for t in types)


def require_type(value: object, types: tuple[type, ...], what: str, where: str = "", note: str | None = None) -> None:
    """Refuse (one line) a `value` whose exact class is not one of `types`: "`where`: unsupported
    `what` `Class` (`note`, by default the supported classes)"."""
    if type(value) not in types:
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}unsupported {what} {type(value).__name__} ({note or 'supported: ' + names(types)})")


def check_blocks(
    blocks: torch.nn.Module,
    block_types: tuple[type, ...],
    attention_types: tuple[type, ...],
    *,
    block_what: str = "transformer block",
    block_note: str | None = None,
    attention_note: str | None = None,
    mlp_types: tuple[type, ...] | None = None,
) -> None:
    """Refuse, naming the block, a block or attention class outside the given ones, an MLP
    outside `mlp_types` (when given) or one `vitlens.lens.mlp` cannot read."""
    for index, block in enumerate(blocks, start=1):
        where = f"block {index}"
        require_type(block, block_types, block_what, where, block_note)
        require_type(block.attn, attention_types, "attention", where, attention_note)
        if mlp_types is not None:
            require_type(block.mlp, mlp_types, "MLP", where)
        check_mlp(block.mlp, where)


def pool_of(model: torch.nn.Module) -> str:
    """The pooling the head applies: "map" for an attention pool, else `global_pool`."""
    return "map" if getattr(model, "attn_pool", None) is not None else model.global_pool


def check_pool(model: torch.nn.Module, pools: tuple[str, ...] = POOLS) -> None:
    """Refuse a pooling outside `pools` (and "map" without an attention pool)."""
    pool = pool_of(model)
    if pool not in pools:
        why = ": without pooling the head classifies every token, so there is no one model output to match"
        raise UserError(f"global_pool={pool!r} is not supported (use one of {pools}){why if pool == '' else ''}")
    if pool == "map" and getattr(model, "attn_pool", None) is None:
        raise UserError("global_pool='map' without an attention pool: the head reads no one pooled token")


def check_attn_pool(model: torch.nn.Module) -> None:
    """Refuse an attention pool other than timm's `AttentionPoolLatent` without a position
    embedding of its own (a one-token projection is not defined for it)."""
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is None:
        return
    require_type(attn_pool, (AttentionPoolLatent,), "attention pool")
    if getattr(attn_pool, "pos_embed", None) is not None:
        raise UserError("attention pooling with its own position embedding: a one-token projection is not defined")


# ---- anatomy -----------------------------------------------------------------------------
def token_grid(patch_embed: torch.nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid_size, token_cell) from the patch embedding itself (METHOD §1b): a hybrid ViT's CNN
    stem strides before its `patch_size`, so its tokens cover img_size / grid_size pixels."""
    grid = tuple(int(g) for g in patch_embed.grid_size)
    image = tuple(int(i) for i in patch_embed.img_size)
    if any(i % g for i, g in zip(image, grid)):
        raise UserError(f"input {image} is not a whole number of tokens of the {grid} token grid")
    return (grid[0], grid[1]), (image[0] // grid[0], image[1] // grid[1])


def pool_skipped(has_class_token: bool, pool: str) -> tuple[tuple[str, str], ...]:
    """The experiments that do not apply because of the token layout or the pooling."""
    skipped = []
    if not has_class_token:
        skipped.append(("attn_no_cls", "the model has no CLS token"))
    if not (has_class_token and pool == "token"):
        skipped.append(("explain", "explainability differentiates the CLS token the head reads; this model "
                                   f"pools with global_pool={pool!r}"))
    return tuple(skipped)


def timm_anatomy(adapter: ModelAdapter, **facts: object) -> ViTAnatomy:
    """The `ViTAnatomy` of a timm model from what it states itself — depth (`blocks`), prefix
    tokens, class token, pooling (`pool_of`), width, classes, MLP width (block 1's value
    vectors), token grid (`patch_embed`), the experiments its pooling skips — with `facts`
    (any `ViTAnatomy` field a family knows better) in their place."""
    model = adapter.model
    if "grid_size" not in facts:
        facts["grid_size"], facts["token_cell"] = token_grid(model.patch_embed)
    if "has_class_token" not in facts:
        stated = getattr(model, "has_class_token", None)
        facts["has_class_token"] = bool(stated) if stated is not None else getattr(model, "cls_token", None) is not None
    facts.setdefault("num_blocks", len(model.blocks))
    facts.setdefault("global_pool", pool_of(model))
    if "skipped" not in facts:
        facts["skipped"] = pool_skipped(bool(facts["has_class_token"]), str(facts["global_pool"]))
    if "mlp_width" not in facts:
        facts["mlp_width"] = int(adapter.value_vectors(1, "mlp").shape[1]) if facts["num_blocks"] else 0
    return ViTAnatomy(family=adapter.family, num_prefix_tokens=int(model.num_prefix_tokens),
                      embed_dim=int(model.embed_dim), num_classes=int(model.num_classes), **facts)


# ---- blocks ------------------------------------------------------------------------------
def layer_scale(gamma: torch.Tensor | None) -> Scale:
    """A layer-scale vector (BEiT's `gamma_1`, Eva's) as a function; None: the identity."""
    return (lambda x: x) if gamma is None else (lambda x: gamma * x)


def residual_trace(
    block: torch.nn.Module,
    index: int,
    resid_pre: torch.Tensor,
    attention: Callable[[torch.Tensor], AttentionResult],
    scales: tuple[Scale, Scale] | None,
) -> BlockTrace:
    """The two-sub-layer residual block of timm's ViT-style families (`norm1`, `norm2`, `mlp`,
    `drop_path1`, `drop_path2`) in timm's order, every stream exposed. Pre-norm: `scales` are
    the layer scales of the attention and MLP outputs; post-norm (`scales` None, METHOD §1):
    the sub-layer streams are taken after the block's own `norm1` / `norm2`.

    # resid_pre: [B, T, d], attention: [B, T, d] -> AttentionResult -> BlockTrace
    """
    post_norm = scales is None
    attn_scale, mlp_scale = (block.norm1, block.norm2) if post_norm else scales
    result = attention(resid_pre if post_norm else block.norm1(resid_pre))
    attn_out = attn_scale(result.output)  # [B, T, d]
    resid_mid = resid_pre + block.drop_path1(attn_out)
    mlp_raw, mlp_coefficients = mlp_forward(block.mlp, resid_mid if post_norm else block.norm2(resid_mid))
    mlp_out = mlp_scale(mlp_raw)  # [B, T, d]
    return BlockTrace(
        index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid, mlp_out=mlp_out,
        resid_post=resid_mid + block.drop_path2(mlp_out), attn_coefficients=result.coefficients,
        mlp_coefficients=mlp_coefficients, attn_probs=result.probs, attn_values=result.values,
    )


def residual_cls_branch(
    block: torch.nn.Module,
    resid_pre: torch.Tensor,
    cls_attention: Callable[[torch.Tensor], torch.Tensor],
    scales: tuple[Scale, Scale] | None,
    source: str,
) -> torch.Tensor:
    """The CLS stream of a `residual_trace` block alone (explainability, METHOD §6), with the
    same submodules and order; `cls_attention` gives the attention output of the CLS query.

    # resid_pre: [B, T, d] (detached), cls_attention: [B, T, d] -> [B, d]
    #   -> x_cls: [B, d] (`source` "attn": the attention sub-layer's stream; "resid": the block output)
    """
    post_norm = scales is None
    attn_scale, mlp_scale = (block.norm1, block.norm2) if post_norm else scales
    attn_out = attn_scale(cls_attention(resid_pre if post_norm else block.norm1(resid_pre)))
    if source == "attn":
        return attn_out
    resid_mid = resid_pre[:, 0] + block.drop_path1(attn_out)
    mlp_raw, _ = mlp_forward(block.mlp, resid_mid if post_norm else block.norm2(resid_mid))
    return resid_mid + block.drop_path2(mlp_scale(mlp_raw))


def bias_qkv(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused `qkv` projection of BEiT / Eva attention: `qkv` has no bias; `q_bias`, a zero
    `k_bias` and `v_bias` are added as timm does (in the linear, or after it with
    `qkv_bias_separate`). Without `q_bias`: `qkv(x)`.

    # x: [B, T, d] -> qkv: [B, T, 3·H·hd]
    """
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        return attn.qkv(x)
    qkv_bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        return attn.qkv(x) + qkv_bias
    return F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)


def qkv_attention(
    attn: torch.nn.Module,
    qkv: torch.Tensor,
    args: AttentionArgs,
    bias: torch.Tensor | None = None,
    qk_norm: bool = False,
) -> AttentionResult:
    """A timm attention module from its fused `qkv` output: heads split, `q_norm` / `k_norm`
    (`qk_norm`), `attend` with the additive `bias`, heads merged, `proj`, `proj_drop`.

    # qkv: [B, T, 3·H·hd], bias: [1, H, T, T] -> output/coefficients: [B, T, d], probs: [B, H, T, T] | None
    """
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, hd]
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    heads_out, probs = args.attend(q, k, v, attn.scale, bias=bias)
    coefficients = merge_heads(heads_out)  # [B, T, H·hd]
    return AttentionResult(output=attn.proj_drop(attn.proj(coefficients)), coefficients=coefficients, probs=probs,
                           values=v)


def cls_values(cls_row: torch.Tensor, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The CLS query's mix of the values: each head's attention row `cls_row` (after
    `attn_drop`) weighting the value part of the fused `qkv`, heads concatenated.

    # cls_row: [B, H, T], qkv: [B, T, 3·H·hd] -> [B, H·hd]
    """
    batch, tokens, _ = qkv.shape
    values = qkv.reshape(batch, tokens, 3, num_heads, -1)[:, :, 2].transpose(1, 2)  # [B, H, T, hd]
    return torch.einsum("bht,bhtd->bhd", cls_row, values).reshape(batch, -1)


# ---- head --------------------------------------------------------------------------------
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


def kept_head_logits(
    adapter: ModelAdapter, resid_final: torch.Tensor, key_keep: torch.Tensor | None, start: int,
) -> torch.Tensor:
    """timm's `forward_head(norm(x))`; with `key_keep`, the pooling over the kept tokens from
    position `start` on (the attention pool with the removed keys masked; CLS pooling reads
    the CLS token either way), then `fc_norm`, `head_drop`, `head`.

    # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
    """
    model, pool = adapter.model, adapter.anatomy.global_pool
    hidden = model.norm(resid_final)
    if key_keep is None or pool == "token":
        return model.forward_head(hidden)
    tokens, keep = hidden[:, start:], key_keep[:, start:]
    if pool == "map":  # an additive mask: right for timm's fused and unfused paths
        additive = torch.zeros(keep.shape, dtype=tokens.dtype, device=tokens.device).masked_fill(~keep, float("-inf"))
        pooled = model.attn_pool(tokens, attn_mask=additive[:, None, None, :])
    else:
        pooled = pool_tokens(tokens, pool, keep)
    return model.head(model.head_drop(model.fc_norm(pooled)))


def pooled_parity_logits(adapter: ModelAdapter, resid_final: torch.Tensor, start: int) -> torch.Tensor:
    """The projection of what timm's head reads from the tokens at positions `start..`: CLS
    pooling, the CLS token's projection; average pooling without a norm before pooling, the
    projection of the mean; with the norm before pooling and no `fc_norm`, the mean of the
    tokens' projections (the head is linear); otherwise (max / avgmax / attention pooling, or
    both norms) the pooled token through `fc_norm` and the class embedding.

    # resid_final: [B, T, d] -> logits: [B, C]
    """
    model, pool = adapter.model, adapter.anatomy.global_pool
    if pool == "token":
        return adapter.project(resid_final[:, 0])
    tokens = resid_final[:, start:]  # [B, T - start, d]
    if pool == "avg":
        if isinstance(model.norm, torch.nn.Identity):
            return adapter.project(tokens.mean(dim=1))
        if isinstance(model.fc_norm, torch.nn.Identity):
            return adapter.project(tokens).mean(dim=1)
    normed = model.norm(tokens)
    pooled = model.attn_pool(normed) if pool == "map" else pool_tokens(normed, pool)
    return F.linear(model.fc_norm(pooled), *adapter.class_embedding())


class AbsolutePositionAdapter(ModelAdapter):
    """Models whose position information is all in the embedded sequence (absolute position
    embeddings) and whose `blocks` run on the sequence alone (ViT, NaFlexViT): timm's own
    blocks run the forward when no stream is kept, and token removal is a shorter sequence."""

    def run_blocks(self, hidden: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """timm's own blocks (no streams kept; token removal as key masking).

        # hidden: [B, T, d], key_keep: [B, T] bool -> resid_final: [B, T, d]
        """
        if key_keep is None:
            return self.model.blocks(hidden)
        return super().run_blocks(hidden, key_keep)

    def logits_keeping(self, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The kept tokens gathered into a shorter sequence (prefix + n, in sequence order) and
        run through timm's own blocks and head: the same output as key masking at about half
        the cost over a curve.

        # hidden: [B, T, d], kept: [B, n] sorted positions -> logits: [B, C]
        """
        prefix = self.anatomy.num_prefix_tokens
        image_tokens = hidden.gather(1, kept[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, n, d]
        sequence = torch.cat([hidden[:, :prefix], image_tokens], dim=1)  # [B, P+n, d]
        return self.model_logits(self.model.blocks(sequence))


class BiasedAttentionAdapter(ModelAdapter):
    """Residual blocks (`residual_trace`) whose attention is a fused `qkv` with an additive
    position bias (BEiT, RelPos), CLS or average pooling of the image tokens. A family gives
    `check`, `embed`, `attention_bias`, `scales` and, where they are not timm's plain ones,
    `qkv` and `qk_norm`."""

    #: the attention applies `q_norm` / `k_norm` after the projection
    qk_norm: ClassVar[bool] = False

    def attention_bias(self, index: int) -> torch.Tensor | None:
        """The additive bias of block `index`'s attention scores. # -> bias: [1, H, T, T] | None"""
        return None

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The attention's fused projection. # x: [B, T, d] -> qkv: [B, T, 3·H·hd]"""
        return attn.qkv(x)

    def scales(self, block: torch.nn.Module) -> tuple[Scale, Scale] | None:
        """Block `block`'s layer scales, None for a post-norm block (`residual_trace`)."""
        raise NotImplementedError

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """The block in timm's order with its attention inlined: `qkv` → (`q_norm` / `k_norm`) →
        attention with the bias → `proj` → `proj_drop`.

        # resid_pre: [B, T, d] -> BlockTrace
        """
        block = self.model.blocks[index - 1]
        bias = self.attention_bias(index)

        def attention(x: torch.Tensor) -> AttentionResult:
            """# x: [B, T, d] -> AttentionResult"""
            return qkv_attention(block.attn, self.qkv(block.attn, x), args, bias=bias, qk_norm=self.qk_norm)

        return residual_trace(block, index, resid_pre, attention, self.scales(block))

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))`; with `key_keep`, the average over the kept image tokens.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        return kept_head_logits(self, resid_final, key_keep, self.model.num_prefix_tokens)

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """# resid_final: [B, T, d] -> logits: [B, C] (see `pooled_parity_logits`)"""
        return pooled_parity_logits(self, resid_final, self.model.num_prefix_tokens)

    def cls_branch(self, index: int, trace: BlockTrace, cls_row: torch.Tensor, source: str) -> torch.Tensor:
        """Block `index`'s CLS stream from the leaf attention row `cls_row`: the CLS query alone,
        the same submodules and order as `trace_block` (the bias only shapes the row itself).

        # cls_row: [B, H, T] (leaf) -> x_cls: [B, d]
        """
        block = self.model.blocks[index - 1]
        attn = block.attn

        def cls_attention(x: torch.Tensor) -> torch.Tensor:
            """# x: [B, T, d] (the attention's input) -> the CLS query's attention output [B, d]"""
            return attn.proj_drop(attn.proj(cls_values(attn.attn_drop(cls_row), self.qkv(attn, x), attn.num_heads)))

        return residual_cls_branch(block, trace.resid_pre.detach(), cls_attention, self.scales(block), source)
