"""What the lens needs to know about a timm ViT, checked once: prefix tokens, pooling, norms, head.

The projection onto class space (METHOD §1) is `proj(h) = head(norm_final(h))`, bias
included: `norm_final = model.norm` for CLS models, `model.fc_norm` for GAP models
(`global_pool='avg'`, where timm sets `model.norm` to Identity); see `project`. Post-norm blocks
(timm `ResPostBlock`) add `norm1(attn(x))` and `norm2(mlp(x))` to the residual stream, so
their sub-layer streams are taken after that block's own post-norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from vitlens.errors import UserError

SUPPORTED_POOLS = ("token", "avg")


@dataclass(frozen=True)
class ViTAnatomy:
    """Static facts about one supported timm `VisionTransformer`."""

    num_blocks: int
    num_prefix_tokens: int  # CLS + distillation + register tokens, at the start of the sequence
    has_class_token: bool
    global_pool: str  # "token" (CLS) or "avg" (GAP)
    post_norm: bool  # True for ResPostBlock models
    embed_dim: int
    num_classes: int
    mlp_width: int
    grid_size: tuple[int, int] = (0, 0)  # image tokens per column and row (patch_embed.grid_size)
    token_cell: tuple[int, int] = (0, 0)  # input pixels (h, w) one image token covers: img_size / grid_size

    @property
    def is_gap(self) -> bool:
        """True for global-average-pooling models (every token is an image token when no prefix)."""
        return self.global_pool == "avg"


def describe_model(model: torch.nn.Module) -> ViTAnatomy:
    """Check that `model` is a ViT the lens handles exactly, and describe it.

    Raises `UserError` for anything the lens would get wrong rather than silently
    mis-project: non-`VisionTransformer` models, attention pooling, headless models,
    blocks other than timm `Block`/`ResPostBlock`, attention other than timm `Attention`,
    MLPs other than timm `Mlp`.
    """
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UserError(f"the lens needs a timm VisionTransformer, got {name}")
    if getattr(model, "head_dist", None) is not None:
        # METHOD §1b: the model averages head(cls) and head_dist(dist); projecting through
        # `head` alone would disagree with the model's own output, so refuse until supported.
        raise UserError(f"{name} averages two heads (head and head_dist); distilled models are not supported yet")
    if model.global_pool not in SUPPORTED_POOLS or model.attn_pool is not None:
        raise UserError(f"global_pool={model.global_pool!r} is not supported (use one of {SUPPORTED_POOLS})")
    if not isinstance(model.head, torch.nn.Linear):
        raise UserError("the model has no linear classifier head (num_classes=0?)")
    block_types = {type(block) for block in model.blocks}
    if not block_types <= {Block, ResPostBlock} or len(block_types) != 1:
        raise UserError(f"unsupported transformer blocks {sorted(t.__name__ for t in block_types)}")
    for index, block in enumerate(model.blocks):
        if type(block.attn) is not Attention:
            raise UserError(f"block {index}: unsupported attention {type(block.attn).__name__}")
        if type(block.mlp) is not Mlp:
            raise UserError(f"block {index}: unsupported MLP {type(block.mlp).__name__}")
    grid_size, token_cell = _token_grid(model)
    return ViTAnatomy(
        grid_size=grid_size,
        token_cell=token_cell,
        num_blocks=len(model.blocks),
        num_prefix_tokens=int(model.num_prefix_tokens),
        has_class_token=bool(model.has_class_token),
        global_pool=model.global_pool,
        post_norm=ResPostBlock in block_types,
        embed_dim=int(model.embed_dim),
        num_classes=int(model.num_classes),
        mlp_width=int(model.blocks[0].mlp.fc1.out_features),
    )


def _token_grid(model: VisionTransformer) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid_size, token_cell) from the patch embedding itself (METHOD §1b): a hybrid ViT's CNN
    stem strides before its `patch_size`, so its tokens cover img_size / grid_size pixels."""
    embed = model.patch_embed
    grid = tuple(int(g) for g in embed.grid_size)
    image = tuple(int(i) for i in embed.img_size)
    if any(i % g for i, g in zip(image, grid)):
        raise UserError(f"input {image} is not a whole number of tokens of the {grid} token grid")
    return (grid[0], grid[1]), (image[0] // grid[0], image[1] // grid[1])


def project(model: VisionTransformer, hidden: torch.Tensor) -> torch.Tensor:
    """Class-space projection `proj(h) = head(norm_final(h))`, bias included (METHOD §1).

    `norm_final` is `fc_norm ∘ norm` — exactly the per-token part of timm's head path: for
    CLS models `fc_norm` is Identity (so `norm`), for GAP models `norm` is Identity (so
    `fc_norm`). For CLS models the CLS token's projection is the model's output.

    # hidden: [..., d] -> logits: [..., C]
    """
    return model.head(model.fc_norm(model.norm(hidden)))
