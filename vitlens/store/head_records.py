"""Turn the per-head attribution (experiment `heads`, METHOD §3b) and the tuned lens
(experiment `tuned`, METHOD §7b) of one batch into rows of the store's tables.

Pure reshaping (the group sums come from `vitlens.metrics.heads`): `heads` has one row per
(image, block, head, target token) a head writes, ordered that way; `head_summary` and
`head_sources` one per non-empty group; `tuned` one per (image, block slot, present token).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from vitlens.data.token_labels import LABEL_NAMES
from vitlens.lens.heads import HeadBatch
from vitlens.metrics.heads import summarise_heads
from vitlens.store.records import dictionary_array, token_kinds
from vitlens.store.schema import TOKEN_KINDS, to_table


def _keys(keys: list[str], image: np.ndarray) -> pa.Array:
    """The image key of every row. # image: [n] row -> image index"""
    return pa.array(keys, pa.string()).take(pa.array(image))


def heads_table(heads: HeadBatch, keys: list[str], token_label: torch.Tensor) -> pa.Table:
    """The `heads` rows of one batch (tokens tier): DLA per written (image, block, head, token),
    and the token's term as a source of the CLS's DLA (null without a CLS or where the CLS's
    block does not read it).

    # heads.dla / cls_source: [B, L, H, T], token_label: [B, T] -> rows
    """
    dla = heads.dla.cpu().numpy()
    cls_source = heads.cls_source.cpu().numpy()
    image, block, head, token = np.nonzero(~np.isnan(dla))  # C order
    kinds = token_kinds(dla.shape[-1], heads.num_prefix_tokens, heads.has_class_token)
    labels = token_label.cpu().numpy().astype(np.int8)
    source = cls_source[image, block, head, token]
    return to_table("heads", {
        "image_key": _keys(keys, image),
        "block": (block + 1).astype(np.int16),
        "head": head.astype(np.int16),
        "token": token.astype(np.int16),
        "token_kind": dictionary_array(kinds[token], TOKEN_KINDS),
        "label": dictionary_array(labels[image, token], LABEL_NAMES),
        "dla": dla[image, block, head, token],
        "cls_source_dla": pa.array(source, pa.float32(), mask=np.isnan(source)),
    })


def head_group_tables(heads: HeadBatch, keys: list[str], token_label: torch.Tensor) -> tuple[pa.Table, pa.Table]:
    """The `head_summary` and `head_sources` rows of one batch: one row per non-empty (image,
    block, head, target kind, target label) group (and source label), in that order.

    # heads fields: [B, L, H, T(, G)], token_label: [B, T] -> (head_summary, head_sources)
    """
    kinds = torch.from_numpy(token_kinds(heads.dla.shape[-1], heads.num_prefix_tokens, heads.has_class_token))
    summary, sources = summarise_heads(heads, kinds, token_label, len(TOKEN_KINDS), len(LABEL_NAMES))
    tokens = summary.tokens.cpu().numpy()
    image, block, head, kind, label = np.nonzero(tokens)
    common = {
        "image_key": _keys(keys, image), "block": (block + 1).astype(np.int16), "head": head.astype(np.int16),
    }
    head_summary = to_table("head_summary", {
        **common,
        "token_kind": dictionary_array(kind, TOKEN_KINDS),
        "label": dictionary_array(label, LABEL_NAMES),
        "tokens": tokens[image, block, head, kind, label].astype(np.int32),
        "dla_sum": summary.dla_sum.cpu().numpy()[image, block, head, kind, label],
    })
    signed, absolute = sources.dla_sum.cpu().numpy(), sources.abs_sum.cpu().numpy()
    groups = len(LABEL_NAMES)
    row = np.repeat(np.arange(image.shape[0]), groups)  # every group × every source label
    source = np.tile(np.arange(groups), image.shape[0])
    at = (image[row], block[row], head[row], kind[row], label[row], source)
    head_sources = to_table("head_sources", {
        "image_key": _keys(keys, image[row]),
        "block": (block[row] + 1).astype(np.int16),
        "head": head[row].astype(np.int16),
        "target_kind": dictionary_array(kind[row], TOKEN_KINDS),
        "target_label": dictionary_array(label[row], LABEL_NAMES),
        "source_label": dictionary_array(source, LABEL_NAMES),
        "targets": tokens[image, block, head, kind, label][row].astype(np.int32),
        "dla_sum": signed[at],
        "abs_sum": absolute[at],
    })
    return head_summary, head_sources


def head_tables(heads: HeadBatch, keys: list[str], token_label: torch.Tensor, detail: str) -> dict[str, pa.Table]:
    """The `heads` experiment's tables of one batch for a job of `detail` tier: `heads` rows
    (tokens tier) or `head_summary` sums (summary tier), and `head_sources` in both.

    # heads fields: [B, L, H, T(, G)], token_label: [B, T] -> {table: rows}
    """
    summary, sources = head_group_tables(heads, keys, token_label)
    if detail == "summary":
        return {"head_summary": summary, "head_sources": sources}
    return {"heads": heads_table(heads, keys, token_label), "head_sources": sources}


def tuned_table(rank: torch.Tensor, correct_logit: torch.Tensor, keys: list[str], token_label: torch.Tensor,
                num_prefix_tokens: int, has_class_token: bool) -> pa.Table:
    """The `tuned` rows of one batch: per image, block slot 0..L and present token (rank >= 0).

    # rank: [B, L+1, T] int32 (-1 absent), correct_logit: [B, L+1, T], token_label: [B, T] -> rows
    """
    ranks = rank.cpu().numpy()
    image, block, token = np.nonzero(ranks >= 0)
    kinds = token_kinds(ranks.shape[-1], num_prefix_tokens, has_class_token)
    labels = token_label.cpu().numpy().astype(np.int8)
    return to_table("tuned", {
        "image_key": _keys(keys, image),
        "block": block.astype(np.int16),
        "token": token.astype(np.int16),
        "token_kind": dictionary_array(kinds[token], TOKEN_KINDS),
        "label": dictionary_array(labels[image, token], LABEL_NAMES),
        "identifiability_rank": ranks[image, block, token].astype(np.int32),
        "correct_logit": correct_logit.float().cpu().numpy()[image, block, token],
    })
