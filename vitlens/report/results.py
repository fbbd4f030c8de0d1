"""A DuckDB connection over a Parquet result set, with one view per table.

There is one view per table of `vitlens.store.schema.TABLES` (`tokens`, `token_summary`,
`residual_match`, `images`, `params`, `runs`, `rejects`, `explain`, `perturbation_curves`);
each has the table's columns plus the hive partition columns `variant` and `experiment`
taken from the folder names. A table without files (e.g. no rejects) is an empty view of
the same columns, so every query runs on any result set.

The per-token queries read `token_summary` and `residual_match`, never `tokens`: a job with
`detail = "summary"` stores those sums, a job with `detail = "tokens"` stores `tokens` rows
and the two views compute the same sums from them (`DERIVED_VIEWS`), so every query gives the
same numbers from either tier — and from a result set that mixes them (a (variant,
experiment) with stored sums is never counted twice).

The views read exactly the files the result set commits (`vitlens.store.committed`): on an
object store (`s3://bucket/prefix`, ...) the files its done-markers name, read through the
same fsspec file system the job wrote with, so an object of a writer killed before its
marker is never counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import duckdb
import pyarrow as pa

from vitlens.errors import UserError
from vitlens.store.committed import ResultFiles, committed_files
from vitlens.store.schema import TABLES, TOKENS_COLUMNS, TOKENS_NULL_WHERE, TOKENS_RANKED, ranked, schema_of
from vitlens.store.storage import open_storage

PARTITION_COLUMNS: tuple[str, ...] = ("variant", "experiment")


def _view_type(kind: pa.DataType) -> pa.DataType:
    """The type DuckDB shows for a stored column: dictionaries as strings, float16 as float32
    (DuckDB reads half floats from Parquet as float, and cannot register Arrow float16)."""
    if pa.types.is_dictionary(kind):
        return pa.string()
    if pa.types.is_float16(kind):
        return pa.float32()
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind):
        return pa.list_(_view_type(kind.value_type))
    return kind


def _view_columns(table: str) -> pa.Schema:
    """The stored columns of `table` as its view shows them (`tokens`: `TOKENS_COLUMNS`)."""
    return TOKENS_COLUMNS if table == "tokens" else schema_of(table)


def _empty_table(table: str) -> pa.Table:
    """An empty Arrow table with `table`'s columns (as the views show them) + partitions."""
    fields = [pa.field(f.name, _view_type(f.type)) for f in _view_columns(table)]
    fields += [pa.field(name, pa.string()) for name in PARTITION_COLUMNS]
    return pa.schema(fields).empty_table()


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _read_sql(files: list[str]) -> str:
    listed = ", ".join(_sql_string(f) for f in files)
    return f"read_parquet([{listed}], hive_partitioning = true, hive_types_autocast = false, union_by_name = true)"


def tokens_select(stored: Collection[str]) -> str:
    """The SELECT list that shows `tokens` files whose (union of) columns is `stored` as the
    `TOKENS_COLUMNS` of schema <= 7, then the partition columns: since v8 a list column is
    stored one column per rank and the nullable columns without nulls
    (`vitlens.store.schema`); a set mixing both layouts reads each row from its own."""
    parts = []
    for name in TOKENS_COLUMNS.names:
        if name in TOKENS_RANKED and ranked(name)[0] in stored:
            listed = "[" + ", ".join(ranked(name)) + "]"
            parts.append(f"coalesce({name}, {listed}) AS {name}" if name in stored else f"{listed} AS {name}")
        elif name in TOKENS_NULL_WHERE:
            column, value = TOKENS_NULL_WHERE[name]
            parts.append(f"CASE WHEN {column} <> {_sql_string(value)} THEN {name} END AS {name}")
        else:
            parts.append(name)
    return ", ".join(parts + [name for name in stored if name in PARTITION_COLUMNS])  # in the files' order


def table_sql(con: duckdb.DuckDBPyConnection, table: str, files: list[str]) -> str:
    """The SELECT of `table`'s rows over its hive-partitioned Parquet `files` (full paths or
    URLs) with the columns its view shows; for `tokens` it reads the files' footers first
    (which layout they have: `tokens_select`)."""
    source = _read_sql(files)
    if table != "tokens":
        return f"SELECT * EXCLUDE (\"table\") FROM {source}"
    stored = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
    return f"SELECT {tokens_select(stored)} FROM {source}"


def view_sql(con: duckdb.DuckDBPyConnection, files: list[str], table: str) -> str:
    """The `CREATE VIEW` statement of one table over its hive-partitioned Parquet files
    (full paths or URLs)."""
    return f"CREATE OR REPLACE VIEW {table} AS {table_sql(con, table, files)}"


