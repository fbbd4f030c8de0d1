"""Turn the lens's per-batch reductions into rows of the store's tables.

Pure reshaping (no metric is computed here): `LensBatch` tensors become the `tokens`
and `images` columns of `vitlens.store.schema`, one row per existing (image, block,
stream, token) — attention and MLP at blocks 1..L, the residual stream at 0..L, and
only the tokens an experiment kept.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from vitlens.data.token_labels import LABEL_NAMES, LABEL_PREFIX
from vitlens.lens.output import RANK_FILL, STREAM_RESID, STREAMS, LensBatch
from vitlens.store.schema import TOKEN_KINDS, to_table

_KIND_CLS, _KIND_PREFIX, _KIND_IMAGE = (TOKEN_KINDS.index(k) for k in ("cls", "prefix", "image"))


def _dictionary(codes: np.ndarray, names: tuple[str, ...]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int8)), pa.array(list(names)))


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

    # lens_batch fields: [B, L+1, 3, T(, k)], fg_fraction: [B, T], token_label: [B, T]
    """
    batch = lens_batch.to("cpu")
    num_images, num_slots, num_streams, num_tokens = batch.rank.shape
    slot_exists = torch.ones(num_slots, num_streams, dtype=torch.bool)
    slot_exists[0, [s for s in range(num_streams) if s != STREAM_RESID]] = False
    present = slot_exists[None, :, :, None] & batch.token_present[:, None, None, :]  # [B, L+1, 3, T]
    # positions a block does not cover (CaiT / XCiT: the CLS token before the class-attention
    # blocks, image tokens' sub-layers inside them) were never computed: they hold RANK_FILL
    present &= batch.rank != RANK_FILL
    image_idx, block_idx, stream_idx, token_idx = (t.numpy() for t in torch.nonzero(present, as_tuple=True))
    flat = present.numpy()

    def take(tensor: torch.Tensor) -> np.ndarray:
        return tensor.numpy()[flat]

    is_sublayer = stream_idx != STREAM_RESID
    labels = token_label.cpu().numpy().astype(np.int8)[image_idx, token_idx]
    fg = fg_fraction.cpu().numpy().astype(np.float32)[image_idx, token_idx]
    kinds = token_kinds(num_tokens, lens_batch.num_prefix_tokens, has_class_token)[token_idx]
    columns = {
        "image_key": pa.DictionaryArray.from_arrays(pa.array(image_idx.astype(np.int32)), pa.array(keys)).cast(pa.string()),
        "block": block_idx.astype(np.int16),
        "stream": _dictionary(stream_idx, STREAMS),
        "token": token_idx.astype(np.int16),
        "token_kind": _dictionary(kinds, TOKEN_KINDS),
        "label": _dictionary(labels, LABEL_NAMES),
        "fg_fraction": pa.array(fg, mask=labels == LABEL_PREFIX),
        "identifiability_rank": take(batch.rank),
        "correct_logit": take(batch.correct_logit),
        "top5_class": take(batch.topk_class).astype(np.int16),
        "top5_logit": take(batch.topk_logit).astype(np.float16),
        "sublayer_input_correct_logit": pa.array(take(batch.input_correct_logit), mask=~is_sublayer),
        "key_value_agreement": pa.array(take(batch.key_value_agreement), mask=~is_sublayer),
        "non_compositional": pa.array(take(batch.non_compositional), mask=~is_sublayer),
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
