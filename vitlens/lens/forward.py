"""The hooked forward, model-level: each function dispatches to the model's family adapter.

The adapters (`vitlens/lens/families/`) call the model's own submodules in timm's order, so
the final logits equal `model(x)` (tests check 1e-5). Nothing is patched; nothing is cached.
Code that runs many batches holds one adapter (`vitlens.lens.families.adapter_for`) instead.
"""

from __future__ import annotations

from typing import Iterator

import torch

from vitlens.lens.anatomy import ViTAnatomy, model_adapter
from vitlens.lens.trace import BlockTrace

__all__ = ["BlockTrace", "embed", "iter_block_traces", "model_logits"]


def embed(model: torch.nn.Module, images: torch.Tensor, anatomy: ViTAnatomy | None = None) -> torch.Tensor:
    """Residual stream entering block 1 (the lens's block 0).

    Token removal (METHOD §4) happens after this point, as key masking in every block.

    # images: [B, 3, H, W] -> hidden: [B, T0, d]
    """
    return model_adapter(model).embed(images)


def iter_block_traces(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    anatomy: ViTAnatomy | None = None,
    attention_keep_mask: torch.Tensor | None = None,
    need_probs: bool = False,
    key_keep: torch.Tensor | None = None,
) -> Iterator[BlockTrace]:
    """Run every block on the embedded sequence `hidden`, yielding each block's trace in order.

    The consumer reduces a trace before asking for the next one, so at most one block's
    streams are alive at a time. `key_keep` removes tokens (False = removed: no query
    attends to it; its own stream is computed but meaningless).

    # hidden: [B, T0, d] (from `embed`), attention_keep_mask: [T, T], key_keep: [B, T] bool
    #   -> BlockTrace per block
    """
    return model_adapter(model).iter_block_traces(hidden, attention_keep_mask, need_probs, key_keep)


def model_logits(
    model: torch.nn.Module, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's own output from the last residual stream.

    With removed tokens (`key_keep`), pooling runs over the kept tokens only (what the model
    computes on the shortened sequence); CLS pooling is unaffected.

    # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
    """
    return model_adapter(model).model_logits(resid_final, key_keep)
