"""Provenance at the top of the report: what produced this result set.

Per job run (the `runs` view, one row per run): job name, run id, status, start and end,
the job spec's essentials (data manifest or shards, detail, precision, batch size, variants,
experiments, [explain] / [probe] settings when those experiments ran), versions, wall
seconds, per-experiment seconds (`experiment_seconds`, schema v5; "not recorded" before),
the samples the run rejected per stage (`samples_rejected`, schema v6), device and actors. Then the data: per variant × experiment the images and shards analysed
(`images` view) and the store's tables holding it, and every reject with its reason (the
`rejects` view, written as tables/rejects.csv and shown in the page).

Everything is read from the result set (and, where the job's manifest file is still
readable here, its shard count and conversion rejects); nothing is recomputed.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from vitlens.data.manifest import read_manifest
from vitlens.errors import UserError
from vitlens.report.html import html_table
from vitlens.report.queries import format_cell, format_markdown
from vitlens.report.results import result_files
from vitlens.report.sections import RawSection, write_table
from vitlens.store.committed import ResultFiles

ANCHOR = "provenance"
TITLE = "Provenance: runs, data and rejects"
#: Tables whose (variant, experiment) folders are listed in the data table (runs and
#: rejects are shown on their own).
DATA_TABLES: tuple[str, ...] = ("tokens", "token_summary", "residual_match", "images", "params", "explain",
                                "perturbation_curves", "probes", "variants")
#: The labels of `run_fields`, in display order (the columns of tables/provenance_runs.csv).
RUN_FIELDS: tuple[str, ...] = (
    "job", "run id", "status", "started", "finished", "data", "variants", "experiments", "detail", "precision",
    "batch size", "[explain]", "[probe]", "shard × variant", "rows written", "samples rejected", "wall seconds",
    "seconds per experiment", "device × actors", "versions")
RUNS_FILE, DATA_FILE, REJECTS_FILE = "provenance_runs", "provenance_data", "rejects"


def _json(text: str | None) -> Any:
    """Parsed JSON, or None for a null or unparsable value."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RunProvenance:
    """One `runs` row with its JSON columns parsed (`spec`, `versions`, `experiment_seconds`,
    `samples_rejected`; None for runs before schema v5 and v6)."""

    run_id: str
    job_name: str
    status: str | None
    started_at: datetime | None
    finished_at: datetime | None
    wall_seconds: float
    device: str
    actors: int
    shards_total: int
    shards_done: int
    shards_skipped: int
    shards_failed: int
    rows_written: int
    spec: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    experiment_seconds: dict[str, Any] | None = None
    samples_rejected: dict[str, Any] | None = None  # {stage: {variant: samples}}

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.spec.get("variants") or ())

    @property
    def experiments(self) -> tuple[str, ...]:
        return tuple(self.spec.get("experiments") or ())

    @property
    def manifest(self) -> str | None:
        return (self.spec.get("data") or {}).get("manifest")

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple((self.spec.get("data") or {}).get("shards") or ())

    @property
    def detail(self) -> str | None:
        return self.spec.get("detail")

    @property
    def precision(self) -> str | None:
        return (self.spec.get("resources") or {}).get("precision")

    @property
    def batch_size(self) -> int | None:
        return self.spec.get("batch_size")

    def settings(self, experiment: str) -> dict[str, Any] | None:
        """The spec's [explain] / [probe] table when the run had that experiment (else None)."""
        if experiment not in self.experiments:
            return None
        return dict(self.spec.get(experiment) or {})


def read_runs(con: duckdb.DuckDBPyConnection) -> list[RunProvenance]:
    """Every `runs` row, oldest first, with its JSON parsed (null-safe for older rows)."""
    columns = {d[0] for d in con.execute("SELECT * FROM runs LIMIT 0").description}
    seconds = "experiment_seconds" if "experiment_seconds" in columns else "NULL AS experiment_seconds"
    rejected = "samples_rejected" if "samples_rejected" in columns else "NULL AS samples_rejected"
    status = "status" if "status" in columns else "NULL AS status"
    finished = "finished_at" if "finished_at" in columns else "NULL AS finished_at"
    rows = con.execute(
        f"SELECT run_id, job_name, {status}, started_at, {finished}, wall_seconds, device, actors, "
        "shards_total, shards_done, shards_skipped, shards_failed, rows_written, job_spec, versions, "
        f"{seconds}, {rejected} FROM runs ORDER BY started_at, run_id").fetchall()
    runs = []
    for row in rows:
        spec, versions, experiment_seconds, samples_rejected = (_json(v) for v in row[13:17])
        runs.append(RunProvenance(*row[:13], spec=spec if isinstance(spec, dict) else {},
                                  versions=versions if isinstance(versions, dict) else {},
                                  experiment_seconds=experiment_seconds if isinstance(experiment_seconds, dict)
                                  else None,
                                  samples_rejected=samples_rejected if isinstance(samples_rejected, dict) else None))
    return runs


