"""Turn the linear probes' ranks of one batch into rows of the `probes` table (paper §8).

Pure reshaping (no metric is computed here): one row per existing (image, probe slot, token)
— the residual stream at blocks 0..L, attention and MLP at 1..L, for the streams the job
probes — ordered image × slot × token, like `tokens`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from vitlens.data.token_labels import LABEL_NAMES
from vitlens.lens.output import STREAMS
from vitlens.store.records import dictionary_array, token_kinds
from vitlens.store.schema import TOKEN_KINDS, to_table


def probes_table(
    ranks: torch.Tensor,
    slots: tuple[tuple[int, str], ...],
    keys: list[str],
    token_label: torch.Tensor,
    num_prefix_tokens: int,
    has_class_token: bool,
) -> pa.Table:
    """The `probes` rows of one batch: the probe rank of the true class per image, (block,
    stream) slot and token position; positions a slot does not cover (rank -1) have no row.

    # ranks: [B, K, T] int32 (-1 where absent), token_label: [B, T] -> rows
    """
    rank = ranks.cpu().numpy()
    batch, num_slots, num_tokens = rank.shape
    image, slot, token = np.nonzero(rank >= 0)  # C order: image × slot × token
    streams = tuple(sorted({stream for _, stream in slots}, key=STREAMS.index))
    slot_block = np.array([block for block, _ in slots], dtype=np.int16)
    slot_stream = np.array([streams.index(stream) for _, stream in slots], dtype=np.int8)
    kinds = token_kinds(num_tokens, num_prefix_tokens, has_class_token)
    labels = token_label.cpu().numpy().astype(np.int8)
    return to_table("probes", {
        "image_key": pa.array(keys, pa.string()).take(pa.array(image)),
        "block": slot_block[slot],
        "stream": dictionary_array(slot_stream[slot], streams),
        "token": token.astype(np.int16),
        "token_kind": dictionary_array(kinds[token], TOKEN_KINDS),
        "label": dictionary_array(labels[image, token], LABEL_NAMES),
        "probe_rank": rank[image, slot, token].astype(np.int32),
    })
