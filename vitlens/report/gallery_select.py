"""The gallery's reading side: which images to draw and their rows in the result set.

`select_keys` picks the images of a variant (the first `per_class` of each class, correct and
misclassified alternating); `ResultSet` runs the gallery's queries on one Parquet result set
(`vitlens.report.results`) and returns its rows as the typed records below: `VariantInfo`
(`variants`), `ImageInfo` (`images`), `TokenMaps` (`tokens`, residual stream) and
`ExplainMaps` (`explain`, methods `ours` and `chefer`) and `SourceMaps` (`heads`: where the CLS
reads its class from). Nothing here draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vitlens.report.image_source import shard_url_index
from vitlens.report.results import open_results, result_files, table_sql

#: The lens experiment whose `images`/`tokens` rows the gallery draws (the unperturbed model).
GALLERY_EXPERIMENT = "baseline"
EXPLAIN_EXPERIMENT = "explain"
HEADS_EXPERIMENT = "heads"


@dataclass(frozen=True)
class ImageInfo:
    """One `images` row: what the selection and the captions need."""

    image_key: str
    shard: str
    class_index: int
    class_name: str | None
    prediction: int
    correct: bool


@dataclass(frozen=True)
class VariantInfo:
    """One `variants` row (the token grid and eval transform of a variant)."""

    name: str
    family: str
    num_blocks: int
    num_prefix_tokens: int
    grid_rows: int
    grid_cols: int
    input_height: int
    input_width: int
    num_classes: int
    data_config: dict[str, Any]
    class_names: tuple[str, ...] = field(default=())

    @property
    def num_tokens(self) -> int:
        """Prefix plus image tokens of the full sequence."""
        return self.num_prefix_tokens + self.grid_rows * self.grid_cols

    def class_name(self, index: int) -> str:
        """The class's name, or its index where the variant names none."""
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)


@dataclass(frozen=True)
class TokenMaps:
    """The residual stream's per-token values of one image: rank and top-1 [L+1, T], labels [T]."""

    rank: np.ndarray  # [L+1, T] int, -1 where no row
    top1: np.ndarray  # [L+1, T] int, -1 where no row
    label: np.ndarray  # [T] str ('' where no row)


@dataclass(frozen=True)
class ExplainMaps:
    """The explainability maps of one image, each [T] over the full sequence (NaN: no row)."""

    ours_blocks: dict[int, np.ndarray]  # block -> importance summed over heads
    ours_heads: dict[int, np.ndarray]  # block -> [heads, T]
    chefer: np.ndarray | None

    @property
    def ours_global(self) -> np.ndarray:
        """The global map: the sum of the per-block maps (paper §7)."""
        return np.nansum(np.stack(list(self.ours_blocks.values())), axis=0)


@dataclass(frozen=True)
class SourceMaps:
    """Where the CLS reads its class from (experiment `heads`, METHOD §3b): per block, every
    token's term as a source of the CLS's direct logit attribution, summed over heads, [T] over
    the full sequence (NaN: no row), and the CLS's DLA summed over heads."""

    blocks: dict[int, np.ndarray]  # block -> [T] source terms summed over heads
    cls_dla: dict[int, float]  # block -> the CLS's DLA (= the sum of that block's source terms)


# ---------------------------------------------------------------------------------------- selection


def select_keys(images: Sequence[ImageInfo], per_class: int = 1, max_images: int = 8) -> list[str]:
    """The first `per_class` images (by key) of each class among the correctly classified and,
    separately, among the misclassified ones; then correct and misclassified picks alternate
    (each list in order of (position within its class, class index)) up to `max_images`."""
    groups: dict[tuple[bool, int], list[ImageInfo]] = {}
    for info in sorted(images, key=lambda i: i.image_key):
        groups.setdefault((info.correct, info.class_index), []).append(info)
    picks: dict[bool, list[tuple[int, int, str]]] = {True: [], False: []}
    for (correct, class_index), members in groups.items():
        for position, info in enumerate(members[:per_class]):
            picks[correct].append((position, class_index, info.image_key))
    ordered = {correct: [key for *_, key in sorted(rows)] for correct, rows in picks.items()}
    chosen: list[str] = []
    for index in range(max(len(ordered[True]), len(ordered[False]))):
        for correct in (True, False):
            if index < len(ordered[correct]) and len(chosen) < max_images:
                chosen.append(ordered[correct][index])
    return chosen


# ---------------------------------------------------------------------------------------- reading


