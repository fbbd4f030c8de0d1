"""The Arrow schema of every table of the Parquet store — defined here and nowhere else.

Bump `SCHEMA_VERSION` on any change; it is stored in each file's metadata and in the
`runs` table so queries can tell which layout a result set has.

Tables (one row each of):
- `tokens`:  image × block × stream × token (the lens output, reduced on the device)
- `token_summary`, `residual_match`: the summary tier's sums per image × block × stream ×
             token kind × label (`detail = "summary"`; see below)
- `images`:  image (class, prediction, correctness, token counts)
- `params`:  variant × block × sub-layer × class (class-value agreement, parameters only)
- `rejects`: sample or shard that could not be processed, with the reason
- `runs`:    one run of a job (spec, versions, timings)
- `explain`: image × method × block × image token importance (experiment `explain`): the
             paper's gradients per block with the heads as a list (`method = 'ours'`, blocks
             1..L; the global map is their sum over blocks), and the baselines' global maps
             (block null). Per head and token rather than per token only: B/16 has 12 × 196
             `ours` rows per image, a fraction of its `tokens` rows.
- `perturbation_curves`: image × method × deletion test × kept count × order (experiments
             `explain` and, for method `linear_probe`, `probe`); `order` numbers the random
             orders of method `random` (0..R-1; 0 for every other method)
- `probes`:  image × block × stream × token (experiment `probe`, paper §8): the rank of the
             true class among a linear probe's predictions, one ridge probe per (block,
             stream, token position) fitted on separate training shards
- `heads`:   image × block × head × token (experiment `heads`, METHOD §3b, tokens tier): the
             head's direct logit attribution (DLA) of the true class at that token, and the
             token's term as a source of the CLS's DLA for that head
- `head_summary`: the summary tier's DLA sums per image × block × head × token kind × label
- `head_sources`: image × block × head × target kind × target label × source label (both tiers):
             the heads' DLA split over the labels of the tokens they read
- `tuned`:   image × block × token (experiment `tuned`, METHOD §7b): the tuned lens's rank of
             the true class (an affine map per block to the last block's stream, then the head)
- `variants`: one row per variant: what the report needs to draw a token grid over an image
             (family, blocks, prefix tokens, grid, input size, eval transform, class names)
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from vitlens.settings import DETAILS

SCHEMA_VERSION = 8

# Stream names come from vitlens.lens.output.STREAMS, sub-layers from vitlens.lens.memories.SUBLAYERS,
# labels from vitlens.data.token_labels.LABEL_NAMES; token kinds are defined here.
TOKEN_KINDS: tuple[str, ...] = ("cls", "prefix", "image")

_dict = pa.dictionary(pa.int8(), pa.string())
TOP_K = 5

#: The `tokens` columns as the views show them, and as result sets of schema <= 7 stored them.
TOKENS_COLUMNS = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("block", pa.int16(), nullable=False),  # resid: 0..L (0 = embeddings); attn/mlp: 1..L
        pa.field("stream", _dict, nullable=False),  # resid | attn | mlp
        pa.field("token", pa.int16(), nullable=False),  # position in the full sequence (prefix first)
        pa.field("token_kind", _dict, nullable=False),  # cls | prefix | image
        pa.field("label", _dict, nullable=False),  # class | context | ignore | prefix
        pa.field("fg_fraction", pa.float32()),  # null for prefix tokens
        pa.field("identifiability_rank", pa.int32(), nullable=False),  # #{c': logit[c'] > logit[c]}
        pa.field("correct_logit", pa.float32(), nullable=False),
        pa.field("top5_class", pa.list_(pa.int16(), TOP_K), nullable=False),
        pa.field("top5_logit", pa.list_(pa.float16(), TOP_K), nullable=False),  # half precision: display only
        pa.field("sublayer_input_correct_logit", pa.float32()),  # attn/mlp only
        pa.field("key_value_agreement", pa.bool_()),  # attn/mlp only
        pa.field("non_compositional", pa.bool_()),  # attn/mlp only
    ]
)

# How `tokens` is stored since v8 (docs/schema.md, "How tokens is stored"): Parquet writes
# flat non-null columns several times faster than lists and nullable columns, so
# - each list column of TOKENS_COLUMNS is one column per rank (`top5_class_1` .. `top5_class_5`);
# - the nullable columns are stored without nulls (0 / false there), and the views null them
#   where another column says so: TOKENS_NULL_WHERE[column] = (column, value);
# - `image_key` is dictionary-encoded in Arrow too (no string per row is built).
TOKENS_RANKED: tuple[str, ...] = ("top5_class", "top5_logit")
TOKENS_NULL_WHERE: dict[str, tuple[str, str]] = {
    "fg_fraction": ("label", "prefix"),
    "sublayer_input_correct_logit": ("stream", "resid"),
    "key_value_agreement": ("stream", "resid"),
    "non_compositional": ("stream", "resid"),
}


def ranked(column: str) -> list[str]:
    """The stored columns of list column `column` of `tokens`, one per rank: `column_1` .. `column_K`."""
    return [f"{column}_{rank}" for rank in range(1, TOP_K + 1)]


def _stored_tokens(columns: pa.Schema) -> pa.Schema:
    fields = []
    for f in columns:
        if f.name in TOKENS_RANKED:
            fields += [pa.field(name, f.type.value_type, nullable=False) for name in ranked(f.name)]
        elif f.name == "image_key":
            fields.append(pa.field(f.name, pa.dictionary(pa.int32(), pa.string()), nullable=False))
        else:
            fields.append(f.with_nullable(f.nullable and f.name not in TOKENS_NULL_WHERE))
    return pa.schema(fields)


TOKENS = _stored_tokens(TOKENS_COLUMNS)

IMAGES = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("class_name", pa.string()),
        pa.field("prediction", pa.int32(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("num_image_tokens", pa.int16(), nullable=False),  # after token removal
        pa.field("num_class_tokens", pa.int16(), nullable=False),  # class-labelled, before removal
        pa.field("num_context_tokens", pa.int16(), nullable=False),
    ]
)

PARAMS = pa.schema(
    [
        pa.field("block", pa.int16(), nullable=False),  # 1..L
        pa.field("sublayer", _dict, nullable=False),  # attn | mlp
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("class_value_agreement", pa.float32(), nullable=False),  # max cosine over memories
    ]
)

REJECTS = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("image_key", pa.string()),  # null when the whole shard failed
        pa.field("stage", pa.string(), nullable=False),  # decode | label (v6) (a sample) | read | analysis (a shard)
        pa.field("reason", pa.string(), nullable=False),
    ]
)

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("job_name", pa.string(), nullable=False),
        pa.field("job_spec", pa.string(), nullable=False),  # JSON of the validated spec
        pa.field("versions", pa.string(), nullable=False),  # JSON: vitlens, torch, timm, ray, schema
        pa.field("started_at", pa.timestamp("s", tz="UTC"), nullable=False),
        pa.field("status", pa.string()),  # running | done | partial | interrupted | killed (v3; null before)
        pa.field("finished_at", pa.timestamp("s", tz="UTC")),  # null while running or when killed
        pa.field("wall_seconds", pa.float64(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("actors", pa.int32(), nullable=False),
        pa.field("shards_total", pa.int32(), nullable=False),
        pa.field("shards_done", pa.int32(), nullable=False),
        pa.field("shards_skipped", pa.int32(), nullable=False),
        pa.field("shards_failed", pa.int32(), nullable=False),
        pa.field("rows_written", pa.int64(), nullable=False),
        pa.field("analysis_seconds", pa.float64(), nullable=False),  # summed over actors
        # v5: JSON {experiment: {variant: seconds of its device step summed over this run's
        # shards and actors}}, with "probe_fit": the linear probes' training pass and solve
        pa.field("experiment_seconds", pa.string()),
        # v6: JSON {stage: {variant: samples}} of the samples this run's shards rejected and
        # skipped (stage decode | label; the rows are in `rejects`); null before v6
        pa.field("samples_rejected", pa.string()),
    ]
)

EXPLAIN = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("class_of_interest", pa.int32(), nullable=False),  # c of the gradients / relevancy
        pa.field("method", _dict, nullable=False),  # ours | chefer | attention | rollout | random
        pa.field("block", pa.int16()),  # ours: 1..L; null for a method's global map
        pa.field("token", pa.int16(), nullable=False),  # position in the full sequence (prefix first)
        pa.field("label", _dict, nullable=False),  # class | context | ignore
        pa.field("fg_fraction", pa.float32(), nullable=False),
        pa.field("importance", pa.float32(), nullable=False),  # ours: sum over heads; higher = more important
        pa.field("head_importance", pa.list_(pa.float32())),  # ours: one value per head; else null
    ]
)

PERTURBATION_CURVES = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("method", _dict, nullable=False),
        pa.field("test", _dict, nullable=False),  # negative (most important kept first) | positive
        pa.field("kept_tokens", pa.int16(), nullable=False),  # n image tokens kept (plus the prefix)
        pa.field("kept_fraction", pa.float32(), nullable=False),  # n / N
        pa.field("prediction", pa.int32(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),  # prediction == true class
        pa.field("order", pa.int16(), nullable=False),  # v5: random order 0..R-1 of method 'random'; else 0
    ]
)

PROBES = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("block", pa.int16(), nullable=False),  # resid: 0..L (0 = embeddings); attn/mlp: 1..L
        pa.field("stream", _dict, nullable=False),  # resid | attn | mlp
        pa.field("token", pa.int16(), nullable=False),  # position in the full sequence (prefix first)
        pa.field("token_kind", _dict, nullable=False),  # cls | prefix | image
        pa.field("label", _dict, nullable=False),  # class | context | ignore | prefix
        pa.field("probe_rank", pa.int32(), nullable=False),  # #{c': probe score[c'] > score[true class]}
    ]
)

VARIANTS = pa.schema(
    [
        pa.field("family", pa.string(), nullable=False),  # the lens's family adapter (vit, eva, ...)
        pa.field("num_blocks", pa.int16(), nullable=False),
        pa.field("num_prefix_tokens", pa.int16(), nullable=False),
        pa.field("grid_rows", pa.int16(), nullable=False),  # image tokens per column
        pa.field("grid_cols", pa.int16(), nullable=False),  # image tokens per row
        pa.field("input_height", pa.int16(), nullable=False),  # the model's input, after the eval transform
        pa.field("input_width", pa.int16(), nullable=False),
        pa.field("num_classes", pa.int32(), nullable=False),
        pa.field("data_config", pa.string(), nullable=False),  # JSON: timm's resolved eval transform
        pa.field("class_names", pa.list_(pa.string()), nullable=False),
    ]
)

HEADS = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("block", pa.int16(), nullable=False),  # 1..L
        pa.field("head", pa.int16(), nullable=False),  # 0..H-1
        pa.field("token", pa.int16(), nullable=False),  # the target: position in the full sequence
        pa.field("token_kind", _dict, nullable=False),  # cls | prefix | image
        pa.field("label", _dict, nullable=False),  # class | context | ignore | prefix
        pa.field("dla", pa.float32(), nullable=False),  # the head's direct logit attribution of the true class
        pa.field("cls_source_dla", pa.float32()),  # this token as a source of the CLS's DLA; null without a CLS
    ]
)

HEAD_SUMMARY = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("block", pa.int16(), nullable=False),
        pa.field("head", pa.int16(), nullable=False),
        pa.field("token_kind", _dict, nullable=False),
        pa.field("label", _dict, nullable=False),
        pa.field("tokens", pa.int32(), nullable=False),  # targets the head writes in the group (> 0)
        pa.field("dla_sum", pa.float64(), nullable=False),
    ]
)

HEAD_SOURCES = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("block", pa.int16(), nullable=False),
        pa.field("head", pa.int16(), nullable=False),
        pa.field("target_kind", _dict, nullable=False),  # cls | prefix | image
        pa.field("target_label", _dict, nullable=False),
        pa.field("source_label", _dict, nullable=False),  # the label of the tokens read
        pa.field("targets", pa.int32(), nullable=False),  # targets in the group (> 0)
        pa.field("dla_sum", pa.float64(), nullable=False),  # signed source terms, summed over the targets
        pa.field("abs_sum", pa.float64(), nullable=False),  # |term|, summed
    ]
)

TUNED = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("block", pa.int16(), nullable=False),  # 0..L (L: the identity map, the lens itself)
        pa.field("token", pa.int16(), nullable=False),
        pa.field("token_kind", _dict, nullable=False),
        pa.field("label", _dict, nullable=False),
        pa.field("identifiability_rank", pa.int32(), nullable=False),  # of proj(A_b h + c_b)
        pa.field("correct_logit", pa.float32(), nullable=False),
    ]
)

# The summary tier (`detail = "summary"`): the sums every paper table needs, per image ×
# block × stream × token kind × label (vitlens.metrics.summary), instead of `tokens` rows.
# The views `token_summary` / `residual_match` compute the same sums from `tokens` rows, so
# every query gives the same numbers from either tier.
TOKEN_SUMMARY = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("block", pa.int16(), nullable=False),  # as in tokens
        pa.field("stream", _dict, nullable=False),
        pa.field("token_kind", _dict, nullable=False),
        pa.field("label", _dict, nullable=False),
        pa.field("tokens", pa.int32(), nullable=False),  # tokens in the group (> 0)
        pa.field("identifiable", pa.int32(), nullable=False),  # rank 0
        pa.field("rank_sum", pa.int64(), nullable=False),  # sum of identifiability ranks
        pa.field("changed", pa.int32()),  # attn/mlp: correct logit > the sub-layer input's; null for resid
        pa.field("kv_agree", pa.int32()),  # attn/mlp: key-value agreement; null for resid
        pa.field("non_compositional", pa.int32()),  # attn/mlp; null for resid
    ]
)

RESIDUAL_MATCH = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("block", pa.int16(), nullable=False),  # 1..L
        pa.field("token_kind", _dict, nullable=False),
        pa.field("label", _dict, nullable=False),
        pa.field("tokens", pa.int32(), nullable=False),  # tokens with resid_b, attn_b, mlp_b and resid_{b-1}
        pa.field("attn_match", pa.int32(), nullable=False),  # top-1 of resid_b == top-1 of attn_b
        pa.field("mlp_match", pa.int32(), nullable=False),
        pa.field("previous_match", pa.int32(), nullable=False),  # == top-1 of resid_{b-1}
        pa.field("composite", pa.int32(), nullable=False),  # matches none of the three
    ]
)

#: Detail tiers of a job (`detail` in the job spec, vitlens.settings.DETAILS) and the
#: per-token tables each writes.
DETAIL_TIERS: dict[str, tuple[str, ...]] = dict(zip(DETAILS, (("tokens",), ("token_summary", "residual_match"))))

TABLES: dict[str, pa.Schema] = {
    "tokens": TOKENS,
    "token_summary": TOKEN_SUMMARY,
    "residual_match": RESIDUAL_MATCH,
    "images": IMAGES,
    "params": PARAMS,
    "rejects": REJECTS,
    "runs": RUNS,
    "explain": EXPLAIN,
    "perturbation_curves": PERTURBATION_CURVES,
    "probes": PROBES,
    "variants": VARIANTS,
    "heads": HEADS,
    "head_summary": HEAD_SUMMARY,
    "head_sources": HEAD_SOURCES,
    "tuned": TUNED,
}


def schema_of(table: str) -> pa.Schema:
    """The versioned schema of `table` (with `vitlens.schema_version` metadata)."""
    return TABLES[table].with_metadata(
        {"vitlens.table": table, "vitlens.schema_version": str(SCHEMA_VERSION)}
    )


def to_table(table: str, columns: Mapping[str, Any]) -> pa.Table:
    """Build an Arrow table of `table`'s schema from column arrays (numpy, lists or Arrow).

    Raises KeyError naming a missing or unexpected column; casts each column to its type.
    `tokens` also takes the columns as the views show them (`TOKENS_COLUMNS`): a list column
    as a [n, TOP_K] array, split into one column per rank, and nulls where the views null
    them, stored as 0 / false.
    """
    schema = schema_of(table)
    if table == "tokens":
        columns = dict(columns)
        for name in TOKENS_RANKED:
            if name in columns:
                columns.update(zip(ranked(name), np.asarray(columns.pop(name)).T))
    missing = [f.name for f in schema if f.name not in columns]
    extra = [name for name in columns if schema.get_field_index(name) < 0]
    if missing or extra:
        raise KeyError(f"table {table}: missing columns {missing}, unexpected {extra}")
    arrays = []
    for f in schema:
        value = columns[f.name]
        if isinstance(value, pa.Array) and value.type == f.type:
            arrays.append(value)  # built with the stored type already: no cast, no copy
        elif isinstance(value, pa.DictionaryArray) and pa.types.is_dictionary(f.type):
            arrays.append(value.cast(f.type))  # index width only; the strings are not expanded
        elif pa.types.is_dictionary(f.type):
            arrays.append(pa.array(value, type=pa.string()).dictionary_encode().cast(f.type))
        else:
            arrays.append(pa.array(value, type=f.type) if not isinstance(value, (pa.Array, pa.ChunkedArray)) else value.cast(f.type))
        if table == "tokens" and f.name in TOKENS_NULL_WHERE and arrays[-1].null_count:
            arrays[-1] = arrays[-1].fill_null(pa.scalar(0, f.type) if pa.types.is_floating(f.type) else False)
    return pa.Table.from_arrays(arrays, schema=schema)
