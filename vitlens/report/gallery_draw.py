"""The gallery's drawing side: pure array helpers and the matplotlib figures of one image.

- `<key>-tokens.png` (`draw_token_figure`; the paper's Fig. 1 idea, block by block): the image
  through the variant's eval transform; one panel per residual-stream block whose cells (the
  variant's token grid, `variants.grid_rows × grid_cols`, prefix tokens left out) are coloured
  by the true class's identifiability score `1 − rank / C` (cividis, 0..1, one colour bar),
  with a white dot on every cell of rank 0 (the true class is the token's top-1); the object's
  outline (the shard's mask through the same eval transform; without the shard, the boundary
  of the class-labelled tokens); and the top-1 class of every token in the last block
  (Okabe-Ito colours, class names from `variants.class_names`).
- `<key>-explain.png` (`draw_explain_figure`; the paper's Fig. 5 idea): the global map of
  method `ours` (the sum of its per-block maps), `chefer`'s map beside it when it ran, the
  per-block maps and the per-head maps of the block with the most importance (PuOr: purple
  negative, orange positive; each group scaled to its largest |value|).
- `<key>-sources.png` (`draw_source_figure`; experiment `heads`, METHOD §3b): per block, where
  the CLS reads its class from: every image token's term in the CLS's direct logit attribution
  of the true class, summed over heads (PuOr, all blocks scaled to one largest |value|).

The pure parts (`token_grid`, `identifiability_scores`, `label_outline_segments`,
`top1_colour_grid`, `block_panels`) are numpy only; the drawing uses matplotlib (Agg). The
records drawn come from `vitlens.report.gallery_select`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import Normalize, to_rgb  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from vitlens.report.gallery_select import ExplainMaps, ImageInfo, SourceMaps, TokenMaps, VariantInfo  # noqa: E402
from vitlens.report.image_source import ImageLookup  # noqa: E402

#: At most this many block panels per token figure (evenly spaced, first and last kept).
MAX_BLOCK_PANELS = 16
NCOLS = 6
PANEL_INCHES = 2.3

SCORE_CMAP = "cividis"  # colour-blind safe, monotone in lightness
IMPORTANCE_CMAP = "PuOr_r"  # ColorBrewer diverging, colour-blind safe: purple < 0 < orange
OUTLINE_COLOUR = "#D55E00"  # Okabe-Ito vermillion: visible on cividis' blue and yellow
#: Okabe-Ito: the true class, the model's prediction, then the most frequent other top-1 classes.
TOP1_COLOURS: tuple[str, ...] = ("#0072B2", "#D55E00", "#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#F0E442")
OTHER_COLOUR = "#BBBBBB"


# ---------------------------------------------------------------------------------------- pure parts


def token_grid(values: np.ndarray, grid_rows: int, grid_cols: int, num_prefix_tokens: int) -> np.ndarray:
    """The image tokens' values on the patch grid: `values[P:]` row-major -> [grid_rows, grid_cols].

    values: [P + grid_rows * grid_cols] per token position of the full sequence (prefix first).
    """
    values = np.asarray(values)
    expected = num_prefix_tokens + grid_rows * grid_cols
    if values.shape != (expected,):
        raise ValueError(f"expected {expected} token values ({num_prefix_tokens} prefix + "
                         f"{grid_rows}×{grid_cols} image tokens), got shape {values.shape}")
    return values[num_prefix_tokens:].reshape(grid_rows, grid_cols)


def identifiability_scores(rank: np.ndarray, num_classes: int) -> np.ndarray:
    """`1 − rank / C` per token (1 = the true class is the top-1); NaN where rank < 0 (no token)."""
    rank = np.asarray(rank)
    return np.where(rank >= 0, 1.0 - rank / float(num_classes), np.nan)


Segment = tuple[tuple[float, float], tuple[float, float]]


def label_outline_segments(inside: np.ndarray, cell_height: float, cell_width: float) -> list[Segment]:
    """The boundary of the `inside` cells [R, C] bool as line segments ((x0, y0), (x1, y1)) in
    pixels (x right, y down): every cell edge between an inside cell and an outside cell or the
    grid's border."""
    inside = np.asarray(inside, dtype=bool)
    padded = np.pad(inside, 1, constant_values=False)
    segments = []
    for r, c in zip(*np.nonzero(inside)):
        top, left = r * cell_height, c * cell_width
        bottom, right = top + cell_height, left + cell_width
        if not padded[r, c + 1]:  # above
            segments.append(((left, top), (right, top)))
        if not padded[r + 2, c + 1]:  # below
            segments.append(((left, bottom), (right, bottom)))
        if not padded[r + 1, c]:  # left
            segments.append(((left, top), (left, bottom)))
        if not padded[r + 1, c + 2]:  # right
            segments.append(((right, top), (right, bottom)))
    return segments


