"""`build_report`: every query of queries/ run on a result set, written as Markdown/CSV tables,
PNG figures, the statistical tests, one `report.md` and one `index.html` (figures linked
by relative path, so keep the output folder together).

Output layout::

    OUT/index.html   OUT/report.md   OUT/tables/<query>.csv|.md   OUT/figures/<figure>.png
    OUT/tables/provenance_runs.csv|.md, provenance_data.csv|.md, rejects.csv|.md

The page: the provenance (runs, data, rejects) first, then one section per query in
`REPORT_ORDER` (a query of queries/ not named there comes after them, by name), each with a
note saying which experiment or variant pair would fill it when it is (partly) empty
(`vitlens.report.sections.REQUIREMENTS`). Extra sections (e.g. an image gallery) are
`SectionBuilder`s: pass them as `extra_sections`, or append to `EXTRA_SECTIONS` so that
`vitlens report` includes them; each is placed after the query its `RawSection.after` names
(at the end when None). The image gallery is one (`gallery=GallerySelection(...)`, as
`vitlens report` passes it; `gallery_section`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import pyarrow as pa
from tqdm import tqdm

from vitlens.report import statistics
from vitlens.report.figures import FIGURES, HEATMAPS, draw_figure, draw_heatmap
from vitlens.report.html import render_html, render_markdown
from vitlens.report.provenance import write_provenance
from vitlens.report.queries import find_query, list_queries, run_query
from vitlens.report.results import open_results, result_files
from vitlens.report.sections import (
    RawSection,
    ReportContext,
    Section,
    SectionBuilder,
    empty_reason,
    section_note,
    write_table,
)

if TYPE_CHECKING:
    from vitlens.report.gallery import GallerySelection

REPORT_TITLE = "vitlens report: ViTs in class embedding space"

# query name -> (test title, stats query, test function) for the tables the paper tests.
TESTS: dict[str, tuple[str, str, Callable[[pa.Table], pa.Table]]] = {
    "fig3a_class_context_by_block": (
        "Class vs context tokens, last block: permutation test (300 permutations of token labels)",
        "stats/class_context_last_block", statistics.class_vs_context_tokens),
    "fig4a_class_value_agreement": (
        "Trained vs random twin: one-sided Wilcoxon signed-rank test, paired by class",
        "stats/class_value_agreement_pairs", statistics.class_value_agreement_wilcoxon),
    "kv_agreement_correct_vs_misclassified": (
        "Correct vs misclassified images: permutation test (300 permutations of image labels)",
        "stats/kv_agreement_per_image", statistics.kv_agreement_correct_vs_misclassified),
}

# The order of the report: the paper's order of results.
REPORT_ORDER: tuple[str, ...] = (
    "table1_identifiability", "images_with_identifiable_token", "fig2_identifiability_by_block",
    "fig3a_class_context_by_block", "perturbation_attention", "perturbation_token_removal",
    "fig3b_class_similarity_change", "fig3c_residual_top1_match", "fig4a_class_value_agreement",
    "fig4b_key_value_agreement", "kv_agreement_correct_vs_misclassified", "compositionality",
    # paper §7 (explainability, experiment `explain`; the AUC table also has `linear_probe` from `probe`)
    "explain_importance_by_block", "explain_deletion_curves", "explain_auc",
    # paper §8 (linear probes, experiment `probe`)
    "probe_accuracy_by_block", "probe_time",
    # beyond the paper: per-head attribution (METHOD §3b, `heads`) and the tuned lens (§7b, `tuned`)
    "heads_by_block", "heads_top_by_class", "head_source_shares", "tuned_vs_logit_by_block",
)

#: Extra sections every report gets: append a `SectionBuilder` (called with a `ReportContext`).
EXTRA_SECTIONS: list[SectionBuilder] = []
#: The query section the gallery follows (None: the end of the page).
GALLERY_AFTER: str | None = None

INTRO = ("Every table is one SQL file of queries/ (header shown above each table); rates are percentages; "
         "figures put the normalised block (block / L) on the x-axis with one colour per variant "
         "(colour-blind-safe Okabe-Ito palette); solid lines are trained weights, dashed lines the "
         "random-weight twin NAME@random, dotted lines a second quantity named in the legend (misclassified "
         "images, the lens beside the probe); the deletion curves put the kept fraction of image tokens on the "
         "x-axis with one line per method. A section without rows says which experiment or variant pair "
         "would fill it.")


@dataclass(frozen=True)
class ReportFiles:
    """What `build_report` wrote."""

    html: Path
    markdown: Path
    tables: tuple[Path, ...]
    figures: tuple[Path, ...]
    extras: tuple[Path, ...] = ()  # files the extra sections wrote


def _query_section(con, name: str, out: Path) -> tuple[Section, list[Path], list[Path]]:
    """Run query `name` (and its test), write its table(s) and figure; (section, tables, figures)."""
    query = find_query(name)
    result = run_query(con, query)
    tables = [write_table(result, out / "tables", name)]
    figures = []
    figure_file = None
    spec = next((f for f in FIGURES if f.query == name), None)
    heatmap = next((f for f in HEATMAPS if f.query == name), None)
    if spec is not None:
        figures.append(draw_figure(spec, result, out / "figures" / f"{spec.name}.png", empty_reason(name)))
        figure_file = f"figures/{spec.name}.png"
    elif heatmap is not None:
        figures.append(draw_heatmap(heatmap, result, out / "figures" / f"{heatmap.name}.png", empty_reason(name)))
        figure_file = f"figures/{heatmap.name}.png"
    test_title = test_table = test_file = None
    if name in TESTS:
        test_title, stats_query, test = TESTS[name]
        test_table = test(run_query(con, find_query(stats_query)))
        tables.append(write_table(test_table, out / "tables", f"{name}_test"))
        test_file = f"tables/{name}_test.csv"
    section = Section(query.title, query.header, result, f"tables/{name}.csv", figure_file,
                      test_title, test_table, test_file, note=section_note(name, result), name=name)
    return section, tables, figures


def _place(sections: list[Section | RawSection], extra: RawSection) -> None:
    """Insert `extra` after the section of query `extra.after` (at the end when absent)."""
    names = [s.name if isinstance(s, Section) else None for s in sections]
    if extra.after is not None and extra.after in names:
        sections.insert(names.index(extra.after) + 1, extra)
    else:
        sections.append(extra)


def gallery_section(selection: "GallerySelection") -> SectionBuilder:
    """The image gallery (`vitlens.report.gallery`) as an extra section (after `GALLERY_AFTER`)."""

    def build(context: ReportContext) -> RawSection:
        from vitlens.report.gallery import GALLERY_DIR, gallery_html, gallery_markdown, write_gallery

        figures = write_gallery(context.results_dir, context.out_dir, selection)
        files = tuple(context.out_dir / f.path for f in figures if f.path is not None)
        if not figures:
            note = "No gallery: no variant has `images` rows to draw (experiment 'baseline' not run)."
            return RawSection("Gallery: token maps of a few images", f"<p class='note'>{note}</p>", f"> {note}",
                              GALLERY_DIR, files, GALLERY_AFTER)
        return RawSection("Gallery: token maps of a few images", gallery_html(figures), gallery_markdown(figures),
                          GALLERY_DIR, files, GALLERY_AFTER)

    return build


def build_report(results_dir: str | Path, out_dir: str | Path, progress: bool = True,
                 extra_sections: Sequence[SectionBuilder] | None = None,
                 gallery: "GallerySelection | None" = None) -> ReportFiles:
    """Run every query on `results_dir`, write the provenance, tables, tests, figures, report.md
    and index.html into `out_dir`.

    `extra_sections` (default: `EXTRA_SECTIONS`) are called as `builder(ReportContext(con,
    results_dir, out_dir))` after the query sections; each returns a `RawSection` (or None to
    leave it out) that is placed after the query named by its `after`; the files it lists are
    returned in `ReportFiles.extras`. `gallery` (a `GallerySelection`; None: no gallery) adds
    `gallery_section(gallery)` after them.
    """
    out = Path(out_dir)
    files = result_files(results_dir)
    con = open_results(files)
    names = {q.name for q in list_queries()}
    ordered = [n for n in REPORT_ORDER if n in names] + sorted(names - set(REPORT_ORDER))
    provenance = write_provenance(con, files, out)
    sections: list[Section | RawSection] = [provenance]
    tables: list[Path] = list(provenance.files)
    figures: list[Path] = []
    extras: list[Path] = []
    for name in tqdm(ordered, desc="report", unit="query", disable=not progress):
        section, written, drawn = _query_section(con, name, out)
        sections.append(section)
        tables += written
        figures += drawn
    builders = list(EXTRA_SECTIONS if extra_sections is None else extra_sections)
    if gallery is not None:
        builders.append(gallery_section(gallery))
    context = ReportContext(con, files.storage.root, out)
    for builder in builders:
        extra = builder(context)
        if extra is not None:
            _place(sections, extra)
            extras += list(extra.files)
    intro = f"Results: {files.storage.root}. {INTRO}"
    html_path, md_path = out / "index.html", out / "report.md"
    html_path.write_text(render_html(REPORT_TITLE, intro, sections), encoding="utf-8")
    md_path.write_text(render_markdown(REPORT_TITLE, intro, sections), encoding="utf-8")
    return ReportFiles(html_path, md_path, tuple(tables), tuple(figures), tuple(extras))
