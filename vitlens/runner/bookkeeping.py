"""What the driver records about a run (no torch, no Ray): the `runs` row and the shards
that failed.

A run writes its `runs` row twice under one run id: when it starts (`status = 'running'`)
and when it ends (`done`, `partial` when some shard failed, `interrupted` on Ctrl-C or an
error). A driver killed outright leaves `running`; the next run into the same output takes
over its stale lock and rewrites that row as `killed`. So every run, also a re-run with
nothing to do, has exactly one row.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq

from vitlens.runner.spec import JobSpec
from vitlens.store.committed import FAILED_SHARDS
from vitlens.store.layout import NO_EXPERIMENT, shard_stem, table_key
from vitlens.store.storage import Storage, open_storage
from vitlens.store.schema import SCHEMA_VERSION, to_table

#: `runs.status` values.
RUN_STATUSES: tuple[str, ...] = ("running", "done", "partial", "interrupted", "killed")


class ShardFailure(NamedTuple):
    """A (variant, shard) that this run could not complete: stage `read` (the shard is
    damaged or does not match its manifest; not retried) or `analysis` (every attempt failed)."""

    variant: str
    shard: str  # the shard's URL as the job lists it
    stage: str
    reason: str  # one line (vitlens.errors.one_line_reason)


@dataclass
class JobReport:
    """What a run did: shard counts, failures, per-shard statistics, wall time."""

    shards_total: int
    shards_skipped: int
    shards_done: int = 0
    failures: list[ShardFailure] = field(default_factory=list)
    shard_stats: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    actors: int = 0
    device: str = "none"  # "none" when no actor was needed
    run_id: str = ""
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0))

    def samples_rejected(self) -> dict[str, dict[str, int]]:
        """Samples the shards of this run rejected and skipped (their rows are in `rejects`),
        per stage (`decode`, `label`) and variant; shards skipped as done before are not in it.

        # -> {stage: {variant: samples}}
        """
        total: dict[str, dict[str, int]] = {}
        for stats in self.shard_stats:
            for stage, count in stats.get("rejects_by_stage", {}).items():
                if count:
                    per_variant = total.setdefault(stage, {})
                    per_variant[stats["variant"]] = per_variant.get(stats["variant"], 0) + int(count)
        return {stage: dict(sorted(per_variant.items())) for stage, per_variant in sorted(total.items())}


def new_run_id(now: datetime | None = None) -> str:
    """`YYYYmmddTHHMMSS-<8 hex>`: sortable by start time, unique."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def versions() -> dict[str, str]:
    """Versions recorded in the `runs` table (read from package metadata, nothing imported)."""
    from vitlens import __version__

    found = {"vitlens": __version__, "schema": str(SCHEMA_VERSION)}
    for package in ("torch", "timm", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_key(run_id: str) -> str:
    """The key of the `runs` file of one run."""
    return table_key("runs", "all", NO_EXPERIMENT, run_id)


def experiment_seconds(shard_stats: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Seconds per experiment and variant, summed over shards (and actors): each shard's
    device step per experiment, and `probe_fit`, the linear probes' training pass and solve.

    # -> {experiment: {variant: seconds}}
    """
    total: dict[str, dict[str, float]] = {}
    for stats in shard_stats:
        for name, seconds in stats.get("experiment_seconds", {}).items():
            per_variant = total.setdefault(name, {})
            per_variant[stats["variant"]] = per_variant.get(stats["variant"], 0.0) + float(seconds)
    return {name: dict(sorted(per_variant.items())) for name, per_variant in sorted(total.items())}


def write_run_record(job: JobSpec, report: JobReport, status: str) -> None:
    """Write (or rewrite) this run's `runs` row with `status`."""
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r}")
    finished = None if status == "running" else datetime.now(timezone.utc).replace(microsecond=0)
    table = to_table("runs", {
        "run_id": [report.run_id], "job_name": [job.name],
        "job_spec": [json.dumps(asdict(job), sort_keys=True)],
        "versions": [json.dumps(versions(), sort_keys=True)],
        "started_at": [report.started_at], "status": [status], "finished_at": [finished],
        "wall_seconds": [report.wall_seconds], "device": [report.device], "actors": [report.actors],
        "shards_total": [report.shards_total], "shards_done": [report.shards_done],
        "shards_skipped": [report.shards_skipped], "shards_failed": [len(report.failures)],
        "rows_written": [sum(s.get("rows", 0) for s in report.shard_stats)],
        "analysis_seconds": [sum(s.get("seconds", 0.0) for s in report.shard_stats)],
        "experiment_seconds": [json.dumps(experiment_seconds(report.shard_stats))],
        "samples_rejected": [json.dumps(report.samples_rejected())],
    })
    open_storage(job.output).write_table(table, run_key(report.run_id))


def mark_run_killed(root: str | Path | Storage, run_id: str) -> bool:
    """Rewrite the `running` row of a run whose driver died as `killed`; False when there is none."""
    storage = root if isinstance(root, Storage) else open_storage(root)
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(run_key(run_id))))
    except (OSError, ValueError):
        return False
    if table.num_rows != 1 or table.column("status")[0].as_py() != "running":
        return False
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    columns["status"] = ["killed"]
    columns.setdefault("experiment_seconds", [None])  # a row written before schema v5
    columns.setdefault("samples_rejected", [None])  # a row written before schema v6
    storage.write_table(to_table("runs", columns), run_key(run_id))
    return True


def write_failed_shards(job: JobSpec, failures: list[ShardFailure]) -> None:
    """Record the shards this run could not complete in `rejects` (stage `read` or `analysis`;
    `shard` is the shard's id, like everywhere in the store).

    One file per variant, rewritten by every run that analysed something, so a re-run that
    succeeds clears it.
    """
    storage = open_storage(job.output)
    for variant in job.variants:
        rows = [f for f in failures if f.variant == variant]
        key = table_key("rejects", variant, NO_EXPERIMENT, FAILED_SHARDS)
        if not rows:
            storage.delete(key)
            continue
        table = to_table("rejects", {
            "shard": [shard_stem(f.shard) for f in rows], "image_key": [None] * len(rows),
            "stage": [f.stage for f in rows], "reason": [f.reason for f in rows],
        })
        storage.write_table(table, key)