def block_panels(num_blocks: int, limit: int = MAX_BLOCK_PANELS) -> list[int]:
    """The residual blocks 0..L drawn as panels: all of them, or `limit` evenly spaced ones
    (0 and L always)."""
    if num_blocks + 1 <= limit:
        return list(range(num_blocks + 1))
    return sorted({round(i * num_blocks / (limit - 1)) for i in range(limit)})


# ---------------------------------------------------------------------------------------- drawing


def _extent(variant: VariantInfo) -> tuple[float, float, float, float]:
    return (0.0, float(variant.input_width), float(variant.input_height), 0.0)


def draw_cells(ax: plt.Axes, grid: np.ndarray, variant: VariantInfo, cmap: str, norm: Normalize,
               image: np.ndarray | None = None, alpha: float = 0.65) -> None:
    """Draw a [R, C] grid of values over the input's pixel frame (NaN cells transparent), on a
    greyed copy of `image` [H, W, 3] when given (then with `alpha`), else opaque."""
    ax.set_facecolor("white")
    if image is not None:
        grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=_extent(variant), interpolation="bilinear")
    ax.imshow(np.ma.masked_invalid(np.asarray(grid, dtype=float)), cmap=cmap, norm=norm, extent=_extent(variant),
              interpolation="nearest", alpha=alpha if image is not None else 1.0)
    _frame(ax, variant)


