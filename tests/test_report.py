"""`vitlens report` on the toy result set: every figure drawn, every table written, the HTML
links them; empty sections say what would fill them; the figures' styles (twins dashed and
named in the legend, Okabe–Ito colours, fonts and width readable at the page's size)."""

from __future__ import annotations

import csv
import re
import shutil
import struct
from pathlib import Path

import matplotlib.text
import pyarrow as pa
import pytest

from vitlens.cli import main as cli_main
from vitlens.report import figures
from vitlens.report.build import REPORT_ORDER, TESTS, build_report
from vitlens.report.figures import FIGURES, FONTS, HEATMAPS, MIN_FONT_PT, PALETTE, TWIN_NOTE, draw_figure

#: every figure file a report draws: line figures and heatmaps
FIGURE_NAMES = sorted([f.name for f in FIGURES] + [h.name for h in HEATMAPS])
from vitlens.report.queries import find_query, list_queries, run_query
from vitlens.report.results import open_results
from vitlens.report.sections import REQUIREMENTS, RawSection, ReportContext, empty_reason, section_note
from tests.test_queries import VARIANTS, write_toy_results
from tests.test_queries_probe import write_probe_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAGE_WIDTH_PX = 1200  # body max-width of the page (vitlens.report.html)
PROVENANCE_TABLES = {"provenance_runs", "provenance_data", "rejects"}


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    results = write_probe_results(root / "results")  # the toy set + probes and runs rows
    assert cli_main(["report", "--results", str(results), "--out", str(root / "report"), "--no-progress"]) == 0
    return root / "report"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return struct.unpack(">II", data[16:24])


def test_every_query_is_in_the_report_order():
    assert set(REPORT_ORDER) == {q.name for q in list_queries()}
    # §8 after §7
    assert REPORT_ORDER.index("explain_auc") < REPORT_ORDER.index("probe_accuracy_by_block") \
        < REPORT_ORDER.index("probe_time")


def test_every_query_says_what_fills_it():
    assert set(REQUIREMENTS) == {q.name for q in list_queries()}
    for name in ("explain_importance_by_block", "explain_deletion_curves", "explain_auc"):
        assert "experiment 'explain' not run" in empty_reason(name)
    for name in ("probe_accuracy_by_block", "probe_time"):
        assert "experiment 'probe' not run" in empty_reason(name)
    assert "experiment 'probe' not run" not in empty_reason("explain_auc") and "'probe'" in empty_reason("explain_auc")


def test_every_figure_is_a_non_empty_png_no_wider_than_the_page(toy_report: Path):
    pngs = sorted((toy_report / "figures").glob("*.png"))
    assert [p.stem for p in pngs] == FIGURE_NAMES and len(pngs) == len(FIGURES) + len(HEATMAPS) == 13
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
        width, _ = _png_size(png)
        assert width <= PAGE_WIDTH_PX, png  # shown unscaled: the fonts keep their size


