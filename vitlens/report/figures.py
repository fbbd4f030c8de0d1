"""The paper's figures drawn from query results with matplotlib (Agg backend, PNG files).

Every figure is a grid of panels (one per value of `panel_by`; one row unless the spec sets
`columns`), by default the normalised block on the x-axis (variants of different depth share
it) and one line per value of `line_by`.

Styles, the same in every figure:

- colours: the Okabe–Ito colour-blind-safe palette (`PALETTE`), one per variant; a random
  twin NAME@random has NAME's colour. With another `line_by` column (e.g. `method` for the
  deletion curves) every distinct value gets its own colour.
- line styles: solid = trained weights, dashed = the random-weight twin (a variant named
  NAME@random, or a `twin` series holding the twin's values); a `secondary` series of the
  same variant (misclassified images, the lens beside the probe) is dotted (dash-dot for a
  twin's) with square markers; a `tertiary` one (a third quantity: the probes beside the tuned
  and logit lenses) is dash-dot-dotted with triangle markers. The legend names every line with its own handle and adds
  "dashed = random-weight twin" / "dotted = ..." whenever such lines are drawn.
- size: at most `MAX_WIDTH_IN` inches at `DPI` (= the HTML page's 1200 px), so the page shows
  the PNG unscaled, with fonts of at least `MIN_FONT_PT` pt; the legend sits below the panels.

An empty result draws one panel carrying the section's reason (`empty_reason`).

Heatmaps (`HeatmapSpec`, `draw_heatmap`): one panel per value of `panel_by` (a variant beside
its @random twin), `y` down and `x` across, a diverging colour map centred on 0 (blue < 0 <
red, symmetric limits per panel, so a head writing against the class shows as blue).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

#: Okabe & Ito (2008), ordered so the first colours contrast most on white (yellow last).
PALETTE: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
                            "#F0E442")
DPI = 100
MAX_WIDTH_IN = 12.0  # x DPI = the page's max width (1200 px): the PNG is shown unscaled
PANEL_WIDTH_IN = 3.6
PANEL_HEIGHT_IN = 3.0
MIN_FONT_PT = 11
FONTS = {"font.size": 12, "axes.titlesize": 12, "axes.labelsize": 12, "xtick.labelsize": 11,
         "ytick.labelsize": 11, "legend.fontsize": 11, "figure.titlesize": 13}

#: Series roles: `main` (solid; dashed for a NAME@random line), `twin` (the twin's values in
#: the trained variant's row: dashed), `secondary` (a second quantity of the same line: dotted).
ROLES: tuple[str, ...] = ("main", "twin", "secondary", "tertiary")
TWIN_NOTE = "dashed = random-weight twin (NAME@random)"


@dataclass(frozen=True)
class FigureSpec:
    """How to draw one query's result: panels, x column, (y column, role, legend suffix)s.

    `line_by` is the column giving one line (and colour) per distinct value in every panel;
    `columns` wraps the panels into rows of that many (0: one row); `only` keeps the rows
    whose (column, value) pairs all match before drawing.
    """

    name: str
    query: str
    title: str
    panel_by: tuple[str, ...]
    series: tuple[tuple[str, str, str], ...]
    ylabel: str
    x: str = "normalised_block"
    xlabel: str = "normalised block (block / L)"
    series_as_panels: bool = False
    line_by: str = "variant"
    columns: int = 0
    only: tuple[tuple[str, str], ...] = ()


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("fig2_identifiability_by_block", "fig2_identifiability_by_block",
               "Fig. 2: mean class identifiability score", ("token_kind",),
               (("mean_score", "main", ""),), "mean identifiability score 1 - rank/C"),
    FigureSpec("fig3a_class_context_by_block", "fig3a_class_context_by_block",
               "Fig. 3a: class- vs context-labelled image tokens", ("label",),
               (("mean_score", "main", ""),), "mean identifiability score 1 - rank/C"),
    FigureSpec("fig3b_class_similarity_change", "fig3b_class_similarity_change",
               "Fig. 3b: class similarity change rate", ("sublayer", "token_kind"),
               (("change_rate_pct", "main", ""),), "% tokens whose correct logit rises"),
    FigureSpec("fig3c_residual_top1_match", "fig3c_residual_top1_match",
               "Fig. 3c: residual top-1 matches the attention / MLP / previous residual top-1, or none",
               ("token_kind",),
               (("attn_pct", "main", " attn"), ("mlp_pct", "main", " mlp"),
                ("previous_resid_pct", "main", " previous resid"), ("composite_pct", "main", " composite")),
               "% tokens", series_as_panels=True, columns=4),
    FigureSpec("fig4a_class_value_agreement", "fig4a_class_value_agreement",
               "Fig. 4a: class-value agreement, trained vs random-weight twin", ("sublayer",),
               (("mean_agreement", "main", ""), ("random_mean_agreement", "twin", "@random")),
               "mean max cosine over memories"),
    FigureSpec("fig4b_key_value_agreement", "fig4b_key_value_agreement",
               "Fig. 4b: key-value agreement rate", ("sublayer",),
               (("kv_agreement_pct", "main", ""),), "% tokens"),
    FigureSpec("kv_agreement_correct_vs_misclassified", "kv_agreement_correct_vs_misclassified",
               "Key-value agreement: correct (solid) vs misclassified (dotted) images", ("sublayer",),
               (("correct_pct", "main", " correct"), ("misclassified_pct", "secondary", " misclassified")),
               "% tokens"),
    FigureSpec("compositionality", "compositionality",
               "Compositionality of sub-layer predictions", ("sublayer",),
               (("compositional_pct", "main", ""),), "% tokens with a composite top-1"),
    FigureSpec("explain_deletion_curves", "explain_deletion_curves",
               "Section 7: deletion curves (negative: most important tokens kept first; "
               "positive: least important first)", ("variant", "test"),
               (("accuracy_pct", "main", ""),), "top-1 accuracy %",
               x="kept_fraction", xlabel="kept fraction of image tokens", line_by="method", columns=4),
    FigureSpec("explain_importance_by_block", "explain_importance_by_block",
               "Section 7: mean gradient importance of class- vs context-labelled tokens", ("label",),
               (("mean_importance", "main", ""),), "mean importance (ours, sum over heads)"),
    FigureSpec("probe_accuracy_by_block", "probe_accuracy_by_block",
               "Section 8: linear probe accuracy (solid) vs the lens's identifiability rate (dotted), "
               "image tokens", ("stream",),
               (("probe_acc_pct", "main", " probe"), ("lens_id_rate_pct", "secondary", " lens")),
               "% image tokens with the true class top-1", only=(("token_kind", "image"),)),
    FigureSpec("tuned_vs_logit_by_block", "tuned_vs_logit_by_block",
               "Tuned lens (solid, ridge-fitted affine maps; not Belrose et al.'s KL-trained lens) vs the "
               "logit lens (dotted) and the residual-stream probes (dash-dot-dot)", ("token_kind",),
               (("tuned_id_rate_pct", "main", " tuned"), ("lens_id_rate_pct", "secondary", " logit lens"),
                ("probe_acc_pct", "tertiary", " probe")),
               "% tokens with the true class top-1"),
)


@dataclass(frozen=True)
class HeatmapSpec:
    """How to draw one query's result as heatmaps: one panel per `panel_by` value, `y` rows
    (top to bottom) by `x` columns, coloured by `value`."""

    name: str
    query: str
    title: str
    panel_by: tuple[str, ...]
    x: str
    y: str
    value: str
    colorbar: str


HEATMAPS: tuple[HeatmapSpec, ...] = (
    HeatmapSpec("heads_by_block", "heads_by_block",
                "Heads: mean direct logit attribution of the true class (METHOD §3b), per block and head",
                ("variant", "token_kind"), "head", "block", "mean_dla", "mean DLA (logit units)"),
)


def draw_heatmap(spec: HeatmapSpec, result: pa.Table, path: Path, empty_reason: str | None = None) -> Path:
    """Draw `spec` from its query's result into the PNG `path` (an empty result: one panel
    with `empty_reason`).

    # result rows: (panel_by..., x, y, value) -> one [y, x] grid per panel
    """
    frame = pl.from_arrow(result)
    panels = frame.select(spec.panel_by).unique().sort(spec.panel_by).rows() if len(frame) else []
    with plt.rc_context(FONTS):
        ncols = max(1, min(len(panels), int(MAX_WIDTH_IN // 2.8)))
        nrows = max(1, -(-len(panels) // ncols))
        width = min(MAX_WIDTH_IN, PANEL_WIDTH_IN * ncols + 0.8)
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, PANEL_HEIGHT_IN * nrows + 0.9), squeeze=False)
        for ax, values in zip(axes.flat, panels):
            rows = frame.filter(pl.all_horizontal([pl.col(c) == v for c, v in zip(spec.panel_by, values)]))
            xs, ys = sorted(rows[spec.x].unique().to_list()), sorted(rows[spec.y].unique().to_list())
            grid = [[float("nan")] * len(xs) for _ in ys]
            for x, y, v in rows.select(spec.x, spec.y, spec.value).iter_rows():
                grid[ys.index(y)][xs.index(x)] = float("nan") if v is None else v
            limit = max((abs(v) for row in grid for v in row if v == v), default=1.0) or 1.0
            image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_yticks(range(len(ys)), [str(y) for y in ys])
            ax.set_xlabel(spec.x)
            ax.set_ylabel(spec.y)
            ax.set_title(", ".join(str(v) for v in values))
            fig.colorbar(image, ax=ax, label=spec.colorbar, shrink=0.85)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_axis_off()
        if not panels:
            ax = axes[0][0]
            ax.set_axis_off()
            ax.text(0.5, 0.5, textwrap.fill(f"No rows: {empty_reason or 'no rows in this result set'}", 40),
                    ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(textwrap.fill(spec.title, int(width * 72 / (0.55 * FONTS["figure.titlesize"]))))
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(spec: FigureSpec, frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame, tuple]]:
    """(title, rows, series) per panel; with `series_as_panels` one panel per value x series."""
    if not len(frame):
        return []
    panels = []
    for values in frame.select(spec.panel_by).unique().sort(spec.panel_by).rows():
        rows = frame.filter(pl.all_horizontal([pl.col(c) == v for c, v in zip(spec.panel_by, values)]))
        title = ", ".join(str(v) for v in values)
        if spec.series_as_panels:
            panels += [(f"{title}: {suffix.strip()}", rows, ((column, "main", ""),))
                       for column, _, suffix in spec.series]
        else:
            panels.append((title, rows, spec.series))
    return panels


def is_twin(value: str) -> bool:
    """Whether a variant name is a random-weight twin (NAME@random)."""
    return value.endswith("@random")


def colours(values: list[str], twins_share: bool = True) -> dict[str, str]:
    """One palette colour per value; with `twins_share` a random twin NAME@random has NAME's colour."""
    def base(v: str) -> str:
        return v.split("@", 1)[0] if twins_share else v

    bases = sorted({base(v) for v in values})
    return {v: PALETTE[bases.index(base(v)) % len(PALETTE)] for v in values}


