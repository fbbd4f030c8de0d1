"""`LensBatch`: the ONE layout of what the lens keeps per image, block, stream and token.

Axes: B images, L+1 block slots (slot 0 = embeddings, slot b = after block b), the three
`STREAMS`, T = P+N token positions of the *unperturbed* sequence (prefix tokens first, image
tokens row-major), k = top-k. Slots that do not exist hold fill values: attention and MLP at
slot 0, and removed tokens (`token_present` False): rank -1, logits NaN, classes -1, flags False.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

STREAMS: tuple[str, ...] = ("resid", "attn", "mlp")
STREAM_RESID, STREAM_ATTN, STREAM_MLP = 0, 1, 2
RANK_FILL = -1
CLASS_FILL = -1


@dataclass
class LensBatch:
    """Per-token reductions of one image batch (all tensors on the lens's device)."""

    class_index: torch.Tensor  # [B] int64 correct class
    prediction: torch.Tensor  # [B] int64 argmax of the model's own logits
    correct: torch.Tensor  # [B] bool prediction == class_index
    token_present: torch.Tensor  # [B, T] bool False where a token was removed
    rank: torch.Tensor  # [B, L+1, 3, T] int32 correct-class rank (comparison count)
    correct_logit: torch.Tensor  # [B, L+1, 3, T] float32
    topk_class: torch.Tensor  # [B, L+1, 3, T, k] int32
    topk_logit: torch.Tensor  # [B, L+1, 3, T, k] float32
    input_correct_logit: torch.Tensor  # [B, L+1, 3, T] float32 correct logit of the sub-layer's input
    key_value_agreement: torch.Tensor  # [B, L+1, 3, T] bool (attn/mlp only)
    non_compositional: torch.Tensor  # [B, L+1, 3, T] bool (attn/mlp only)
    num_prefix_tokens: int
    num_classes: int

    @property
    def num_blocks(self) -> int:
        """L, the number of transformer blocks."""
        return self.rank.shape[1] - 1

    def to(self, device: torch.device | str) -> "LensBatch":
        """A copy with every tensor on `device` (call once per batch, never inside the block loop)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return LensBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    @staticmethod
    def empty(
        class_index: torch.Tensor, num_blocks: int, num_tokens: int, top_k: int,
        num_prefix_tokens: int, num_classes: int,
    ) -> "LensBatch":
        """A batch filled with fill values, on `class_index`'s device, for the lens to write into.

        # class_index: [B] -> LensBatch with T = num_tokens, L = num_blocks
        """
        batch = class_index.shape[0]
        device = class_index.device
        per_token = (batch, num_blocks + 1, len(STREAMS), num_tokens)
        nan = float("nan")
        return LensBatch(
            class_index=class_index,
            prediction=torch.full((batch,), CLASS_FILL, dtype=torch.int64, device=device),
            correct=torch.zeros(batch, dtype=torch.bool, device=device),
            token_present=torch.zeros(batch, num_tokens, dtype=torch.bool, device=device),
            rank=torch.full(per_token, RANK_FILL, dtype=torch.int32, device=device),
            correct_logit=torch.full(per_token, nan, device=device),
            topk_class=torch.full(per_token + (top_k,), CLASS_FILL, dtype=torch.int32, device=device),
            topk_logit=torch.full(per_token + (top_k,), nan, device=device),
            input_correct_logit=torch.full(per_token, nan, device=device),
            key_value_agreement=torch.zeros(per_token, dtype=torch.bool, device=device),
            non_compositional=torch.zeros(per_token, dtype=torch.bool, device=device),
            num_prefix_tokens=num_prefix_tokens,
            num_classes=num_classes,
        )
