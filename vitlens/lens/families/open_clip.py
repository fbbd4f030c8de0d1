"""open_clip image towers inside a `ZeroShotClassifier` (METHOD §1c): family "open_clip".

`self.model` is the wrapper (`vitlens.lens.classifiers.ZeroShotClassifier`), `self.model.tower`
the unmodified open_clip module; its class picks the adapter. The class space is the wrapper's
head (`s · E`, bias `b` or None); the per-token head path (`norm_final`) is the tower's own
pooling applied to the token alone, its final norm and projection, then L2 normalisation.

Covered:
- `open_clip.transformer.VisionTransformer` (CLIP / CustomTextCLIP / CoCa `visual`; family
  "open_clip"): the class token, learnable or `sin_cos_2d` position embedding, `ln_pre` or none,
  `ResidualAttentionBlock` (torch `nn.MultiheadAttention` recomputed from its fused
  `in_proj_weight` / `in_proj_bias` and `out_proj`, LayerScale `ls_1` / `ls_2`, GELU or QuickGELU
  MLP `c_fc` → act → `c_proj`) and `CustomResidualAttentionBlock` (qk-norm `ln_q` / `ln_k`,
  per-head `head_scale`, `ln_inner` before `out_proj` (the coefficients are its output),
  `ln_attn` after it (the attention stream is taken after it, like timm's post-norm blocks),
  the MLP's `ln`); pooling `pool_type` "tok" (CLS) or "avg" (image tokens), `ln_post` before or
  after pooling (`final_ln_after_pool`), `proj`; CoCa's attentional pooler (`attn_pool`, any
  number of queries): one token is a one-key sequence, so every query reads that key's value
  with weight exactly 1 and the pooled vector is `ln_post(out_proj(W_v ln_k(h) + b_v))`.
- `open_clip.timm_model.TimmModel` towers: `open_clip_timm.py`.

Value vectors (METHOD §3) live where the class embedding does: the columns of `out_proj` /
`c_proj` (trunk: its family's value vectors) mapped through the LINEAR part of the one-token head
path — the attentional pooler's value and output projections, `proj`, the trunk / tower heads —
without norms or biases, so `E · W` is defined when the feature width d' differs from the
residual width d.

Refused with a one-line reason: ModifiedResNet towers (RN50 ...: a CNN, no token sequence),
`scaled_cosine_attn` (open_clip 3.3's own forward of it fails: `bmm` on 4-D tensors),
`pool_type="none"` without a pooler and the string poolers ("parallel" / "cascade": no single
pooled vector in the contrastive path), unknown block / attention / MLP layouts, cross-attention
blocks, timm trunks without a lens family (ConvNeXt, FastViT, Swin, ...), timm heads with a 2-D
attention pool or an MLP projection. Explainability (METHOD §6) is skipped unless the head reads
the CLS token (`pool_type="tok"`, no pooler).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from vitlens.errors import UserError
from vitlens.lens.attention import AttentionResult, merge_heads
from vitlens.lens.families.attention_heads import AttentionHeads, layer_scale_vector, output_heads
from vitlens.lens.families.base import AttentionArgs, ModelAdapter, ViTAnatomy, check_sublayer
from vitlens.lens.families.common import pool_tokens
from vitlens.lens.linearise import unit_length
from vitlens.lens.trace import BlockTrace

try:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import (
        AttentionalPooler,
        CustomResidualAttentionBlock,
        ResidualAttentionBlock,
        VisionTransformer,
    )
    from open_clip.transformer import Attention as OpenClipAttention
except ImportError:  # the optional 'clip' extra is not installed: nothing registers
    VisionTransformer = ModifiedResNet = None  # type: ignore[assignment, misc]
    AttentionalPooler = CustomResidualAttentionBlock = ResidualAttentionBlock = OpenClipAttention = None

MLP_LAYOUTS = (["c_fc", "gelu", "c_proj"], ["c_fc", "gelu", "ln", "c_proj"])


def _mha_value_projection(mha: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The value projection (weight [E, kdim], bias [E] | None) of a torch `nn.MultiheadAttention`."""
    embed = mha.embed_dim
    weight = mha.in_proj_weight[2 * embed:] if mha._qkv_same_embed_dim else mha.v_proj_weight
    bias = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * embed:]
    return weight, bias


