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

The commit protocol (docs/jobs.md, "Guarantees"), the same on every file system:

- a shard's files are written first, each whole or not at all (a local temporary renamed into
  place; on an object store, which has no rename, an upload under a name no other write uses:
  `<shard>.<12 hex>.parquet`);
- its done-marker is written last and names exactly the files it commits, with each file's
  size and sha256 (`vitlens verify` checks them; a re-run redoes a shard whose files fail);
- readers read what markers name (and the per-variant and per-run tables), so a file of a
  writer killed before its marker is never read; locally, stable names also let a re-run
  overwrite rather than add.

A shard counts as done only when its marker exists; a re-run skips the experiments a shard's
marker lists and runs the others, so adding an experiment to a finished job analyses only
that experiment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from vitlens.errors import UserError
from vitlens.store.schema import TOKENS, ranked
from vitlens.store.storage import FileRecord, StagedFile, Storage, open_storage

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


def table_key(table: str, variant: str, experiment: str, stem: str) -> str:
    """The key (path relative to the result root) of one (table, variant, experiment, shard)
    file under its stable name; object stores write it under `Storage.unique_key` of it."""
    return f"table={table}/variant={partition_value(variant)}/experiment={partition_value(experiment)}/{stem}.parquet"


def marker_key(variant: str, stem: str) -> str:
    """The key of the done-marker of (variant, shard)."""
    return f"_done/variant={partition_value(variant)}/{stem}.json"


def table_file(root: str | Path, table: str, variant: str, experiment: str, stem: str) -> Path:
    """The local path of one (table, variant, experiment, shard) file under its stable name."""
    return Path(root) / table_key(table, variant, experiment, stem)


def done_marker(root: str | Path, variant: str, stem: str) -> Path:
    """The local path of the marker that says every table of (variant, shard) is written."""
    return Path(root) / marker_key(variant, stem)


def write_parquet_atomic(table: pa.Table, path: Path, row_group_size: int = 256 * 1024) -> None:
    """Write `table` as zstd Parquet to the local `path` via a temporary name and a rename."""
    Storage(str(Path(path).parent)).write_table(table, Path(path).name, row_group_size=row_group_size)


