"""A DuckDB connection over a Parquet result set, with one view per table.

Every query in `queries/` reads the views `tokens`, `images`, `params`, `runs` and
`rejects`; each has the table's columns (vitlens.store.schema) plus the hive partition
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


def _empty_table(table: str) -> pa.Table:
    """An empty Arrow table with `table`'s columns (dictionaries as plain strings) + partitions."""
    fields = [
        pa.field(f.name, pa.string() if pa.types.is_dictionary(f.type) else f.type)
        for f in schema_of(table)
    ]
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
    """An in-memory DuckDB connection with the views `tokens`, `images`, `params`, `runs`, `rejects`.

    Raises UserError when `results_dir` holds no `table=tokens` folder.
    """
    root = Path(results_dir)
    if not (root / "table=tokens").is_dir():
        raise UserError(f"--results {root}: no table=tokens folder there (run a job into it first)")
    con = duckdb.connect()
    for table in TABLES:
        if any((root / f"table={table}").glob("*/*/*.parquet")):
            con.execute(view_sql(root, table))
        else:
            con.register(f"_empty_{table}", _empty_table(table))
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _empty_{table}")
    return con
