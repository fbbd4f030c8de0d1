"""Memory tables and per-token key-value flags on a hand-made example."""

from __future__ import annotations

import torch

from vitlens.lens.memories import MemoryTable, build_memory_table, token_memory_flags


def test_memory_table_by_hand() -> None:
    class_embedding = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # C=3, d=2
    values = torch.tensor([[3.0, -1.0, 1.0, -1.0], [-1.0, 2.0, 0.5, 4.0]])  # d=2, M=4
    # E·W = [[3, -1, 1, -1], [-1, 2, 0.5, 4], [2, 1, 1.5, 3]]
    table = build_memory_table(class_embedding, values, top_k=2)
    assert table.memory_top_class.tolist() == [0, 1, 2, 1]
    assert table.class_top_memories.tolist() == [[0, 2], [3, 1], [3, 0]]


def test_token_flags_by_hand() -> None:
    table = MemoryTable(
        class_top_memories=torch.tensor([[0, 1], [2, 3]]),  # C=2, k=2
        memory_top_class=torch.tensor([1, 1, 0, 0, 1]),  # M=5
    )
    coefficients = torch.tensor([[
        [9.0, 8.0, 0.0, 0.0, 0.0],  # top memories {0, 1}
        [0.0, 0.0, 5.0, -9.0, 6.0],  # top memories {4, 2} (signed: -9 is smallest)
        [0.0, 0.0, 0.0, 7.0, 8.0],  # top memories {4, 3}
    ]])
    class_index = torch.tensor([1])  # correct class 1: memories {2, 3}
    sublayer_top1 = torch.tensor([[0, 1, 0]])
    agreement, non_compositional = token_memory_flags(coefficients, table, class_index, sublayer_top1, top_k=2)
    assert agreement.tolist() == [[False, True, True]]
    # memory classes: token0 {1,1} vs 0 -> no; token1 {1,0} vs 1 -> yes; token2 {1,0} vs 0 -> yes
    assert non_compositional.tolist() == [[False, True, True]]
