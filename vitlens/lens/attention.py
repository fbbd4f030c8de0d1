"""The attention sub-layer, computed from the unmodified timm `Attention` module's own weights.

Same submodules, same order as `timm.layers.Attention.forward`: `qkv` → `q_norm`/`k_norm` →
attention → `norm` → gate → `proj` → `proj_drop`. Without a perturbation and without
`need_probs` the attention itself is `F.scaled_dot_product_attention` (timm's fused path,
bit-identical); otherwise the probabilities are recomputed as timm's unfused path does,
`softmax((q·scale) kᵀ)`, optionally multiplied by a keep mask (no renormalisation).

Removed tokens (METHOD §4 token removal) are excluded as *keys*: `key_keep[b, j] = False`
gives key j weight exactly 0 in every query's softmax (-inf score), which is the same
attention as on the shortened sequence; layer norms and MLPs act per token, so the kept
tokens' streams equal those of the shortened sequence and one batched forward serves
images that keep different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention


@dataclass
class AttentionResult:
    """Output of one attention sub-layer and the quantities the lens reads from it."""

    output: torch.Tensor  # [B, T, d] after attn.proj (before LayerScale / post-norm)
    coefficients: torch.Tensor  # [B, T, d] the input of attn.proj: per-head A·V concatenated
    probs: torch.Tensor | None  # [B, H, T, T] post-softmax (post-mask) attention, when computed


def attention_sublayer(
    attn: Attention,
    x: torch.Tensor,
    keep_mask: torch.Tensor | None = None,
    need_probs: bool = False,
    key_keep: torch.Tensor | None = None,
) -> AttentionResult:
    """Run `attn` on `x`, exposing coefficients and (on request or when masking) probabilities.

    # x: [B, T, d], keep_mask: [T, T], key_keep: [B, T] bool
    #   -> output/coefficients: [B, T, d], probs: [B, H, T, T]
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = None
    key_mask = None if key_keep is None else key_keep[:, None, None, :]  # [B, 1, 1, T]
    if keep_mask is None and not need_probs:
        heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        if keep_mask is not None:
            probs = probs * keep_mask
        heads_out = attn.attn_drop(probs) @ v
    coefficients = attn.norm(heads_out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if gate is not None:
        coefficients = coefficients * gate
    output = attn.proj_drop(attn.proj(coefficients))
    return AttentionResult(output=output, coefficients=coefficients, probs=probs)
