"""What a linear probe reads (METHOD §7): the raw hidden state (no final norm) of one token
position at one block and stream, laid out on the lens's axes.

Slots are `(block, stream)` pairs: `resid` at blocks `0..L` (0 = the embedded sequence, as
the lens's block slot 0; block b = the output of block b), `attn` / `mlp` at blocks `1..L`
(what the sub-layer adds to the residual stream, after LayerScale / post-norm, as
`BlockTrace.attn_out` / `mlp_out`). The token axis is the full sequence (prefix first, image
tokens row-major); positions a block does not cover (CaiT / XCiT before the class-attention
blocks, their sub-layers after) are zeros with `present` False.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.output import STREAMS

ProbeSlot = tuple[int, str]  # (block, stream)


def probe_slots(num_blocks: int, streams: tuple[str, ...] = STREAMS) -> tuple[ProbeSlot, ...]:
    """Every probed (block, stream), ordered by block, then stream in `STREAMS` order.

    `resid` exists at blocks 0..L, `attn` and `mlp` at blocks 1..L.
    """
    unknown = [s for s in streams if s not in STREAMS]
    if unknown:
        raise ValueError(f"unknown stream {unknown[0]!r}: use some of {STREAMS}")
    if not streams:
        raise ValueError("no stream to probe")
    return tuple(
        (block, stream)
        for block in range(num_blocks + 1)
        for stream in STREAMS
        if stream in streams and (stream == "resid" or block >= 1)
    )


def check_slots(slots: Sequence[ProbeSlot], num_blocks: int) -> None:
    """Raise ValueError for a slot that does not exist in a model of `num_blocks` blocks."""
    if not slots:
        raise ValueError("no probe slot given")
    for block, stream in slots:
        if stream not in STREAMS:
            raise ValueError(f"slot ({block}, {stream!r}): unknown stream, use one of {STREAMS}")
        low = 0 if stream == "resid" else 1
        if not low <= block <= num_blocks:
            raise ValueError(f"slot ({block}, {stream!r}): block must be in {low}..{num_blocks}")
    if len(set(slots)) != len(slots):
        raise ValueError("a probe slot is listed twice")


def token_features(
    adapter: ModelAdapter, images: torch.Tensor, slots: Sequence[ProbeSlot]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden state of every slot and token position, under `torch.no_grad()`.

    # images: [B, 3, H, W] -> features: [B, K, T, d] float32 (zeros where absent),
    #   present: [K, T] bool (on the images' device)
    """
    anatomy = adapter.anatomy
    check_slots(slots, anatomy.num_blocks)
    index = {slot: k for k, slot in enumerate(slots)}
    num_tokens = anatomy.num_tokens
    batch, device = images.shape[0], images.device
    features = torch.zeros(batch, len(slots), num_tokens, anatomy.embed_dim, dtype=torch.float32, device=device)
    present = torch.zeros(len(slots), num_tokens, dtype=torch.bool, device=device)

    def put(slot: ProbeSlot, hidden: torch.Tensor, start: int) -> None:
        # hidden: [B, T', d] covering sequence positions start .. start + T' - 1
        k = index.get(slot)
        if k is None:
            return
        positions = slice(start, start + hidden.shape[1])
        features[:, k, positions] = hidden.float()
        present[k, positions] = True

    last = max(block for block, _ in slots)
    with torch.no_grad():
        hidden = adapter.embed(images)  # [B, T0, d]
        put((0, "resid"), hidden, num_tokens - hidden.shape[1])
        if last >= 1:
            for trace in adapter.iter_block_traces(hidden):
                put((trace.index, "resid"), trace.resid_post, num_tokens - trace.resid_post.shape[1])
                put((trace.index, "attn"), trace.attn_out, trace.first_token)
                put((trace.index, "mlp"), trace.mlp_out, trace.first_token)
                if trace.index >= last:
                    break
    return features, present
