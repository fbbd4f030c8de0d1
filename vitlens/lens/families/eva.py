"""timm `Eva` (`timm/models/eva.py`): EVA-01/02, the `*_rope_*` ViTs, Perception Encoder,
DINOv3, LingBot-Vision and Sapiens2, in every option their architectures use.

Covers:
- blocks: pre-norm `EvaBlock` (layer scale `gamma_1` / `gamma_2`, also attention-only layer
  scale) and post-norm `EvaBlockPostNorm` (METHOD §1: the sub-layer streams after the block's
  own `norm1` / `norm2`);
- attention: `EvaAttention` (fused `qkv` with the q/v biases and EVA's zero k-bias, added
  inside or after the matmul, or separate `q_proj` / `k_proj` / `v_proj`) and timm's
  `AttentionRope` (fused or separate projections, grouped-query attention: the key/value
  heads repeated to every query head after norm and rotation, as timm does); `qk_norm`, the
  output norm before `proj` (`scale_attn_inner`), the sigmoid gate;
- rotary position embeddings applied to the image tokens only (the first
  `attn.num_prefix_tokens` queries and keys are left unrotated), interleaved or half layout:
  `RotaryEmbeddingCat`, `RotaryEmbeddingDinoV3`, `RotaryEmbeddingMRope` (one table for every
  block) and `RotaryEmbeddingMixed` (`rope_mixed`: a table per block, `rot_pos_embed[b]`).
  The tables come from the model's own `_pos_embed`, so the embedded sequence and the tables
  are those of `forward_features`; token removal masks keys at full length, so every kept
  token keeps the rotation of its own position;
- MLPs `Mlp`, `SwiGLU`, `GluMlp` (`vitlens.lens.mlp`); absolute position embeddings with or
  without the prefix (`no_embed_class`), `norm_pre`, register tokens, CLS / average / max /
  avgmax pooling, `fc_norm`, `head_drop`, and attention pooling (`map`, Perception Encoder
  core): projected per METHOD §1b as `head(fc_norm(attn_pool(norm(h))))` on the one-token
  sequence, like `ViTAdapter.norm_final`. Eva's attention pool reads every token, prefix
  included (`Eva.pool`), and so does the parity check;
- `dynamic_img_size` models (DINOv3, LingBot, Sapiens2) at their configured input size: the
  lens's token grid is `patch_embed.grid_size`, and an input giving another grid is refused.

Refused with a reason: `global_pool=''` (per-token outputs, no single head input), an
attention pool other than timm's `AttentionPoolLatent` without its own position embedding,
block / attention / MLP / rotary types other than the above. Explainability (METHOD §6) is
skipped unless the head reads the CLS token (`global_pool='token'`).
"""

from __future__ import annotations

import torch
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.layers.pos_embed_sincos import (
    RotaryEmbeddingCat,
    RotaryEmbeddingDinoV3,
    RotaryEmbeddingMixed,
    RotaryEmbeddingMRope,
)
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

from vitlens.errors import UserError
from vitlens.lens.attention import AttentionResult, merge_heads
from vitlens.lens.families.base import AttentionArgs, ModelAdapter, ViTAnatomy
from vitlens.lens.families.common import (
    bias_qkv,
    check_attn_pool,
    check_blocks,
    check_pool,
    kept_head_logits,
    layer_scale,
    pooled_parity_logits,
    require_type,
    residual_trace,
    timm_anatomy,
)
from vitlens.lens.trace import BlockTrace

BLOCK_TYPES = (EvaBlock, EvaBlockPostNorm)
ATTENTION_TYPES = (EvaAttention, AttentionRope)
ROPE_TYPES = (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed, RotaryEmbeddingMRope)


def eva_attention_sublayer(
    attn: EvaAttention | AttentionRope,
    x: torch.Tensor,
    rope: torch.Tensor | None,
    args: AttentionArgs = AttentionArgs(),
) -> AttentionResult:
    """timm's `EvaAttention.forward` / `AttentionRope.forward` from the module's own weights, in
    timm's order (gate, q/k/v projections and biases, `q_norm`/`k_norm`, rotation of the image
    tokens, key/value head repeat, attention, `norm`, gate, `proj`, `proj_drop`), exposing the
    coefficients and probabilities.

    # x: [B, T, d], rope: [N, 2·hd] or [H, N, 2·hd] (one block's table) or None
    #   -> output/coefficients: [B, T, d], probs: [B, H, T, T]
    """
    batch, tokens, _ = x.shape
    heads = attn.num_heads
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None  # [B, T, H·hd]
    if attn.qkv is not None:  # EvaAttention's q/v biases; AttentionRope's bias is in qkv
        qkv = bias_qkv(attn, x)  # [B, T, 3·H·hd]
        q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, hd]
    else:
        kv_heads = getattr(attn, "num_kv_heads", heads)
        q = attn.q_proj(x).reshape(batch, tokens, heads, -1).transpose(1, 2)  # [B, H, T, hd]
        k = attn.k_proj(x).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)  # [B, Hkv, T, hd]
        v = attn.v_proj(x).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        prefix, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:  # grouped-query attention: query head h reads key/value head h // groups
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    heads_out, probs = args.attend(q, k, v, attn.scale)
    coefficients = attn.norm(merge_heads(heads_out))  # [B, T, H·hd]
    if gate is not None:
        coefficients = coefficients * gate
    output = attn.proj_drop(attn.proj(coefficients))  # [B, T, d]
    return AttentionResult(output=output, coefficients=coefficients, probs=probs, values=v)


