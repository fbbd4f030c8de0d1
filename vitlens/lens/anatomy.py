"""What the lens needs to know about a model, checked once by its family adapter.

`ViTAnatomy` holds the static facts (prefix tokens, pooling, token grid, which experiments
apply); the family adapters in `vitlens/lens/families/` compute it. The functions here are
the model-level entry points used across the package: each dispatches to the model's
adapter, the one place a family's anatomy is defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vitlens.lens.families.base import ModelAdapter

#: Experiments a family may skip, with the reason recorded in `ViTAnatomy.skipped`.
PERTURBATION_EXPERIMENTS: tuple[str, ...] = (
    "attn_self_only", "attn_no_cls", "remove_class_tokens", "remove_context_tokens",
)
EXPLAIN_EXPERIMENT = "explain"


@dataclass(frozen=True)
class ViTAnatomy:
    """Static facts about one supported model."""

    family: str  # the adapter's family, e.g. "vit", "eva", "cait"
    num_blocks: int
    num_prefix_tokens: int  # CLS + distillation + register tokens, at the start of the sequence
    has_class_token: bool
    global_pool: str  # "token" (CLS), "avg" (GAP), "map" (attention pooling), ...
    embed_dim: int
    num_classes: int
    mlp_width: int
    grid_size: tuple[int, int] = (0, 0)  # image tokens per column and row (patch_embed.grid_size)
    token_cell: tuple[int, int] = (0, 0)  # input pixels (h, w) one image token covers: img_size / grid_size
    post_norm: bool = False  # ViT ResPostBlock models: sub-layer streams after the block's own norms
    cls_from_block: int = 0  # first block slot whose residual stream holds the CLS token (CaiT, XCiT: > 0)
    skipped: tuple[tuple[str, str], ...] = ()  # (experiment, one-line reason) that do not apply

    @property
    def is_gap(self) -> bool:
        """True for average-pooling models (every token is an image token when no prefix)."""
        return self.global_pool == "avg"

    @property
    def num_image_tokens(self) -> int:
        """N, the image tokens of the token grid."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        """T = P + N, the full sequence the head reads."""
        return self.num_prefix_tokens + self.num_image_tokens

    @property
    def pools_class_token(self) -> bool:
        """True when the head reads the CLS token (explainability differentiates it)."""
        return self.has_class_token and self.global_pool == "token"

    def skip_reason(self, experiment: str) -> str | None:
        """Why `experiment` does not apply to this model, or None when it does."""
        return dict(self.skipped).get(experiment)


def model_adapter(model: torch.nn.Module) -> "ModelAdapter":
    """The family adapter of `model` (raises `UserError` with a one-line reason if unsupported)."""
    from vitlens.lens.families import adapter_for

    return adapter_for(model)


def describe_model(model: torch.nn.Module) -> ViTAnatomy:
    """Check that the lens handles `model` exactly, and describe it (raises `UserError` otherwise)."""
    return model_adapter(model).anatomy


def project(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Class-space projection of any token, pooling-aware (METHOD §1b), bias included.

    # hidden: [..., d] -> logits: [..., C]
    """
    return model_adapter(model).project(hidden)
