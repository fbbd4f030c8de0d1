"""timm `Beit` (BEiT, BEiT v2): pre-norm blocks with relative position biases.

Covers: BEiT's own `Block` (LayerScale as the `gamma_1` / `gamma_2` vectors, or none) and
its own `Attention` (a `qkv` without bias plus separate `q_bias` / `v_bias`, a zero `k_bias`;
a per-block relative position bias table, the model-wide shared `rel_pos_bias`, both summed
or neither), an optional absolute position embedding, GELU `Mlp` or `SwiGLU` (with the
`scale_mlp` norm), average pooling of the image tokens with `fc_norm` (every BEiT checkpoint)
or CLS pooling with `norm`. The relative position bias enters the attention scores through
`attend(..., bias=...)`, computed by the model's own modules (`_get_rel_pos_bias`,
`rel_pos_bias()`), so the perturbations of METHOD §4 act on the same post-softmax attention
as timm's; token removal is key masking at full length (the bias of every kept pair of
positions is the bias of the full image), and deletion uses the generic `logits_keeping`.

The CLS token always exists (`num_prefix_tokens = 1`) and is a prefix token; under average
pooling the head reads only the image tokens, so explainability (the CLS token's gradient)
is skipped for those models.

Refused with a reason: `global_pool=''` (the head classifies every token: there is no one
output to match), blocks / attention / MLPs other than BEiT's own, a relative position
table whose window is not the token grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock

from vitlens.errors import UserError
from vitlens.lens.anatomy import ViTAnatomy
from vitlens.lens.attention import ProbsEdit, attend, merge_heads
from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.families.vit import pool_tokens, token_grid
from vitlens.lens.mlp import check_mlp, mlp_forward, mlp_values
from vitlens.lens.trace import BlockTrace

#: `global_pool` values whose output is one vector per image (timm also allows '', no pooling).
POOLS = ("token", "avg")


# ---- helpers shared with the relative-position ViT (`relpos.py`): same head, same pooling --
def check_pool(model: torch.nn.Module) -> None:
    """Refuse a `global_pool` other than CLS ('token') or average ('avg') pooling."""
    if model.global_pool not in POOLS:
        raise UserError(
            f"global_pool={model.global_pool!r} is not supported (use one of {POOLS}): without pooling "
            "the head classifies every token, so there is no one model output to match")


def pool_skipped(model: torch.nn.Module, has_class_token: bool) -> list[tuple[str, str]]:
    """The experiments that do not apply because of the token layout or the pooling."""
    skipped = []
    if not has_class_token:
        skipped.append(("attn_no_cls", "the model has no CLS token"))
    if not (has_class_token and model.global_pool == "token"):
        skipped.append(("explain", "explainability differentiates the CLS token the head reads; this model "
                                   f"pools with global_pool={model.global_pool!r}"))
    return skipped


def head_logits(model: torch.nn.Module, resid_final: torch.Tensor, key_keep: torch.Tensor | None) -> torch.Tensor:
    """timm's `forward_head(norm(x))` (`Beit`, `VisionTransformerRelPos`); with `key_keep`,
    the average pooling runs over the kept image tokens only (the shortened sequence).

    # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
    """
    hidden = model.norm(resid_final)
    if key_keep is None or model.global_pool == "token":
        return model.forward_head(hidden)
    prefix = model.num_prefix_tokens
    pooled = pool_tokens(hidden[:, prefix:], "avg", key_keep[:, prefix:])  # [B, d]
    return model.head(model.head_drop(model.fc_norm(pooled)))


def pooled_parity_logits(adapter: ModelAdapter, resid_final: torch.Tensor) -> torch.Tensor:
    """CLS pooling: the CLS token's projection; average pooling with the norm after pooling
    (`fc_norm`): the projection of the mean image token; with the norm before pooling: the mean
    of the image tokens' projections (the head is linear).

    # resid_final: [B, T, d] -> logits: [B, C]
    """
    model = adapter.model
    if model.global_pool == "token":
        return adapter.project(resid_final[:, 0])
    tokens = resid_final[:, model.num_prefix_tokens:]  # [B, N, d]
    if isinstance(model.norm, torch.nn.Identity):
        return adapter.project(tokens.mean(dim=1))
    if isinstance(model.fc_norm, torch.nn.Identity):
        return adapter.project(tokens).mean(dim=1)
    weight, bias = adapter.class_embedding()  # both norms (not built by timm): the pooled path itself
    return F.linear(model.fc_norm(model.norm(tokens).mean(dim=1)), weight, bias)


class BeitAdapter(ModelAdapter):
    """timm `Beit` (BEiT and BEiT v2, every option of the class)."""

    family = "beit"
    model_classes = (Beit,)

    model: Beit

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        model = self.model
        check_pool(model)
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        tables = [("the shared rel_pos_bias", model.rel_pos_bias)] if model.rel_pos_bias is not None else []
        for index, block in enumerate(model.blocks, start=1):
            where = f"block {index}"
            if type(block) is not BeitBlock:
                raise UserError(f"{where}: unsupported transformer block {type(block).__name__} "
                                "(supported: BEiT's Block)")
            if type(block.attn) is not BeitAttention:
                raise UserError(f"{where}: unsupported attention {type(block.attn).__name__} "
                                "(supported: BEiT's Attention)")
            check_mlp(block.mlp, where)
            if block.attn.relative_position_bias_table is not None:
                tables.append((f"{where}'s relative position table", block.attn))
        for name, module in tables:
            if tuple(int(w) for w in module.window_size) != grid:
                raise UserError(f"{name} has window {tuple(module.window_size)} but the token grid is {grid}: "
                                "its bias does not fit the sequence")

    def describe(self) -> ViTAnatomy:
        model = self.model
        grid_size, token_cell = token_grid(model.patch_embed)
        return ViTAnatomy(
            family=self.family,
            num_blocks=len(model.blocks),
            num_prefix_tokens=int(model.num_prefix_tokens),
            has_class_token=True,
            global_pool=model.global_pool,
            embed_dim=int(model.embed_dim),
            num_classes=int(model.num_classes),
            mlp_width=int(mlp_values(model.blocks[0].mlp).shape[1]) if len(model.blocks) else 0,
            grid_size=grid_size,
            token_cell=token_cell,
            skipped=tuple(pool_skipped(model, has_class_token=True)),
        )

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches, the CLS token in front, the absolute position embedding where the model
        has one, `pos_drop` (`Beit.forward_features` up to the blocks).

        # images: [B, 3, H, W] -> hidden: [B, 1+N, d]
        """
        model = self.model
        x = model.patch_embed(images)  # [B, N, d]
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x)

    def attention_bias(self, index: int) -> torch.Tensor | None:
        """The additive relative position bias of block `index`'s attention scores, from the
        model's own modules: the block's table plus the shared one, as timm's fused path sums them.

        # -> bias: [1, H, T, T] | None
        """
        attn, shared = self.model.blocks[index - 1].attn, self.model.rel_pos_bias
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        if shared is not None:
            shared_bias = shared()[None]  # [H, T, T] -> [1, H, T, T]
            bias = shared_bias if bias is None else bias + shared_bias
        return bias

    def block_forward(
        self,
        index: int,
        resid_pre: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        need_probs: bool = False,
        key_keep: torch.Tensor | None = None,
        probs_edit: ProbsEdit | None = None,
    ) -> BlockTrace:
        """BEiT's `Block.forward` with its `Attention.forward` inlined, in timm's order.

        # resid_pre: [B, T, d] -> BlockTrace
        """
        block = self.model.blocks[index - 1]
        attn = block.attn
        x = block.norm1(resid_pre)  # [B, T, d]
        batch, tokens, _ = x.shape
        qkv = _qkv(attn, x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, T, hd] each
        heads_out, probs = attend(q, k, v, attn.scale, keep_mask, need_probs, key_keep,
                                  bias=self.attention_bias(index), probs_edit=probs_edit)
        coefficients = merge_heads(heads_out)  # [B, T, H·hd]
        attn_raw = attn.proj_drop(attn.proj(coefficients))  # [B, T, d]
        attn_out = attn_raw if block.gamma_1 is None else block.gamma_1 * attn_raw
        resid_mid = resid_pre + block.drop_path1(attn_out)
        mlp_raw, mlp_coefficients = mlp_forward(block.mlp, block.norm2(resid_mid))
        mlp_out = mlp_raw if block.gamma_2 is None else block.gamma_2 * mlp_raw
        resid_post = resid_mid + block.drop_path2(mlp_out)
        return BlockTrace(
            index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid,
            mlp_out=mlp_out, resid_post=resid_post, attn_coefficients=coefficients,
            mlp_coefficients=mlp_coefficients, attn_probs=probs,
        )

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_head(norm(x))`; with `key_keep`, the average over the kept image tokens.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        return head_logits(self.model, resid_final, key_keep)

    # ---- projection ----------------------------------------------------------------------
    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """# resid_final: [B, T, d] -> logits: [B, C] (see `pooled_parity_logits`)"""
        return pooled_parity_logits(self, resid_final)

    # ---- memories ------------------------------------------------------------------------
    # ---- explainability ------------------------------------------------------------------
    def cls_branch(
        self, index: int, trace: BlockTrace, cls_row: torch.Tensor, source: str
    ) -> torch.Tensor:
        """Block `index`'s CLS stream from the leaf attention row `cls_row`: the CLS query alone,
        the same submodules and order as `block_forward` (the bias only shapes the row itself).

        # cls_row: [B, H, T] (leaf) -> x_cls: [B, d]
        """
        block = self.model.blocks[index - 1]
        attn = block.attn
        resid_pre = trace.resid_pre.detach()  # [B, T, d]
        x = block.norm1(resid_pre)
        batch, tokens, _ = x.shape
        values = _qkv(attn, x).reshape(batch, tokens, 3, attn.num_heads, -1)[:, :, 2].transpose(1, 2)  # [B, H, T, hd]
        heads_out = torch.einsum("bht,bhtd->bhd", attn.attn_drop(cls_row), values)  # [B, H, hd]
        attn_raw = attn.proj_drop(attn.proj(heads_out.reshape(batch, -1)))  # [B, d]
        attn_out = attn_raw if block.gamma_1 is None else block.gamma_1 * attn_raw
        if source == "attn":
            return attn_out
        resid_mid = resid_pre[:, 0] + block.drop_path1(attn_out)
        mlp_raw, _ = mlp_forward(block.mlp, block.norm2(resid_mid))
        mlp_out = mlp_raw if block.gamma_2 is None else block.gamma_2 * mlp_raw
        return resid_mid + block.drop_path2(mlp_out)


def _qkv(attn: BeitAttention, x: torch.Tensor) -> torch.Tensor:
    """BEiT's qkv projection: `qkv` has no bias; `q_bias`, a zero `k_bias` and `v_bias` are
    added as timm does (in the linear, or after it with `qkv_bias_separate`).

    # x: [B, T, d] -> qkv: [B, T, 3·H·hd]
    """
    if attn.q_bias is None:
        return attn.qkv(x)
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        return attn.qkv(x) + qkv_bias
    return F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