class EvaAdapter(ModelAdapter):
    """timm `Eva` (every architecture of `timm/models/eva.py`)."""

    family = "eva"
    model_classes = (Eva,)

    model: Eva

    def __init__(self, model: torch.nn.Module) -> None:
        self._rope: torch.Tensor | None = None  # the rotary tables of the last `embed`
        super().__init__(model)

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        check_pool(model)
        check_attn_pool(model)
        if model.rope is not None:
            require_type(model.rope, ROPE_TYPES, "rotary embedding")
        check_blocks(model.blocks, BLOCK_TYPES, ATTENTION_TYPES)

    def describe(self) -> ViTAnatomy:
        return timm_anatomy(self, post_norm=any(isinstance(block, EvaBlockPostNorm) for block in self.model.blocks))

    # ---- rotary tables -------------------------------------------------------------------
    def _rotary_tables(self) -> torch.Tensor | None:
        """The rotary tables `_pos_embed` builds for the lens's token grid (eval mode, no patch
        dropout), for blocks run without a preceding `embed`.

        # -> [N, 2·hd] (one table) or [L, H, N, 2·hd] (mixed: one per block) or None
        """
        model = self.model
        if model.rope is None:
            return None
        if model.dynamic_img_size:
            return model.rope.get_embed(shape=self.anatomy.grid_size)
        if hasattr(model.rope, "feat_shape"):
            return model.rope.get_embed()
        return model.rope.get_embed(shape=model.patch_embed.grid_size)

    def _block_rope(self, index: int, device: torch.device) -> torch.Tensor | None:
        """Block `index`'s rotary table: the one of the last `embed` (recomputed when missing, on
        another device, or made under inference mode while autograd is on).

        # -> [N, 2·hd] / [H, N, 2·hd] or None
        """
        if self.model.rope is None:
            return None
        rope = self._rope
        stale = rope is None or rope.device != device or (rope.is_inference() and not torch.is_inference_mode_enabled())
        if stale:
            rope = self._rope = self._rotary_tables()
        return rope[index - 1] if getattr(self.model, "rope_mixed", False) else rope

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`patch_embed`, then `_pos_embed` (CLS, registers, absolute position embedding, the
        rotary tables kept for the blocks), then `norm_pre`, as `forward_features` does.

        # images: [B, 3, H, W] -> hidden: [B, P+N, d]
        """
        model = self.model
        hidden, rope = model._pos_embed(model.patch_embed(images))
        if hidden.shape[1] != self.anatomy.num_tokens:
            raise UserError(
                f"input {tuple(images.shape[-2:])} gives {hidden.shape[1] - self.anatomy.num_prefix_tokens} image "
                f"tokens, not the {self.anatomy.grid_size} grid of the model's input size "
                f"{tuple(model.patch_embed.img_size)}: the lens analyses the model at that size")
        self._rope = rope
        return model.norm_pre(hidden)

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """`EvaBlock.forward` / `EvaBlockPostNorm.forward` with every stream exposed.

        # resid_pre: [B, T, d] -> BlockTrace
        """
        block = self.model.blocks[index - 1]
        rope = self._block_rope(index, resid_pre.device)
        post_norm = isinstance(block, EvaBlockPostNorm)
        scales = None if post_norm else (layer_scale(block.gamma_1), layer_scale(block.gamma_2))
        return residual_trace(block, index, resid_pre, lambda x: eva_attention_sublayer(block.attn, x, rope, args),
                              scales)

    def run_blocks(self, hidden: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """timm's own blocks with their rotary tables (no streams kept); token removal as
        timm's boolean attention mask over the keys.

        # hidden: [B, T, d], key_keep: [B, T] bool -> resid_final: [B, T, d]
        """
        attn_mask = None if key_keep is None else key_keep[:, None, None, :]  # [B, 1, 1, T]
        for index, block in enumerate(self.model.blocks, start=1):
            hidden = block(hidden, rope=self._block_rope(index, hidden.device), attn_mask=attn_mask)
        return hidden

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))` as timm does; with `key_keep`, pooling over the kept tokens
        only (the attention pool, which reads every token, prefix included, masks the removed keys).

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        return kept_head_logits(self, resid_final, key_keep, self._pool_start())

    def _pool_start(self) -> int:
        """The first sequence position the pooling reads: Eva's attention pool reads every token."""
        return 0 if self.model.attn_pool is not None else self.model.num_prefix_tokens

    # ---- projection ----------------------------------------------------------------------
    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """# resid_final: [B, T, d] -> logits: [B, C] (see `common.pooled_parity_logits`)"""
        return pooled_parity_logits(self, resid_final, self._pool_start())
