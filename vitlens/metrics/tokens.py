"""Token selections and the pooled rate every per-token metric is built on (pure tensor functions)."""

from __future__ import annotations

import torch


def image_token_mask(token_present: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Image tokens that are present: prefix positions (CLS, distillation, registers) excluded.

    For GAP models without prefix tokens (`num_prefix_tokens=0`) every token is an image token.

    # token_present: [B, T] bool -> [B, T] bool
    """
    mask = token_present.clone()
    mask[:, :num_prefix_tokens] = False
    return mask


def cls_token_mask(token_present: torch.Tensor) -> torch.Tensor:
    """Only the CLS token (position 0) of CLS models.

    # token_present: [B, T] bool -> [B, T] bool
    """
    mask = torch.zeros_like(token_present)
    mask[:, 0] = token_present[:, 0]
    return mask


def labelled_token_mask(token_label: torch.Tensor, label: int, token_present: torch.Tensor) -> torch.Tensor:
    """Present tokens carrying segmentation label `label` (e.g. class- or context-labelled).

    # token_label: [B, T] int, token_present: [B, T] bool -> [B, T] bool
    """
    return (token_label == label) & token_present


def broadcast_token_mask(token_mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Expand a per-image token mask over the middle axes of `values`.

    # token_mask: [B, T], values: [B, *S, T] -> [B, *S, T] bool
    """
    batch, tokens = token_mask.shape
    middle = values.dim() - 2
    return token_mask.view(batch, *([1] * middle), tokens).expand_as(values)


def masked_rate(flags: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of selected tokens whose flag is set, pooled over images and tokens.

    NaN where no token is selected.

    # flags: [B, *S, T] bool, token_mask: [B, T] bool -> [*S] float
    """
    mask = broadcast_token_mask(token_mask, flags)
    hits = (flags.bool() & mask).sum(dim=(0, -1), dtype=torch.float64)
    count = mask.sum(dim=(0, -1), dtype=torch.float64)
    return (hits / count).float()


def per_image_rate(flags: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of selected tokens whose flag is set, per image (NaN for an image with none).

    # flags: [B, *S, T] bool, token_mask: [B, T] bool -> [B, *S] float
    """
    mask = broadcast_token_mask(token_mask, flags)
    hits = (flags.bool() & mask).sum(dim=-1, dtype=torch.float64)
    count = mask.sum(dim=-1, dtype=torch.float64)
    return (hits / count).float()
