"""The summary tier: group sums computed on the device (vitlens.metrics.summary) equal the
`token_summary` / `residual_match` views' SQL sums over the `tokens` rows of the same batch,
and a brute-force Python count; the tokens rows themselves equal a per-row Python loop."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vitlens.data.token_labels import LABEL_NAMES, LABEL_PREFIX
from vitlens.lens.output import STREAMS, LensBatch
from vitlens.report.results import open_results, table_sql
from vitlens.store.layout import table_file, write_parquet_atomic
from vitlens.store.records import summary_tables, tokens_table
from vitlens.store.schema import TOKENS_COLUMNS
from tests.test_store_records import tokens_view_rows

B, L, T, K, C = 3, 3, 6, 5, 7  # images, blocks, tokens (2 prefix: CLS + register), top-k, classes


def random_batch(seed: int, removed: bool) -> tuple[LensBatch, torch.Tensor, torch.Tensor]:
    """A LensBatch with few classes (ties and matches happen) and, optionally, removed tokens."""
    g = torch.Generator().manual_seed(seed)
    out = LensBatch.empty(torch.randint(0, C, (B,), generator=g), L, T, K, 2, C)
    shape = out.rank.shape
    out.rank.copy_(torch.randint(0, 3, shape, generator=g, dtype=torch.int32))
    out.rank[:, 0, 1:] = -1
    out.correct_logit.copy_(torch.randint(0, 3, shape, generator=g).float())
    out.input_correct_logit.copy_(torch.randint(0, 3, shape, generator=g).float())
    out.topk_class.copy_(torch.randint(0, 3, shape + (K,), generator=g, dtype=torch.int32))
    out.topk_logit.copy_(torch.randn(shape + (K,), generator=g))
    out.key_value_agreement.copy_(torch.rand(shape, generator=g) < 0.5)
    out.non_compositional.copy_(torch.rand(shape, generator=g) < 0.5)
    out.token_present.fill_(True)
    if removed:
        out.token_present[0, 3] = False
        out.token_present[2, [2, 5]] = False
        for tensor in (out.rank,):
            tensor.masked_fill_(~out.token_present[:, None, None, :], -1)
    out.prediction = out.class_index.clone()
    out.correct = torch.tensor([True, False, True])
    labels = torch.randint(0, 3, (B, T), generator=g, dtype=torch.int8)
    labels[:, :2] = LABEL_PREFIX
    fg = torch.rand(B, T, generator=g)
    return out, fg, labels


def expected_rows(out: LensBatch, keys: list[str], fg: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """The `tokens` rows of a batch as the views show them (the v7 layout: top-5 as lists,
    nulls for prefix tokens' fg_fraction and the resid stream's sub-layer columns), by a
    per-row Python loop over the tensors."""
    rows = []
    for b in range(B):
        for slot in range(L + 1):
            for s, stream in enumerate(STREAMS):
                for t in range(T):
                    if (slot == 0 and s > 0) or not out.token_present[b, t]:
                        continue
                    label = LABEL_NAMES[int(labels[b, t])]
                    sub = s > 0
                    rows.append({
                        "image_key": keys[b], "block": slot, "stream": stream, "token": t,
                        "token_kind": "cls" if t == 0 else "prefix" if t < 2 else "image", "label": label,
                        "fg_fraction": None if label == "prefix" else float(np.float32(fg[b, t])),
                        "identifiability_rank": int(out.rank[b, slot, s, t]),
                        "correct_logit": float(np.float32(out.correct_logit[b, slot, s, t])),
                        "top5_class": [int(c) for c in out.topk_class[b, slot, s, t]],
                        "top5_logit": [float(np.float16(v)) for v in out.topk_logit[b, slot, s, t].tolist()],
                        "sublayer_input_correct_logit": float(np.float32(out.input_correct_logit[b, slot, s, t])) if sub else None,
                        "key_value_agreement": bool(out.key_value_agreement[b, slot, s, t]) if sub else None,
                        "non_compositional": bool(out.non_compositional[b, slot, s, t]) if sub else None,
                    })
    return rows


@pytest.mark.parametrize("removed", [False, True], ids=["all_present", "tokens_removed"])
def test_tokens_rows_equal_a_per_row_loop(tmp_path: Path, removed: bool) -> None:
    """Stored in the v8 layout by the streaming writer, read through the `tokens` view: every
    column of every row as the v7 layout held it."""
    out, fg, labels = random_batch(1, removed)
    keys = ["a", "b", "c"]
    assert tokens_view_rows(tokens_table(out, keys, fg, labels, has_class_token=True), tmp_path) == expected_rows(
        out, keys, fg, labels)


def v7_table(rows: list[dict]) -> pa.Table:
    """`rows` in the layout of schema v7 (the top-5 as fixed-size lists, nulls stored), built
    by hand as that version's writer did."""
    schema = TOKENS_COLUMNS.with_metadata({"vitlens.table": "tokens", "vitlens.schema_version": "7"})
    arrays = []
    for f in schema:
        values = [row[f.name] for row in rows]
        if pa.types.is_fixed_size_list(f.type):
            flat = np.array(values, dtype=f.type.value_type.to_pandas_dtype()).reshape(-1)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), K))
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def test_v7_result_sets_read_through_the_same_views(tmp_path: Path) -> None:
    """A v7 file (lists, nulls) and a v8 file of the same rows, alone or in one result set,
    read through the `tokens` view and the single-file reads of the gallery and explorer:
    the same rows, with the v7 column types."""
    out, fg, labels = random_batch(5, removed=True)
    keys = ["a", "b", "c"]
    want = expected_rows(out, keys, fg, labels)
    old = table_file(tmp_path, "tokens", "old", "baseline", "s0")
    old.parent.mkdir(parents=True)
    pq.write_table(v7_table(want), old)
    assert tokens_view_rows(tokens_table(out, keys, fg, labels, True), tmp_path, variant="new") == want
    con = open_results(tmp_path)  # both layouts in one view
    assert [(name, kind) for name, kind, *_ in con.execute("DESCRIBE tokens").fetchall()] == [
        ("image_key", "VARCHAR"), ("block", "SMALLINT"), ("stream", "VARCHAR"), ("token", "SMALLINT"),
        ("token_kind", "VARCHAR"), ("label", "VARCHAR"), ("fg_fraction", "FLOAT"), ("identifiability_rank", "INTEGER"),
        ("correct_logit", "FLOAT"), ("top5_class", "SMALLINT[]"), ("top5_logit", "FLOAT[]"),
        ("sublayer_input_correct_logit", "FLOAT"), ("key_value_agreement", "BOOLEAN"),
        ("non_compositional", "BOOLEAN"), ("experiment", "VARCHAR"), ("variant", "VARCHAR")]
    for variant in ("old", "new"):
        rows = con.sql(f"SELECT * EXCLUDE (variant, experiment) FROM tokens WHERE variant = '{variant}'")
        assert rows.to_arrow_table().to_pylist() == want, variant
    for path in (old, *table_file(tmp_path, "tokens", "new", "baseline", "s0").parent.glob("*.parquet")):
        one = con.sql(f"SELECT * EXCLUDE (variant, experiment) FROM ({table_sql(con, 'tokens', [str(path)])})")
        assert one.to_arrow_table().to_pylist() == want, path