#: The summary tier's tables as sums over `tokens` rows: the same columns, in schema order.
DERIVED_VIEWS: dict[str, str] = {
    "token_summary": """
        SELECT image_key, block, stream, token_kind, label,
               count(*)::INTEGER AS tokens,
               sum((identifiability_rank = 0)::INTEGER)::INTEGER AS identifiable,
               sum(identifiability_rank)::BIGINT AS rank_sum,
               sum((correct_logit > sublayer_input_correct_logit)::INTEGER)::INTEGER AS changed,
               sum(key_value_agreement::INTEGER)::INTEGER AS kv_agree,
               sum(non_compositional::INTEGER)::INTEGER AS non_compositional,
               variant, experiment
        FROM tokens
        GROUP BY variant, experiment, image_key, block, stream, token_kind, label""",
    "residual_match": """
        WITH base AS (
            SELECT variant, experiment, image_key, token, token_kind, label, block, stream,
                   top5_class[1] AS top1
            FROM tokens
        )
        SELECT r.image_key, r.block, r.token_kind, r.label,
               count(*)::INTEGER AS tokens,
               sum((r.top1 = a.top1)::INTEGER)::INTEGER AS attn_match,
               sum((r.top1 = m.top1)::INTEGER)::INTEGER AS mlp_match,
               sum((r.top1 = p.top1)::INTEGER)::INTEGER AS previous_match,
               sum((r.top1 <> a.top1 AND r.top1 <> m.top1 AND r.top1 <> p.top1)::INTEGER)::INTEGER AS composite,
               r.variant, r.experiment
        FROM base r
        JOIN base a ON a.variant = r.variant AND a.experiment = r.experiment AND a.image_key = r.image_key
                   AND a.token = r.token AND a.block = r.block AND a.stream = 'attn'
        JOIN base m ON m.variant = r.variant AND m.experiment = r.experiment AND m.image_key = r.image_key
                   AND m.token = r.token AND m.block = r.block AND m.stream = 'mlp'
        JOIN base p ON p.variant = r.variant AND p.experiment = r.experiment AND p.image_key = r.image_key
                   AND p.token = r.token AND p.block = r.block - 1 AND p.stream = 'resid'
        WHERE r.stream = 'resid' AND r.block >= 1
        GROUP BY r.variant, r.experiment, r.image_key, r.block, r.token_kind, r.label""",
    "head_summary": """
        SELECT image_key, block, head, token_kind, label,
               count(*)::INTEGER AS tokens,
               sum(dla)::DOUBLE AS dla_sum,
               variant, experiment
        FROM heads
        GROUP BY variant, experiment, image_key, block, head, token_kind, label""",
}
#: The stored table each derived view sums (the tokens tier's rows).
DERIVED_FROM: dict[str, str] = {"token_summary": "tokens", "residual_match": "tokens", "head_summary": "heads"}


def result_files(results_dir: str | Path) -> ResultFiles:
    """The committed files of a result set (local folder or object-store URL); UserError when
    it holds no table (`table=tokens`, `table=explain`, ...)."""
    storage = open_storage(results_dir)
    try:
        found = committed_files(storage)
    except OSError as err:
        raise UserError(f"--results {storage.root}: cannot list it ({err})") from None
    if not any(key.startswith("table=") for key in found.listing):
        raise UserError(f"--results {storage.root}: no table=... folder there (run a job into it first)")
    return found


def open_results(results_dir: str | Path | ResultFiles) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table of `vitlens.store.schema.TABLES`,
    over the files the result set commits (object stores through their fsspec file system).

    Raises UserError when `results_dir` holds no table folder (`table=tokens`, `table=explain`, ...).
    """
    found = results_dir if isinstance(results_dir, ResultFiles) else result_files(results_dir)
    storage = found.storage
    con = duckdb.connect()
    if not storage.renames:
        con.register_filesystem(storage.fs)
    files = {table: [storage.url(key) for key in found.of_table(table)] for table in TABLES}

    for table in TABLES:
        if files[table]:
            con.execute(view_sql(con, files[table], table))
        else:
            con.register(f"_empty_{table}", _empty_table(table))
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _empty_{table}")
    for table, derived in DERIVED_VIEWS.items():
        if files[DERIVED_FROM[table]]:
            con.execute(view_sql(con, files[table], table).replace(f"VIEW {table} AS", f"VIEW _stored_{table} AS")
                        if files[table] else
                        f"CREATE OR REPLACE VIEW _stored_{table} AS SELECT * FROM _empty_{table}")
            con.execute(
                f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _stored_{table} UNION ALL BY NAME "
                f"SELECT * FROM ({derived}) d WHERE NOT EXISTS (SELECT 1 FROM _stored_{table} s "
                "WHERE s.variant = d.variant AND s.experiment = d.experiment)"
            )
    return con