def _frame(ax: plt.Axes, variant: VariantInfo) -> None:
    ax.set_xlim(0, variant.input_width)
    ax.set_ylim(variant.input_height, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_rank0_dots(ax: plt.Axes, rank_grid: np.ndarray, variant: VariantInfo) -> None:
    """A white dot (black rim) at the centre of every cell of rank 0."""
    rows, cols = np.nonzero(np.asarray(rank_grid) == 0)
    if rows.size == 0:
        return
    cell_h, cell_w = variant.input_height / variant.grid_rows, variant.input_width / variant.grid_cols
    diameter = min(0.3 * PANEL_INCHES * 72 / max(variant.grid_rows, variant.grid_cols), 7.0)
    ax.scatter((cols + 0.5) * cell_w, (rows + 0.5) * cell_h, s=max(diameter, 1.5) ** 2, c="white",
               edgecolors="black", linewidths=0.4, zorder=3)


def draw_outline(ax: plt.Axes, variant: VariantInfo, object_mask: np.ndarray | None,
                 label_grid: np.ndarray | None, colour: str = OUTLINE_COLOUR) -> None:
    """The object's outline: the contour of the transformed mask when there is one, else the
    boundary of the class-labelled tokens."""
    if object_mask is not None and object_mask.any() and not object_mask.all():
        height, width = object_mask.shape
        ax.contour(np.arange(width) + 0.5, np.arange(height) + 0.5, object_mask.astype(float), levels=[0.5],
                   colors=[colour], linewidths=1.2)
    elif label_grid is not None:
        cell_h, cell_w = variant.input_height / variant.grid_rows, variant.input_width / variant.grid_cols
        segments = label_outline_segments(np.asarray(label_grid) == "class", cell_h, cell_w)
        if segments:
            ax.add_collection(LineCollection(segments, colors=[colour], linewidths=1.2, zorder=4))
    _frame(ax, variant)


def top1_colour_grid(top1: np.ndarray, true_class: int, prediction: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """RGB [R, C, 3] of the top-1 class per cell and the legend's (class, colour) pairs: the true
    class, the model's prediction, then the most frequent others; the rest grey; NaN where no token."""
    top1 = np.asarray(top1)
    present = top1 >= 0
    counts: dict[int, int] = {}
    for cls in top1[present].tolist():
        counts[cls] = counts.get(cls, 0) + 1
    order = [true_class] + ([prediction] if prediction != true_class else [])
    order += [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c not in order]
    palette = list(TOP1_COLOURS) if prediction != true_class else [TOP1_COLOURS[0]] + list(TOP1_COLOURS[2:])
    legend = [(cls, palette[i]) for i, cls in enumerate(order[: len(palette)]) if cls in counts or i == 0]
    colours = {cls: colour for cls, colour in legend}
    rgb = np.full((*top1.shape, 3), np.nan)
    for index in zip(*np.nonzero(present)):
        rgb[index] = to_rgb(colours.get(int(top1[index]), OTHER_COLOUR))
    if any(cls not in colours for cls in counts):
        legend.append((-1, OTHER_COLOUR))
    return rgb, legend


def _axes_grid(panels: int, extra_height: float = 0.0) -> tuple[plt.Figure, list[plt.Axes]]:
    ncols = min(NCOLS, panels)
    nrows = math.ceil(panels / ncols)
    size = (PANEL_INCHES * ncols + 1.2, PANEL_INCHES * nrows + 0.9 + extra_height)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[panels:]:
        ax.set_axis_off()
    return fig, flat[:panels]


def _image_panel(ax: plt.Axes, variant: VariantInfo, lookup: ImageLookup, label_grid: np.ndarray | None) -> None:
    if lookup.image is not None:
        ax.imshow(lookup.image.pixels, extent=_extent(variant))
        draw_outline(ax, variant, lookup.image.object_mask, label_grid)
        ax.set_title("image (eval crop)", fontsize=8)
    else:
        ax.text(0.5, 0.5, "image not found:\n" + _wrap(lookup.short or "", 24) + "\n(see the caption)",
                ha="center", va="center", fontsize=7, transform=ax.transAxes)
        draw_outline(ax, variant, None, label_grid)
        ax.set_title("no image", fontsize=8)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def draw_token_figure(variant: VariantInfo, info: ImageInfo, maps: TokenMaps, lookup: ImageLookup, path: Path) -> Path:
    """The token-map figure of one image (see the module docstring) as a PNG at `path`."""
    blocks = block_panels(variant.num_blocks)
    fig, axes = _axes_grid(len(blocks) + 2, extra_height=0.6)
    label_grid = token_grid(maps.label, variant.grid_rows, variant.grid_cols, variant.num_prefix_tokens)
    image = lookup.image.pixels if lookup.image is not None else None
    object_mask = lookup.image.object_mask if lookup.image is not None else None
    _image_panel(axes[0], variant, lookup, label_grid)
    norm = Normalize(0.0, 1.0)
    for ax, block in zip(axes[1:], blocks):
        rank = token_grid(maps.rank[block], variant.grid_rows, variant.grid_cols, variant.num_prefix_tokens)
        draw_cells(ax, identifiability_scores(rank, variant.num_classes), variant, SCORE_CMAP, norm, image)
        draw_rank0_dots(ax, rank, variant)
        draw_outline(ax, variant, object_mask, label_grid)
        present = rank >= 0
        share = 100.0 * float((rank[present] == 0).mean()) if present.any() else float("nan")
        ax.set_title(f"block {block}: {share:.0f}% rank 0", fontsize=8)
    last = variant.num_blocks
    top1 = token_grid(maps.top1[last], variant.grid_rows, variant.grid_cols, variant.num_prefix_tokens)
    rgb, legend = top1_colour_grid(top1, info.class_index, info.prediction)
    ax = axes[-1]
    if image is not None:
        grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=_extent(variant))
    ax.imshow(np.nan_to_num(rgb, nan=1.0), extent=_extent(variant), interpolation="nearest",
              alpha=0.75 if image is not None else 1.0)
    draw_outline(ax, variant, object_mask, label_grid, colour="black")
    ax.set_title(f"top-1 class, block {last}", fontsize=8)
    counts = {int(c): int((top1 == c).sum()) for c in np.unique(top1[top1 >= 0])}
    handles = []
    for cls, colour in legend:
        if cls < 0:
            name = f"other ({sum(n for c, n in counts.items() if c not in dict(legend))})"
        else:
            role = " (true)" if cls == info.class_index else " (predicted)" if cls == info.prediction else ""
            name = f"{variant.class_name(cls)}{role} ({counts.get(cls, 0)})"
        handles.append(Patch(facecolor=colour, edgecolor="black", linewidth=0.3, label=name))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=6, frameon=False)
    _colour_bar(fig, norm, SCORE_CMAP, "identifiability score 1 − rank/C (dot: rank 0)")
    verdict = "correct" if info.correct else f"misclassified as {variant.class_name(info.prediction)}"
    fig.suptitle(f"{variant.name} · {info.image_key}: {variant.class_name(info.class_index)} ({verdict})", fontsize=10)
    return _save(fig, path)


