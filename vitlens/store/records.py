"""Turn the lens's per-batch reductions into rows of the store's tables.

Pure reshaping (no metric is computed here): `LensBatch` tensors become the `tokens`
and `images` columns of `vitlens.store.schema` (or, for the summary tier, the group sums
of `vitlens.metrics.summary` become `token_summary` / `residual_match` rows), one row per existing (image, block,
stream, token) — attention and MLP at blocks 1..L, the residual stream at 0..L, and
only the tokens an experiment kept.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from vitlens.data.token_labels import LABEL_NAMES, LABEL_PREFIX
from vitlens.lens.output import RANK_FILL, STREAM_RESID, STREAMS, LensBatch
from vitlens.metrics.summary import summarise_residual_match, summarise_tokens
from vitlens.store.schema import TOKEN_KINDS, to_table

_KIND_CLS, _KIND_PREFIX, _KIND_IMAGE = (TOKEN_KINDS.index(k) for k in ("cls", "prefix", "image"))


def dictionary_array(codes: np.ndarray, names: tuple[str, ...]) -> pa.DictionaryArray:
    """int8 codes into `names` as an Arrow dictionary array (no strings are built per row)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int8, copy=False)), pa.array(list(names)))


def token_kinds(num_tokens: int, num_prefix_tokens: int, has_class_token: bool) -> np.ndarray:
    """Kind code per sequence position: CLS (position 0 of CLS models), other prefix, image.

    # -> [T] int8 codes into `TOKEN_KINDS`
    """
    kinds = np.full(num_tokens, _KIND_IMAGE, dtype=np.int8)
    kinds[:num_prefix_tokens] = _KIND_PREFIX
    if has_class_token and num_prefix_tokens > 0:
        kinds[0] = _KIND_CLS
    return kinds


