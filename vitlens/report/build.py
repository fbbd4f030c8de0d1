"""`build_report`: every query of queries/ run on a result set, written as Markdown/CSV tables,
PNG figures, the statistical tests, one `report.md` and one `index.html` (figures linked
by relative path, so keep the output folder together).

Output layout::

    OUT/index.html   OUT/report.md   OUT/tables/<query>.csv|.md   OUT/figures/<figure>.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm import tqdm

from vitlens.report import statistics
from vitlens.report.figures import FIGURES, draw_figure
from vitlens.report.html import Section, render_html, render_markdown
from vitlens.report.queries import find_query, format_markdown, list_queries, run_query
from vitlens.report.results import open_results

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
    # paper §7 (explainability, experiment `explain`)
    "explain_importance_by_block", "explain_deletion_curves", "explain_auc",
)


@dataclass(frozen=True)
class ReportFiles:
    """What `build_report` wrote."""

    html: Path
    markdown: Path
    tables: tuple[Path, ...]
    figures: tuple[Path, ...]


def _write_table(table: pa.Table, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / f"{name}.csv"
    pa_csv.write_csv(table, csv_path)
    (folder / f"{name}.md").write_text(format_markdown(table) + "\n", encoding="utf-8")
    return csv_path


def build_report(results_dir: str | Path, out_dir: str | Path, progress: bool = True) -> ReportFiles:
    """Run every query on `results_dir`, write tables, tests, figures, report.md and index.html into `out_dir`."""
    out = Path(out_dir)
    con = open_results(results_dir)
    queries = {q.name: q for q in list_queries()}
    ordered = [n for n in REPORT_ORDER if n in queries] + sorted(set(queries) - set(REPORT_ORDER))
    figures_by_query = {f.query: f for f in FIGURES}
    sections, tables, figures = [], [], []
    for name in tqdm(ordered, desc="report", unit="query", disable=not progress):
        query = queries[name]
        result = run_query(con, query)
        tables.append(_write_table(result, out / "tables", name))
        figure_file = None
        if name in figures_by_query:
            spec = figures_by_query[name]
            figures.append(draw_figure(spec, result, out / "figures" / f"{spec.name}.png"))
            figure_file = f"figures/{spec.name}.png"
        test_title = test_table = test_file = None
        if name in TESTS:
            test_title, stats_query, test = TESTS[name]
            test_table = test(run_query(con, find_query(stats_query)))
            test_name = f"{name}_test"
            tables.append(_write_table(test_table, out / "tables", test_name))
            test_file = f"tables/{test_name}.csv"
        sections.append(Section(query.title, query.header, result, f"tables/{name}.csv", figure_file,
                                test_title, test_table, test_file))
    intro = (f"Results: {Path(results_dir).resolve()}. Every table is one SQL file of queries/ "
             "(header shown above each table); rates are percentages; figures put the normalised "
             "block (block / L) on the x-axis with one line per variant; the deletion curves put the "
             "kept fraction of image tokens on the x-axis with one line per method.")
    html_path, md_path = out / "index.html", out / "report.md"
    html_path.write_text(render_html(REPORT_TITLE, intro, sections), encoding="utf-8")
    md_path.write_text(render_markdown(REPORT_TITLE, intro, sections), encoding="utf-8")
    return ReportFiles(html_path, md_path, tuple(tables), tuple(figures))