def _colour_bar(fig: plt.Figure, norm: Normalize, cmap: str, label: str) -> None:
    """One colour bar at the figure's right edge, beside every panel."""
    fig.subplots_adjust(right=0.9)
    cax = fig.add_axes((0.925, 0.2, 0.012, 0.6))
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=7)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _scaled(values: np.ndarray | Iterable[np.ndarray]) -> float:
    stacked = np.abs(np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float))
    peak = float(np.nanmax(stacked)) if np.isfinite(stacked).any() else 0.0
    return peak if peak > 0 else 1.0


def draw_explain_figure(variant: VariantInfo, info: ImageInfo, maps: ExplainMaps, lookup: ImageLookup,
                        path: Path) -> Path:
    """The explainability figure of one image: global map(s), per-block maps, the heads of the
    block with the most positive importance; each group scaled to its largest |value|."""
    grid = lambda v: token_grid(v, variant.grid_rows, variant.grid_cols, variant.num_prefix_tokens)  # noqa: E731
    blocks = sorted(maps.ours_blocks)
    top_block = max(blocks, key=lambda b: float(np.nansum(np.clip(maps.ours_blocks[b], 0, None))))
    heads = maps.ours_heads.get(top_block)
    panels: list[tuple[str, np.ndarray, float]] = []
    panels.append(("ours: global (sum of blocks)", grid(maps.ours_global), _scaled(maps.ours_global)))
    if maps.chefer is not None:
        panels.append(("chefer", grid(maps.chefer), _scaled(maps.chefer)))
    block_peak = _scaled(list(maps.ours_blocks.values()))
    panels += [(f"ours: block {b}", grid(maps.ours_blocks[b]), block_peak) for b in blocks]
    if heads is not None:
        head_peak = _scaled(heads)
        panels += [(f"block {top_block}, head {h}", grid(heads[h]), head_peak) for h in range(heads.shape[0])]
    return _diverging_figure(variant, lookup, panels, "importance / largest |importance| of its group",
                             f"{variant.name} · {info.image_key}: explainability for "
                             f"{variant.class_name(info.class_index)}", path)


def _diverging_figure(variant: VariantInfo, lookup: ImageLookup, panels: list[tuple[str, np.ndarray, float]],
                      colour_label: str, title: str, path: Path) -> Path:
    """The image, then one panel per (title, [rows, cols] grid, scale) coloured by value / scale
    on the diverging map (PuOr) with the object's outline; one colour bar."""
    fig, axes = _axes_grid(len(panels) + 1)
    image = lookup.image.pixels if lookup.image is not None else None
    object_mask = lookup.image.object_mask if lookup.image is not None else None
    _image_panel(axes[0], variant, lookup, None)
    norm = Normalize(-1.0, 1.0)
    for ax, (panel_title, values, peak) in zip(axes[1:], panels):
        draw_cells(ax, values / peak, variant, IMPORTANCE_CMAP, norm, image, alpha=0.75)
        draw_outline(ax, variant, object_mask, None, colour="black")
        ax.set_title(panel_title, fontsize=8)
    _colour_bar(fig, norm, IMPORTANCE_CMAP, colour_label)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def draw_source_figure(variant: VariantInfo, info: ImageInfo, maps: SourceMaps, lookup: ImageLookup,
                       path: Path) -> Path:
    """Where the CLS reads the true class from, block by block (METHOD §3b): every image token's
    source term in the CLS's DLA, summed over heads; all blocks share one scale (the largest
    |term|), so blocks compare; a panel's title gives the CLS's DLA and the share of it read
    from the image tokens (the rest comes from the prefix tokens, the CLS itself included)."""
    grid = lambda v: token_grid(v, variant.grid_rows, variant.grid_cols, variant.num_prefix_tokens)  # noqa: E731
    peak = _scaled([values[variant.num_prefix_tokens:] for values in maps.blocks.values()])
    panels = []
    for block, values in maps.blocks.items():
        total = maps.cls_dla[block]
        image_part = float(np.nansum(values[variant.num_prefix_tokens:]))
        share = f"\n{100 * image_part / total:.0f}% of it from image tokens" if abs(total) > 1e-12 else ""
        panels.append((f"block {block}: CLS DLA {total:+.2f}{share}", grid(values), peak))
    return _diverging_figure(variant, lookup, panels, "source term / largest |term| (all blocks)",
                             f"{variant.name} · {info.image_key}: where the CLS reads "
                             f"{variant.class_name(info.class_index)} from", path)
