"""The summary tier: group sums computed on the device (vitlens.metrics.summary) equal the
`token_summary` / `residual_match` views' SQL sums over the `tokens` rows of the same batch,
and a brute-force Python count; the tokens rows themselves equal a per-row Python loop."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from vitlens.data.token_labels import LABEL_NAMES, LABEL_PREFIX
from vitlens.lens.output import STREAMS, LensBatch
from vitlens.report.results import open_results
from vitlens.store.layout import table_file, write_parquet_atomic
from vitlens.store.records import summary_tables, tokens_table

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


@pytest.mark.parametrize("removed", [False, True], ids=["all_present", "tokens_removed"])
def test_tokens_rows_equal_a_per_row_loop(removed: bool) -> None:
    out, fg, labels = random_batch(1, removed)
    keys = ["a", "b", "c"]
    rows = tokens_table(out, keys, fg, labels, has_class_token=True).to_pylist()
    expected = []
    for b in range(B):
        for slot in range(L + 1):
            for s, stream in enumerate(STREAMS):
                for t in range(T):
                    if (slot == 0 and s > 0) or not out.token_present[b, t]:
                        continue
                    expected.append((keys[b], slot, stream, t, "cls" if t == 0 else "prefix" if t < 2 else "image",
                                     LABEL_NAMES[int(labels[b, t])], int(out.rank[b, slot, s, t]),
                                     [int(c) for c in out.topk_class[b, slot, s, t]],
                                     None if s == 0 else bool(out.key_value_agreement[b, slot, s, t])))
    got = [(r["image_key"], r["block"], r["stream"], r["token"], r["token_kind"], r["label"],
            r["identifiability_rank"], r["top5_class"], r["key_value_agreement"]) for r in rows]
    assert got == expected


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
