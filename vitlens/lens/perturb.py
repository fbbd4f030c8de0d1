"""Perturbations of METHOD §4: attention masks (post-softmax, no renormalisation) and token removal."""

from __future__ import annotations

from typing import Literal

import torch

from vitlens.errors import UserError

AttentionPerturbation = Literal["self_only", "no_cls"]
ATTENTION_PERTURBATIONS: tuple[str, ...] = ("self_only", "no_cls")


def attention_keep_mask(
    perturbation: AttentionPerturbation,
    num_tokens: int,
    num_prefix_tokens: int,
    has_class_token: bool,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Multiplicative mask on the post-softmax attention matrix (1 = keep, 0 = zero).

    Rows are queries, columns keys; prefix-token query rows are all ones.
    - `self_only`: an image-token query i keeps only i→i and i→prefix (zero to image j ≠ i).
    - `no_cls`: an image-token query drops its weight to the CLS token (token 0).

    # -> mask: [T, T] float32
    """
    if perturbation not in ATTENTION_PERTURBATIONS:
        raise UserError(
            f"unknown attention perturbation {perturbation!r}: use one of {ATTENTION_PERTURBATIONS}"
        )
    mask = torch.ones(num_tokens, num_tokens, device=device)
    first_image = num_prefix_tokens
    if perturbation == "self_only":
        mask[first_image:, first_image:] = torch.eye(num_tokens - first_image, device=device)
    else:
        if not has_class_token:
            raise UserError("attention perturbation 'no_cls' needs a model with a CLS token")
        mask[first_image:, 0] = 0.0
    return mask


def token_keep_from_labels(
    token_label: torch.Tensor, drop_label: int, num_prefix_tokens: int
) -> torch.Tensor:
    """Which image tokens survive removing those labelled `drop_label` (e.g. LABEL_CLASS).

    # token_label: [B, P+N] int -> token_keep: [B, N] bool
    """
    return token_label[:, num_prefix_tokens:] != drop_label