def line_style(role: str, twin: bool) -> tuple[object, str]:
    """(line style, marker) of a series role for a trained line or a twin's (`twin`)."""
    if role == "secondary":
        return ("-." if twin else ":"), "s"
    if role == "tertiary":
        return ("--" if twin else (0, (5, 1, 1, 1, 1, 1))), "^"
    return ("--" if twin or role == "twin" else "-"), "o"


def _note_handles(roles_drawn: set[tuple[str, bool]], spec: FigureSpec) -> dict[str, Line2D]:
    """Legend entries explaining the line styles that were drawn."""
    notes: dict[str, Line2D] = {}
    if any(twin or role == "twin" for role, twin in roles_drawn):
        notes[TWIN_NOTE] = Line2D([], [], color="0.3", linestyle="--")
    secondary = next((suffix.strip() for _, role, suffix in spec.series if role == "secondary"), "")
    if ("secondary", False) in roles_drawn:
        notes[f"dotted = {secondary}"] = Line2D([], [], color="0.3", linestyle=":", marker="s")
    if ("secondary", True) in roles_drawn:
        notes[f"dash-dot = {secondary}, random-weight twin"] = Line2D([], [], color="0.3", linestyle="-.", marker="s")
    tertiary = next((suffix.strip() for _, role, suffix in spec.series if role == "tertiary"), "")
    if ("tertiary", False) in roles_drawn:
        notes[f"dash-dot-dot = {tertiary}"] = Line2D([], [], color="0.3", linestyle=(0, (5, 1, 1, 1, 1, 1)),
                                                     marker="^")
    return notes


