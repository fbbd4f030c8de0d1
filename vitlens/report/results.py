"""A DuckDB connection over a Parquet result set, with one view per table.

Every query in `queries/` reads the views `tokens`, `images`, `params`, `runs`,
`rejects`, `explain` and `perturbation_curves`; each has the table's columns (vitlens.store.schema) plus the hive partition
columns `variant` and `experiment` taken from the folder names. A table without files
(e.g. no rejects) is an empty view of the same columns, so every query runs on any result set.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from vitlens.errors import UserError
from vitlens.store.schema import TABLES, schema_of

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


def _empty_table(table: str) -> pa.Table:
    """An empty Arrow table with `table`'s columns (as the views show them) + partitions."""
    fields = [pa.field(f.name, _view_type(f.type)) for f in schema_of(table)]
    fields += [pa.field(name, pa.string()) for name in PARTITION_COLUMNS]
    return pa.schema(fields).empty_table()


def view_sql(root: Path, table: str) -> str:
    """The `CREATE VIEW` statement of one table over its hive-partitioned Parquet files."""
    pattern = (root / f"table={table}" / "*" / "*" / "*.parquet").as_posix().replace("'", "''")
    return (
        f"CREATE OR REPLACE VIEW {table} AS SELECT * EXCLUDE (\"table\") FROM read_parquet("
        f"'{pattern}', hive_partitioning = true, hive_types_autocast = false, union_by_name = true)"
    )


def open_results(results_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table of `vitlens.store.schema.TABLES`.

    Raises UserError when `results_dir` holds no table folder (`table=tokens`, `table=explain`, ...).
    """
    root = Path(results_dir)
    if not any((root / f"table={table}").is_dir() for table in TABLES):
        raise UserError(f"--results {root}: no table=... folder there (run a job into it first)")
    con = duckdb.connect()
    for table in TABLES:
        if any((root / f"table={table}").glob("*/*/*.parquet")):
            con.execute(view_sql(root, table))
        else:
            con.register(f"_empty_{table}", _empty_table(table))
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _empty_{table}")
    return con
