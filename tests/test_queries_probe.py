"""The §8 linear-probe queries (probe_accuracy_by_block.sql, probe_time.sql) on hand-made rows.

The set adds to the toy result set of tests/test_queries.py (`toy`, `toy@random`: L = 2,
1 CLS + 3 image tokens, experiment 'baseline' among others):

- `probes` rows (experiment 'probe') for `toy` and `toy@random`, every stream, block and
  token, with probe ranks from a fixed rule; and for `deep`, a GAP-like variant with no CLS
  and no lens rows, probed at blocks 1..2 of 'mlp' only while its `variants` row says L = 4
  (so its normalised block is block / 4, not block / 2);
- `runs` rows whose `experiment_seconds` cover every shape: a flat {experiment: seconds},
  a per-variant {experiment: {variant: seconds}}, probes without a lens, a lens without
  probes, and a run from before schema v5 (null).

Each test recomputes the answer with plain Python loops over the same rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from vitlens.report.queries import find_query, run_query
from vitlens.report.results import open_results
from vitlens.store.layout import table_file, write_parquet_atomic
from vitlens.store.schema import to_table
from tests.test_queries import DEPTH, IMAGES, STREAM_IDS, token_rows, write_toy_results

PROBED = ("toy", "toy@random")
DEEP, DEEP_BLOCKS, DEEP_DEPTH = "deep", (1, 2), 4


def probe_rows(variant: str) -> list[dict]:
    """The probes rows of one variant (experiment 'probe')."""
    rows = []
    for i, (image_key, (_, labels)) in enumerate(IMAGES.items()):
        if variant == DEEP:  # no CLS: the 3 tokens are all image tokens; mlp only
            for block in DEEP_BLOCKS:
                for token in range(3):
                    rows.append({"image_key": image_key, "block": block, "stream": "mlp", "token": token,
                                 "token_kind": "image", "label": labels[token],
                                 "probe_rank": (i + block + token) % 2})
            continue
        v = PROBED.index(variant)
        for stream, s in STREAM_IDS.items():
            for block in range(0 if stream == "resid" else 1, DEPTH + 1):
                for token in range(4):
                    rows.append({
                        "image_key": image_key, "block": block, "stream": stream, "token": token,
                        "token_kind": "cls" if token == 0 else "image",
                        "label": "prefix" if token == 0 else labels[token - 1],
                        "probe_rank": (v * 5 + i * 3 + block * 2 + s + token) % 3,
                    })
    return rows


RUN_SECONDS = {  # run id -> experiment_seconds (None: a run before schema v5)
    "r1-flat": {"baseline": 10.0, "probe": 4.0, "probe_fit": 6.0, "explain": 3.0},
    "r2-old": None,
    "r3-per-variant": {"baseline": {"toy": 8.0, "toy@random": 2.0}, "probe_fit": {"toy": 4.0, "toy@random": 3.0}},
    "r4-no-lens": {"probe_fit": 5.0},
    "r5-no-probe": {"baseline": 7.0},
}


def run_rows() -> list[dict]:
    """One `runs` row per entry of RUN_SECONDS, started a minute apart in that order."""
    rows = []
    for n, (run_id, seconds) in enumerate(RUN_SECONDS.items()):
        rows.append({
            "run_id": run_id, "job_name": f"job{n}", "job_spec": json.dumps({"name": f"job{n}"}),
            "versions": json.dumps({"vitlens": "0.1", "schema": "5"}),
            "started_at": datetime(2024, 1, 1, 12, n, tzinfo=timezone.utc), "status": "done",
            "finished_at": datetime(2024, 1, 1, 13, n, tzinfo=timezone.utc), "wall_seconds": 60.0 + n,
            "device": "cpu", "actors": 1, "shards_total": 2, "shards_done": 2, "shards_skipped": 0,
            "shards_failed": 0, "rows_written": 100, "analysis_seconds": 30.0,
            "experiment_seconds": None if seconds is None else json.dumps(seconds), "samples_rejected": None,
        })
    return rows


def _columns(rows: list[dict]) -> dict:
    return {name: [row[name] for row in rows] for name in rows[0]}


def write_probe_results(root: Path, lens: bool = True) -> Path:
    """The toy result set (when `lens`) plus the probes, variants and runs rows above."""
    if lens:
        write_toy_results(root)
    for variant in PROBED + (DEEP,):
        write_parquet_atomic(to_table("probes", _columns(probe_rows(variant))),
                             table_file(root, "probes", variant, "probe", "toy-000000"))
    variants_row = {"family": ["vit"], "num_blocks": [DEEP_DEPTH], "num_prefix_tokens": [0], "grid_rows": [1],
                    "grid_cols": [3], "input_height": [16], "input_width": [48], "num_classes": [4],
                    "data_config": ["{}"], "class_names": [["c0", "c1", "c2", "c3"]]}
    write_parquet_atomic(to_table("variants", variants_row), table_file(root, "variants", DEEP, "none", "variant"))
    for row in run_rows():
        write_parquet_atomic(to_table("runs", {k: [v] for k, v in row.items()}),
                             table_file(root, "runs", "all", "none", row["run_id"]))
    return root


@pytest.fixture(scope="module")
def probe_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_probe_results(tmp_path_factory.mktemp("probe_results"))


def query_rows(results: Path, name: str) -> list[dict]:
    return run_query(open_results(results), find_query(name)).to_pylist()


def test_probe_accuracy_by_block_beside_the_lens(probe_results: Path):
    probe, lens = defaultdict(list), defaultdict(list)
    for variant in PROBED + (DEEP,):
        for r in probe_rows(variant):
            probe[(variant, r["stream"], r["block"], r["token_kind"])].append(r["probe_rank"] == 0)
    for variant in ("toy", "toy@random"):
        for r in token_rows(variant, "baseline"):
            lens[(variant, r["stream"], r["block"], r["token_kind"])].append(r["identifiability_rank"] == 0)
    got = query_rows(probe_results, "probe_accuracy_by_block")
    assert len(got) == len(probe) == 2 * (3 + 2 + 2) * 2 + 2
    depth = {"toy": DEPTH, "toy@random": DEPTH, DEEP: DEEP_DEPTH}
    for row in got:
        key = (row["variant"], row["stream"], row["block"], row["token_kind"])
        assert row["probe_tokens"] == len(probe[key])
        assert row["probe_acc_pct"] == pytest.approx(100 * np.mean(probe[key]))
        assert row["normalised_block"] == pytest.approx(row["block"] / depth[row["variant"]])
        if row["variant"] == DEEP:
            assert row["lens_tokens"] is None and row["lens_id_rate_pct"] is None
        else:
            assert row["lens_tokens"] == len(lens[key])
            assert row["lens_id_rate_pct"] == pytest.approx(100 * np.mean(lens[key]))
    # by hand: toy (v=0), resid block 0, CLS (token 0): rank = (3i) % 3 = 0 for both images -> 100 %;
    # image tokens t=1..3: img0 ranks 1,2,0; img1 (3 % 3 = 0): 1,2,0 -> 2 of 6
    by_key = {(r["variant"], r["stream"], r["block"], r["token_kind"]): r for r in got}
    assert by_key[("toy", "resid", 0, "cls")]["probe_acc_pct"] == pytest.approx(100.0)
    assert by_key[("toy", "resid", 0, "image")]["probe_acc_pct"] == pytest.approx(100 * 2 / 6)
    assert [r["variant"] for r in got] == sorted(r["variant"] for r in got)  # ordered by variant


def test_probe_accuracy_without_probes_is_empty(tmp_path: Path):
    assert query_rows(write_toy_results(tmp_path / "results"), "probe_accuracy_by_block") == []


def test_probe_time_reads_every_shape_of_experiment_seconds(probe_results: Path):
    got = [(r["run_id"], r["variant"]) for r in query_rows(probe_results, "probe_time")]
    assert got == [("r1-flat", "all"), ("r3-per-variant", "toy"), ("r3-per-variant", "toy@random"),
                   ("r4-no-lens", "all")]  # r2 predates v5, r5 has no probes
    rows = {(r["run_id"], r["variant"]): r for r in query_rows(probe_results, "probe_time")}
    flat = rows[("r1-flat", "all")]
    assert (flat["job_name"], flat["probe_fit_seconds"], flat["probe_seconds"]) == ("job0", 6.0, 4.0)
    assert (flat["probing_seconds"], flat["lens_seconds"], flat["probe_lens_ratio"]) == (10.0, 10.0, 1.0)
    toy = rows[("r3-per-variant", "toy")]
    assert (toy["probe_fit_seconds"], toy["probe_seconds"], toy["probing_seconds"]) == (4.0, None, 4.0)
    assert toy["probe_lens_ratio"] == pytest.approx(4.0 / 8.0)
    assert rows[("r3-per-variant", "toy@random")]["probe_lens_ratio"] == pytest.approx(3.0 / 2.0)
    no_lens = rows[("r4-no-lens", "all")]
    assert (no_lens["probing_seconds"], no_lens["lens_seconds"], no_lens["probe_lens_ratio"]) == (5.0, None, None)


def test_probe_time_without_runs_is_empty(tmp_path: Path):
    assert query_rows(write_toy_results(tmp_path / "results"), "probe_time") == []
