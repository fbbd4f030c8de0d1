"""`vitlens query`: run one SQL query of queries/ (or any .sql file) on a result set, or open a shell."""

from __future__ import annotations

import argparse
import code
import json
import sys
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from vitlens.errors import UserError
from vitlens.report.queries import find_query, format_table, list_queries, run_query
from vitlens.report.results import open_results

FORMATS = ("table", "csv", "parquet", "json")

SHELL_BANNER = """vitlens results shell on {root}
  con            DuckDB connection with views tokens, images, params, runs, rejects
  sql("SELECT …")  run SQL, returns a polars DataFrame
  query("table1_identifiability")  run a query of queries/ by name, returns a polars DataFrame
Ctrl-D to leave."""


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens query`."""
    parser = subparsers.add_parser(
        "query",
        help="run a query of queries/ (or a .sql file) on a result set, or open a shell",
        description=(
            "Runs NAME (a file of queries/, e.g. table1_identifiability or stats/kv_agreement_per_image) "
            "or FILE.sql on the Parquet results, over the views tokens, images, params, runs, rejects. "
            "--list shows the queries; --shell opens a Python shell with `con` and `sql(...)`."
        ),
    )
    parser.add_argument("query", nargs="?", help="query name or path of a .sql file")
    parser.add_argument("--results", required=False, help="the results a job wrote: a folder or an object-store URL (s3://bucket/prefix)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write to this file instead of stdout (required for --format parquet)")
    parser.add_argument("--list", action="store_true", help="list the queries of queries/ with their titles")
    parser.add_argument("--shell", action="store_true", help="interactive Python shell over the results")
    parser.set_defaults(func=_query)


def results_namespace(con: duckdb.DuckDBPyConnection) -> dict[str, object]:
    """The shell's names: `con`, `sql(text)` and `query(name)` (both return polars DataFrames)."""

    def sql(text: str) -> pl.DataFrame:
        """Run SQL over the result views; returns a polars DataFrame."""
        return pl.from_arrow(con.sql(text).to_arrow_table())

    def query(name: str) -> pl.DataFrame:
        """Run a query of queries/ by name (or a .sql path); returns a polars DataFrame."""
        return pl.from_arrow(run_query(con, find_query(name)))

    return {"con": con, "sql": sql, "query": query, "pl": pl}


def _write(table: pa.Table, fmt: str, output: Path | None) -> None:
    if fmt == "parquet":
        if output is None:
            raise UserError("--format parquet needs --output FILE.parquet")
        pq.write_table(table, output)
        return
    if fmt == "csv":
        sink = pa.BufferOutputStream()
        pa_csv.write_csv(table, sink)
        text = sink.getvalue().to_pybytes().decode("utf-8")
    elif fmt == "json":
        text = json.dumps(table.to_pylist(), indent=1, default=str) + "\n"
    else:
        text = format_table(table) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


def _query(args: argparse.Namespace) -> int:
    if args.list:
        for query in list_queries() + list_queries("stats"):
            print(f"{query.name:45s} {query.title}")
        return 0
    if args.results is None:
        raise UserError("--results DIR is required (the folder a job wrote)")
    con = open_results(args.results)
    if args.shell:
        code.interact(banner=SHELL_BANNER.format(root=args.results), local=results_namespace(con), exitmsg="")
        return 0
    if not args.query:
        raise UserError("name a query (see `vitlens query --list`), or pass --shell")
    _write(run_query(con, find_query(args.query)), args.format, args.output)
    return 0
