"""timm `Cait` (CaiT, "Going deeper with Image Transformers"): talking-heads self-attention
blocks on the image tokens, then class-attention blocks that insert and update the CLS token.

Layout (METHOD §1b, class-attention blocks): the full sequence is `T = 1 + N` (CLS at
position 0, then the image tokens row-major over `patch_embed.grid_size`). `embed` returns
the image tokens only (after `pos_embed` and `pos_drop`). The lens's blocks are the
self-attention blocks `model.blocks` (1..D) followed by the class-attention blocks
`model.blocks_token_only` (D+1..D+K), so `num_blocks = D + K`.
- Self-attention blocks (`LayerScaleBlock` + `TalkingHeadAttn`): every stream covers the
  image tokens, positions 1..N (`first_token = 1`); there is no CLS yet.
- Class-attention blocks (`LayerScaleBlockClassAttn` + `ClassAttn`): the first one inserts
  `model.cls_token`; its `resid_pre` is the sequence the block reads, `[cls_token, image
  tokens]`. Only the CLS query attends (to the CLS and every image token) and only the CLS
  is updated by attention and MLP: the residual tensors cover all T positions (the image
  tokens pass through unchanged, exactly as timm keeps them), the sub-layer tensors only the
  CLS (`sublayer_tokens = 1`). `ViTAnatomy.cls_from_block = D + 1`.

Streams: `attn` = `gamma_1 * attn(norm1(x))`, `mlp` = `gamma_2 * mlp(norm2(x))`; coefficients
= the input of `attn.proj` and `mlp_forward`'s; value vectors = the columns of `attn.proj`
and `mlp.fc2`. Projection: `head(norm(h))` (CLS pooling; average pooling over the image
tokens with the norm before pooling projects a token the same way, and the model's output
is the mean of the image tokens' projections).

Talking heads: `proj_l` mixes the heads' scores before the softmax and `proj_w` mixes the
heads' probabilities after it; the attention that weights the values is after `proj_w`, so
that is `attn_probs` and where METHOD §4's keep mask multiplies (no renormalisation; after
`proj_w` the weights are not a distribution to begin with). Token removal (key masking)
is exact: a removed key's score is -inf after `proj_l` (which mixes heads per query-key
pair, never across keys), and its column is zeroed after `proj_w` (whose bias would
otherwise give every removed key a weight `b_w[h]` it does not have in the shortened
sequence).

Experiments: `attn_self_only` applies in the self-attention blocks (an image query keeps
only itself; there is no prefix there) and leaves the class-attention blocks alone (their
only query is the CLS). Skipped: `attn_no_cls` (no image-token query ever attends to the
CLS: it would equal the unperturbed run) and `explain` (METHOD §6 differentiates the
attention the CLS query gives the image tokens in every block; CaiT's CLS attends only in
the class-attention blocks).

Refused with a reason: `global_pool=''` (the head on every token, no pooled output), no
class-attention blocks (a pruned model), other block / attention / MLP types.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from timm.layers import PatchEmbed
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

from vitlens.errors import UserError
from vitlens.lens.attention import AttentionResult, merge_heads
from vitlens.lens.families.attention_heads import AttentionHeads, output_heads
from vitlens.lens.families.base import AttentionArgs, ModelAdapter, ViTAnatomy, check_sublayer
from vitlens.lens.families.common import TOKEN_OR_AVG, check_pool, pool_tokens, timm_anatomy
from vitlens.lens.mlp import check_mlp, mlp_forward, mlp_values
from vitlens.lens.trace import BlockTrace

NO_CLS_REASON = ("no image-token query attends to the CLS token in CaiT (self-attention blocks have no CLS, "
                 "class-attention blocks only the CLS query): 'no_cls' would equal the unperturbed run")
EXPLAIN_REASON = ("METHOD §6 differentiates the CLS query's attention in every block; CaiT's CLS attends only "
                  "in the class-attention blocks")


def talking_heads_attention(
    attn: TalkingHeadAttn, x: torch.Tensor, args: AttentionArgs = AttentionArgs(),
) -> AttentionResult:
    """timm's `TalkingHeadAttn` from its own weights: `qkv` → scores → `proj_l` (heads mixed
    before the softmax) → softmax → `proj_w` (heads mixed after it) → keep mask / edit →
    `attn_drop` → values → `proj` → `proj_drop`. The probabilities are always materialised
    (timm has no fused path for talking heads); they are returned when asked for.

    # x: [B, N, d], args over the N image tokens (keep_mask: [N, N], key_keep: [B, N] bool)
    #   -> output/coefficients: [B, N, d], probs: [B, H, N, N] (after proj_w and the masks)
    """
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]  # [B, H, N, hd]
    scores = q @ k.transpose(-2, -1)  # [B, H, N, N]
    scores = attn.proj_l(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    key_mask = None if args.key_keep is None else args.key_keep[:, None, None, :]  # [B, 1, 1, N]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    probs = attn.proj_w(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B, H, N, N]
    if key_mask is not None:  # removed keys do not exist: no proj_w bias for them (also clears all-masked NaN rows)
        probs = probs.masked_fill(~key_mask, 0.0)
    if args.keep_mask is not None:
        probs = probs * args.keep_mask
    if args.probs_edit is not None:
        probs = args.probs_edit(probs)
    coefficients = merge_heads(attn.attn_drop(probs) @ v)  # [B, N, d]
    output = attn.proj_drop(attn.proj(coefficients))
    wanted = args.need_probs or args.keep_mask is not None or args.probs_edit is not None
    return AttentionResult(output=output, coefficients=coefficients, probs=probs if wanted else None, values=v)


def class_attention(attn: ClassAttn, x: torch.Tensor, args: AttentionArgs = AttentionArgs()) -> AttentionResult:
    """timm's `ClassAttn` (CaiT and XCiT) from its own weights: the CLS query (`q` of token 0)
    attends to every token (`k`, `v` of all), through `attend`; then `proj`, `proj_drop`.

    # x: [B, T, d] (normed, CLS first), args: keep_mask [1, T] (the CLS query's row), key_keep [B, T] bool
    #   -> output/coefficients: [B, 1, d], probs: [B, H, 1, T]
    """
    batch, tokens, width = x.shape
    heads = attn.num_heads
    q = attn.q(x[:, 0]).reshape(batch, 1, heads, width // heads).permute(0, 2, 1, 3)  # [B, H, 1, hd]
    k = attn.k(x).reshape(batch, tokens, heads, width // heads).permute(0, 2, 1, 3)  # [B, H, T, hd]
    v = attn.v(x).reshape(batch, tokens, heads, width // heads).permute(0, 2, 1, 3)
    heads_out, probs = args.attend(q, k, v, attn.scale)
    coefficients = merge_heads(heads_out)  # [B, 1, d]
    return AttentionResult(output=attn.proj_drop(attn.proj(coefficients)), coefficients=coefficients, probs=probs,
                           values=v)


class ClassAttentionAdapter(ModelAdapter):
    """What CaiT and XCiT share: `model.blocks` over the image tokens, then the class-attention
    blocks (the model attribute `class_blocks`) that insert the CLS token and update only it;
    CLS or average pooling after the final `norm`, then `head` (module notes)."""

    #: the model attribute holding the class-attention blocks
    class_blocks: ClassVar[str] = ""

    def _check_class_attention(self) -> None:
        """Refuse a pooling other than CLS / average and a model without class-attention blocks."""
        model = self.model
        check_pool(model, TOKEN_OR_AVG)
        if not getattr(model, self.class_blocks, None) or getattr(model, "cls_token", None) is None:
            raise UserError(f"{type(model).__name__} without class-attention blocks or CLS token (a pruned model): "
                            "the CLS token is never computed")

    def _anatomy(self, **facts: object) -> ViTAnatomy:
        """`timm_anatomy` with the class-attention blocks counted and the CLS from the first of them."""
        depth = len(self.model.blocks)
        return timm_anatomy(self, num_blocks=depth + len(getattr(self.model, self.class_blocks)),
                            cls_from_block=depth + 1, **facts)

    def _block(self, index: int) -> torch.nn.Module:
        """Block `index` (1-based) over `model.blocks`, then the class-attention blocks."""
        depth = len(self.model.blocks)
        if index <= depth:
            return self.model.blocks[index - 1]
        return getattr(self.model, self.class_blocks)[index - 1 - depth]

    def attention_heads(self, index: int) -> AttentionHeads:
        """`attn.proj` and `gamma_1` of block `index` (talking heads: the heads after `proj_w`,
        whose probabilities weight the values). # -> AttentionHeads"""
        block = self._block(index)
        return output_heads(block.attn.proj, block.gamma_1, block.attn.num_heads)

    def _with_cls(self, resid_pre: torch.Tensor) -> torch.Tensor:
        """The sequence a class-attention block reads: the first one gets the image tokens and
        prepends the CLS (timm's `forward_cls`), later ones already hold it.

        # resid_pre: [B, N, d] or [B, 1+N, d] -> [B, 1+N, d]
        """
        num_image_tokens = self.anatomy.num_image_tokens
        if resid_pre.shape[1] == num_image_tokens:
            return torch.cat([self.model.cls_token.expand(resid_pre.shape[0], -1, -1), resid_pre], dim=1)
        if resid_pre.shape[1] != num_image_tokens + 1:
            raise ValueError(f"a class-attention block reads {num_image_tokens} or {num_image_tokens + 1} tokens, "
                             f"got {resid_pre.shape[1]}")
        return resid_pre

    # ---- projection ----------------------------------------------------------------------
    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """CLS pooling: the CLS token's projection; average pooling (after the norm): the mean
        of the image tokens' projections (the head is linear).

        # resid_final: [B, 1+N, d] -> logits: [B, C]
        """
        if self.model.global_pool == "token":
            return self.project(resid_final[:, 0])
        return self.project(resid_final[:, 1:]).mean(dim=1)

    # ---- memories ------------------------------------------------------------------------
    def value_vectors(self, index: int, sublayer: str) -> torch.Tensor:
        """attn: the columns of `attn.proj`; mlp: the columns of `mlp.fc2`. # -> values: [d, M]"""
        check_sublayer(sublayer)
        block = self._block(index)
        return block.attn.proj.weight if sublayer == "attn" else mlp_values(block.mlp)


