"""Sums of the per-head attribution (METHOD §3b) per image × block × head × token kind ×
token label (pure tensor functions, on the device): what the `head_summary` and
`head_sources` tables store.

Group axes: `B` images, `L` blocks, `H` heads, `K` token kinds, `G` token labels (of the
target token; sources are already summed per source label `G` by `vitlens.lens.heads`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.lens.heads import HeadBatch
from vitlens.metrics.summary import group_sum, kind_label_groups


@dataclass
class HeadSummary:
    """DLA sums per (image, block, head, target kind, target label)."""

    tokens: torch.Tensor  # [B, L, H, K, G] int64 targets the head writes in the group
    dla_sum: torch.Tensor  # [B, L, H, K, G] float64 sum of their DLA


@dataclass
class SourceSums:
    """Source terms per (image, block, head, target kind, target label, source label)."""

    targets: torch.Tensor  # [B, L, H, K, G] int64 targets in the group
    dla_sum: torch.Tensor  # [B, L, H, K, G, G] float64 signed source terms summed over the group's targets
    abs_sum: torch.Tensor  # [B, L, H, K, G, G] float64 the same with |term|


def _bin_sum(values: torch.Tensor, group: torch.Tensor, bins: int) -> torch.Tensor:
    """Sum over the token axis (axis 3) into `bins` (float64).

    # values: [B, L, H, T, *E], group: [B, T] -> [B, L, H, bins, *E]
    """
    extra = values.ndim - 4
    index = group.reshape(group.shape[0], 1, 1, *([1] * extra), group.shape[1])  # [B, 1, 1, 1.., T]
    return group_sum(values.movedim(3, -1), index, bins, torch.float64).movedim(-1, 3)


def summarise_heads(heads: HeadBatch, token_kind: torch.Tensor, token_label: torch.Tensor,
                    num_kinds: int, num_labels: int) -> tuple[HeadSummary, SourceSums]:
    """Group sums of one batch over the targets each head writes (NaN = not written: counts nowhere).

    # heads.dla: [B, L, H, T], token_kind: [T], token_label: [B, T] -> (HeadSummary, SourceSums)
    """
    written = ~heads.dla.isnan()  # [B, L, H, T]
    group = kind_label_groups(token_kind, token_label, num_labels, heads.dla.device)
    bins = num_kinds * num_labels
    shape = (*written.shape[:3], num_kinds, num_labels)
    count = group_sum(written, group[:, None, None, :], bins).reshape(shape)  # int64
    dla = _bin_sum(heads.dla.nan_to_num(0.0), group, bins).reshape(shape)
    sources = (*shape, heads.source_dla.shape[-1])
    signed = _bin_sum(heads.source_dla.nan_to_num(0.0), group, bins).reshape(sources)
    absolute = _bin_sum(heads.source_abs.nan_to_num(0.0), group, bins).reshape(sources)
    return HeadSummary(count, dla), SourceSums(count, signed, absolute)