class ResultSet:
    """The queries the gallery runs on one result set."""

    def __init__(self, results_dir: str | Path) -> None:
        self.files = result_files(results_dir)
        self.con = open_results(self.files)
        self._tokens_sql: dict[str, str] = {}  # shard file -> SELECT with the view's columns
        specs = [row[0] for row in self.con.execute("SELECT job_spec FROM runs ORDER BY started_at").fetchall()]
        self.shard_urls = shard_url_index(specs)

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def variant_names(self) -> list[str]:
        """Every variant with `images` or `variants` rows, sorted."""
        rows = self.con.execute(
            "SELECT DISTINCT variant FROM images UNION SELECT DISTINCT variant FROM variants").fetchall()
        return sorted(r[0] for r in rows)

    def variant(self, name: str) -> VariantInfo | None:
        """The variant's `variants` row, or None (a result set written before schema v5)."""
        rows = self.con.execute(
            "SELECT family, num_blocks, num_prefix_tokens, grid_rows, grid_cols, input_height, input_width, "
            "num_classes, data_config, class_names FROM variants WHERE variant = ? LIMIT 1", [name]).fetchall()
        if not rows:
            return None
        (family, blocks, prefix, rows_, cols, height, width, classes, config, names) = rows[0]
        return VariantInfo(name, family, int(blocks), int(prefix), int(rows_), int(cols), int(height), int(width),
                           int(classes), json.loads(config), tuple(names or ()))

    def experiment(self, variant: str) -> str | None:
        """`baseline` when the variant has its `images` rows, else the first lens experiment that has."""
        rows = self.con.execute("SELECT DISTINCT experiment FROM images WHERE variant = ?", [variant]).fetchall()
        found = sorted(r[0] for r in rows)
        return GALLERY_EXPERIMENT if GALLERY_EXPERIMENT in found else (found[0] if found else None)

    def images(self, variant: str, experiment: str) -> list[ImageInfo]:
        """The variant's `images` rows of one experiment."""
        rows = self.con.execute(
            "SELECT image_key, shard, class_index, class_name, prediction, correct FROM images "
            "WHERE variant = ? AND experiment = ? ORDER BY image_key", [variant, experiment]).fetchall()
        return [ImageInfo(k, s, int(c), n, int(p), bool(ok)) for k, s, c, n, p, ok in rows]

    def has_tokens(self, variant: str, experiment: str) -> bool:
        """Whether `tokens` rows exist (detail = "tokens")."""
        return bool(self.con.execute("SELECT 1 FROM tokens WHERE variant = ? AND experiment = ? LIMIT 1",
                                     [variant, experiment]).fetchall())

    def _source(self, table: str, variant: str, experiment: str, shard: str) -> tuple[str, list[str]]:
        """The FROM clause and its parameters for one (table, variant, experiment): the shard's
        own file when it exists (one file read instead of the variant's whole table), else the view."""
        key = self.files.shard_file(table, variant, experiment, shard)
        if key is None:
            return f"{table} WHERE variant = ? AND experiment = ? AND", [variant, experiment]
        if table != "tokens":
            return "read_parquet(?)", [self.files.storage.url(key)]
        if key not in self._tokens_sql:  # the view's columns, whichever layout the file has
            self._tokens_sql[key] = f"({table_sql(self.con, table, [self.files.storage.url(key)])})"
        return self._tokens_sql[key], []

    def shard_rows(self, columns: str, table: str, variant: str, experiment: str, shard: str, where: str,
                   params: list[Any]) -> list[tuple]:
        """`SELECT columns FROM table WHERE where` over one (variant, experiment) and the rows of one
        shard (its own file when it exists); `params` fill the `?` of `where`."""
        source, source_params = self._source(table, variant, experiment, shard)
        glue = "" if source.endswith("AND") else " WHERE"
        return self.con.execute(f"SELECT {columns} FROM {source}{glue} {where}", source_params + params).fetchall()

    def token_maps(self, variant: VariantInfo, experiment: str, info: ImageInfo) -> TokenMaps:
        """Rank, top-1 and label of every residual-stream token of one image."""
        rows = self.shard_rows("block, token, label, identifiability_rank, top5_class[1]", "tokens", variant.name,
                            experiment, info.shard, "image_key = ? AND stream = 'resid'", [info.image_key])
        shape = (variant.num_blocks + 1, variant.num_tokens)
        rank, top1 = np.full(shape, -1, dtype=np.int64), np.full(shape, -1, dtype=np.int64)
        label = np.full(variant.num_tokens, "", dtype=object)
        for block, token, lab, r, t in rows:
            if 0 <= block < shape[0] and 0 <= token < shape[1]:
                rank[block, token], top1[block, token] = r, -1 if t is None else t
                label[token] = lab
        return TokenMaps(rank, top1, label)

    def source_maps(self, variant: VariantInfo, info: ImageInfo) -> SourceMaps | None:
        """The CLS's source terms per block of one image (summed over heads), or None."""
        rows = self.shard_rows("block, token, sum(cls_source_dla)", "heads", variant.name, HEADS_EXPERIMENT,
                            info.shard, "image_key = ? AND cls_source_dla IS NOT NULL GROUP BY block, token",
                            [info.image_key])
        blocks: dict[int, np.ndarray] = {}
        for block, token, value in rows:
            if 0 <= token < variant.num_tokens:
                blocks.setdefault(int(block), np.full(variant.num_tokens, np.nan))[token] = value
        dla = {block: float(np.nansum(values)) for block, values in blocks.items()}
        return SourceMaps(dict(sorted(blocks.items())), dla) if blocks else None

    def explain_maps(self, variant: VariantInfo, info: ImageInfo) -> ExplainMaps | None:
        """Method `ours` per block (and head) and `chefer`'s global map of one image, or None."""
        rows = self.shard_rows("method::VARCHAR, block, token, importance, head_importance", "explain", variant.name,
                            EXPLAIN_EXPERIMENT, info.shard, "image_key = ? AND method IN ('ours', 'chefer')",
                            [info.image_key])
        blocks: dict[int, np.ndarray] = {}
        heads: dict[int, np.ndarray] = {}
        chefer = None
        for method, block, token, importance, head_importance in rows:
            if not 0 <= token < variant.num_tokens:
                continue
            if method == "ours" and block is not None:
                blocks.setdefault(block, np.full(variant.num_tokens, np.nan))[token] = importance
                if head_importance:
                    per_head = heads.setdefault(block, np.full((len(head_importance), variant.num_tokens), np.nan))
                    per_head[:, token] = head_importance
            elif method == "chefer" and block is None:
                if chefer is None:
                    chefer = np.full(variant.num_tokens, np.nan)
                chefer[token] = importance
        return ExplainMaps(blocks, heads, chefer) if blocks else None
