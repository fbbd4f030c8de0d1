"""What the explorer asks of a result set, as plain JSON-able records (no HTTP here).

Every query is parameterised (values never enter SQL text) and reads as little as it can:
per-image rows come from the image's own shard files (`ResultSet._select`, the gallery's
reader), so an interaction costs about the same on a result set of any size. The per-image
sort keys, the `baseline` images' rows and the whole set's curves are computed once, when the
explorer opens the result set, into in-memory tables.

Nothing here writes: the connection is an in-memory DuckDB over the result set's committed
files (`vitlens.report.results`), the images are re-read from the shards the runs recorded.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from vitlens.errors import UserError
from vitlens.report.gallery_select import ImageInfo, ResultSet, VariantInfo
from vitlens.report.image_source import load_sample

#: The per-image quantities the image list sorts by (column -> what it is), whitelisted.
SORT_KEYS: dict[str, str] = {
    "image_key": "the image's key",
    "class_index": "the true class",
    "correct": "correctly classified first (descending)",
    "last_block_id_pct": "% of image tokens identifiable in the residual stream of the last block",
    "cls_last_block_rank": "the CLS token's identifiability rank in the last block",
    "ours_negative_auc": "the image's negative deletion-test AUC of method ours (experiment explain): the "
                         "prediction kept with the most important tokens first",
}
STREAMS: tuple[str, ...] = ("resid", "attn", "mlp")
#: The experiment whose rows the explorer shows (the unperturbed model).
EXPERIMENT = "baseline"
MAX_PAGE = 500


class NotFound(UserError):
    """An unknown variant or image key (the server answers 404; other `UserError`s are 400)."""


class ExploreData:
    """One result set opened for the explorer. Not thread-safe: the server serialises calls
    (`vitlens.explore.server`; one DuckDB connection, whose registered views a cursor would not see)."""

    def __init__(self, results_dir: str | Path) -> None:
        self.results = ResultSet(results_dir)
        self._variants = {name: self.results.variant(name) for name in self.results.variant_names()}
        self._has_tokens = {name: self.results.has_tokens(name, EXPERIMENT) for name in self._variants}
        con = self.results.con
        # once, from the summary view (either tier): every image's residual-stream counts per
        # block and token kind; the sort keys, the whole set's curves and any images' curves
        # are small queries on it
        con.execute("""
            CREATE TABLE image_curves AS
            SELECT variant, image_key, block, token_kind::VARCHAR AS token_kind,
                   sum(identifiable)::BIGINT AS identifiable, sum(tokens)::BIGINT AS tokens,
                   sum(rank_sum)::BIGINT AS rank_sum
            FROM token_summary
            WHERE experiment = 'baseline' AND stream = 'resid' AND token_kind IN ('cls', 'image')
            GROUP BY ALL""")
        con.execute("""
            CREATE TABLE image_stats AS
            WITH depth AS (SELECT variant, max(block) AS depth FROM image_curves GROUP BY variant)
            SELECT c.variant, c.image_key,
                   100.0 * sum(c.identifiable) FILTER (WHERE c.token_kind = 'image')
                         / nullif(sum(c.tokens) FILTER (WHERE c.token_kind = 'image'), 0) AS last_block_id_pct,
                   sum(c.rank_sum) FILTER (WHERE c.token_kind = 'cls') AS cls_last_block_rank
            FROM image_curves c JOIN depth d ON d.variant = c.variant AND c.block = d.depth
            GROUP BY c.variant, c.image_key""")
        con.execute("""
            CREATE TABLE image_auc AS
            WITH points AS (
                SELECT variant, image_key, kept_fraction::DOUBLE AS x, correct::INT AS y,
                       lag(kept_fraction::DOUBLE) OVER w AS x0, lag(correct::INT) OVER w AS y0
                FROM perturbation_curves
                WHERE experiment = 'explain' AND method = 'ours' AND test = 'negative'
                WINDOW w AS (PARTITION BY variant, image_key ORDER BY kept_tokens))
            SELECT variant, image_key, coalesce(sum((x - x0) * (y + y0) / 2.0), 0) AS ours_negative_auc
            FROM points GROUP BY variant, image_key""")
        con.execute("""
            CREATE TABLE image_index AS
            SELECT variant, image_key, shard, class_index, class_name, prediction, correct FROM images
            WHERE experiment = 'baseline'""")
        con.execute("""
            CREATE TABLE set_curves AS
            SELECT variant, block, token_kind, 100.0 * sum(identifiable) / sum(tokens) AS id_rate_pct
            FROM image_curves GROUP BY variant, block, token_kind""")

    def close(self) -> None:
        """Close the connection."""
        self.results.close()

    def _rows(self, sql: str, params: list[Any]) -> list[tuple]:
        """The rows of one parameterised query."""
        return self.results.con.execute(sql, params).fetchall()

    # ---- variants and images --------------------------------------------------------------
    def variant(self, name: str) -> VariantInfo:
        """The variant's facts, or UserError naming it."""
        info = self._variants.get(name)
        if info is None:
            raise NotFound(f"unknown variant {name!r}")
        return info

    def variants(self) -> list[dict[str, Any]]:
        """Every variant: its token grid, classes, whether `tokens` rows exist, its random twin."""
        out = []
        for name, info in self._variants.items():
            if info is None:
                continue
            twin = f"{name}@random"
            out.append({
                "name": name, "family": info.family, "num_blocks": info.num_blocks,
                "num_prefix_tokens": info.num_prefix_tokens, "grid_rows": info.grid_rows, "grid_cols": info.grid_cols,
                "num_classes": info.num_classes, "class_names": list(info.class_names),
                "has_tokens": self._has_tokens[name], "twin": twin if self._variants.get(twin) else None,
            })
        return out

    def images(self, variant: str, class_index: int | None = None, correct: bool | None = None,
               shard: str | None = None, sort: str = "image_key", descending: bool = False,
               limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """One page of the variant's images, filtered and sorted (`SORT_KEYS`), with the count."""
        self.variant(variant)
        if sort not in SORT_KEYS:
            raise UserError(f"unknown sort {sort!r}: use one of {sorted(SORT_KEYS)}")
        where, params = ["i.variant = ?"], [variant]
        for column, value in (("i.class_index", class_index), ("i.correct", correct), ("i.shard", shard)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        table = {"last_block_id_pct": "s", "cls_last_block_rank": "s", "ours_negative_auc": "a"}.get(sort, "i")
        order = f"{table}.{sort}"
        direction = "DESC" if descending else "ASC"
        base = (f"FROM image_index i LEFT JOIN image_stats s ON s.variant = i.variant AND s.image_key = i.image_key "
                f"LEFT JOIN image_auc a ON a.variant = i.variant AND a.image_key = i.image_key "
                f"WHERE {' AND '.join(where)}")
        (total,) = self._rows(f"SELECT count(*) {base}", params)[0]
        rows = self._rows(
            f"SELECT i.image_key, i.shard, i.class_index, i.class_name, i.prediction, i.correct, "
            f"s.last_block_id_pct, s.cls_last_block_rank, a.ours_negative_auc {base} "
            f"ORDER BY {order} {direction} NULLS LAST, i.image_key LIMIT ? OFFSET ?",
            params + [max(1, min(int(limit), MAX_PAGE)), max(0, int(offset))])
        names = ("image_key", "shard", "class_index", "class_name", "prediction", "correct", "last_block_id_pct",
                 "cls_last_block_rank", "ours_negative_auc")
        return {"total": int(total), "images": [dict(zip(names, row)) for row in rows]}

    def image_info(self, variant: str, key: str) -> ImageInfo:
        """The image's `images` row, or UserError naming the key."""
        rows = self._rows("SELECT image_key, shard, class_index, class_name, prediction, correct FROM image_index "
                          "WHERE variant = ? AND image_key = ?", [variant, key])
        if not rows:
            raise NotFound(f"image key {key!r} is not in the images of variant {variant!r}")
        k, s, c, n, p, ok = rows[0]
        return ImageInfo(k, s, int(c), n, int(p), bool(ok))

    # ---- one image ------------------------------------------------------------------------
    def tokens(self, variant: str, key: str, block: int, stream: str) -> dict[str, Any]:
        """Every token of one image at one block and stream: label, fg_fraction, rank, score
        1 − rank/C, top-5 classes and logits (needs `detail = "tokens"`)."""
        info = self.variant(variant)
        if stream not in STREAMS:
            raise UserError(f"unknown stream {stream!r}: use one of {STREAMS}")
        image = self.image_info(variant, key)
        if not self._has_tokens[variant]:
            raise UserError(f"variant {variant!r} has no tokens rows: token views need a job with detail = \"tokens\"")
        rows = self.results.shard_rows(
            "token, token_kind::VARCHAR, label::VARCHAR, fg_fraction, identifiability_rank, correct_logit, "
            "top5_class, top5_logit", "tokens", variant, EXPERIMENT, image.shard,
            "image_key = ? AND block = ? AND stream = ? ORDER BY token", [key, int(block), stream])
        tokens = [{"token": t, "kind": kind, "label": label, "fg_fraction": fg, "rank": rank,
                   "score": 1.0 - rank / info.num_classes, "correct_logit": logit,
                   "top5": [{"class": int(c), "name": info.class_name(int(c)), "logit": float(v)}
                            for c, v in zip(classes, values)]}
                  for t, kind, label, fg, rank, logit, classes, values in rows]
        return {"variant": variant, "image_key": key, "block": int(block), "stream": stream,
                "class_index": image.class_index, "prediction": image.prediction, "correct": image.correct,
                "tokens": tokens}

    def picture(self, variant: str, key: str) -> bytes:
        """The image through the variant's eval transform with the object's outline (vermillion),
        as PNG bytes; UserError when its shard cannot be read."""
        from PIL import Image

        info = self.variant(variant)
        image = self.image_info(variant, key)
        lookup = load_sample(self.results.shard_urls.get(image.shard), image.shard, key, info.data_config)
        if lookup.image is None:
            raise UserError(f"image {key!r} cannot be drawn: {lookup.reason}")
        pixels = np.array(lookup.image.pixels, dtype=np.uint8, copy=True)
        mask = lookup.image.object_mask
        if mask is not None:
            inside = mask.astype(bool)
            edge = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1)
                              & np.roll(inside, -1, 1))
            pixels[edge] = (213, 94, 0)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    def heads(self, variant: str, key: str) -> dict[str, Any]:
        """The block × head direct logit attribution of the true class on the token the head
        reads (the CLS, else the mean over image tokens) for one image (experiment `heads`),
        from the image's own shard file (`heads` rows, or the summary tier's `head_summary`)."""
        self.variant(variant)
        shard = self.image_info(variant, key).shard
        rows = self.results.shard_rows(
            "block, head, token_kind::VARCHAR, avg(dla)", "heads", variant, "heads", shard,
            "image_key = ? AND token_kind IN ('cls', 'image') GROUP BY ALL ORDER BY ALL", [key])
        if not rows:
            rows = self.results.shard_rows(
                "block, head, token_kind::VARCHAR, sum(dla_sum) / sum(tokens)", "head_summary", variant, "heads",
                shard, "image_key = ? AND token_kind IN ('cls', 'image') GROUP BY ALL ORDER BY ALL", [key])
        kinds = {kind for _, _, kind, _ in rows}
        kind = "cls" if "cls" in kinds else "image"
        return {"token_kind": kind, "cells": [{"block": b, "head": h, "dla": v} for b, h, k, v in rows if k == kind]}

    def explain(self, variant: str, key: str) -> dict[str, Any]:
        """Method `ours`' per-block maps (summed over heads) and per-head maps of one image."""
        info = self.variant(variant)
        maps = self.results.explain_maps(info, self.image_info(variant, key))
        if maps is None:
            return {"blocks": {}}
        clean = lambda values: [None if not np.isfinite(v) else float(v) for v in values]  # noqa: E731
        return {"blocks": {str(b): clean(v) for b, v in maps.ours_blocks.items()},
                "heads": {str(b): [clean(row) for row in v] for b, v in maps.ours_heads.items()}}

    def curves(self, variant: str, keys: list[str]) -> dict[str, Any]:
        """Identifiability per block (residual stream) of the chosen images beside the whole
        set's, for the variant and its random twin."""
        self.variant(variant)
        names = [variant] + ([f"{variant}@random"] if self._variants.get(f"{variant}@random") else [])
        out: dict[str, Any] = {}
        for name in names:
            whole = self._rows("SELECT block, token_kind, id_rate_pct FROM set_curves WHERE variant = ? ORDER BY ALL",
                               [name])
            chosen: list[tuple] = []
            if keys:
                marks = ", ".join("?" for _ in keys)
                chosen = self._rows(
                    "SELECT block, token_kind, 100.0 * sum(identifiable) / sum(tokens) FROM image_curves "
                    f"WHERE variant = ? AND image_key IN ({marks}) GROUP BY ALL ORDER BY ALL", [name, *keys])
            out[name] = {"set": [list(r) for r in whole], "chosen": [list(r) for r in chosen]}
        return out
