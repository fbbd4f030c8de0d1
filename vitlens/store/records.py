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
from vitlens.store.schema import TOKEN_KINDS, ranked, to_table

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
    """The `tokens` rows of one batch, ordered image × block × stream × token, in the stored
    layout (`vitlens.store.schema.TOKENS`: one column per top-k rank, 0 / false where the
    views show nulls).

    Vectorised from the lens's tensors where they are (the device): every column is a
    [B, L+1, 3, T] tensor (the coordinates as broadcast views), the existing rows are
    selected and converted to their stored dtypes there, then each column crosses to the
    host once and becomes an Arrow array without a copy or a cast (no per-row Python).

    # lens_batch fields: [B, L+1, 3, T(, k)], fg_fraction: [B, T], token_label: [B, T]
    """
    batch = lens_batch
    device = batch.rank.device
    num_images, num_slots, num_streams, num_tokens = grid = batch.rank.shape

    def coordinate(values: torch.Tensor, axis: int) -> torch.Tensor:  # [n] along `axis` -> [B, L+1, 3, T]
        shape = [1] * len(grid)
        shape[axis] = -1
        return values.to(device).reshape(shape).expand(grid)

    def per_token(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # [B, T] -> [B, L+1, 3, T]
        return values.to(device=device, dtype=dtype)[:, None, None, :].expand(grid)

    # Usually every token of every existing slot is present: then the rows are two contiguous
    # pieces per image (slot 0's resid, slots 1..L), copied into place, converting on the way.
    # Positions a block does not cover (CaiT / XCiT: the CLS token before the class-attention
    # blocks, image tokens' sub-layers inside them) were never computed: they hold RANK_FILL.
    computed = batch.rank != RANK_FILL
    flat = None
    if not (batch.token_present.all() and computed[:, 0, STREAM_RESID].all() and computed[:, 1:].all()):
        slot_exists = torch.ones(num_slots, num_streams, dtype=torch.bool, device=device)
        slot_exists[0, [s for s in range(num_streams) if s != STREAM_RESID]] = False
        present = slot_exists[None, :, :, None] & batch.token_present[:, None, None, :] & computed
        flat = present.reshape(-1).nonzero().squeeze(1)  # [n] row positions in C order

    def rows(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:  # [*k, B, L+1, 3, T] -> [*k, n]
        dtype = dtype or tensor.dtype
        lead = tensor.shape[:-4]
        if flat is not None:
            return tensor.reshape(*lead, -1).index_select(-1, flat).to(dtype).cpu().numpy()
        out = torch.empty(*lead, num_images, 1 + (num_slots - 1) * num_streams, num_tokens, dtype=dtype, device=device)
        out[..., 0, :] = tensor[..., 0, STREAM_RESID, :]
        out[..., 1:, :].view(*lead, num_images, num_slots - 1, num_streams, num_tokens).copy_(tensor[..., 1:, :, :])
        return out.reshape(*lead, -1).cpu().numpy()

    def codes(tensor: torch.Tensor, names: tuple[str, ...]) -> pa.DictionaryArray:
        return dictionary_array(rows(tensor), names)

    def sublayer(tensor: torch.Tensor) -> torch.Tensor:  # 0 / false on resid rows (the views null them)
        return tensor.index_fill(2, torch.tensor([STREAM_RESID], device=device), 0)

    kinds = torch.from_numpy(token_kinds(num_tokens, batch.num_prefix_tokens, has_class_token))
    columns = {
        "image_key": pa.DictionaryArray.from_arrays(
            pa.array(rows(coordinate(torch.arange(num_images, dtype=torch.int32), 0))), pa.array(keys, pa.string())),
        "block": rows(coordinate(torch.arange(num_slots, dtype=torch.int16), 1)),
        "stream": codes(coordinate(torch.arange(num_streams, dtype=torch.int8), 2), STREAMS),
        "token": rows(coordinate(torch.arange(num_tokens, dtype=torch.int16), 3)),
        "token_kind": codes(coordinate(kinds, 3), TOKEN_KINDS),
        "label": codes(per_token(token_label, torch.int8), LABEL_NAMES),
        "fg_fraction": rows(per_token(fg_fraction.to(device).masked_fill(token_label.to(device) == LABEL_PREFIX, 0),
                                      torch.float32)),
        "identifiability_rank": rows(batch.rank),
        "correct_logit": rows(batch.correct_logit),
        "sublayer_input_correct_logit": rows(sublayer(batch.input_correct_logit)),
        "key_value_agreement": rows(sublayer(batch.key_value_agreement)),
        "non_compositional": rows(sublayer(batch.non_compositional)),
    }
    for name, tensor, dtype in (("top5_class", batch.topk_class, torch.int16),
                                ("top5_logit", batch.topk_logit, torch.float16)):
        columns.update(zip(ranked(name), rows(tensor.movedim(-1, 0), dtype)))  # one column per rank
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