def write_json_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write a JSON file to the local `path` via a temporary name and a rename (markers, summaries)."""
    Storage(str(Path(path).parent)).write_bytes(marker_bytes(payload), Path(path).name)


def marker_bytes(payload: dict[str, Any]) -> bytes:
    """A marker's (or any small record's) JSON bytes: sorted keys, one level of indent."""
    return json.dumps(payload, indent=1, sort_keys=True).encode()


def _as_storage(root: "str | Path | Storage") -> Storage:
    return root if isinstance(root, Storage) else open_storage(root)


def read_marker(root: "str | Path | Storage", variant: str, stem: str) -> dict[str, Any] | None:
    """The done-marker of (variant, shard) as a dict, or None without a readable one."""
    storage = _as_storage(root)
    try:
        payload = json.loads(storage.read_bytes(marker_key(variant, stem)))
    except (OSError, ValueError):
        return None  # missing or unreadable: the shard is not done
    return payload if isinstance(payload, dict) else None


def earlier_marker(root: "str | Path | Storage", variant: str, stem: str,
                   sha256: str | None = None, fresh: bool = False) -> dict[str, Any] | None:
    """The done-marker of (variant, shard) whose files a run may keep: None without a readable
    one, with `fresh` (its files were found damaged), or when it recorded another checksum
    than `sha256` (the shard's now): other data under the same name, so all is redone."""
    if fresh:
        return None
    payload = read_marker(root, variant, stem)
    if payload is None:
        return None
    recorded = payload.get("sha256")
    if sha256 is not None and recorded is not None and recorded != sha256:
        return None
    return payload


def done_experiments(root: "str | Path | Storage", variant: str, stem: str,
                     sha256: str | None = None) -> frozenset[str]:
    """The experiments whose tables of (variant, shard) were completely written by earlier runs
    (empty without a marker, for a marker that lists none, or one of other shard bytes)."""
    payload = earlier_marker(root, variant, stem, sha256)
    return frozenset(payload.get("experiments", ())) if payload is not None else frozenset()


def kept_files(storage: Storage, earlier: dict[str, Any] | None, experiments: list[str],
               variant: str, stem: str) -> list[FileRecord]:
    """The files of `earlier`'s `experiments` that a run keeps (does not redo); never its
    per-shard `rejects` file, which every run writes again.

    A marker written before markers named their files (vitlens 0.1: local folders only) has
    them under their stable names: they are recorded (size, sha256) as found.
    """
    if earlier is None or not experiments:
        return []
    folders = {f"experiment={partition_value(e)}" for e in experiments}
    named = marker_files(earlier)
    if named is not None:
        return [r for key, r in named.items() if key.split("/")[2] in folders and not key.startswith("table=rejects/")]
    root = Path(storage.root)
    return [FileRecord(key, storage.size(key), storage.sha256(key))
            for folder in sorted(folders)
            for key in sorted(p.relative_to(root).as_posix() for p in
                              root.glob(f"table=*/variant={partition_value(variant)}/{folder}/{stem}.parquet"))]


def commit_marker(storage: Storage, variant: str, stem: str, stats: dict[str, Any],
                  files: list[FileRecord], earlier: dict[str, Any] | None) -> None:
    """Write the done-marker of (variant, shard), last: `stats` plus every file it commits with
    its size and sha256; then delete the files `earlier` named that it does not."""
    named = {record.key: record.as_json() for record in sorted(files, key=lambda r: r.key)}
    storage.write_bytes(marker_bytes({**stats, "files": named}), marker_key(variant, stem))
    replaced = set(marker_files(earlier) or {}) - set(named) if earlier is not None else set()
    storage.delete_many(sorted(replaced))  # named by no marker now: never read again


def marker_files(payload: dict[str, Any]) -> dict[str, FileRecord] | None:
    """The files a marker commits (key -> record), or None for a marker written before markers
    named their files (vitlens 0.1 result sets: their files have stable names)."""
    files = payload.get("files")
    if not isinstance(files, dict):
        return None
    return {key: FileRecord(key, int(entry["size"]), str(entry["sha256"])) for key, entry in files.items()}


def clean_temporaries(root: "str | Path | Storage") -> int:
    """Remove temporary files a killed writer left behind in a local result folder; returns how
    many (object stores have none: an upload that never completed is not an object)."""
    storage = _as_storage(root)
    if not storage.renames:
        return 0
    removed = 0
    for tmp in Path(storage.root).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


#: zstd level of the streamed (per-shard) tables, chosen by measurement on B/16 `tokens` rows
#: (64 images, one core): level 1 writes in 0.87x the time of level 3 for 1.02x the bytes;
#: lz4 / snappy / no compression are faster still but 1.3-2.2x the bytes (benchmarks/README.md).
#: Since schema v8 `tokens` is written column by column (`_tokens_options`).
STREAM_ZSTD_LEVEL = 1


def _tokens_options() -> dict[str, Any]:
    """How `tokens` is written (schema v8; chosen by measurement on B/16 rows, one core, in
    docs/schema.md "How tokens is stored"): dictionary pages only for the string columns;
    byte-stream-split integers and float32 (zero high bytes and exponents then cost lz4
    next to nothing); lz4 where zstd saves little, zstd for the half-precision logits (a
    quarter of their bytes); statistics only on `image_key`, the one column whose row-group
    ranges prune (the explorer and gallery read one image)."""
    ranked_class, ranked_logit = ranked("top5_class"), ranked("top5_logit")
    split = ["identifiability_rank", "correct_logit", "sublayer_input_correct_logit", *ranked_class]
    compression = {name: "lz4" for name in TOKENS.names}
    compression.update({name: "zstd" for name in ranked_logit})
    return {
        "use_dictionary": ["image_key", "stream", "token_kind", "label"],
        "column_encoding": {name: "BYTE_STREAM_SPLIT" for name in split},
        "compression": compression,
        "compression_level": {name: STREAM_ZSTD_LEVEL for name in ranked_logit},
        "write_statistics": ["image_key"],
    }


def stream_options(table: str) -> dict[str, Any]:
    """The `pyarrow.parquet.ParquetWriter` options of a streamed (per-shard) table."""
    if table == "tokens":
        return _tokens_options()
    return {"compression": "zstd", "compression_level": STREAM_ZSTD_LEVEL}


class StagedParquetWriter:
    """Stream tables into one Parquet file that nobody reads until `commit()` (a `StagedFile`:
    a temporary name renamed into place locally, an upload under a unique name on an object
    store); `commit()` returns its `FileRecord` for the done-marker.

    Small tables are buffered up to `row_group_size` rows so row groups stay sensible;
    `abort()` drops the file.
    """

    def __init__(self, storage: Storage, key: str, schema: pa.Schema, row_group_size: int = 256 * 1024) -> None:
        self.key = storage.unique_key(key)
        self.schema = schema
        self.row_group_size = row_group_size
        self._file = StagedFile(storage, self.key)
        try:
            table = (schema.metadata or {}).get(b"vitlens.table", b"").decode()
            self._writer = pq.ParquetWriter(self._file.stream, schema, **stream_options(table))
        except BaseException:
            self._file.abort()
            raise
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
            # one dictionary per column (as one table has), without copying the columns
            merged = pa.concat_tables(self._buffer).unify_dictionaries()
            self._writer.write_table(merged, row_group_size=self.row_group_size)
            self._buffer, self._buffered = [], 0

    def commit(self) -> FileRecord:
        """Finish the file and make it visible under `self.key`."""
        self._flush()
        self._writer.close()
        return self._file.commit()

    def abort(self) -> None:
        """Drop the file (nothing at `self.key` changes)."""
        try:
            self._writer.close()
        except Exception:
            pass
        finally:
            self._file.abort()