def _attentional_pool(pool: "AttentionalPooler", tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """`AttentionalPooler.forward` with the removed tokens excluded as keys (its own modules).

    # tokens: [B, T, d], keep: [B, T] bool -> [B, Q, d']
    """
    keys = pool.ln_k(tokens)
    queries = pool.ln_q(pool.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
    mask = None if keep is None else ~keep
    return pool.attn(queries, keys, keys, key_padding_mask=mask, need_weights=False)[0]


def _attention(block: nn.Module, x: torch.Tensor, args: AttentionArgs) -> AttentionResult:
    """The attention of a `ResidualAttentionBlock` (torch MHA) or `CustomResidualAttentionBlock`
    (open_clip `Attention`) from the module's fused in-projection, through `attend`.

    # x: [B, T, d] (after ln_1) -> output [B, T, d] (after out_proj), coefficients [B, T, d]
    """
    attn, custom = block.attn, isinstance(block, CustomResidualAttentionBlock)
    batch, tokens, _ = x.shape
    q, k, v = (
        part.reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2)  # [B, H, T, hd]
        for part in F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    )
    if custom:
        q, k = attn.ln_q(q), attn.ln_k(k)
    heads_out, probs = args.attend(q, k, v, q.shape[-1] ** -0.5)
    if custom and attn.head_scale is not None:
        heads_out = heads_out * attn.head_scale  # [H, 1, 1]
        v = v * attn.head_scale  # the values each head's coefficients are the weighted sum of
    coefficients = merge_heads(heads_out)  # [B, T, d]
    if custom:
        coefficients = attn.ln_inner(coefficients)
    output = attn.out_proj(coefficients)
    if custom:
        output = attn.out_drop(output)
    return AttentionResult(output=output, coefficients=coefficients, probs=probs, values=v)


def _mlp(mlp: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`mlp(x)` (c_fc → act → [ln] → c_proj) and its memory coefficients (c_fc's output).

    # x: [B, T, d] -> (output [B, T, d], coefficients [B, T, M])
    """
    coefficients = mlp.c_fc(x)
    hidden = mlp.gelu(coefficients)
    if hasattr(mlp, "ln"):
        hidden = mlp.ln(hidden)
    return mlp.c_proj(hidden), coefficients


def _check_block(block: nn.Module, where: str) -> None:
    """Raise `UserError` for a block layout `_attention` / `_mlp` do not reproduce."""
    if type(block) is ResidualAttentionBlock:
        mha = block.attn
        if hasattr(block, "ln_1_kv"):
            raise UserError(f"{where}: a cross-attention block (ln_1_kv) is not a self-attention ViT block")
        if type(mha) is not nn.MultiheadAttention or not mha.batch_first or not mha._qkv_same_embed_dim:
            raise UserError(f"{where}: attention {type(mha).__name__} is not a batch-first, fused-projection "
                            "nn.MultiheadAttention")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UserError(f"{where}: nn.MultiheadAttention with bias_k/bias_v or add_zero_attn is not supported")
    elif type(block) is CustomResidualAttentionBlock:
        if type(block.attn) is not OpenClipAttention:
            raise UserError(f"{where}: unsupported attention {type(block.attn).__name__}")
        if block.attn.logit_scale is not None:
            raise UserError(f"{where}: scaled cosine attention (scaled_cosine_attn) is refused: open_clip 3.3's "
                            "own forward of it fails (bmm on 4-D tensors), so there is no reference to match")
    else:
        raise UserError(f"{where}: unsupported block {type(block).__name__} "
                        "(supported: ResidualAttentionBlock, CustomResidualAttentionBlock)")
    names = [name for name, _ in block.mlp.named_children()]
    if names not in MLP_LAYOUTS or not all(isinstance(getattr(block.mlp, n), nn.Linear) for n in ("c_fc", "c_proj")):
        raise UserError(f"{where}: unsupported MLP layout {names} (expected c_fc, gelu, [ln,] c_proj)")


class OpenClipAdapter(ModelAdapter):
    """open_clip `VisionTransformer` towers (CLIP, CLIPA, CoCa, ...) in a `ZeroShotClassifier`."""

    family = "open_clip"
    model_classes = (VisionTransformer,) if VisionTransformer is not None else ()

    def attention_heads(self, index: int) -> AttentionHeads:
        """`attn.out_proj` and `ls_1` of block `index` (`head_scale` is in the values); `ln_inner`
        over the merged heads is refused. # -> AttentionHeads"""
        block = self.tower.transformer.resblocks[index - 1]
        inner = getattr(block.attn, "ln_inner", None)
        if inner is not None and not isinstance(inner, nn.Identity):
            raise UserError(f"block {index}: ln_inner, a norm over the merged heads, mixes the heads")
        return output_heads(block.attn.out_proj, layer_scale_vector(block.ls_1), block.attn.num_heads)

    def final_norms(self) -> list[tuple[str, nn.Module]]:
        """`ln_post` (the L2 normalisation of METHOD §1c stays live)."""
        return [] if isinstance(self.tower.ln_post, nn.Identity) else [("visual.ln_post", self.tower.ln_post)]

    @property
    def tower(self) -> "VisionTransformer":
        """The open_clip image tower (never modified)."""
        return self.model.tower

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        tower = self.tower
        if getattr(tower, "attn_pool_contrastive", None) is not None:
            raise UserError(f"attentional_pool={tower.attn_pool_type!r} (open_clip's WIP CoCa pooling): the "
                            "contrastive embedding is not one pooled vector")
        if tower.pool_type not in ("tok", "avg"):
            raise UserError(f"pool_type={tower.pool_type!r}: the tower returns per-token features, "
                            "no single pooled embedding (use 'tok' or 'avg')")
        if tower.attn_pool is not None and type(tower.attn_pool) is not AttentionalPooler:
            raise UserError(f"attention pool {type(tower.attn_pool).__name__} is not supported")
        for index, block in enumerate(tower.transformer.resblocks, start=1):
            _check_block(block, f"block {index}")

    def describe(self) -> ViTAnatomy:
        tower = self.tower
        patch = tuple(int(s) for s in tower.conv1.stride)
        image = tuple(int(s) for s in tower.image_size)
        grid = tuple(int(g) for g in tower.grid_size)
        if any(i != g * p for i, g, p in zip(image, grid, patch)):
            raise UserError(f"image size {image} is not a whole number of {patch} patches")
        blocks = tower.transformer.resblocks
        if tower.attn_pool is not None:
            pool = "map"
        else:
            pool = "token" if tower.pool_type == "tok" else "avg"
        skipped = []
        if pool != "token":
            how = "its attentional pooler" if pool == "map" else "pool_type='avg'"
            skipped.append(("explain", f"explainability differentiates the CLS token the head reads; this tower "
                                       f"pools with {how}"))
        return ViTAnatomy(
            family=self.family,
            num_blocks=len(blocks),
            num_prefix_tokens=1,
            has_class_token=True,
            global_pool=pool,
            embed_dim=int(tower.conv1.out_channels),
            num_classes=int(self.model.num_classes),
            mlp_width=int(blocks[0].mlp.c_fc.out_features) if len(blocks) else 0,
            grid_size=(grid[0], grid[1]),
            token_cell=(patch[0], patch[1]),
            post_norm=any(not isinstance(getattr(b, "ln_attn", nn.Identity()), nn.Identity) for b in blocks),
            skipped=tuple(skipped),
        )

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's own `_embeds`: conv1 → flatten → class token → positional embedding →
        patch dropout (eval: none) → ln_pre.

        # images: [B, 3, H, W] -> hidden: [B, 1+N, d]
        """
        tower, cell = self.tower, self.anatomy.token_cell
        grid = (images.shape[-2] // cell[0], images.shape[-1] // cell[1])
        if grid != self.anatomy.grid_size:
            raise UserError(f"input {tuple(images.shape[-2:])} gives a {grid} token grid, not the tower's "
                            f"{self.anatomy.grid_size} (image size {tuple(tower.image_size)})")
        return tower._embeds(images)

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """`ResidualAttentionBlock.forward` / `CustomResidualAttentionBlock.forward`, every stream exposed.

        # resid_pre: [B, T, d] -> BlockTrace
        """
        block = self.tower.transformer.resblocks[index - 1]
        attention = _attention(block, block.ln_1(resid_pre), args)
        attn_out = block.ls_1(getattr(block, "ln_attn", nn.Identity())(attention.output))  # [B, T, d]
        resid_mid = resid_pre + attn_out
        mlp_raw, mlp_coefficients = _mlp(block.mlp, block.ln_2(resid_mid))
        mlp_out = block.ls_2(mlp_raw)
        return BlockTrace(
            index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid, mlp_out=mlp_out,
            resid_post=resid_mid + mlp_out, attn_coefficients=attention.coefficients,
            mlp_coefficients=mlp_coefficients, attn_probs=attention.probs, attn_values=attention.values,
        )

    def run_blocks(self, hidden: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The tower's own transformer (no streams kept; token removal as key masking)."""
        if key_keep is None:
            return self.tower.transformer(hidden)
        return super().run_blocks(hidden, key_keep)

    def logits_keeping(self, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The absolute position embedding is already in `hidden`: the CLS token and the kept
        image tokens (in sequence order) run as a shorter sequence through the tower's own
        transformer, whose pooling then reads exactly them.

        # hidden: [B, T, d], kept: [B, n] sorted positions -> logits: [B, C]
        """
        image_tokens = hidden.gather(1, kept[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, n, d]
        return self.model_logits(self.tower.transformer(torch.cat([hidden[:, :1], image_tokens], dim=1)))

    def _pooled(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The tower's `_pool` (with `key_keep`: over the kept tokens only), before `proj`.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> pooled: [B, d_pool]
        """
        tower = self.tower
        if key_keep is None or (tower.attn_pool is None and tower.pool_type == "tok"):
            return tower._pool(resid_final)[0]
        if tower.attn_pool is not None:
            return tower._global_pool(tower.ln_post(_attentional_pool(tower.attn_pool, resid_final, key_keep)))[0]
        tokens, keep = resid_final[:, 1:], key_keep[:, 1:]  # avg pooling reads the image tokens
        if tower.final_ln_after_pool:
            return tower.ln_post(pool_tokens(tokens, "avg", keep))
        return pool_tokens(tower.ln_post(tokens), "avg", keep)

    def _features(self, pooled: torch.Tensor) -> torch.Tensor:
        """`pooled @ proj` (the tower's own image embedding). # [..., d_pool] -> [..., d']"""
        proj = self.tower.proj
        return pooled if proj is None else pooled @ proj

    def _classify(self, features: torch.Tensor) -> torch.Tensor:
        """The wrapper's head on the L2-normalised features. # [B, d'] -> [B, C]"""
        return self.model.head(F.normalize(features, dim=-1))

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The tower's own pooling, `ln_post`, `proj`, then `head(n(·))`; with `key_keep`, average
        pooling (or the attentional pooler) over the kept tokens only.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        return self._classify(self._features(self._pooled(resid_final, key_keep)))

    # ---- projection ----------------------------------------------------------------------
    def norm_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tower's pooling of the token alone, `ln_post`, `proj`, L2 normalisation (METHOD §1c):
        the CLS token or the mean of one token is the token (`ln_post` on either side of the
        pooling is the same); the attentional pooler reads one key with weight 1 for every query.

        # hidden: [..., d] -> [..., d'] (unit norm)
        """
        tower = self.tower
        if tower.attn_pool is not None:
            pool = tower.attn_pool
            value = F.linear(pool.ln_k(hidden), *_mha_value_projection(pool.attn))  # [..., d_pool]
            hidden = pool.attn.out_proj(value)
        return unit_length(self._features(tower.ln_post(hidden)))

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """CLS pooling: the CLS token's projection; average pooling with `ln_post` after it: the
        projection of the mean image token; otherwise (`ln_post` before the mean, attentional
        pooler) the pooled vector through `proj`, normalisation and the head.

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        tower = self.tower
        if tower.attn_pool is None and tower.pool_type == "tok":
            return self.project(resid_final[:, 0])
        if tower.attn_pool is None and tower.final_ln_after_pool:
            return self.project(resid_final[:, 1:].mean(dim=1))
        return self.model_logits(resid_final)

    # ---- memories ------------------------------------------------------------------------
    def _to_feature_space(self, values: torch.Tensor) -> torch.Tensor:
        """The linear part of the one-token head path (pooler value / output projections, `proj`;
        no norms, no biases) applied to residual-space columns.

        # values: [d, M] -> [d', M]
        """
        tower = self.tower
        if tower.attn_pool is not None:
            attn = tower.attn_pool.attn
            values = attn.out_proj.weight @ (_mha_value_projection(attn)[0] @ values)
        return values if tower.proj is None else tower.proj.T @ values

    def value_vectors(self, index: int, sublayer: str) -> torch.Tensor:
        """Columns of `attn.out_proj` ("attn") or `mlp.c_proj` ("mlp") of block `index`, in the
        class embedding's space (`_to_feature_space`).

        # -> values: [d', M]
        """
        check_sublayer(sublayer)
        block = self.tower.transformer.resblocks[index - 1]
        layer = block.attn.out_proj if sublayer == "attn" else block.mlp.c_proj
        return self._to_feature_space(layer.weight)


class OpenClipResNetRefusal(OpenClipAdapter):
    """open_clip's `ModifiedResNet` towers (RN50, RN101, ...): refused."""

    model_classes = (ModifiedResNet,) if ModifiedResNet is not None else ()

    def check(self) -> None:
        raise UserError("open_clip ModifiedResNet towers (RN50, RN101, ...) are CNNs: there is no token "
                        "sequence for the lens to analyse")
