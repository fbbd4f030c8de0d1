"""Block- and head-specific class-embedding gradients (METHOD §6, paper §7).

Importance of image token t for head h of block b (1-based) and class of interest c:
`-∂ℓ_b/∂a_b^h[cls, t]` with `ℓ_b = CE(proj(x_cls^b), c)` on logits, `x_cls^b` the CLS token
of the residual stream after block b (`source="resid"`) or of the attention sub-layer's
output of block b (`source="attn"`, the reference code's choice).

All blocks come from ONE forward and ONE backward per batch. Inside block b the CLS
token's stream depends on `a_b` only through the CLS row `a_b[:, :, cls, :]` (every other
row feeds other tokens; layer norms and MLPs act per token). So for every block a
*detached branch* recomputes the rest of block b for the CLS token alone from a leaf copy
of that row; the main path (run without gradients) continues to block b+1 untouched.
The branch losses are summed and back-propagated once: the gradient on leaf b contains
`ℓ_b` only — never the later losses `ℓ_{b'>b}` (tests compare against a separate
`torch.autograd.grad` per block on the full graph).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import UserError
from vitlens.lens.anatomy import ViTAnatomy, describe_model, project
from vitlens.lens.forward import BlockTrace, embed, iter_block_traces

GradientSource = Literal["resid", "attn"]
GRADIENT_SOURCES: tuple[str, ...] = ("resid", "attn")


def require_autograd() -> None:
    """Gradients cannot be taken under `torch.inference_mode()` (e.g. inside `Lens.run`)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("vitlens.explain needs autograd: call it outside torch.inference_mode()")


def require_class_token(anatomy: ViTAnatomy) -> None:
    """Reject models without a CLS token: the method differentiates the CLS token's projection."""
    if not anatomy.has_class_token or anatomy.global_pool != "token":
        raise UserError(
            "explainability needs a CLS-token model (global_pool='token'); "
            f"this model pools with global_pool={anatomy.global_pool!r}"
        )


def _cls_branch(
    block: torch.nn.Module, trace: BlockTrace, cls_row: torch.Tensor, post_norm: bool, source: str
) -> torch.Tensor:
    """Recompute block `trace.index`'s CLS stream from the leaf attention row `cls_row`.

    Same submodules and order as `vitlens.lens.forward.block_forward` and
    `vitlens.lens.attention.attention_sublayer`, for the CLS query only.

    # cls_row: [B, H, T] (leaf) -> x_cls: [B, d]
    """
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
    mlp = block.mlp
    mlp_coefficients = mlp.fc1(resid_mid if post_norm else block.norm2(resid_mid))
    mlp_raw = mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(mlp_coefficients)))))
    mlp_out = block.norm2(mlp_raw) if post_norm else block.ls2(mlp_raw)
    return resid_mid + block.drop_path2(mlp_out)


def block_head_importance(
    model: VisionTransformer,
    images: torch.Tensor,
    class_index: torch.Tensor,
    source: GradientSource = "resid",
) -> torch.Tensor:
    """Importance of every image token for every block and head, one forward + one backward.

    `class_index` is the class of interest per image (the true class, or the model's
    prediction). Importance = `-∂CE(proj(x_cls^b), c)/∂a_b^h[cls, t]` over image tokens t.

    # images: [B, 3, H, W], class_index: [B] int64 -> importance: [B, L, H, N]
    """
    if source not in GRADIENT_SOURCES:
        raise UserError(f"unknown gradient source {source!r}: use one of {GRADIENT_SOURCES}")
    require_autograd()
    anatomy = describe_model(model)
    require_class_token(anatomy)
    prefix = anatomy.num_prefix_tokens
    leaves: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    with torch.no_grad():  # the main path needs no graph; each branch builds its own
        hidden = embed(model, images, anatomy)
        for block, trace in zip(model.blocks, iter_block_traces(model, hidden, anatomy, need_probs=True)):
            with torch.enable_grad():
                cls_row = trace.attn_probs[:, :, 0, :].clone().requires_grad_(True)  # [B, H, T]
                x_cls = _cls_branch(block, trace, cls_row, anatomy.post_norm, source)
                losses.append(F.cross_entropy(project(model, x_cls), class_index, reduction="sum"))
            leaves.append(cls_row)
    with torch.enable_grad():
        torch.stack(losses).sum().backward(inputs=leaves)
    gradients = torch.stack([leaf.grad[:, :, prefix:] for leaf in leaves], dim=1)  # [B, L, H, N]
    return -gradients


def global_importance(importance: torch.Tensor) -> torch.Tensor:
    """Global map: sum over blocks and heads.

    # importance: [B, L, H, N] -> global: [B, N]
    """
    return importance.sum(dim=(1, 2))
