"""The hooked forward: timm's `VisionTransformer` forward, block by block, exposing every stream.

It calls the model's own submodules in timm's order (`patch_embed`, `_pos_embed`,
`patch_drop`, `norm_pre`, then per block `norm1`, `attn`, `ls1`, `drop_path1`, `norm2`,
`mlp.fc1`, `mlp.act`, `mlp.drop1`, `mlp.norm`, `mlp.fc2`, `mlp.drop2`, `ls2`, `drop_path2`;
post-norm `ResPostBlock`s apply `norm1`/`norm2` after the sub-layer instead), so the final
logits equal `model(x)` (tests check 1e-5). Nothing is patched; nothing is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.lens.anatomy import ViTAnatomy
from vitlens.lens.attention import attention_sublayer


@dataclass
class BlockTrace:
    """Every stream of one block (1-based `index`); hook names as in `vitlens/lens/README.md`."""

    index: int
    resid_pre: torch.Tensor  # [B, T, d] block input
    attn_out: torch.Tensor  # [B, T, d] what attention adds to the residual (after ls1 / post-norm1)
    resid_mid: torch.Tensor  # [B, T, d] resid_pre + attn_out: the MLP's input stream
    mlp_out: torch.Tensor  # [B, T, d] what the MLP adds (after ls2 / post-norm2)
    resid_post: torch.Tensor  # [B, T, d] block output
    attn_coefficients: torch.Tensor  # [B, T, d] input of attn.proj (per-head A·V, concatenated)
    mlp_coefficients: torch.Tensor  # [B, T, M] fc1 output before the activation
    attn_probs: torch.Tensor | None  # [B, H, T, T] when computed (perturbation or need_probs)


def embed(model: VisionTransformer, images: torch.Tensor, anatomy: ViTAnatomy) -> torch.Tensor:
    """Residual stream entering block 1 (the lens's block 0): patches + position embedding.

    Token removal (METHOD §4) happens after this point, as key masking in every block.

    # images: [B, 3, H, W] -> hidden: [B, P+N, d]
    """
    hidden = model._pos_embed(model.patch_embed(images))
    return model.norm_pre(model.patch_drop(hidden))


def block_forward(
    block: torch.nn.Module,
    resid_pre: torch.Tensor,
    index: int,
    post_norm: bool,
    attention_keep_mask: torch.Tensor | None = None,
    need_probs: bool = False,
    key_keep: torch.Tensor | None = None,
) -> BlockTrace:
    """One timm `Block` (pre-norm) or `ResPostBlock` (post-norm), exposing its streams.

    # resid_pre: [B, T, d], attention_keep_mask: [T, T], key_keep: [B, T] bool
    #   -> BlockTrace (shapes on the fields)
    """
    attn_input = resid_pre if post_norm else block.norm1(resid_pre)
    attention = attention_sublayer(block.attn, attn_input, attention_keep_mask, need_probs, key_keep)
    attn_out = block.norm1(attention.output) if post_norm else block.ls1(attention.output)
    resid_mid = resid_pre + block.drop_path1(attn_out)
    mlp = block.mlp
    mlp_coefficients = mlp.fc1(resid_mid if post_norm else block.norm2(resid_mid))
    mlp_raw = mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(mlp_coefficients)))))
    mlp_out = block.norm2(mlp_raw) if post_norm else block.ls2(mlp_raw)
    resid_post = resid_mid + block.drop_path2(mlp_out)
    return BlockTrace(
        index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid,
        mlp_out=mlp_out, resid_post=resid_post, attn_coefficients=attention.coefficients,
        mlp_coefficients=mlp_coefficients, attn_probs=attention.probs,
    )


def iter_block_traces(
    model: VisionTransformer,
    hidden: torch.Tensor,
    anatomy: ViTAnatomy,
    attention_keep_mask: torch.Tensor | None = None,
    need_probs: bool = False,
    key_keep: torch.Tensor | None = None,
) -> Iterator[BlockTrace]:
    """Run every block on the embedded sequence `hidden`, yielding each block's trace in order.

    The consumer reduces a trace before asking for the next one, so at most one block's
    streams are alive at a time. `key_keep` removes tokens (False = removed: no query
    attends to it; its own stream is computed but meaningless).

    # hidden: [B, T, d] (from `embed`), attention_keep_mask: [T, T], key_keep: [B, T] bool
    #   -> BlockTrace per block
    """
    for index, block in enumerate(model.blocks, start=1):
        trace = block_forward(block, hidden, index, anatomy.post_norm, attention_keep_mask, need_probs, key_keep)
        hidden = trace.resid_post
        yield trace


def model_logits(
    model: VisionTransformer, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's own output from the last residual stream: `forward_head(norm(x))` as timm does.

    With removed tokens (`key_keep`), average pooling runs over the kept image tokens only
    (what the model computes on the shortened sequence); CLS pooling is unaffected.

    # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
    """
    hidden = model.norm(resid_final)
    if key_keep is None or model.global_pool != "avg":
        return model.forward_head(hidden)
    prefix = model.num_prefix_tokens
    weights = key_keep[:, prefix:, None].to(hidden.dtype)  # [B, N, 1]
    pooled = (hidden[:, prefix:] * weights).sum(1) / weights.sum(1)
    return model.head(model.head_drop(model.fc_norm(pooled)))
