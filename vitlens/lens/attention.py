"""Attention computed from the unmodified timm modules' own weights, exposing what the lens reads.

`attend(q, k, v, ...)` is the one place attention probabilities are formed, for every family:
without a perturbation, `need_probs` or an edit it is `F.scaled_dot_product_attention`
(timm's fused path); otherwise the probabilities are materialised as timm's unfused path
does, `softmax((q·scale) kᵀ + bias)`, optionally multiplied by a keep mask (no
renormalisation, METHOD §4) and then passed through `probs_edit` (the explainability
branch swaps in a leaf CLS row there).

Removed tokens (METHOD §4 token removal) are excluded as *keys*: `key_keep[b, j] = False`
gives key j weight exactly 0 in every query's softmax (-inf score), which is the same
attention as on the shortened sequence; layer norms and MLPs act per token, so the kept
tokens' streams equal those of the shortened sequence and one batched forward serves
images that keep different numbers of tokens.

`attention_sublayer` is timm's `Attention` (ViT family): `qkv` → `q_norm`/`k_norm` →
attention → `norm` → gate → `proj` → `proj_drop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention

ProbsEdit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AttentionResult:
    """Output of one attention sub-layer and the quantities the lens reads from it."""

    output: torch.Tensor  # [B, T, d] after the output projection (before LayerScale / post-norm)
    coefficients: torch.Tensor  # [B, T, Ma] the input of the output projection: per-head A·V concatenated
    probs: torch.Tensor | None  # [B, H, T, T] post-softmax (post-mask) attention, when computed
    values: torch.Tensor | None = None  # [B, H, Tk, hd] what the probabilities weight (per-source attribution)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    keep_mask: torch.Tensor | None = None,
    need_probs: bool = False,
    key_keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    probs_edit: ProbsEdit | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with the lens's perturbations.

    # q: [B, H, Tq, hd], k, v: [B, H, Tk, hd], keep_mask: [Tq, Tk], key_keep: [B, Tk] bool,
    # bias: [B or 1, H or 1, Tq, Tk] additive -> (heads_out [B, H, Tq, hd], probs [B, H, Tq, Tk] | None)
    """
    key_mask = None if key_keep is None else key_keep[:, None, None, :]  # [B, 1, 1, Tk]
    if keep_mask is None and not need_probs and probs_edit is None:
        mask = bias
        if key_mask is not None:
            mask = key_mask if bias is None else bias.masked_fill(~key_mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if keep_mask is not None:
        probs = probs * keep_mask
    if probs_edit is not None:
        probs = probs_edit(probs)
    return probs @ v, probs


def merge_heads(heads_out: torch.Tensor) -> torch.Tensor:
    """# heads_out: [B, H, T, hd] -> [B, T, H·hd]"""
    batch, heads, tokens, head_dim = heads_out.shape
    return heads_out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def attention_sublayer(
    attn: Attention,
    x: torch.Tensor,
    keep_mask: torch.Tensor | None = None,
    need_probs: bool = False,
    key_keep: torch.Tensor | None = None,
    probs_edit: ProbsEdit | None = None,
) -> AttentionResult:
    """Run timm's `Attention` module `attn` on `x`, exposing coefficients and probabilities.

    # x: [B, T, d], keep_mask: [T, T], key_keep: [B, T] bool
    #   -> output/coefficients: [B, T, d], probs: [B, H, T, T]
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    heads_out, probs = attend(q, k, v, attn.scale, keep_mask, need_probs, key_keep, probs_edit=probs_edit)
    coefficients = attn.norm(merge_heads(heads_out))
    if gate is not None:
        coefficients = coefficients * gate
    output = attn.proj_drop(attn.proj(coefficients))
    return AttentionResult(output=output, coefficients=coefficients, probs=probs, values=v)
