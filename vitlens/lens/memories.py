"""Key-value memories of the sub-layers (METHOD §3): parameter-only tables and per-token flags.

Value vectors: the columns of `blocks[b].mlp.fc2.weight` (d × M) and of
`blocks[b].attn.proj.weight` (d × d). Their class logits are `E · W` (no bias, no norm).
Per token the coefficients are the MLP's fc1 output before the activation and the
attention's `attn.proj` input; its top-k memories are the k largest signed coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.lens.anatomy import model_adapter
from vitlens.lens.families.base import SUBLAYERS, ModelAdapter


@dataclass(frozen=True)
class MemoryTable:
    """Parameter-only facts about one sub-layer's value vectors."""

    class_top_memories: torch.Tensor  # [C, k] int64: the k memories with the largest logit per class
    memory_top_class: torch.Tensor  # [M] int64: argmax over classes of each memory's E·w


def value_vectors(model: torch.nn.Module, block_index: int, sublayer: str) -> torch.Tensor:
    """The value vectors (as columns) of sub-layer `sublayer` of block `block_index` (1-based).

    # -> values: [d, M]
    """
    return model_adapter(model).value_vectors(block_index, sublayer)


def build_memory_table(class_embedding: torch.Tensor, values: torch.Tensor, top_k: int) -> MemoryTable:
    """Top-k memories per class and top-1 class per memory from `E · W`.

    # class_embedding: [C, d], values: [d, M] -> MemoryTable
    """
    memory_logits = class_embedding @ values  # [C, M]
    return MemoryTable(
        class_top_memories=memory_logits.topk(min(top_k, memory_logits.shape[1]), dim=1).indices,
        memory_top_class=memory_logits.argmax(dim=0),
    )


def build_memory_tables(model: torch.nn.Module | ModelAdapter, top_k: int) -> list[dict[str, MemoryTable]]:
    """One table per sub-layer for every block, in block order (index 0 = block 1).

    The class embedding is the one the projection applies (distilled models: the mean head).
    """
    adapter = model if isinstance(model, ModelAdapter) else model_adapter(model)
    with torch.inference_mode():
        class_embedding = adapter.class_embedding()[0]
        return [
            {sublayer: build_memory_table(class_embedding, adapter.value_vectors(index, sublayer), top_k)
             for sublayer in SUBLAYERS}
            for index in range(1, adapter.anatomy.num_blocks + 1)
        ]


def token_memory_flags(
    coefficients: torch.Tensor,
    table: MemoryTable,
    class_index: torch.Tensor,
    sublayer_top1: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-value agreement and non-compositionality of every token (METHOD §3).

    Agreement: any of the token's top-k memories is among the correct class's top-k memories.
    Non-compositional: the sub-layer's top-1 class equals the top-1 class of any of the
    token's top-k memories.

    # coefficients: [B, T, M], class_index: [B], sublayer_top1: [B, T]
    # -> (agreement [B, T] bool, non_compositional [B, T] bool)
    """
    token_top = coefficients.topk(min(top_k, coefficients.shape[-1]), dim=-1).indices  # [B, T, k]
    class_top = table.class_top_memories[class_index]  # [B, k]
    agreement = (token_top[..., :, None] == class_top[:, None, None, :]).any(dim=-1).any(dim=-1)
    memory_classes = table.memory_top_class[token_top]  # [B, T, k]
    non_compositional = (memory_classes == sublayer_top1[..., None]).any(dim=-1)
    return agreement, non_compositional
