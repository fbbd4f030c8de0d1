"""Class identifiability (METHOD §2, the paper's eq. 1), from the lens's correct-class ranks."""

from __future__ import annotations

import torch

from vitlens.metrics.tokens import broadcast_token_mask, masked_rate, per_image_rate


def identifiability_score(rank: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`r = 1 − rank / C` per token (1 = the correct class is top-1); NaN where rank is fill (-1).

    # rank: [...] int -> [...] float
    """
    score = 1.0 - rank.double() / num_classes
    return score.masked_fill(rank < 0, float("nan")).float()


def identifiability_rate(rank: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of selected tokens with rank 0, pooled over all tokens of all images.

    # rank: [B, *S, T] int, token_mask: [B, T] bool (e.g. image tokens) -> [*S] float
    """
    return masked_rate(rank == 0, token_mask)


def identifiability_rate_per_image_mean(rank: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean over images of each image's identifiable fraction (images with no selected token skipped).

    # rank: [B, *S, T] int, token_mask: [B, T] bool -> [*S] float
    """
    return per_image_rate(rank == 0, token_mask).nanmean(dim=0)


def images_with_identifiable_token(rank: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of images with at least one selected token of rank 0 (e.g. last block, image tokens).

    # rank: [B, *S, T] int, token_mask: [B, T] bool -> [*S] float
    """
    mask = broadcast_token_mask(token_mask, rank)
    return ((rank == 0) & mask).any(dim=-1).float().mean(dim=0)
