"""What one report section is, and why a section can be empty.

- `Section`: one query's entry (its table, figure, statistical test and a note).
- `RawSection`: a section its producer rendered itself (ready HTML and Markdown fragments),
  such as the provenance at the top of the page or an image gallery; `SectionBuilder` is
  the callable that makes one (`build_report(..., extra_sections=[builder])`).
- `REQUIREMENTS`: the ONE mapping query name -> what fills it: the sentence shown when the
  query returns no rows, and per column the sentence shown when that column is null in
  every row (e.g. no random twin, no misclassified images). `section_note` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv

from vitlens.report.queries import format_markdown


@dataclass(frozen=True)
class Section:
    """One report entry: a title, the query's header text, its result, an optional figure and
    test table; `note` says why the section (or some of its columns) is empty; `name` is the
    query's name (the HTML anchor)."""

    title: str
    description: str
    table: pa.Table
    table_file: str
    figure_file: str | None = None
    test_title: str | None = None
    test_table: pa.Table | None = None
    test_file: str | None = None
    note: str | None = None
    name: str = ""


@dataclass(frozen=True)
class RawSection:
    """A section rendered by its producer.

    `html` and `markdown` are the body below the section's heading (the producer escapes its
    own text); `anchor` is the HTML id; `files` are the files it wrote under the report folder
    (paths relative to it are what its HTML should link); `after` is the query name whose
    section it follows (None: after every query section).
    """

    title: str
    html: str
    markdown: str
    anchor: str
    files: tuple[Path, ...] = ()
    after: str | None = None


@dataclass(frozen=True)
class ReportContext:
    """What an extra section's builder gets: the open result set (`con`, views as in
    `vitlens.report.results`), its folder, and the report folder (where the builder may write
    files, e.g. OUT/gallery/..., linked from its HTML by path relative to `out_dir`)."""

    con: duckdb.DuckDBPyConnection
    results_dir: str  # a local folder or an object-store URL
    out_dir: Path


#: Makes an extra section; returns None to leave it out.
SectionBuilder = Callable[[ReportContext], "RawSection | None"]

def write_table(table: pa.Table, folder: Path, name: str) -> Path:
    """Write `table` as `folder/name.csv` and `folder/name.md`; returns the CSV's path."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / f"{name}.csv"
    pa_csv.write_csv(table, csv_path)
    (folder / f"{name}.md").write_text(format_markdown(table) + "\n", encoding="utf-8")
    return csv_path


BASELINE = "experiment 'baseline' not run"
TWIN = "no trained/random pair: add NAME@random to variants (beside NAME)"
EXPLAIN = "experiment 'explain' not run"
PROBE = "experiment 'probe' not run"
HEADS = "experiment 'heads' not run (or the family skips it: see `vitlens models check`)"
TUNED = "experiment 'tuned' not run"


@dataclass(frozen=True)
class Requirement:
    """What fills a query: `empty` when it returns no rows; `null_columns` maps a column to the
    sentence shown when that column is null in every row."""

    empty: str
    null_columns: Mapping[str, str] = field(default_factory=dict)


REQUIREMENTS: dict[str, Requirement] = {
    "table1_identifiability": Requirement(BASELINE),
    "images_with_identifiable_token": Requirement(
        f"{BASELINE} for a trained (not @random) variant",
        {"random_images_with_id_token_pct": TWIN}),
    "fig2_identifiability_by_block": Requirement(
        BASELINE, {"mean_score": "no params rows (C unknown): the variant's class-value step did not run"}),
    "fig3a_class_context_by_block": Requirement(
        f"{BASELINE}, or no image token is labelled class or context (masks missing)",
        {"mean_score": "no params rows (C unknown): the variant's class-value step did not run"}),
    "perturbation_attention": Requirement(
        "experiments 'attn_self_only' / 'attn_no_cls' not run",
        {"baseline_pct": BASELINE, "self_only_pct": "experiment 'attn_self_only' not run",
         "no_cls_pct": "experiment 'attn_no_cls' not run"}),
    "perturbation_token_removal": Requirement(
        "experiments 'remove_class_tokens' / 'remove_context_tokens' not run",
        {"baseline_pct": BASELINE}),
    "fig3b_class_similarity_change": Requirement(BASELINE),
    "fig3c_residual_top1_match": Requirement(BASELINE),
    "fig4a_class_value_agreement": Requirement(
        "no params rows of a trained (not @random) variant: add NAME (and NAME@random) to variants",
        {"random_mean_agreement": TWIN}),
    "fig4b_key_value_agreement": Requirement(BASELINE),
    "kv_agreement_correct_vs_misclassified": Requirement(
        f"{BASELINE} (or no images rows)",
        {"misclassified_pct": "no misclassified images", "correct_pct": "no correctly classified images"}),
    "compositionality": Requirement(BASELINE),
    "explain_importance_by_block": Requirement(EXPLAIN),
    "explain_deletion_curves": Requirement(EXPLAIN),
    "explain_auc": Requirement(
        f"{EXPLAIN} (method 'linear_probe' needs {PROBE.removeprefix('experiment ')} too)",
        {"random_auc": "method 'random' not run: the random token order is part of experiment 'explain'"}),
    "probe_accuracy_by_block": Requirement(PROBE, {"lens_id_rate_pct": f"{BASELINE}: no lens rate to compare"}),
    "probe_time": Requirement(
        f"{PROBE} (or its runs predate schema v5 and recorded no experiment_seconds)",
        {"lens_seconds": f"{BASELINE} in the probing run: no lens seconds to compare"}),
    "heads_by_block": Requirement(HEADS),
    "heads_top_by_class": Requirement(f"{HEADS} (or no images rows)"),
    "head_source_shares": Requirement(HEADS),
    "tuned_vs_logit_by_block": Requirement(
        TUNED, {"lens_id_rate_pct": f"{BASELINE}: no logit-lens rate to compare",
                "probe_acc_pct": f"{PROBE}: no probe accuracy to compare"}),
}

#: The sentence for a query that is not in `REQUIREMENTS` (tests keep every query in it).
UNKNOWN_REQUIREMENT = "no rows: this result set lacks the tables or experiments this query reads (see its header)"


def empty_reason(name: str) -> str:
    """Why query `name` returns no rows: the experiment or variant pair that would fill it."""
    requirement = REQUIREMENTS.get(name)
    return requirement.empty if requirement else UNKNOWN_REQUIREMENT


def section_note(name: str, table: pa.Table) -> str | None:
    """The note of query `name`'s section: why it is empty, or which of its columns are null
    in every row and why (None when every column has a value somewhere)."""
    if table.num_rows == 0:
        return f"No rows: {empty_reason(name)}."
    requirement = REQUIREMENTS.get(name)
    if requirement is None:
        return None
    reasons = [reason for column, reason in requirement.null_columns.items()
               if column in table.column_names and table.column(column).null_count == table.num_rows]
    if not reasons:
        return None
    return "Empty columns: " + "; ".join(dict.fromkeys(reasons)) + "."
