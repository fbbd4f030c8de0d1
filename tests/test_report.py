"""`vitlens report` on the toy result set: every figure drawn, every table written, the HTML links them."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from vitlens.cli import main as cli_main
from vitlens.report.build import REPORT_ORDER, TESTS
from vitlens.report.figures import FIGURES
from vitlens.report.queries import list_queries
from tests.test_queries import VARIANTS, write_toy_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    results = write_toy_results(root / "results")
    assert cli_main(["report", "--results", str(results), "--out", str(root / "report"), "--no-progress"]) == 0
    return root / "report"


def test_every_query_is_in_the_report_order():
    assert set(REPORT_ORDER) == {q.name for q in list_queries()}


def test_every_figure_is_a_non_empty_png(toy_report: Path):
    pngs = sorted((toy_report / "figures").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(f.name for f in FIGURES) and len(pngs) == 10
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png


def test_tables_written_as_csv_and_markdown(toy_report: Path):
    names = {q.name for q in list_queries()} | {f"{name}_test" for name in TESTS}
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
    assert sorted(images) == sorted(f"figures/{f.name}.png" for f in FIGURES)
    links = re.findall(r"<a href='(tables/[^']+)'", page)
    assert len(links) == len(list_queries()) + len(TESTS)
    for relative in images + links:
        assert (toy_report / relative).is_file(), relative
    assert page.count("<h2") == len(list_queries())
    markdown = (toy_report / "report.md").read_text()
    assert all(f"(figures/{f.name}.png)" in markdown for f in FIGURES)


def test_report_of_a_folder_without_results_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert cli_main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no table=... folder" in capsys.readouterr().err


def test_report_without_random_twins_or_misclassified_images(tmp_path: Path):
    import shutil

    results = write_toy_results(tmp_path / "results")
    for folder in results.glob("table=*/variant=toy@random"):
        shutil.rmtree(folder)
    assert cli_main(["report", "--results", str(results), "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    assert len(list((tmp_path / "report" / "figures").glob("*.png"))) == len(FIGURES)
    with open(tmp_path / "report" / "tables" / "images_with_identifiable_token.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["random_top1_pct"] == ""  # no twin: null
    assert (tmp_path / "report" / "tables" / "fig4a_class_value_agreement_test.csv").read_text().strip() != ""
