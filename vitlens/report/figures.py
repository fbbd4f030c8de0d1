"""The paper's figures drawn from query results with matplotlib (Agg backend, PNG files).

Every figure is a grid of panels (one per value of `panel_by`; one row unless the spec sets
`columns`), by default the normalised
block on the x-axis (variants of different depth share it) and one line per value of
`line_by`. With `line_by = "variant"` (the default) a random twin NAME@random has its
variant's colour and a dashed line (a second series of one variant, such as misclassified
images, is dashed too); with another column (e.g. `method` for the deletion curves) every
distinct value gets its own colour and a solid line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402


@dataclass(frozen=True)
class FigureSpec:
    """How to draw one query's result: panels, x column, (y column, line style, legend suffix)s.

    `line_by` is the column giving one line (and colour) per distinct value in every panel;
    `columns` wraps the panels into rows of that many (0: one row).
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


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("fig2_identifiability_by_block", "fig2_identifiability_by_block",
               "Fig. 2: mean class identifiability score", ("token_kind",),
               (("mean_score", "-", ""),), "mean identifiability score 1 - rank/C"),
    FigureSpec("fig3a_class_context_by_block", "fig3a_class_context_by_block",
               "Fig. 3a: class- vs context-labelled image tokens", ("label",),
               (("mean_score", "-", ""),), "mean identifiability score 1 - rank/C"),
    FigureSpec("fig3b_class_similarity_change", "fig3b_class_similarity_change",
               "Fig. 3b: class similarity change rate", ("sublayer", "token_kind"),
               (("change_rate_pct", "-", ""),), "% tokens whose correct logit rises"),
    FigureSpec("fig3c_residual_top1_match", "fig3c_residual_top1_match",
               "Fig. 3c: residual top-1 matches the attention / MLP / previous residual top-1, or none",
               ("token_kind",),
               (("attn_pct", "-", " attn"), ("mlp_pct", "-", " mlp"),
                ("previous_resid_pct", "-", " previous resid"), ("composite_pct", "-", " composite")),
               "% tokens", series_as_panels=True),
    FigureSpec("fig4a_class_value_agreement", "fig4a_class_value_agreement",
               "Fig. 4a: class-value agreement (dashed = random twin)", ("sublayer",),
               (("mean_agreement", "-", ""), ("random_mean_agreement", "--", " random")),
               "mean max cosine over memories"),
    FigureSpec("fig4b_key_value_agreement", "fig4b_key_value_agreement",
               "Fig. 4b: key-value agreement rate", ("sublayer",),
               (("kv_agreement_pct", "-", ""),), "% tokens"),
    FigureSpec("kv_agreement_correct_vs_misclassified", "kv_agreement_correct_vs_misclassified",
               "Key-value agreement: correct (solid) vs misclassified (dashed) images", ("sublayer",),
               (("correct_pct", "-", " correct"), ("misclassified_pct", "--", " misclassified")),
               "% tokens", x="block", xlabel="block"),
    FigureSpec("compositionality", "compositionality",
               "Compositionality of sub-layer predictions", ("sublayer",),
               (("compositional_pct", "-", ""),), "% tokens with a composite top-1"),
    FigureSpec("explain_deletion_curves", "explain_deletion_curves",
               "Section 7: deletion curves (negative: most important tokens kept first; "
               "positive: least important first)", ("variant", "test"),
               (("accuracy_pct", "-", ""),), "top-1 accuracy %",
               x="kept_fraction", xlabel="kept fraction of image tokens", line_by="method", columns=4),
    FigureSpec("explain_importance_by_block", "explain_importance_by_block",
               "Section 7: mean gradient importance of class- vs context-labelled tokens", ("label",),
               (("mean_importance", "-", ""),), "mean importance (ours, sum over heads)"),
)


def _panels(spec: FigureSpec, frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame, tuple]]:
    """(title, rows, series) per panel; with `series_as_panels` one panel per value x series."""
    if not len(frame):
        return []
    panels = []
    for values in frame.select(spec.panel_by).unique().sort(spec.panel_by).rows():
        rows = frame.filter(pl.all_horizontal([pl.col(c) == v for c, v in zip(spec.panel_by, values)]))
        title = ", ".join(str(v) for v in values)
        if spec.series_as_panels:
            panels += [(f"{title}: {suffix.strip()}", rows, ((column, "-", ""),)) for column, _, suffix in spec.series]
        else:
            panels.append((title, rows, spec.series))
    return panels


def _colours(values: list[str], twins_share: bool = True) -> dict[str, tuple]:
    """One colour per value; with `twins_share` a random twin NAME@random shares NAME's colour."""
    bases = sorted({v.split("@", 1)[0] if twins_share else v for v in values})
    cmap = plt.get_cmap("tab10")
    return {v: cmap(bases.index(v.split("@", 1)[0] if twins_share else v) % 10) for v in values}


def draw_figure(spec: FigureSpec, result: pa.Table, path: Path) -> Path:
    """Draw `spec` from its query's result into the PNG `path` (an empty result gives a note)."""
    frame = pl.from_arrow(result)
    panels = _panels(spec, frame)
    by_variant = spec.line_by == "variant"
    values = sorted(str(v) for v in frame[spec.line_by].drop_nulls().unique().to_list()) if len(frame) else []
    colours = _colours(values, twins_share=by_variant)
    ncols = len(spec.series) if spec.series_as_panels else max(1, len(panels))
    if spec.columns:
        ncols = min(ncols, spec.columns)
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols + 2.2, 3.3 * nrows), squeeze=False, sharey=True)
    for ax, (title, rows, series) in zip(axes.flat, panels):
        for value in values:
            lines = rows.filter(pl.col(spec.line_by).cast(pl.String) == value).sort(spec.x)
            for column, style, suffix in series:
                if len(lines) and lines[column].null_count() < len(lines):
                    if by_variant and len(series) == 1 and value.endswith("@random"):
                        style = "--"
                    ax.plot(lines[spec.x], lines[column], style, marker="o", markersize=3,
                            color=colours[value], label=f"{value}{suffix}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(spec.xlabel)
        ax.grid(alpha=0.3)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no rows in this result set", ha="center", va="center")
    for row in axes:
        row[0].set_ylabel(spec.ylabel)
    legend: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=7, frameon=False)
    fig.suptitle(spec.title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
