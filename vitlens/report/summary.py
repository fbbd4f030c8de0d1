"""A first look at a result set: the paper's headline numbers per variant and experiment.

Last block, image tokens only (prefix excluded; for GAP every token is an image token):
identifiability rate pooled over tokens and as a per-image mean, % of images with at
least one identifiable image token, and top-1 accuracy on the same images (METHOD §2).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from vitlens.errors import UserError

SUMMARY_SQL = """
WITH tokens AS (
    SELECT * FROM read_parquet('{root}/table=tokens/*/*/*.parquet', hive_partitioning = true)
), last_block AS (
    SELECT variant, max(block) AS block FROM tokens GROUP BY variant
), per_image AS (
    SELECT t.variant, t.experiment, t.image_key,
           avg((t.identifiability_rank = 0)::DOUBLE) AS rate,
           sum((t.identifiability_rank = 0)::INT) AS identifiable,
           count(*) AS n
    FROM tokens t JOIN last_block USING (variant, block)
    WHERE t.stream = 'resid' AND t.token_kind = 'image'
    GROUP BY ALL
), images AS (
    SELECT variant, experiment, avg(correct::DOUBLE) AS top1
    FROM read_parquet('{root}/table=images/*/*/*.parquet', hive_partitioning = true)
    GROUP BY ALL
)
SELECT p.variant, p.experiment,
       round(100 * sum(p.identifiable) / sum(p.n), 2) AS id_rate_pct,
       round(100 * avg(p.rate), 2) AS id_rate_per_image_pct,
       round(100 * avg((p.identifiable > 0)::DOUBLE), 2) AS images_with_id_token_pct,
       round(100 * any_value(i.top1), 2) AS top1_pct,
       count(*) AS images
FROM per_image p JOIN images i USING (variant, experiment)
GROUP BY p.variant, p.experiment
ORDER BY p.variant, p.experiment
"""


def identifiability_summary(results_dir: str | Path) -> list[dict]:
    """One row per (variant, experiment) with the last-block identifiability figures."""
    root = Path(results_dir)
    if not (root / "table=tokens").is_dir():
        raise UserError(f"{root} holds no tokens table (run a job into it first)")
    con = duckdb.connect()
    cursor = con.execute(SUMMARY_SQL.format(root=root.as_posix()))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def format_table(rows: list[dict]) -> str:
    """Rows as a fixed-width text table (header first)."""
    if not rows:
        return "(no rows)"
    names = list(rows[0])
    cells = [[str(r[n]) for n in names] for r in rows]
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(names), line(["-" * w for w in widths])] + [line(c) for c in cells])