def test_tables_written_as_csv_and_markdown(toy_report: Path):
    names = {q.name for q in list_queries()} | {f"{name}_test" for name in TESTS} | PROVENANCE_TABLES
    assert {p.stem for p in (toy_report / "tables").glob("*.csv")} == names
    assert {p.stem for p in (toy_report / "tables").glob("*.md")} == names
    with open(toy_report / "tables" / "table1_identifiability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert float(rows[0]["id_rate_pct"]) == pytest.approx(100 * 2 / 6)  # by hand, see test_queries
    with open(toy_report / "tables" / "fig4a_class_value_agreement_test.csv") as f:
        tests = list(csv.DictReader(f))
    # every class of `toy` beats its twin by 0.3 (tied differences: scipy's normal approximation)
    assert len(tests) == 4 and all(float(t["p_value"]) < 0.07 for t in tests)


def test_html_links_every_figure_and_table(toy_report: Path):
    page = (toy_report / "index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert sorted(images) == [f"figures/{name}.png" for name in FIGURE_NAMES]
    links = re.findall(r"<a href='(tables/[^']+)'", page)
    assert len(links) == len(list_queries()) + len(TESTS) + 1  # + the rejects table of the provenance
    for relative in images + links:
        assert (toy_report / relative).is_file(), relative
    # provenance + every query + the gallery (on by default)
    assert page.count("<h2") == len(list_queries()) + 2
    assert page.index("<h2 id='provenance'>") < page.index("<h2 id='table1_identifiability'>")
    order = [page.index(f"<h2 id='{name}'>") for name in REPORT_ORDER]
    assert order == sorted(order)
    markdown = (toy_report / "report.md").read_text()
    assert all(f"(figures/{name}.png)" in markdown for name in FIGURE_NAMES)


def _section(page: str, name: str) -> str:
    start = page.index(f"<h2 id='{name}'>")
    end = page.find("<h2", start + 1)
    return page[start:end if end > 0 else len(page)]


def test_empty_sections_say_which_experiment_fills_them(toy_report: Path):
    page = (toy_report / "index.html").read_text()
    for name in ("explain_importance_by_block", "explain_deletion_curves", "explain_auc"):
        assert "No rows: experiment &#x27;explain&#x27; not run" in _section(page, name), name
    for name in ("probe_accuracy_by_block", "probe_time", "table1_identifiability"):
        assert "class='note'" not in _section(page, name), name  # filled by the probe rows and runs
    markdown = (toy_report / "report.md").read_text()
    assert "> No rows: experiment 'explain' not run." in markdown


def test_report_without_probes_twins_or_misclassified_images(tmp_path: Path):
    results = write_toy_results(tmp_path / "results")
    for folder in results.glob("table=*/variant=toy@random"):
        shutil.rmtree(folder)
    out = tmp_path / "report"
    assert cli_main(["report", "--results", str(results), "--out", str(out), "--no-progress", "--no-gallery"]) == 0
    assert len(list((out / "figures").glob("*.png"))) == len(FIGURE_NAMES)
    with open(out / "tables" / "images_with_identifiable_token.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["random_top1_pct"] == ""  # no twin: null
    assert (out / "tables" / "fig4a_class_value_agreement_test.csv").read_text().strip() != ""
    page = (out / "index.html").read_text()
    twin = "no trained/random pair: add NAME@random to variants"
    assert twin in _section(page, "fig4a_class_value_agreement")
    assert twin in _section(page, "images_with_identifiable_token")
    for name in ("probe_accuracy_by_block", "probe_time"):
        assert "No rows: experiment &#x27;probe&#x27; not run" in _section(page, name), name
    assert "class='note'" not in _section(page, "fig2_identifiability_by_block")


def test_section_note_names_empty_columns():
    kv = pa.table({"variant": ["toy"], "block": [1], "correct_pct": [50.0],
                   "misclassified_pct": pa.array([None], pa.float64())})
    assert section_note("kv_agreement_correct_vs_misclassified", kv) == "Empty columns: no misclassified images."
    assert section_note("kv_agreement_correct_vs_misclassified", kv.slice(0, 0)).startswith("No rows: experiment 'baseline'")
    full = kv.set_column(3, "misclassified_pct", pa.array([40.0]))
    assert section_note("kv_agreement_correct_vs_misclassified", full) is None


@pytest.fixture(autouse=True)
def close_kept_figures():
    """`_drawn` keeps its figure open for inspection; close every figure after each test."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _drawn(spec_query: str, result: pa.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reason: str | None = None):
    """Draw the figure of `spec_query` from `result`; returns (spec, the figure kept open)."""
    spec = next(f for f in FIGURES if f.query == spec_query)
    kept = []
    monkeypatch.setattr(figures.plt, "close", kept.append)
    draw_figure(spec, result, tmp_path / f"{spec.name}.png", reason)
    return spec, kept[0]


def _legend(fig) -> dict[str, object]:
    (legend,) = fig.legends
    return {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles)}


def test_random_twins_are_dashed_and_the_legend_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    result = run_query(open_results(write_toy_results(tmp_path / "results")), find_query("fig2_identifiability_by_block"))
    _, fig = _drawn("fig2_identifiability_by_block", result, tmp_path, monkeypatch)
    for ax in [a for a in fig.axes if a.get_title()]:
        styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert styles == {"toy": "-", "toy@random": "--"}
    legend = _legend(fig)
    assert TWIN_NOTE in legend and "twin" in TWIN_NOTE and legend[TWIN_NOTE].get_linestyle() == "--"
    assert legend["toy@random"].get_linestyle() == "--" and legend["toy"].get_linestyle() == "-"


def test_only_random_models_legend_matches_the_dashed_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    results = write_toy_results(tmp_path / "results")
    for folder in results.glob("table=*/variant=toy"):
        shutil.rmtree(folder)
    for query in ("fig2_identifiability_by_block", "kv_agreement_correct_vs_misclassified"):
        result = run_query(open_results(results), find_query(query))
        _, fig = _drawn(query, result, tmp_path, monkeypatch)
        lines = [line for ax in fig.axes for line in ax.get_lines()]
        assert lines and all(line.get_linestyle() in ("--", "-.") for line in lines), query
        legend = _legend(fig)
        for line in lines:
            assert legend[line.get_label()].get_linestyle() == line.get_linestyle()
        assert TWIN_NOTE in legend
        assert not any(h.get_linestyle() == "-" for h in legend.values())  # no solid entry without a solid line


def test_kv_figure_uses_the_normalised_block_like_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    result = run_query(open_results(write_toy_results(tmp_path / "results")),
                       find_query("kv_agreement_correct_vs_misclassified"))
    spec, fig = _drawn("kv_agreement_correct_vs_misclassified", result, tmp_path, monkeypatch)
    assert spec.x == "normalised_block" and "normalised_block" in result.column_names
    ax = fig.axes[0]
    assert ax.get_xlabel() == "normalised block (block / L)"
    for line in ax.get_lines():
        assert list(line.get_xdata()) == pytest.approx([0.5, 1.0])  # blocks 1, 2 of L = 2
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    # toy@random has no correct image (null column: no line); its misclassified line is dash-dot
    assert styles == {"toy correct": "-", "toy misclassified": ":", "toy@random misclassified": "-."}


def test_colours_are_okabe_ito_and_fonts_readable(toy_report: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert PALETTE[:3] == ("#0072B2", "#D55E00", "#009E73") and len(set(PALETTE)) == 8
    results = write_probe_results(tmp_path / "results")
    con = open_results(results)
    for spec in FIGURES:
        _, fig = _drawn(spec.query, run_query(con, find_query(spec.query)), tmp_path, monkeypatch, "reason")
        for ax in fig.axes:
            for line in ax.get_lines():
                assert line.get_color() in PALETTE, (spec.name, line.get_label())
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip() and t.get_visible()]
        assert texts and min(t.get_fontsize() for t in texts) >= MIN_FONT_PT, spec.name
    assert min(v for k, v in FONTS.items() if isinstance(v, (int, float))) >= MIN_FONT_PT


def test_probe_figure_has_one_panel_per_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    result = run_query(open_results(write_probe_results(tmp_path / "results")), find_query("probe_accuracy_by_block"))
    _, fig = _drawn("probe_accuracy_by_block", result, tmp_path, monkeypatch)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["attn", "mlp", "resid"]
    resid = {line.get_label(): line for line in panels[2].get_lines()}
    assert set(resid) == {"toy probe", "toy lens", "toy@random probe", "toy@random lens"}
    assert [resid[k].get_linestyle() for k in ("toy probe", "toy lens", "toy@random probe", "toy@random lens")] \
        == ["-", ":", "--", "-."]
    rows = [r for r in result.to_pylist() if r["variant"] == "toy" and r["stream"] == "resid" and r["token_kind"] == "image"]
    assert list(resid["toy probe"].get_ydata()) == pytest.approx([r["probe_acc_pct"] for r in rows])
    assert list(resid["toy lens"].get_ydata()) == pytest.approx([r["lens_id_rate_pct"] for r in rows])
    assert "dotted = lens" in _legend(fig)


def test_empty_figure_carries_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    result = run_query(open_results(write_toy_results(tmp_path / "results")), find_query("probe_accuracy_by_block"))
    assert result.num_rows == 0
    _, fig = _drawn("probe_accuracy_by_block", result, tmp_path, monkeypatch, empty_reason("probe_accuracy_by_block"))
    texts = " ".join(t.get_text().replace("\n", " ") for t in fig.findobj(matplotlib.text.Text))
    assert "experiment 'probe' not run" in texts


def test_extra_sections_are_placed_and_their_files_returned(tmp_path: Path):
    results = write_toy_results(tmp_path / "results")
    out = tmp_path / "report"
    seen = []

    def after_fig2(context: ReportContext) -> RawSection:
        seen.append(context)
        path = context.out_dir / "extra" / "a.txt"
        path.parent.mkdir(parents=True)
        path.write_text("x")
        return RawSection("Extra one", "<p>extra-one-body</p>", "extra-one-body", "extra1", (path,),
                          after="fig2_identifiability_by_block")

    def at_end(context: ReportContext) -> RawSection:
        assert context.con.execute("SELECT count(*) FROM images").fetchone()[0] > 0
        return RawSection("Extra two", "<p>extra-two-body</p>", "extra-two-body", "extra2")

    files = build_report(results, out, progress=False, extra_sections=[after_fig2, at_end, lambda context: None])
    assert seen[0].results_dir == str(results) and seen[0].out_dir == out
    assert files.extras == (out / "extra" / "a.txt",)
    page = (out / "index.html").read_text()
    assert page.index("<h2 id='fig2_identifiability_by_block'>") < page.index("<h2 id='extra1'>") \
        < page.index("<h2 id='fig3a_class_context_by_block'>")
    assert page.index("<h2 id='probe_time'>") < page.index("<h2 id='extra2'>")
    assert "<a href='#extra1'>Extra one</a>" in page
    assert "extra-two-body" in (out / "report.md").read_text()
