"""Where every file of the Parquet store lives, and how it is written.

Layout (hive partitions, one file per (table, variant, experiment, shard))::

    ROOT/table=tokens/variant=V/experiment=E/<shard>.parquet
    ROOT/table=images/variant=V/experiment=E/<shard>.parquet
    ROOT/table=params/variant=V/experiment=none/params.parquet
    ROOT/table=rejects/variant=V/experiment=none/<shard>.parquet
    ROOT/table=runs/variant=all/experiment=none/<run_id>.parquet
    ROOT/_done/variant=V/<shard>.json        (written last, after every table of the shard;
                                              lists the experiments done on it)

Partition values are percent-encoded (`timm:vit_tiny@random` is the folder
`variant=timm%3Avit_tiny@random`), which DuckDB's hive partitioning decodes, so the
views show exactly the spec's names. A shard's id is its file name without `.tar`; two
shards of one job with the same id are refused before any work starts (`shard_ids`).
File names come from the shard id, so a re-run overwrites rather than adds. Every file
is written under a temporary name in the same folder and renamed into place, so a reader
(or a killed writer) never sees half a file. A shard counts as done only when its marker
exists; a re-run skips the experiments a shard's marker lists and runs the others, so adding
an experiment to a finished job analyses only that experiment.
"""

from __future__ import annotations

import json
import os
import uuid
from urllib.parse import quote
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vitlens.errors import UserError

NO_EXPERIMENT = "none"
#: Characters kept as they are in partition values and file stems; all others are %XX-encoded.
_SAFE_CHARS = "@+-_.~"


def partition_value(value: str) -> str:
    """A hive partition value that is safe as a folder name and decodes back to `value`:
    percent-encoding of every character but letters, digits and `@+-_.~` (DuckDB's hive
    partitioning and `urllib.parse.unquote` give `value` back)."""
    return quote(value, safe=_SAFE_CHARS)


def shard_stem(shard_url: str) -> str:
    """The id of a shard within a job, and the stem of its files: its base name without
    `.tar` (URLs included)."""
    name = shard_url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return partition_value(name)


def shard_ids(shard_urls: list[str]) -> list[str]:
    """The id of every shard of a job (`shard_stem`), refusing two shards with one id:
    their output files and done-markers would overwrite each other."""
    seen: dict[str, str] = {}
    ids = []
    for url in shard_urls:
        stem = shard_stem(url)
        if stem in seen:
            if seen[stem] == url:
                raise UserError(f"shard {url} is listed twice in the job's data")
            raise UserError(
                f"shards {seen[stem]} and {url} have the same shard id {stem!r}: outputs are keyed by "
                "the shard's file name, so rename one of them (or run them as two jobs)"
            )
        seen[stem] = url
        ids.append(stem)
    return ids


def table_file(root: str | Path, table: str, variant: str, experiment: str, stem: str) -> Path:
    """The Parquet path of one (table, variant, experiment, shard) file."""
    return (
        Path(root)
        / f"table={table}"
        / f"variant={partition_value(variant)}"
        / f"experiment={partition_value(experiment)}"
        / f"{stem}.parquet"
    )


def done_marker(root: str | Path, variant: str, stem: str) -> Path:
    """The marker that says every table of (variant, shard) is written."""
    return Path(root) / "_done" / f"variant={partition_value(variant)}" / f"{stem}.json"


def write_parquet_atomic(table: pa.Table, path: Path, row_group_size: int = 256 * 1024) -> None:
    """Write `table` as zstd Parquet to a temporary name beside `path`, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=3,
            row_group_size=row_group_size,
            use_dictionary=True,
            write_statistics=True,
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write a JSON file via a temporary name and rename (markers, summaries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def done_experiments(root: str | Path, variant: str, stem: str, sha256: str | None = None) -> frozenset[str]:
    """The experiments whose tables of (variant, shard) were completely written by earlier runs
    (empty without a marker, or for a marker that lists none).

    With `sha256` (the shard's checksum now), a marker that recorded another checksum counts
    as none: the shard was replaced by other data under the same name, so all is redone.
    """
    path = done_marker(root, variant, stem)
    if not path.is_file():
        return frozenset()
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return frozenset()  # an unreadable marker: redo the shard
    if not isinstance(payload, dict):
        return frozenset()
    recorded = payload.get("sha256")
    if sha256 is not None and recorded is not None and recorded != sha256:
        return frozenset()
    return frozenset(payload.get("experiments", ()))


def clean_temporaries(root: str | Path) -> int:
    """Remove temporary files a killed writer left behind; returns how many."""
    removed = 0
    for tmp in Path(root).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


#: zstd level of the streamed (per-shard) tables, chosen by measurement on B/16 `tokens` rows
#: (64 images, one core): level 1 writes in 0.87x the time of level 3 for 1.02x the bytes;
#: lz4 / snappy / no compression are faster still but 1.3-2.2x the bytes (benchmarks/README.md).
STREAM_ZSTD_LEVEL = 1


class StagedParquetWriter:
    """Stream tables into one Parquet file under a temporary name; `commit()` renames it.

    Small tables are buffered up to `row_group_size` rows so row groups stay sensible;
    `abort()` (or an exception inside a `with` block) deletes the temporary file.
    """

    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int = 256 * 1024) -> None:
        self.path = path
        self.schema = schema
        self.row_group_size = row_group_size
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd", compression_level=STREAM_ZSTD_LEVEL)
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append rows (flushed as a row group once `row_group_size` rows are buffered)."""
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            merged = pa.concat_tables(self._buffer).combine_chunks()
            self._writer.write_table(merged, row_group_size=self.row_group_size)
            self._buffer, self._buffered = [], 0

    def commit(self) -> None:
        """Finish the file and rename it into place."""
        self._flush()
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file (nothing at `path` changes)."""
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)