def _stored_partitions(results: ResultFiles) -> dict[tuple[str, str], list[str]]:
    """(variant, experiment) -> the data tables with committed files under it."""
    found = {key: [t for t in DATA_TABLES if t in tables] for key, tables in results.partitions().items()}
    return {key: tables for key, tables in found.items() if tables}


def data_table(con: duckdb.DuckDBPyConnection, results_dir: str | Path | ResultFiles) -> pa.Table:
    """Per variant × experiment: images and shards analysed (`images` view; null where the
    experiment wrote no images rows) and the tables holding it (experiment 'none': the
    variant's own tables such as params)."""
    counts = {(v, e): (n, s) for v, e, n, s in con.execute(
        "SELECT variant, experiment, count(DISTINCT image_key), count(DISTINCT shard) FROM images "
        "GROUP BY variant, experiment").fetchall()}
    stored = _stored_partitions(results_dir if isinstance(results_dir, ResultFiles) else result_files(results_dir))
    keys = sorted(set(counts) | set(stored))
    return pa.table({
        "variant": pa.array([k[0] for k in keys], pa.string()),
        "experiment": pa.array([k[1] for k in keys], pa.string()),
        "images": pa.array([counts.get(k, (None, None))[0] for k in keys], pa.int64()),
        "shards": pa.array([counts.get(k, (None, None))[1] for k in keys], pa.int64()),
        "tables": pa.array([", ".join(stored.get(k, [])) for k in keys], pa.string()),
    })


