"""The gallery: a few analysed images per variant, with the lens's token maps drawn over them.

For each chosen image (explicit keys, or the first `per_class` images of each class, correct
and misclassified when both exist) it draws, from the Parquet result set alone plus the
shard the image came from (re-read by `vitlens.report.image_source`), `<key>-tokens.png`
(the residual stream's identifiability per block and the last block's top-1 classes) and,
where experiment `explain` ran, `<key>-explain.png` (the explainability maps) and, where `heads`
ran, `<key>-sources.png` (where the CLS reads its class from, block by block); the figures
are described in `vitlens.report.gallery_draw`.

When the shard is gone the maps are drawn without the image and the caption says so; a
variant without `tokens` rows (`detail = "summary"`) gets a note instead of token maps.
Everything here is numpy, PIL and matplotlib (Agg); torch is imported only to apply the
eval transform when an image is found (`vitlens.data.geometry`).

This module is the API (`GallerySelection`, `GalleryFigure`, `write_gallery`,
`write_image_figures`, `gallery_html`, `gallery_markdown`) and the captions; choosing images
and reading their rows live in `vitlens.report.gallery_select`, the array helpers and the
figures in `vitlens.report.gallery_draw` (their public names are re-exported here).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vitlens.errors import UserError
# Used below, and re-exported for the callers that import them from here (tests/test_report_gallery.py).
from vitlens.report.gallery_draw import (  # noqa: F401
    SCORE_CMAP,
    block_panels,
    draw_cells,
    draw_explain_figure,
    draw_source_figure,
    draw_token_figure,
    identifiability_scores,
    label_outline_segments,
    token_grid,
    top1_colour_grid,
)
from vitlens.report.gallery_select import (  # noqa: F401
    ExplainMaps,
    ImageInfo,
    SourceMaps,
    VariantInfo,
    ResultSet,
    select_keys,
)
from vitlens.report.image_source import ImageLookup, load_sample
from vitlens.store.layout import partition_value

#: Sub-folder of the report that holds the gallery's PNGs.
GALLERY_DIR = "gallery"


@dataclass(frozen=True)
class GallerySelection:
    """Which images the gallery draws.

    `keys`: these image keys (in every selected variant that has them); else the first
    `per_class` images (by key) of each class, correct and misclassified ones alternating,
    at most `max_images` per variant. `variants`: only these (default: every variant).
    """

    keys: tuple[str, ...] = ()
    per_class: int = 1
    max_images: int = 8
    variants: tuple[str, ...] = ()


@dataclass(frozen=True)
class GalleryFigure:
    """One drawn PNG (`path` relative to the output folder, POSIX separators) with its caption.

    A `path` of None is a note instead of a figure (e.g. a variant without `tokens` rows):
    `caption` says what is missing and why.
    """

    variant: str
    image_key: str
    path: str | None
    caption: str


# ---------------------------------------------------------------------------------------- the API


def _file_name(key: str, kind: str) -> str:
    return f"{partition_value(key)}-{kind}.png"


def _caption_tokens(variant: VariantInfo, info: ImageInfo, lookup: ImageLookup) -> str:
    verdict = "correct" if info.correct else f"misclassified as {variant.class_name(info.prediction)}"
    outline = ("the object's mask from the shard, through the same eval transform" if lookup.image is not None
               and lookup.image.object_mask is not None else "the boundary of the class-labelled tokens")
    text = (f"{variant.name} · {info.image_key} (true class {variant.class_name(info.class_index)}, {verdict}). "
            f"Residual stream per block: cell colour = identifiability score 1 − rank/C of the true class "
            f"(cividis, C = {variant.num_classes}), white dot = rank 0 (the true class is the token's top-1); "
            f"outline: {outline}. Last panel: every token's top-1 class in block {variant.num_blocks}.")
    if lookup.image is None:
        text += f" Drawn without the image: {lookup.reason}."
    return text


def _caption_explain(variant: VariantInfo, info: ImageInfo, maps: ExplainMaps, lookup: ImageLookup) -> str:
    beside = " and method chefer's global map beside it" if maps.chefer is not None else ""
    text = (f"{variant.name} · {info.image_key}: explainability (§7) for class "
            f"{variant.class_name(info.class_index)}: "
            f"method ours' global map (sum over blocks){beside}, its per-block maps and the per-head maps of the "
            "block with the most positive importance (PuOr: purple negative, orange positive; each group "
            "scaled to its largest |importance|).")
    if lookup.image is None:
        text += f" Drawn without the image: {lookup.reason}."
    return text


def _caption_sources(variant: VariantInfo, info: ImageInfo, lookup: ImageLookup) -> str:
    text = (f"{variant.name} · {info.image_key}: where the CLS reads class {variant.class_name(info.class_index)} "
            "from, block by block (experiment heads, METHOD §3b): each image token's term in the CLS's direct "
            "logit attribution, a(CLS, s) times its value through the head's output columns and the final norm "
            "linearised at the CLS's scale, summed over heads (PuOr: purple against the class, orange for it; "
            "all blocks on one scale).")
    if lookup.image is None:
        text += f" Drawn without the image: {lookup.reason}."
    return text


def _draw_image(results: ResultSet, variant: VariantInfo, experiment: str, info: ImageInfo, tokens: bool,
                out_dir: Path, folder: Path) -> list[GalleryFigure]:
    """Every figure of one image, written under `folder` (paths relative to `out_dir`)."""
    lookup = load_sample(results.shard_urls.get(info.shard), info.shard, info.image_key, variant.data_config)
    figures = []
    if tokens:
        path = draw_token_figure(variant, info, results.token_maps(variant, experiment, info), lookup,
                                 folder / _file_name(info.image_key, "tokens"))
        figures.append(GalleryFigure(variant.name, info.image_key, path.relative_to(out_dir).as_posix(),
                                     _caption_tokens(variant, info, lookup)))
    explain = results.explain_maps(variant, info)
    if explain is not None:
        path = draw_explain_figure(variant, info, explain, lookup, folder / _file_name(info.image_key, "explain"))
        figures.append(GalleryFigure(variant.name, info.image_key, path.relative_to(out_dir).as_posix(),
                                     _caption_explain(variant, info, explain, lookup)))
    sources = results.source_maps(variant, info)
    if sources is not None:
        path = draw_source_figure(variant, info, sources, lookup, folder / _file_name(info.image_key, "sources"))
        figures.append(GalleryFigure(variant.name, info.image_key, path.relative_to(out_dir).as_posix(),
                                     _caption_sources(variant, info, lookup)))
    return figures


def _tokens_note(variant: str) -> GalleryFigure:
    return GalleryFigure(variant, "", None, f"{variant}: no token maps: the gallery needs the `tokens` table "
                         'of a job with detail = "tokens" (this result set has only the summary tier\'s sums).')


def _variant_note(variant: str) -> GalleryFigure:
    return GalleryFigure(variant, "", None, f"{variant}: no gallery: the result set has no `variants` row for it "
                         "(token grid, eval transform, class names; written by jobs of schema v5 on).")


def _check_variants(results: ResultSet, wanted: Sequence[str]) -> list[str]:
    known = results.variant_names()
    unknown = [v for v in wanted if v not in known]
    if unknown:
        raise UserError(f"variant {unknown[0]!r} is not in the result set (it has: {', '.join(known) or 'none'})")
    return list(wanted) or known


def write_gallery(results_dir: str | Path, out_dir: str | Path,
                  selection: GallerySelection = GallerySelection()) -> list[GalleryFigure]:
    """Draw the selected images of every selected variant into `out_dir/gallery/<variant>/`.

    Returns the figures (and notes, `path` None) in order: by variant, then image. Raises
    UserError for a selected variant the result set lacks, or an explicit key no selected
    variant has.
    """
    out = Path(out_dir)
    results = ResultSet(results_dir)
    try:
        variants = _check_variants(results, selection.variants)
        plans = []
        seen_keys: set[str] = set()
        for name in variants:
            experiment = results.experiment(name)
            images = results.images(name, experiment) if experiment else []
            by_key = {i.image_key: i for i in images}
            seen_keys |= by_key.keys()
            keys = ([k for k in selection.keys if k in by_key] if selection.keys
                    else select_keys(images, selection.per_class, selection.max_images))
            plans.append((name, experiment, [by_key[k] for k in keys]))
        missing = [k for k in selection.keys if k not in seen_keys]
        if missing:
            raise UserError(f"image key {missing[0]!r} is not in the images of variant(s) {', '.join(variants)}")
        figures: list[GalleryFigure] = []
        for name, experiment, chosen in plans:
            figures += _draw_variant(results, name, experiment, chosen, out, out / GALLERY_DIR / partition_value(name))
        return figures
    finally:
        results.close()


def _draw_variant(results: ResultSet, name: str, experiment: str | None, chosen: list[ImageInfo], out: Path,
                  folder: Path) -> list[GalleryFigure]:
    if not chosen or experiment is None:
        return []
    variant = results.variant(name)
    if variant is None:
        return [_variant_note(name)]
    tokens = results.has_tokens(name, experiment)
    figures = [] if tokens else [_tokens_note(name)]
    for info in chosen:
        figures += _draw_image(results, variant, experiment, info, tokens, out, folder)
    return figures


def write_image_figures(results_dir: str | Path, variant: str, image_key: str,
                        out_dir: str | Path) -> list[GalleryFigure]:
    """Every gallery figure of one image of one variant, written straight into `out_dir`
    (`vitlens show`). Raises UserError naming an unknown variant or key."""
    out = Path(out_dir)
    results = ResultSet(results_dir)
    try:
        _check_variants(results, [variant])
        experiment = results.experiment(variant)
        images = {i.image_key: i for i in (results.images(variant, experiment) if experiment else [])}
        if image_key not in images:
            raise UserError(f"image key {image_key!r} is not in the images of variant {variant!r}")
        return _draw_variant(results, variant, experiment, [images[image_key]], out, out)
    finally:
        results.close()


# ---------------------------------------------------------------------------------------- snippets


def gallery_html(figures: Sequence[GalleryFigure]) -> str:
    """An HTML fragment: per variant an <h3>, its notes as paragraphs, each figure with its caption."""
    parts: list[str] = []
    variant = None
    for figure in figures:
        if figure.variant != variant:
            variant = figure.variant
            parts.append(f"<h3>{html.escape(variant)}</h3>")
        if figure.path is None:
            parts.append(f"<p class=\"gallery-note\">{html.escape(figure.caption)}</p>")
        else:
            parts.append(f"<figure><img src=\"{html.escape(figure.path)}\" alt=\"{html.escape(figure.image_key)}\">"
                         f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")
    return "\n".join(parts)


def gallery_markdown(figures: Sequence[GalleryFigure]) -> str:
    """A Markdown fragment: per variant a `###` heading, notes, each figure and its caption."""
    parts: list[str] = []
    variant = None
    for figure in figures:
        if figure.variant != variant:
            variant = figure.variant
            parts.append(f"### {variant}\n")
        if figure.path is None:
            parts.append(f"{figure.caption}\n")
        else:
            parts.append(f"![{figure.image_key}]({figure.path})\n\n*{figure.caption}*\n")
    return "\n".join(parts)