def write_batch(root: Path, variant: str, out: LensBatch, fg: torch.Tensor, labels: torch.Tensor, tier: str) -> None:
    keys = [f"{variant}-{i}" for i in range(B)]
    if tier == "tokens":
        tables = {"tokens": tokens_table(out, keys, fg, labels, True)}
    else:
        summary, match = summary_tables(out, keys, labels, True)
        tables = {"token_summary": summary, "residual_match": match}
    for table, rows in tables.items():
        write_parquet_atomic(rows, table_file(root, table, variant, "baseline", "s0"))


def view_rows(root: Path, view: str) -> list[tuple]:
    con = open_results(root)
    return sorted(con.execute(f"SELECT * EXCLUDE (experiment) FROM {view}").fetchall(), key=repr)


@pytest.mark.parametrize("removed", [False, True], ids=["all_present", "tokens_removed"])
def test_device_sums_equal_the_views_over_tokens_rows(tmp_path: Path, removed: bool) -> None:
    out, fg, labels = random_batch(2, removed)
    write_batch(tmp_path / "tokens", "m", out, fg, labels, "tokens")
    write_batch(tmp_path / "summary", "m", out, fg, labels, "summary")
    for view in ("token_summary", "residual_match"):
        derived = view_rows(tmp_path / "tokens", view)
        stored = view_rows(tmp_path / "summary", view)
        assert derived == stored and len(stored) > 10, view


def test_residual_match_by_brute_force(tmp_path: Path) -> None:
    out, fg, labels = random_batch(3, removed=True)
    write_batch(tmp_path, "m", out, fg, labels, "summary")
    counts: Counter = Counter()
    top1 = out.topk_class[..., 0]
    for b in range(B):
        for block in range(1, L + 1):
            for t in range(T):
                if not out.token_present[b, t]:
                    continue
                kind = "cls" if t == 0 else "prefix" if t < 2 else "image"
                key = (f"m-{b}", block, kind, LABEL_NAMES[int(labels[b, t])])
                r, a, m, p = (int(top1[b, block, 0, t]), int(top1[b, block, 1, t]), int(top1[b, block, 2, t]),
                              int(top1[b, block - 1, 0, t]))
                counts[key + ("tokens",)] += 1
                counts[key + ("attn",)] += r == a
                counts[key + ("mlp",)] += r == m
                counts[key + ("previous",)] += r == p
                counts[key + ("composite",)] += r not in (a, m, p)
    rows = duckdb.connect().execute(
        f"SELECT image_key, block, token_kind, label, tokens, attn_match, mlp_match, previous_match, composite "
        f"FROM read_parquet('{tmp_path}/table=residual_match/*/*/*.parquet')").fetchall()
    assert len(rows) == len({k[:4] for k in counts})
    for key, tokens, attn, mlp, previous, composite in ((r[:4], *r[4:]) for r in rows):
        assert (tokens, attn, mlp, previous, composite) == tuple(
            counts[key + (name,)] for name in ("tokens", "attn", "mlp", "previous", "composite"))


def test_mixed_tiers_count_each_variant_once(tmp_path: Path) -> None:
    out, fg, labels = random_batch(4, removed=False)
    write_batch(tmp_path, "a", out, fg, labels, "tokens")
    write_batch(tmp_path, "b", out, fg, labels, "summary")
    write_batch(tmp_path, "b", out, fg, labels, "tokens")  # b has both: its stored sums win
    con = open_results(tmp_path)
    totals = dict(con.execute("SELECT variant, sum(tokens)::BIGINT FROM token_summary GROUP BY variant").fetchall())
    expected = int((out.rank != -1).sum())
    assert totals == {"a": expected, "b": expected}
    assert np.isclose(expected, B * (1 + 3 * L) * T)
