"""The report's provenance (vitlens.report.provenance) on a hand-made result set.

The set is the toy result set of tests/test_queries.py plus hand-written `runs` rows (one
run of schema v5 whose spec is a real `JobSpec`, with per-experiment seconds and a manifest
file on disk; one older run with neither status nor experiment_seconds) and `rejects` rows
(decode rejects of single images, a failed shard). Every value the provenance shows is
checked against those rows.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vitlens.cli import main as cli_main
from vitlens.report.provenance import (
    RUN_FIELDS,
    data_table,
    read_runs,
    rejects_table,
    run_fields,
)
from vitlens.report.results import open_results
from vitlens.runner.spec import DataSpec, ExplainSpec, JobSpec, ProbeSpec, ResourceSpec
from vitlens.store.layout import table_file, write_parquet_atomic
from vitlens.store.schema import to_table
from tests.test_queries import EXPERIMENTS, IMAGES, VARIANTS, write_toy_results

REJECTS = [  # (variant, shard, image_key, stage, reason)
    ("toy", "toy-000001", None, "read", "shard toy-000001: sha256 differs from the manifest"),
    ("toy", "toy-000000", "img7", "decode", "image.png: cannot identify image file"),
    ("toy@random", "toy-000000", "img7", "decode", "image.png: cannot identify image file"),
    ("toy@random", "toy-000000", "img8", "decode", "mask.png: size 10x10 differs from the image's 12x12"),
]
SECONDS = {"baseline": 12.5, "explain": 30.25, "probe": 4.0, "probe_fit": 8.0}
SAMPLES_REJECTED = {"decode": {"toy": 1, "toy@random": 2}, "label": {"toy": 3}}  # schema v6


def _job(manifest: Path) -> JobSpec:
    return JobSpec(name="paper-b32", output="/data/out", variants=VARIANTS,
                   experiments=("baseline", "explain", "probe"), batch_size=16, detail="summary",
                   data=DataSpec(manifest=str(manifest)), resources=ResourceSpec(precision="bf16"),
                   explain=ExplainSpec(target="predicted", curve_points=8),
                   probe=ProbeSpec(shards=("/data/train-000000.tar",), shots=5, alpha=2.0))


def _run_row(run_id: str, job: JobSpec, minute: int, **overrides) -> dict:
    row = {
        "run_id": run_id, "job_name": job.name, "job_spec": json.dumps(asdict(job), sort_keys=True),
        "versions": json.dumps({"vitlens": "0.5.0", "torch": "2.4.0", "timm": "1.0.9", "schema": "5"}),
        "started_at": datetime(2024, 5, 1, 9, minute, tzinfo=timezone.utc), "status": "partial",
        "finished_at": datetime(2024, 5, 1, 10, minute, tzinfo=timezone.utc), "wall_seconds": 3600.5,
        "device": "cuda", "actors": 2, "shards_total": 4, "shards_done": 3, "shards_skipped": 0,
        "shards_failed": 1, "rows_written": 12345, "analysis_seconds": 3000.0,
        "experiment_seconds": json.dumps(SECONDS), "samples_rejected": json.dumps(SAMPLES_REJECTED),
    }
    row.update(overrides)
    return row


def write_provenance_results(root: Path) -> tuple[Path, Path]:
    """The toy results with runs, rejects and a manifest; returns (results, manifest)."""
    write_toy_results(root / "results")
    manifest = root / "shards" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"format_version": 1, "dataset": "toy", "split": "validation", "num_classes": 2,
                                    "class_names": ["a", "b"], "shards": [{"name": f"s{i}"} for i in range(3)],
                                    "rejects": [{"path": "a.JPEG", "reason": "truncated"}]}))
    job = _job(manifest)
    results = root / "results"
    new = _run_row("20240501T090100-aaaaaaaa", job, 1)
    write_parquet_atomic(to_table("runs", {k: [v] for k, v in new.items()}),
                         table_file(results, "runs", "all", "none", new["run_id"]))
    # a run of schema v4: no experiment_seconds column at all, and no status (before v3)
    old = _run_row("20240401T080000-bbbbbbbb", job, 0, status=None, finished_at=None,
                   started_at=datetime(2024, 4, 1, 8, 0, tzinfo=timezone.utc))
    old_table = to_table("runs", {k: [v] for k, v in old.items()}).drop_columns(["experiment_seconds", "samples_rejected"])
    path = table_file(results, "runs", "all", "none", old["run_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(old_table, path)
    for variant in VARIANTS:
        rows = [r for r in REJECTS if r[0] == variant]
        write_parquet_atomic(to_table("rejects", {
            "shard": [r[1] for r in rows], "image_key": [r[2] for r in rows],
            "stage": [r[3] for r in rows], "reason": [r[4] for r in rows]}),
            table_file(results, "rejects", variant, "none", "toy-000000"))
    return results, manifest


@pytest.fixture(scope="module")
def provenance_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_provenance_results(tmp_path_factory.mktemp("provenance"))


def test_runs_are_read_oldest_first_with_their_json(provenance_set: tuple[Path, Path]):
    results, manifest = provenance_set
    old, new = read_runs(open_results(results))
    assert (old.run_id, new.run_id) == ("20240401T080000-bbbbbbbb", "20240501T090100-aaaaaaaa")
    assert old.status is None and old.experiment_seconds is None and old.finished_at is None
    assert new.status == "partial" and new.experiment_seconds == SECONDS and new.samples_rejected == SAMPLES_REJECTED
    assert old.samples_rejected is None
    assert (new.job_name, new.wall_seconds, new.device, new.actors) == ("paper-b32", 3600.5, "cuda", 2)
    assert (new.shards_total, new.shards_done, new.shards_skipped, new.shards_failed, new.rows_written) == (4, 3, 0, 1, 12345)
    assert new.variants == VARIANTS and new.experiments == ("baseline", "explain", "probe")
    assert (new.manifest, new.shards, new.detail, new.precision, new.batch_size) == (
        str(manifest), (), "summary", "bf16", 16)
    assert new.settings("explain")["target"] == "predicted" and new.settings("probe")["shots"] == 5
    assert new.versions["torch"] == "2.4.0"


def test_run_fields_show_the_spec_essentials(provenance_set: tuple[Path, Path]):
    results, manifest = provenance_set
    old, new = read_runs(open_results(results))
    fields = run_fields(new)
    assert tuple(fields) == RUN_FIELDS
    assert fields["data"] == f"manifest {manifest} (3 shards, 1 rejected at conversion)"
    assert fields["status"] == "partial" and fields["run id"] == new.run_id and fields["job"] == "paper-b32"
    assert fields["started"] == "2024-05-01 09:01:00+00:00" and fields["finished"] == "2024-05-01 10:01:00+00:00"
    assert fields["seconds per experiment"] == "baseline 12.5 s; explain 30.2 s; probe 4.0 s; probe_fit 8.0 s"
    assert "target = \"predicted\"" in fields["[explain]"] and "curve_points = 8" in fields["[explain]"]
    assert "shots = 5" in fields["[probe]"] and "alpha = 2.0" in fields["[probe]"]
    assert "manifest" not in fields["[probe]"]  # null settings left out
    assert fields["shard × variant"].startswith("4 total, 3 done, 0 skipped") and "1 failed" in fields["shard × variant"]
    assert (fields["detail"], fields["precision"], fields["batch size"]) == ("summary", "bf16", "16")
    assert fields["device × actors"] == "cuda × 2" and fields["wall seconds"] == "3600.5"
    assert fields["versions"] == "schema 5, timm 1.0.9, torch 2.4.0, vitlens 0.5.0"
    old_fields = run_fields(old)
    assert fields["samples rejected"] == "decode 3 over 2 variants; label 3"
    assert old_fields["seconds per experiment"] == "not recorded (run before schema v5)"
    assert old_fields["samples rejected"] == "not recorded (run before schema v6)"
    assert old_fields["status"].startswith("unknown") and old_fields["finished"] == "not finished"


def test_data_and_rejects_tables_equal_the_store(provenance_set: tuple[Path, Path]):
    results, _ = provenance_set
    con = open_results(results)
    data = {(r["variant"], r["experiment"]): r for r in data_table(con, results).to_pylist()}
    for variant in VARIANTS:
        for experiment in EXPERIMENTS:
            row = data[(variant, experiment)]
            assert (row["images"], row["shards"]) == (len(IMAGES), 1)
            assert row["tables"] == "tokens, images"
        assert data[(variant, "none")]["tables"] == "params" and data[(variant, "none")]["images"] is None
    assert len(data) == len(VARIANTS) * (len(EXPERIMENTS) + 1)
    got = [tuple(r.values()) for r in rejects_table(con).to_pylist()]
    assert got == sorted(REJECTS, key=lambda r: (r[0], r[1], r[2] is not None, r[2] or ""))


def test_report_shows_the_provenance_first(provenance_set: tuple[Path, Path], tmp_path: Path):
    results, manifest = provenance_set
    out = tmp_path / "report"
    assert cli_main(["report", "--results", str(results), "--out", str(out), "--no-progress", "--no-gallery"]) == 0
    page = (out / "index.html").read_text()
    start, first_query = page.index("<h2 id='provenance'>"), page.index("<h2 id='table1_identifiability'>")
    provenance = page[start:first_query]
    assert start < first_query
    for run_id in ("20240501T090100-aaaaaaaa", "20240401T080000-bbbbbbbb"):
        assert run_id in provenance
    assert provenance.index("20240401T080000-bbbbbbbb") < provenance.index("20240501T090100-aaaaaaaa")
    assert "not recorded (run before schema v5)" in provenance and "probe_fit 8.0 s" in provenance
    assert f"manifest {manifest} (3 shards" in provenance
    assert "<a href='tables/rejects.csv'>" in provenance
    for _, shard, _, stage, reason in REJECTS:
        assert shard in provenance and reason.replace("'", "&#x27;") in provenance
    with open(out / "tables" / "rejects.csv") as f:
        rows = [(r["variant"], r["shard"], r["image_key"] or None, r["stage"], r["reason"]) for r in csv.DictReader(f)]
    assert sorted(rows, key=str) == sorted(REJECTS, key=str)
    with open(out / "tables" / "provenance_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [r["run_id"] for r in runs] == ["20240401T080000-bbbbbbbb", "20240501T090100-aaaaaaaa"]
    assert runs[1]["explain"].count("=") >= 3 and runs[1]["status"] == "partial"
    markdown = (out / "report.md").read_text()
    assert markdown.index("## Provenance") < markdown.index("## Table 1") and "20240501T090100-aaaaaaaa" in markdown


def test_report_without_runs_says_so(tmp_path: Path):
    results = write_toy_results(tmp_path / "results")
    out = tmp_path / "report"
    assert cli_main(["report", "--results", str(results), "--out", str(out), "--no-progress", "--no-gallery"]) == 0
    page = (out / "index.html").read_text()
    assert "No runs rows" in page and "No rejects" in page
    assert (out / "tables" / "rejects.csv").is_file() and (out / "tables" / "provenance_runs.csv").is_file()


def test_seconds_per_experiment_of_a_run_sums_its_variants(provenance_set: tuple[Path, Path]):
    """The runner writes {experiment: {variant: seconds}}; the run's line shows each
    experiment's total over its variants (the per-variant split is in probe_time)."""
    results, _ = provenance_set
    _, new = read_runs(open_results(results))
    nested = replace(new, experiment_seconds={"baseline": {"a": 1.25, "b": 2.0}, "probe_fit": {"a": 0.5}})
    assert run_fields(nested)["seconds per experiment"] == "baseline 3.2 s over 2 variants; probe_fit 0.5 s over 1 variant"