def _grid(n_panels: int, spec: FigureSpec) -> tuple[int, int, float]:
    """(rows, columns, figure width in inches) of a figure of `n_panels` panels."""
    ncols = max(1, n_panels)
    if spec.columns:
        ncols = min(ncols, spec.columns)
    ncols = min(ncols, int(MAX_WIDTH_IN // 2.8))  # at least 2.8 in per panel
    nrows = max(1, -(-n_panels // ncols))
    return nrows, ncols, min(MAX_WIDTH_IN, PANEL_WIDTH_IN * ncols + 0.8)


def _legend_columns(labels: list[str], width_in: float) -> int:
    """How many legend columns fit the figure's width at the legend's font size."""
    longest = max(len(label) for label in labels)
    column_in = (longest * 0.55 * FONTS["legend.fontsize"] + 45) / 72  # text + handle, in inches
    return max(1, min(len(labels), int((width_in - 0.2) // column_in)))


def draw_figure(spec: FigureSpec, result: pa.Table, path: Path, empty_reason: str | None = None) -> Path:
    """Draw `spec` from its query's result into the PNG `path`.

    An empty result (or one whose `only` rows are empty) draws a single panel with
    `empty_reason`, the experiment or variant pair that would fill it.
    """
    frame = pl.from_arrow(result)
    for column, value in spec.only:
        if len(frame):
            frame = frame.filter(pl.col(column) == value)
    panels = _panels(spec, frame)
    by_variant = spec.line_by == "variant"
    values = sorted(str(v) for v in frame[spec.line_by].drop_nulls().unique().to_list()) if len(frame) else []
    palette = colours(values, twins_share=by_variant)
    with plt.rc_context(FONTS):
        nrows, ncols, width = _grid(len(panels), spec)
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, PANEL_HEIGHT_IN * nrows + 0.9), squeeze=False,
                                 sharey=True)
        roles_drawn: set[tuple[str, bool]] = set()
        for ax, (title, rows, series) in zip(axes.flat, panels):
            for value in values:
                lines = rows.filter(pl.col(spec.line_by).cast(pl.String) == value).sort(spec.x)
                for column, role, suffix in series:
                    if not len(lines) or lines[column].null_count() == len(lines):
                        continue
                    twin = by_variant and is_twin(value)
                    style, marker = line_style(role, twin)
                    label = value.split("@", 1)[0] + suffix if role == "twin" and suffix.startswith("@") \
                        else f"{value}{suffix}"
                    ax.plot(lines[spec.x], lines[column], linestyle=style, marker=marker, markersize=4,
                            color=palette[value], label=label)
                    roles_drawn.add((role, twin))
            ax.set_title(title)
            ax.set_xlabel(spec.xlabel)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_axis_off()
        if not panels:
            ax = axes[0][0]
            ax.set_axis_off()
            reason = empty_reason or "no rows in this result set"
            ax.text(0.5, 0.5, textwrap.fill(f"No rows: {reason}", 40), ha="center", va="center",
                    transform=ax.transAxes)
        else:
            for row in axes:
                row[0].set_ylabel(textwrap.fill(spec.ylabel, 30))
        legend: dict[str, object] = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        legend.update(_note_handles(roles_drawn, spec))
        fig.suptitle(textwrap.fill(spec.title, int(width * 72 / (0.55 * FONTS["figure.titlesize"]))))
        fig.tight_layout()
        if legend:
            fig.legend(list(legend.values()), list(legend), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                       ncol=_legend_columns(list(legend), width), frameon=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
