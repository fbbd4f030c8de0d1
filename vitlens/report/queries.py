"""The SQL of `queries/`: finding a query by name or file, running it, formatting the result.

Convention (queries/README.md): each file is one DuckDB statement over the views that
`vitlens.report.results.open_results` registers (`tokens`, `images`, `params`, `runs`,
`rejects`, `explain`, `perturbation_curves`); its first line is `-- title: ...`, the header comment names the paper's
table/figure and the columns. `queries/*.sql` are the paper's tables; `queries/stats/*.sql`
are the per-unit inputs of the statistical tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from vitlens.errors import UserError

# The paper's SQL: `vitlens/queries` is a link to the repository's `queries/` folder in a
# checkout and a real folder in an installed wheel (package data), so both find the files.
QUERIES_DIR = Path(__file__).parents[1] / "queries"


@dataclass(frozen=True)
class Query:
    """One SQL file: `name` is its path below queries/ without `.sql` (e.g. `stats/kv_agreement_per_image`)."""

    name: str
    title: str
    sql: str
    path: Path

    @property
    def header(self) -> str:
        """The header comment below the title line, as plain text lines."""
        lines = []
        for line in self.sql.splitlines()[1:]:
            if not line.startswith("--"):
                break
            lines.append(line[2:].removeprefix(" "))
        return "\n".join(lines)


def _title(sql: str, fallback: str) -> str:
    first = sql.lstrip().splitlines()[0] if sql.strip() else ""
    return first.split("title:", 1)[1].strip() if first.startswith("--") and "title:" in first else fallback


def load_query_file(path: str | Path, name: str | None = None) -> Query:
    """Read one `.sql` file; raises UserError naming the file when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"query file {path} does not exist")
    sql = path.read_text(encoding="utf-8")
    if not sql.strip():
        raise UserError(f"query file {path} is empty")
    return Query(name=name or path.stem, title=_title(sql, path.stem), sql=sql, path=path)


def list_queries(group: str = "") -> list[Query]:
    """The queries of `queries/` (`group=""`) or of a sub-folder (`group="stats"`), sorted by name."""
    folder = QUERIES_DIR / group
    if not folder.is_dir():
        raise UserError(f"the queries folder {folder} is missing (reinstall vitlens: its SQL ships as package data)")
    prefix = f"{group}/" if group else ""
    return [load_query_file(p, prefix + p.stem) for p in sorted(folder.glob("*.sql"))]


def find_query(name_or_file: str) -> Query:
    """A query by name (`table1_identifiability`, `stats/kv_agreement_per_image`) or by `.sql` path."""
    if name_or_file.endswith(".sql") and Path(name_or_file).is_file():
        return load_query_file(name_or_file)
    path = QUERIES_DIR / f"{name_or_file.removesuffix('.sql')}.sql"
    if path.is_file():
        return load_query_file(path, name_or_file.removesuffix(".sql"))
    known = ", ".join(q.name for q in list_queries() + list_queries("stats"))
    raise UserError(f"no query named {name_or_file!r} and no such .sql file (known: {known})")


def run_query(con: duckdb.DuckDBPyConnection, query: Query) -> pa.Table:
    """Run `query` on a connection from `open_results`; a SQL error becomes a UserError naming the file."""
    try:
        return con.sql(query.sql).to_arrow_table()
    except duckdb.Error as err:
        raise UserError(f"query {query.path}: {str(err).splitlines()[0]}") from None


def format_cell(value: object) -> str:
    """One value for display: 2 decimals from 1 up (percentages), 4 below, 3 significant digits under 0.01 (p-values)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.4f}"
    return str(value)


def format_table(table: pa.Table) -> str:
    """A fixed-width text table (header, rule, rows)."""
    names = table.column_names
    cells = [[format_cell(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    return "\n".join([line(names), line(["-" * w for w in widths])] + [line(c) for c in cells])


def format_markdown(table: pa.Table) -> str:
    """A GitHub-flavoured Markdown table."""
    names = table.column_names
    rows = [[format_cell(v) for v in row.values()] for row in table.to_pylist()]
    out = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