class CaitAdapter(ClassAttentionAdapter):
    """timm `Cait`: talking-heads self-attention blocks, then class-attention blocks."""

    family = "cait"
    model_classes = (Cait,)
    class_blocks = "blocks_token_only"

    model: Cait

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        self._check_class_attention()
        if type(model.patch_embed) is not PatchEmbed or getattr(model.patch_embed, "dynamic_img_size", False):
            raise UserError(f"unsupported patch embedding {type(model.patch_embed).__name__} "
                            "(supported: timm PatchEmbed at a fixed input size)")
        stages = ((model.blocks, 1, "", "self-attention", LayerScaleBlock, TalkingHeadAttn),
                  (model.blocks_token_only, len(model.blocks) + 1, " (class attention)", "class-attention",
                   LayerScaleBlockClassAttn, ClassAttn))
        for blocks, first, suffix, kind, block_type, attention_type in stages:
            for index, block in enumerate(blocks, start=first):
                where = f"block {index}{suffix}"
                if type(block) is not block_type or type(block.attn) is not attention_type:
                    raise UserError(f"{where}: unsupported {kind} block {type(block).__name__} with "
                                    f"{type(getattr(block, 'attn', None)).__name__} (supported: "
                                    f"{block_type.__name__} with {attention_type.__name__})")
                check_mlp(block.mlp, where)

    def describe(self) -> ViTAnatomy:
        return self._anatomy(skipped=(("attn_no_cls", NO_CLS_REASON), ("explain", EXPLAIN_REASON)))

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches + position embedding; the CLS is inserted by the first class-attention block.

        # images: [B, 3, H, W] -> hidden: [B, N, d] (sequence positions 1..N)
        """
        model = self.model
        return model.pos_drop(model.patch_embed(images) + model.pos_embed)

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """# resid_pre: [B, N, d] (self-attention block; first class-attention block) or
        #   [B, 1+N, d] (later class-attention blocks), masks over T = 1+N -> BlockTrace"""
        block = self._block(index)
        if isinstance(block, LayerScaleBlock):
            attention = talking_heads_attention(block.attn, block.norm1(resid_pre), args.covering(1))
            attn_out = block.gamma_1 * attention.output  # [B, N, d]
            resid_mid = resid_pre + block.drop_path(attn_out)
            mlp_raw, mlp_coefficients = mlp_forward(block.mlp, block.norm2(resid_mid))
            mlp_out = block.gamma_2 * mlp_raw
            return BlockTrace(
                index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid, mlp_out=mlp_out,
                resid_post=resid_mid + block.drop_path(mlp_out), attn_coefficients=attention.coefficients,
                mlp_coefficients=mlp_coefficients, attn_probs=attention.probs, attn_values=attention.values,
                first_token=1,
            )
        sequence = self._with_cls(resid_pre)  # [B, T, d]
        attention = class_attention(block.attn, block.norm1(sequence), args.covering(0, queries=1))
        attn_out = block.gamma_1 * attention.output  # [B, 1, d]
        cls_mid = sequence[:, :1] + block.drop_path(attn_out)
        mlp_raw, mlp_coefficients = mlp_forward(block.mlp, block.norm2(cls_mid))
        mlp_out = block.gamma_2 * mlp_raw  # [B, 1, d]
        image_tokens = sequence[:, 1:]  # unchanged by a class-attention block
        return BlockTrace(
            index=index, resid_pre=sequence, attn_out=attn_out,
            resid_mid=torch.cat([cls_mid, image_tokens], dim=1), mlp_out=mlp_out,
            resid_post=torch.cat([cls_mid + block.drop_path(mlp_out), image_tokens], dim=1),
            attn_coefficients=attention.coefficients, mlp_coefficients=mlp_coefficients,
            attn_probs=attention.probs, attn_values=attention.values, first_token=0, sublayer_tokens=1,
        )

    def logits_keeping(self, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The position embedding is already in `hidden`, so the kept image tokens are gathered
        into a shorter sequence and run through timm's own blocks and `forward_cls` (the same
        output as key masking at full length).

        # hidden: [B, N, d] (from `embed`), kept: [B, n] sorted positions in T = 1+N -> logits: [B, C]
        """
        image_tokens = hidden.gather(1, (kept - 1)[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, n, d]
        model = self.model
        return model.forward_head(model.norm(model.forward_cls(model.blocks(image_tokens))))

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))` as timm does; with `key_keep` and average pooling, the mean
        over the kept image tokens only.

        # resid_final: [B, 1+N, d], key_keep: [B, 1+N] bool -> logits: [B, C]
        """
        model = self.model
        if key_keep is None or model.global_pool == "token":
            return model.forward_head(model.norm(resid_final))
        pooled = pool_tokens(model.norm(resid_final[:, 1:]), "avg", key_keep[:, 1:])  # [B, d]
        return model.head(model.head_drop(pooled))
