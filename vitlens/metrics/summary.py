"""The summary tier's counts: every per-token quantity of the paper's tables, summed per
image × block × stream × token kind × token label (pure tensor functions, on the device).

Every query of `queries/` is a ratio of these sums, so a result set that keeps only them
(`detail = "summary"`, ~1 % of the `tokens` tier's bytes) answers the same queries with
the same numbers: the `token_summary` and `residual_match` views compute the same sums
from `tokens` rows (`vitlens.report.results`).

Group axes: `B` images, `L+1` block slots, 3 streams, `K` token kinds, `G` token labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.lens.output import RANK_FILL, STREAM_ATTN, STREAM_MLP, STREAM_RESID, LensBatch


@dataclass
class TokenSummary:
    """Sums over the tokens of each (image, block, stream, kind, label) group."""

    tokens: torch.Tensor  # [B, L+1, 3, K, G] int64 tokens in the group
    identifiable: torch.Tensor  # same shape: tokens with rank 0
    rank_sum: torch.Tensor  # same shape: sum of identifiability ranks (mean score = 1 - rank_sum / (tokens C))
    changed: torch.Tensor  # same shape: sub-layer tokens whose correct logit exceeds the sub-layer input's
    kv_agree: torch.Tensor  # same shape: sub-layer tokens with key-value agreement
    non_compositional: torch.Tensor  # same shape: non-compositional sub-layer tokens


@dataclass
class ResidualMatch:
    """Residual top-1 match sums per (image, block 1..L, kind, label), METHOD §3."""

    tokens: torch.Tensor  # [B, L, K, G] int64 tokens with resid_b, attn_b, mlp_b and resid_{b-1}
    attn_match: torch.Tensor  # same shape: top-1 of resid_b equals top-1 of attn_b
    mlp_match: torch.Tensor  # ... of mlp_b
    previous_match: torch.Tensor  # ... of resid_{b-1}
    composite: torch.Tensor  # matches none of the three


def group_sum(values: torch.Tensor, group: torch.Tensor, num_groups: int,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Sum `values` over the last axis into `num_groups` bins given per position, in `dtype`.

    # values: [..., T] , group: [..., T] int64 in [0, num_groups) (broadcast) -> [..., num_groups]
    """
    out = torch.zeros(*values.shape[:-1], num_groups, dtype=dtype, device=values.device)
    return out.scatter_add_(-1, group.expand_as(values), values.to(dtype))


def kind_label_groups(token_kind: torch.Tensor, token_label: torch.Tensor, num_labels: int,
                      device: torch.device) -> torch.Tensor:
    """Each token's (kind, label) bin, `kind · G + label`.

    # token_kind: [T] int, token_label: [B, T] int -> [B, T] int64
    """
    return token_kind.to(device).long()[None, :] * num_labels + token_label.to(device).long()


def summarise_tokens(
    batch: LensBatch, token_kind: torch.Tensor, token_label: torch.Tensor, num_kinds: int, num_labels: int
) -> TokenSummary:
    """Group sums of one batch. A token counts where it was computed (rank != fill): removed
    tokens, attention / MLP at slot 0 and positions a block does not cover count nowhere.

    # batch fields: [B, L+1, 3, T], token_kind: [T] int, token_label: [B, T] int -> TokenSummary
    """
    present = batch.rank != RANK_FILL  # [B, L+1, 3, T]
    present &= batch.token_present[:, None, None, :]
    group = kind_label_groups(token_kind, token_label, num_labels, present.device)[:, None, None, :]  # [B, 1, 1, T]
    bins = num_kinds * num_labels
    shape = (*present.shape[:3], num_kinds, num_labels)

    def total(mask: torch.Tensor) -> torch.Tensor:
        return group_sum(mask & present, group, bins).reshape(shape)

    sublayer = torch.zeros(present.shape[2], dtype=torch.bool, device=present.device)
    sublayer[[STREAM_ATTN, STREAM_MLP]] = True
    sublayer = sublayer[None, None, :, None]
    rank = torch.where(present, batch.rank, torch.zeros_like(batch.rank))
    return TokenSummary(
        tokens=total(present),
        identifiable=total(batch.rank == 0),
        rank_sum=group_sum(rank, group, bins).reshape(shape),
        changed=total(sublayer & (batch.correct_logit > batch.input_correct_logit)),
        kv_agree=total(sublayer & batch.key_value_agreement),
        non_compositional=total(sublayer & batch.non_compositional),
    )


def summarise_residual_match(
    batch: LensBatch, token_kind: torch.Tensor, token_label: torch.Tensor, num_kinds: int, num_labels: int
) -> ResidualMatch:
    """Residual top-1 match sums (categories may overlap; composite = none of the three).

    # batch fields: [B, L+1, 3, T], token_kind: [T], token_label: [B, T] -> ResidualMatch
    """
    present = (batch.rank != RANK_FILL) & batch.token_present[:, None, None, :]  # [B, L+1, 3, T]
    top1 = batch.topk_class[..., 0]  # [B, L+1, 3, T]
    resid = top1[:, 1:, STREAM_RESID]  # [B, L, T]
    exists = (present[:, 1:, STREAM_RESID] & present[:, 1:, STREAM_ATTN] & present[:, 1:, STREAM_MLP]
              & present[:, :-1, STREAM_RESID])
    attn = resid == top1[:, 1:, STREAM_ATTN]
    mlp = resid == top1[:, 1:, STREAM_MLP]
    previous = resid == top1[:, :-1, STREAM_RESID]
    group = kind_label_groups(token_kind, token_label, num_labels, exists.device)[:, None, :]  # [B, 1, T]
    bins = num_kinds * num_labels
    shape = (*exists.shape[:2], num_kinds, num_labels)

    def total(mask: torch.Tensor) -> torch.Tensor:
        return group_sum(mask & exists, group, bins).reshape(shape)

    return ResidualMatch(
        tokens=total(exists), attn_match=total(attn), mlp_match=total(mlp), previous_match=total(previous),
        composite=total(~(attn | mlp | previous)),
    )
