"""On-device reduction of one batch of class logits to the few numbers the analysis keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.lens.anatomy import model_adapter


@dataclass
class LogitReduction:
    """Per token: correct-class rank and logit, top-k classes and logits (METHOD §1–§2)."""

    rank: torch.Tensor  # [B, T] int32: #{c' : logit[c'] > logit[c]}, 0 = correct class is top-1
    correct_logit: torch.Tensor  # [B, T] float32
    topk_class: torch.Tensor  # [B, T, k] int32, best first
    topk_logit: torch.Tensor  # [B, T, k] float32


def reduce_logits(logits: torch.Tensor, class_index: torch.Tensor, top_k: int) -> LogitReduction:
    """Everything the analysis keeps from one (block, stream) batch of logits.

    CONSUMES `logits` (overwritten in place: the rank needs no second [B, T, C] buffer).
    The rank is a comparison count, `#{c' : logit[c'] > logit[c]}`, so ties count in the
    token's favour; it is computed as `logit - correct > 0`, which equals `logit > correct`
    for finite IEEE floats with gradual underflow (x - y == 0 only when x == y) and is ~3x
    faster on CPU than a bool compare followed by a sum.

    # logits: [B, T, C], class_index: [B] -> LogitReduction (shapes on its fields)
    """
    batch, tokens, num_classes = logits.shape
    index = class_index.view(batch, 1, 1).expand(batch, tokens, 1)
    correct_logit = logits.gather(-1, index)  # [B, T, 1]
    top = logits.topk(min(top_k, num_classes), dim=-1)
    greater = logits.sub_(correct_logit).gt_(0)
    rank = greater.sum(dim=-1, dtype=torch.float32).to(torch.int32)  # exact below 2**24 classes
    return LogitReduction(
        rank=rank,
        correct_logit=correct_logit.squeeze(-1).float(),
        topk_class=top.indices.to(torch.int32),
        topk_logit=top.values.float(),
    )


def correct_class_logit(
    model: torch.nn.Module, hidden: torch.Tensor, class_index: torch.Tensor
) -> torch.Tensor:
    """Only the correct-class logit of `proj(hidden)`: a dot product with that class's head row.

    Equals `project(model, hidden)[b, t, class_index[b]]` without the [B, T, C] matmul.

    # hidden: [B, T, d], class_index: [B] -> [B, T]
    """
    return model_adapter(model).correct_class_logit(hidden, class_index)
