"""timm `Xcit` (XCiT, "Cross-Covariance Image Transformers"): cross-covariance attention
blocks on the image tokens, then class-attention blocks that insert and update the CLS.

Layout (METHOD §1b, class-attention blocks): the full sequence is `T = 1 + N` (CLS at
position 0, then the image tokens row-major over the `img_size / patch_size` grid of the
convolutional patch embedding). `embed` returns the image tokens only: `patch_embed`, plus
the Fourier position encoding `pos_embed(B, Hp, Wp)` when the model has one, then
`pos_drop`. The lens's blocks are `model.blocks` (XCA blocks 1..D) followed by
`model.cls_attn_blocks` (D+1..D+K), so `num_blocks = D + K`; `cls_from_block = D + 1`.

XCA blocks (`XCABlock`) have three sub-layers in timm's order: XCA (`attn`), local patch
interaction (`local_mp`, LPI: two depthwise 3×3 convolutions over the token grid) and the
MLP. Streams: `attn` = `gamma1 * attn(norm1(x))`, `mlp` = `gamma2 * mlp(norm2(x))`; LPI's
output `gamma3 * local_mp(norm3(x))` has no stream of its own: it is part of `resid_mid`,
the MLP's input stream (`resid_mid = resid_pre + attn + LPI`). The attention coefficients
are the input of `attn.proj` (per head, the channel-mixed values `softmax(q̂ᵀk̂·τ)·vᵀ`),
value vectors the columns of `attn.proj` and `mlp.fc2`. Every stream covers the image
tokens, positions 1..N (`first_token = 1`).

Class-attention blocks (`ClassAttentionBlock`): the first one inserts `model.cls_token`
(its `resid_pre` is `[cls_token, image tokens]`). Sub-layer streams cover the CLS only
(`sublayer_tokens = 1`): `attn` = `gamma1 * ClassAttn(norm1(x))` (the CLS query attends to
all tokens), `mlp` = `gamma2 * mlp(·)`. timm's block also changes the image tokens and
replaces the CLS residual by a norm, modelled exactly so that parity holds:
- `x ← x + gamma1 · [ClassAttn(norm1 x) ; norm1(x_img)]` — each image token gets its own
  `gamma1 · norm1` added;
- `tokens_norm=True`: `x ← norm2(x)` (every token); else only the CLS: `x_cls ← norm2(x_cls)`
  (a replacement, not a residual add). This normed sequence is `resid_mid`: the MLP reads
  its CLS directly and adds to it;
- `resid_post = resid_mid + [mlp_out ; resid_mid_img]` — the image tokens are doubled.
So in these blocks the image tokens' `resid_pre`, `resid_mid` and `resid_post` are exactly
the tensors timm carries (block input; after the `gamma1 · norm1` add and, with
`tokens_norm`, `norm2`; twice that); the final `norm` makes the doubling nearly invisible
to the projection.

Projection: `head(norm(h))` (CLS pooling; average pooling over the image tokens after the
norm projects a token the same way, the model's output is the mean of their projections).

Skipped (METHOD §1b): XCA has no token-to-token attention — it attends over channels — so
`attn_self_only`, `attn_no_cls` and `explain` (§6 gradients of the CLS attention in every
block) do not apply; token removal (`remove_class_tokens`, `remove_context_tokens`) does not
either: LPI convolves the full token grid, so a sequence with tokens removed has no defined
forward, and key masking (or zeroing) is not the same as removing. The adapter refuses
masks and probability requests in XCA blocks rather than ignore them.

Refused with a reason: `global_pool=''`, no class-attention blocks, an input grid not
divisible by the patch size, other block / attention / MLP types.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.cait import ClassAttn
from timm.models.xcit import LPI, XCA, ClassAttentionBlock, ConvPatchEmbed, XCABlock, Xcit
from timm.layers import Mlp

from vitlens.errors import UserError
from vitlens.lens.attention import AttentionResult, attend
from vitlens.lens.families.attention_heads import AttentionHeads
from vitlens.lens.families.base import AttentionArgs, ViTAnatomy
from vitlens.lens.families.cait import ClassAttentionAdapter, class_attention
from vitlens.lens.families.common import require_type
from vitlens.lens.mlp import mlp_forward
from vitlens.lens.trace import BlockTrace

XCA_REASON = "cross-covariance attention (XCA) attends over channels, not tokens: there is no token-to-token attention"
SKIPPED: tuple[tuple[str, str], ...] = (
    ("attn_self_only", XCA_REASON),
    ("attn_no_cls", XCA_REASON),
    ("remove_class_tokens", "XCiT's local patch interaction (LPI) convolves the full token grid: "
                            "a sequence with tokens removed has no defined forward"),
    ("remove_context_tokens", "XCiT's local patch interaction (LPI) convolves the full token grid: "
                              "a sequence with tokens removed has no defined forward"),
    ("explain", "METHOD §6 differentiates the CLS attention of every block; XCA blocks have no token attention"),
)


def cross_covariance_attention(attn: XCA, x: torch.Tensor) -> AttentionResult:
    """timm's `XCA` from its own weights: per head, `q`, `k` L2-normalised over the tokens,
    channel attention `softmax(q̂ k̂ᵀ · temperature)` (through `attend`, timm's fused form with
    `scale=1`), applied to the values, then `proj`, `proj_drop`.

    # x: [B, N, d] -> output/coefficients: [B, N, d] (probs None: channel attention is not
    #   token attention)
    """
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 4, 1)
    q, k, v = qkv.unbind(0)  # [B, H, d/H, N]: channels are the "queries" and "keys"
    q = F.normalize(q, dim=-1) * attn.temperature
    k = F.normalize(k, dim=-1)
    heads_out, _ = attend(q, k, v, 1.0)  # [B, H, d/H, N]
    coefficients = heads_out.permute(0, 3, 1, 2).reshape(batch, tokens, width)  # [B, N, d]
    return AttentionResult(output=attn.proj_drop(attn.proj(coefficients)), coefficients=coefficients, probs=None)


class XcitAdapter(ClassAttentionAdapter):
    """timm `Xcit`: XCA blocks (XCA, LPI, MLP), then class-attention blocks."""

    family = "xcit"
    model_classes = (Xcit,)
    class_blocks = "cls_attn_blocks"

    model: Xcit

    def attention_heads(self, index: int) -> AttentionHeads:
        """Refused: XCA heads mix channels across tokens, not tokens (no per-source split)."""
        raise UserError("cross-covariance attention (XCA) has no token-to-token attention to attribute per head")

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        self._check_class_attention()
        embed = model.patch_embed
        require_type(embed, (ConvPatchEmbed,), "patch embedding")
        if any(size % embed.patch_size for size in embed.img_size):
            raise UserError(f"input {tuple(embed.img_size)} is not a whole number of {embed.patch_size}-pixel patches")
        for index, block in enumerate(model.blocks, start=1):
            where = f"block {index}"
            if (type(block) is not XCABlock or type(block.attn) is not XCA or type(block.local_mp) is not LPI
                    or type(block.mlp) is not Mlp):
                raise UserError(f"{where}: unsupported XCiT block {type(block).__name__} (supported: XCABlock "
                                "with XCA, LPI and Mlp)")
        for offset, block in enumerate(model.cls_attn_blocks, start=1):
            where = f"block {len(model.blocks) + offset} (class attention)"
            if (type(block) is not ClassAttentionBlock or type(block.attn) is not ClassAttn
                    or type(block.mlp) is not Mlp):
                raise UserError(f"{where}: unsupported class-attention block {type(block).__name__} "
                                "(supported: ClassAttentionBlock with ClassAttn and Mlp)")

    def describe(self) -> ViTAnatomy:
        embed = self.model.patch_embed
        grid_size = (int(embed.img_size[0]) // embed.patch_size, int(embed.img_size[1]) // embed.patch_size)
        return self._anatomy(grid_size=grid_size, token_cell=(embed.patch_size, embed.patch_size), skipped=SKIPPED)

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Convolutional patches + Fourier position encoding; the CLS is inserted by the first
        class-attention block.

        # images: [B, 3, H, W] -> hidden: [B, N, d] (sequence positions 1..N)
        """
        model = self.model
        hidden, (rows, cols) = model.patch_embed(images)
        if (rows, cols) != self.anatomy.grid_size:
            raise UserError(f"images of {tuple(images.shape[-2:])} pixels give a {(rows, cols)} token grid; "
                            f"the model is described for {self.anatomy.grid_size} (build it with that img_size)")
        if model.pos_embed is not None:
            batch = hidden.shape[0]
            hidden = hidden + model.pos_embed(batch, rows, cols).reshape(batch, -1, hidden.shape[1]).permute(0, 2, 1)
        return model.pos_drop(hidden)

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """# resid_pre: [B, N, d] (XCA block; first class-attention block) or [B, 1+N, d]
        #   (later class-attention blocks) -> BlockTrace"""
        if args.keep_mask is not None or args.key_keep is not None:
            raise UserError(f"XCiT: attention perturbations and token removal do not apply ({XCA_REASON}; "
                            "LPI convolves the full token grid)")
        block = self._block(index)
        if isinstance(block, XCABlock):
            if args.need_probs or args.probs_edit is not None:
                raise UserError(f"XCiT block {index}: {XCA_REASON}")
            return self._xca_block(index, block, resid_pre)
        return self._class_attention_block(index, block, resid_pre, args)

    def _xca_block(self, index: int, block: XCABlock, resid_pre: torch.Tensor) -> BlockTrace:
        """XCA, LPI, MLP as `XCABlock.forward` (LPI's output goes into `resid_mid`).

        # resid_pre: [B, N, d] -> BlockTrace (first_token 1)
        """
        rows, cols = self.anatomy.grid_size
        attention = cross_covariance_attention(block.attn, block.norm1(resid_pre))
        attn_out = block.gamma1 * attention.output  # [B, N, d]
        after_attn = resid_pre + block.drop_path1(attn_out)
        lpi_out = block.gamma3 * block.local_mp(block.norm3(after_attn), rows, cols)  # [B, N, d]
        resid_mid = after_attn + block.drop_path3(lpi_out)
        mlp_raw, mlp_coefficients = mlp_forward(block.mlp, block.norm2(resid_mid))
        mlp_out = block.gamma2 * mlp_raw
        return BlockTrace(
            index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid, mlp_out=mlp_out,
            resid_post=resid_mid + block.drop_path2(mlp_out), attn_coefficients=attention.coefficients,
            mlp_coefficients=mlp_coefficients, attn_probs=None, first_token=1,
        )

    def _class_attention_block(
        self, index: int, block: ClassAttentionBlock, resid_pre: torch.Tensor, args: AttentionArgs,
    ) -> BlockTrace:
        """`ClassAttentionBlock.forward` exactly, image-token updates included (module notes).

        # resid_pre: [B, N, d] or [B, 1+N, d] -> BlockTrace (first_token 0, sublayer_tokens 1)
        """
        sequence = self._with_cls(resid_pre)  # [B, T, d]
        normed = block.norm1(sequence)
        attention = class_attention(block.attn, normed, args)
        added = block.gamma1 * torch.cat([attention.output, normed[:, 1:]], dim=1)  # [B, T, d]
        after_attn = sequence + block.drop_path1(added)
        if block.tokens_norm:
            resid_mid = block.norm2(after_attn)
        else:
            resid_mid = torch.cat([block.norm2(after_attn[:, :1]), after_attn[:, 1:]], dim=1)
        mlp_raw, mlp_coefficients = mlp_forward(block.mlp, resid_mid[:, :1])
        mlp_out = block.gamma2 * mlp_raw  # [B, 1, d]
        resid_post = resid_mid + block.drop_path2(torch.cat([mlp_out, resid_mid[:, 1:]], dim=1))
        return BlockTrace(
            index=index, resid_pre=sequence, attn_out=added[:, :1], resid_mid=resid_mid, mlp_out=mlp_out,
            resid_post=resid_post, attn_coefficients=attention.coefficients, mlp_coefficients=mlp_coefficients,
            attn_probs=attention.probs, first_token=0, sublayer_tokens=1,
        )

    def logits_keeping(self, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Refused: token removal is not defined for XCiT (LPI convolves the full grid)."""
        raise UserError(f"XCiT: {dict(SKIPPED)['remove_class_tokens']}")

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))` as timm does (no token removal for XCiT).

        # resid_final: [B, 1+N, d] -> logits: [B, C]
        """
        if key_keep is not None:
            raise UserError(f"XCiT: {dict(SKIPPED)['remove_class_tokens']}")
        return self.model.forward_head(self.model.norm(resid_final))