def tokens_table(
    lens_batch: LensBatch,
    keys: list[str],
    fg_fraction: torch.Tensor,
    token_label: torch.Tensor,
    has_class_token: bool,
) -> pa.Table:
    """The `tokens` rows of one batch, ordered image × block × stream × token.

    Vectorised from the lens's tensors where they are (the device): the existing rows are
    selected and converted to their stored dtypes there, then each column crosses to the
    host once and becomes an Arrow array without a copy or a cast (no per-row Python).

    # lens_batch fields: [B, L+1, 3, T(, k)], fg_fraction: [B, T], token_label: [B, T]
    """
    batch = lens_batch
    device = batch.rank.device
    _, num_slots, num_streams, num_tokens = batch.rank.shape
    slot_exists = torch.ones(num_slots, num_streams, dtype=torch.bool, device=device)
    slot_exists[0, [s for s in range(num_streams) if s != STREAM_RESID]] = False
    present = slot_exists[None, :, :, None] & batch.token_present[:, None, None, :]  # [B, L+1, 3, T]
    # positions a block does not cover (CaiT / XCiT: the CLS token before the class-attention
    # blocks, image tokens' sub-layers inside them) were never computed: they hold RANK_FILL
    present &= batch.rank != RANK_FILL
    flat = present.reshape(-1).nonzero().squeeze(1)  # [n] row positions in C order, found once
    token_idx = flat % num_tokens
    slot_stream = flat // num_tokens
    stream_idx = slot_stream % num_streams
    block_idx = (slot_stream // num_streams) % num_slots
    image_idx = slot_stream // (num_streams * num_slots)
    image_token = image_idx * num_tokens + token_idx  # [n] index into [B, T] tensors
    labels = token_label.to(device=device, dtype=torch.int8).reshape(-1).index_select(0, image_token)
    fg = fg_fraction.to(device=device, dtype=torch.float32).reshape(-1).index_select(0, image_token)
    kinds = torch.from_numpy(token_kinds(num_tokens, batch.num_prefix_tokens, has_class_token)).to(device)[token_idx]
    is_resid = stream_idx == STREAM_RESID

    def host(tensor: torch.Tensor) -> np.ndarray:
        return tensor.cpu().numpy()

    # Usually every token of every existing slot is present: then the rows are two contiguous
    # pieces per image (slot 0's resid, slots 1..L) and a copy replaces the gather.
    every_slot = flat.numel() == present.shape[0] * (1 + (num_slots - 1) * num_streams) * num_tokens

    def select(tensor: torch.Tensor) -> torch.Tensor:  # [B, L+1, 3, T, *k] -> [n, *k]
        if every_slot:
            tail = tensor.shape[4:]
            first = tensor[:, 0, STREAM_RESID].reshape(tensor.shape[0], -1, *tail)
            rest = tensor[:, 1:].reshape(tensor.shape[0], -1, *tail)
            return torch.cat([first, rest], dim=1).reshape(-1, *tail)
        return tensor.reshape(-1, *tensor.shape[4:]).index_select(0, flat)

    def rows(tensor: torch.Tensor) -> np.ndarray:  # [B, L+1, 3, T] -> [n]
        return host(select(tensor))

    def top_k(tensor: torch.Tensor, dtype: torch.dtype) -> pa.FixedSizeListArray:  # [B, L+1, 3, T, k] -> [n] lists
        values = select(tensor.to(dtype))  # [n, k]
        return pa.FixedSizeListArray.from_arrays(pa.array(host(values).reshape(-1)), values.shape[1])

    sublayer_null = host(is_resid)
    columns = {
        "image_key": pa.DictionaryArray.from_arrays(pa.array(host(image_idx.to(torch.int32))), pa.array(keys, pa.string())),
        "block": host(block_idx.to(torch.int16)),
        "stream": dictionary_array(host(stream_idx.to(torch.int8)), STREAMS),
        "token": host(token_idx.to(torch.int16)),
        "token_kind": dictionary_array(host(kinds), TOKEN_KINDS),
        "label": dictionary_array(host(labels), LABEL_NAMES),
        "fg_fraction": pa.array(host(fg), mask=host(labels == LABEL_PREFIX)),
        "identifiability_rank": rows(batch.rank),
        "correct_logit": rows(batch.correct_logit),
        "top5_class": top_k(batch.topk_class, torch.int16),
        "top5_logit": top_k(batch.topk_logit, torch.float16),
        "sublayer_input_correct_logit": pa.array(rows(batch.input_correct_logit), mask=sublayer_null),
        "key_value_agreement": pa.array(rows(batch.key_value_agreement), mask=sublayer_null),
        "non_compositional": pa.array(rows(batch.non_compositional), mask=sublayer_null),
    }
    return to_table("tokens", columns)


def images_table(
    lens_batch: LensBatch,
    keys: list[str],
    shard: str,
    class_names: list[str | None],
    token_label: torch.Tensor,
) -> pa.Table:
    """The `images` rows of one batch.

    # token_label: [B, T] int8 labels before any token removal
    """
    prefix = lens_batch.num_prefix_tokens  # only the per-image fields are copied to the host
    labels = token_label.cpu()[:, prefix:]
    columns = {
        "image_key": keys,
        "shard": [shard] * len(keys),
        "class_index": lens_batch.class_index.cpu().numpy(),
        "class_name": class_names,
        "prediction": lens_batch.prediction.cpu().numpy(),
        "correct": lens_batch.correct.cpu().numpy(),
        "num_image_tokens": lens_batch.token_present[:, prefix:].sum(1).cpu().numpy(),
        "num_class_tokens": (labels == LABEL_NAMES.index("class")).sum(1).numpy(),
        "num_context_tokens": (labels == LABEL_NAMES.index("context")).sum(1).numpy(),
    }
    return to_table("images", columns)


def summary_tables(
    lens_batch: LensBatch, keys: list[str], token_label: torch.Tensor, has_class_token: bool
) -> tuple[pa.Table, pa.Table]:
    """The summary tier's `token_summary` and `residual_match` rows of one batch: one row per
    non-empty (image, block, stream, token kind, label) group, in that order.

    # lens_batch fields: [B, L+1, 3, T], token_label: [B, T] -> (token_summary, residual_match)
    """
    num_tokens = lens_batch.rank.shape[-1]
    kinds = torch.from_numpy(token_kinds(num_tokens, lens_batch.num_prefix_tokens, has_class_token))
    num_kinds, num_labels = len(TOKEN_KINDS), len(LABEL_NAMES)
    counts = summarise_tokens(lens_batch, kinds, token_label, num_kinds, num_labels)
    matches = summarise_residual_match(lens_batch, kinds, token_label, num_kinds, num_labels)

    def groups(tokens: torch.Tensor) -> tuple[torch.Tensor, list[np.ndarray]]:
        index = tokens.nonzero(as_tuple=True)  # one row per non-empty group, C order
        return index, [i.cpu().numpy() for i in index]

    def column(values: torch.Tensor, index: tuple[torch.Tensor, ...], dtype: np.dtype) -> np.ndarray:
        return values[index].cpu().numpy().astype(dtype)

    index, (image, block, stream, kind, label) = groups(counts.tokens)
    resid = stream == STREAM_RESID
    summary = to_table("token_summary", {
        "image_key": pa.array(keys, pa.string()).take(pa.array(image)),
        "block": block.astype(np.int16),
        "stream": dictionary_array(stream, STREAMS),
        "token_kind": dictionary_array(kind, TOKEN_KINDS),
        "label": dictionary_array(label, LABEL_NAMES),
        "tokens": column(counts.tokens, index, np.int32),
        "identifiable": column(counts.identifiable, index, np.int32),
        "rank_sum": column(counts.rank_sum, index, np.int64),
        "changed": pa.array(column(counts.changed, index, np.int32), mask=resid),
        "kv_agree": pa.array(column(counts.kv_agree, index, np.int32), mask=resid),
        "non_compositional": pa.array(column(counts.non_compositional, index, np.int32), mask=resid),
    })
    index, (image, block, kind, label) = groups(matches.tokens)
    match = to_table("residual_match", {
        "image_key": pa.array(keys, pa.string()).take(pa.array(image)),
        "block": (block + 1).astype(np.int16),  # axis 1 of ResidualMatch is block 1..L
        "token_kind": dictionary_array(kind, TOKEN_KINDS),
        "label": dictionary_array(label, LABEL_NAMES),
        "tokens": column(matches.tokens, index, np.int32),
        "attn_match": column(matches.attn_match, index, np.int32),
        "mlp_match": column(matches.mlp_match, index, np.int32),
        "previous_match": column(matches.previous_match, index, np.int32),
        "composite": column(matches.composite, index, np.int32),
    })
    return summary, match