def rejects_table(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Every reject: variant, shard, image_key (null: the whole shard), stage, reason."""
    return con.sql("SELECT variant, shard, image_key, stage, reason FROM rejects "
                   "ORDER BY variant, shard, image_key NULLS FIRST, stage").to_arrow_table()


def manifest_summary(path: str | None) -> str:
    """`PATH (N shards, M rejected at conversion)` when the manifest is readable here, else a note."""
    if path is None:
        return ""
    try:
        manifest = read_manifest(path)
    except UserError:
        return f"{path} (not readable here)"
    shards, rejected = len(manifest["shards"]), len(manifest.get("rejects") or [])
    return f"{path} ({shards} shards, {rejected} rejected at conversion)"


def _seconds(value: Any) -> str:
    if isinstance(value, dict):  # {variant: seconds}: the total (per variant: probe_time, the data table)
        numbers = [v for v in value.values() if isinstance(v, (int, float))]
        return f"{sum(numbers):.1f} s over {len(numbers)} variant{'s' * (len(numbers) != 1)}"
    return f"{value:.1f} s" if isinstance(value, (int, float)) else str(value)


def _samples(value: Any) -> str:
    """{variant: samples} as `7` (one variant) or `7 over 2 variants`."""
    numbers = [v for v in value.values() if isinstance(v, int)] if isinstance(value, dict) else []
    if len(numbers) == 1:
        return str(numbers[0])
    return f"{sum(numbers)} over {len(numbers)} variants" if numbers else str(value)


def _setting(value: Any, most: int = 5) -> str:
    """One setting as JSON; a list of more than `most` items shortened (e.g. training shards)."""
    if isinstance(value, list) and len(value) > most:
        return json.dumps(value[:most])[:-1] + f", ... ({len(value)} in all)]"
    return json.dumps(value)


def _settings(value: dict[str, Any] | None) -> str:
    if value is None:
        return "not run"
    return ", ".join(f"{k} = {_setting(v)}" for k, v in sorted(value.items()) if v not in (None, [], ()))


def run_fields(run: RunProvenance) -> dict[str, str]:
    """The run's provenance as (label, text) pairs, in display order."""
    if run.manifest:
        data = "manifest " + manifest_summary(run.manifest)
    elif run.shards:
        data = f"{len(run.shards)} shards: " + ", ".join(run.shards[:5]) + (" ..." if len(run.shards) > 5 else "")
    else:
        data = "not recorded"
    if (run.spec.get("data") or {}).get("transform", "timm") != "timm":  # [data] transform (schema v8)
        data += f"; transform {run.spec['data']['transform']} (on the device: close to timm's, not bit-identical)"
    if run.experiment_seconds is None:
        per_experiment = "not recorded (run before schema v5)"
    else:
        per_experiment = "; ".join(f"{k} {_seconds(v)}" for k, v in run.experiment_seconds.items()) or "none"
    if run.samples_rejected is None:
        rejected = "not recorded (run before schema v6)"
    else:
        rejected = "; ".join(f"{stage} {_samples(v)}" for stage, v in sorted(run.samples_rejected.items())) or "none"
    return {
        "job": run.job_name,
        "run id": run.run_id,
        "status": run.status or "unknown (recorded before schema v3)",
        "started": format_cell(run.started_at),
        "finished": format_cell(run.finished_at) or "not finished",
        "data": data,
        "variants": ", ".join(run.variants),
        "experiments": ", ".join(run.experiments),
        "detail": str(run.detail),
        "precision": str(run.precision),
        "batch size": str(run.batch_size),
        "[explain]": _settings(run.settings("explain")),
        "[probe]": _settings(run.settings("probe")),
        "shard × variant": (f"{run.shards_total} total, {run.shards_done} done, {run.shards_skipped} skipped "
                            f"(done before), {run.shards_failed} failed"),
        "rows written": str(run.rows_written),
        "samples rejected": rejected,
        "wall seconds": f"{run.wall_seconds:.1f}",
        "seconds per experiment": per_experiment,
        "device × actors": f"{run.device} × {run.actors}",
        "versions": ", ".join(f"{k} {v}" for k, v in sorted(run.versions.items())),
    }


def runs_table(runs: list[RunProvenance]) -> pa.Table:
    """One row per run with the fields of `run_fields` as text columns."""
    fields = [run_fields(r) for r in runs]
    names = list(fields[0]) if fields else list(RUN_FIELDS)
    return pa.table({re.sub(r"[^a-z0-9]+", "_", name).strip("_"): pa.array([f[name] for f in fields], pa.string())
                     for name in names})


def _kv_html(pairs: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs.items())
    return f"<table class='kv'>{rows}</table>"


def _rejects_summary(rejects: pa.Table) -> pa.Table:
    """Rejects counted per variant × stage × reason."""
    counts: dict[tuple[str, str, str], int] = {}
    for row in rejects.to_pylist():
        key = (row["variant"], row["stage"], row["reason"])
        counts[key] = counts.get(key, 0) + 1
    keys = sorted(counts)
    return pa.table({"variant": [k[0] for k in keys], "stage": [k[1] for k in keys],
                     "reason": [k[2] for k in keys], "rejects": pa.array([counts[k] for k in keys], pa.int64())})


def provenance_section(runs: list[RunProvenance], data: pa.Table, rejects: pa.Table,
                       rejects_file: str = f"tables/{REJECTS_FILE}.csv") -> RawSection:
    """The provenance section (HTML and Markdown) from its parts."""
    parts_html: list[str] = []
    parts_md: list[str] = []
    if not runs:
        note = ("No runs rows: this result set was not written by `vitlens run` / `vitlens demo` "
                "(or its runs table was removed), so its job, versions and timings are unknown.")
        parts_html.append(f"<p class='note'>{html.escape(note)}</p>")
        parts_md += [f"> {note}", ""]
    for run in runs:
        heading = f"Run {run.run_id}: job {run.job_name} ({run.status or 'status unknown'})"
        fields = run_fields(run)
        parts_html.append(f"<h3>{html.escape(heading)}</h3>{_kv_html(fields)}")
        parts_md += [f"### {heading}", "", "| | |", "|---|---|"]
        parts_md += [f"| {k} | {v.replace('|', '/')} |" for k, v in fields.items()] + [""]
    data_note = "" if data.num_rows else "No images or other tables in this result set."
    parts_html.append("<h3>Data: images and shards analysed per variant and experiment</h3>")
    parts_html.append(f"<p class='note'>{html.escape(data_note)}</p>" if data_note else html_table(data))
    parts_md += ["### Data: images and shards analysed per variant and experiment", "",
                 data_note or format_markdown(data), ""]
    link = f"<a href='{html.escape(rejects_file)}'>{html.escape(rejects_file)}</a>"
    parts_html.append("<h3>Rejects</h3>")
    parts_md += ["### Rejects", ""]
    if rejects.num_rows == 0:
        parts_html.append(f"<p>No rejects: every sample decoded and every shard completed ({link}).</p>")
        parts_md += [f"No rejects: every sample decoded and every shard completed ([{rejects_file}]({rejects_file})).",
                     ""]
    else:
        summary = _rejects_summary(rejects)
        parts_html.append(f"<p>{rejects.num_rows} rejects (image_key empty: the whole shard); all of them in "
                          f"{link}.</p>{html_table(summary)}{html_table(rejects)}")
        parts_md += [f"{rejects.num_rows} rejects (image_key empty: the whole shard); all of them in "
                     f"[{rejects_file}]({rejects_file}).", "", format_markdown(summary), "",
                     format_markdown(rejects), ""]
    return RawSection(TITLE, "\n".join(parts_html), "\n".join(parts_md), ANCHOR)


def write_provenance(con: duckdb.DuckDBPyConnection, results_dir: str | Path | ResultFiles,
                     out_dir: str | Path) -> RawSection:
    """Collect the provenance, write tables/provenance_runs, provenance_data and rejects
    (CSV + Markdown) under `out_dir`, and return the section (its `files` are the CSVs)."""
    tables = Path(out_dir) / "tables"
    runs, data, rejects = read_runs(con), data_table(con, results_dir), rejects_table(con)
    files = (write_table(runs_table(runs), tables, RUNS_FILE), write_table(data, tables, DATA_FILE),
             write_table(rejects, tables, REJECTS_FILE))
    section = provenance_section(runs, data, rejects)
    return RawSection(section.title, section.html, section.markdown, section.anchor, files)
