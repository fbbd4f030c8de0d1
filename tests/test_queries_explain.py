"""The explainability queries (explain_*.sql, paper §7) on a tiny hand-built result set.

The set has the real schema and layout (vitlens.store) of an `explain` job: variants `toy`
(L = 3 blocks) and `small` (L = 2), 3 images of 1 CLS + N = 4 image tokens, 2 heads. The
`explain` table has the per-block, per-head gradient importance of method 'ours' plus two
baselines' global maps; `perturbation_curves` keeps the counts n = 0, 1, 3, 4 only (uneven
kept-fraction spacing), `toy`'s 'random' has 2 orders (`order` 0 and 1, averaged by the
queries) and `toy` has 'linear_probe' curves under experiment 'probe'; `small` has no
'random' method. Every test recomputes its query's answer from the Python rows with plain
loops (no SQL), plus a few values by hand.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from vitlens.cli import main as cli_main
from vitlens.report import figures
from vitlens.report.figures import FIGURES, HEATMAPS, FigureSpec, draw_figure
from vitlens.report.queries import find_query, run_query
from vitlens.report.results import open_results
from vitlens.store.layout import table_file, write_parquet_atomic
from vitlens.store.schema import to_table
from tests.test_queries import write_toy_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "explain"
DEPTHS = {"toy": 3, "small": 2}  # variant -> L
HEADS = 2
N = 4  # image tokens per image (positions 1..4; CLS at 0)
KEPT = (0, 1, 3, 4)  # kept counts written: a subset of 0..N with uneven spacing
IMAGES = {  # image_key -> (class_index, labels of image tokens 1..4); img2 has no class token
    "img0": (0, ("class", "class", "context", "ignore")),
    "img1": (1, ("class", "context", "context", "context")),
    "img2": (2, ("context", "context", "ignore", "ignore")),
}
METHODS = {"toy": ("ours", "chefer", "random", "linear_probe"), "small": ("ours", "chefer")}
RULE_METHODS = ("ours", "chefer", "random", "linear_probe")  # index m of the `correct` rule
ORDERS = {"random": 2}  # random orders per method (1 for every other method)
EXPERIMENT_OF = {"linear_probe": "probe"}  # perturbation_curves experiment per method (else EXPERIMENT)
BASELINES = ("chefer", "random")
TESTS = ("negative", "positive")
# Correctness of (img0, img1, img2) per kept count, where it is not the rule of `correct`.
OVERRIDES = {
    ("toy", "ours", "negative"): {0: "FFF", 1: "TFT", 3: "TTT", 4: "TTT"},  # accuracy 0, 2/3, 1, 1
    ("small", "chefer", "positive"): {n: "FFF" for n in KEPT},  # accuracy 0 everywhere
}
EXPLAIN_QUERIES = {
    "explain_deletion_curves": ["variant", "method", "test", "kept_tokens", "kept_fraction", "images",
                                "accuracy_pct"],
    "explain_auc": ["variant", "method", "test", "images", "orders", "points", "auc", "reference_auc",
                    "random_auc"],
    "explain_importance_by_block": ["variant", "block", "normalised_block", "label", "tokens",
                                    "mean_importance", "images", "object_rank_pct"],
}


def head_importance(variant: str, image: int, block: int, token: int) -> list[float]:
    """Per-head importance of method 'ours': multiples of 1/4 (exact in float32), some negative."""
    v = list(DEPTHS).index(variant)
    return [((7 * image + 3 * block + 5 * token + v) % 11) / 4 - 1.0,
            ((2 * image + block * token + v) % 5) / 4 - 0.5]


def explain_rows(variant: str) -> list[dict]:
    """The explain rows of one variant: 'ours' per block 1..L, baselines once (block null)."""
    rows = []
    for i, (image_key, (class_index, labels)) in enumerate(IMAGES.items()):
        for token in range(1, N + 1):
            base = {"image_key": image_key, "class_of_interest": class_index, "token": token,
                    "label": labels[token - 1], "fg_fraction": 1.0 if labels[token - 1] == "class" else 0.0}
            for block in range(1, DEPTHS[variant] + 1):
                heads = head_importance(variant, i, block, token)
                rows.append(dict(base, method="ours", block=block, importance=sum(heads), head_importance=heads))
            for m, method in enumerate(BASELINES):
                # far larger than 'ours': a query mixing in the baselines would be off
                rows.append(dict(base, method=method, block=None, importance=100.0 + 10 * m + token,
                                 head_importance=None))
    return rows


def correct(variant: str, method: str, test: str, image: int, n: int, order: int = 0) -> bool:
    """Top-1 correctness of one image at kept count n in one order (a fixed rule, or OVERRIDES)."""
    if (variant, method, test) in OVERRIDES:
        return OVERRIDES[(variant, method, test)][n][image] == "T"
    v, m, t = list(DEPTHS).index(variant), RULE_METHODS.index(method), TESTS.index(test)
    return (image * (n + 1) + m + 2 * t + v + 3 * order) % 4 < 2


def curve_rows(variant: str, experiment: str = EXPERIMENT) -> list[dict]:
    """The perturbation_curves rows of one variant and experiment (every order of each method)."""
    return [{"image_key": image_key, "method": method, "test": test, "kept_tokens": n, "kept_fraction": n / N,
             "prediction": IMAGES[image_key][0] if correct(variant, method, test, i, n, order) else 9,
             "correct": correct(variant, method, test, i, n, order), "order": order}
            for method in METHODS[variant] if EXPERIMENT_OF.get(method, EXPERIMENT) == experiment
            for test in TESTS for order in range(ORDERS.get(method, 1))
            for i, image_key in enumerate(IMAGES) for n in KEPT]


def _columns(rows: list[dict]) -> dict:
    return {name: [row[name] for row in rows] for name in rows[0]}


def token_rows() -> list[dict]:
    """A minimal tokens table (each image's CLS token, embeddings only).

    open_results cannot yet make an empty `tokens` view (DuckDB does not register Arrow's
    float16 of `top5_logit`), so an explain-only result set gets this tiny file.
    """
    return [{"image_key": image_key, "block": 0, "stream": "resid", "token": 0, "token_kind": "cls",
             "label": "prefix", "fg_fraction": None, "identifiability_rank": 1, "correct_logit": 0.0,
             "top5_class": [1, 2, 3, 4, 5], "top5_logit": [1.0, 0.5, 0.25, 0.0, -1.0],
             "sublayer_input_correct_logit": None, "key_value_agreement": None, "non_compositional": None}
            for image_key in IMAGES]


def write_explain_results(root: Path, tokens: bool = True) -> Path:
    """Write the explain and perturbation_curves tables of both variants under `root`; returns `root`.

    With `tokens`, also the minimal tokens table of `token_rows` (experiment 'baseline').
    """
    for variant in DEPTHS:
        if tokens:
            columns = _columns(token_rows())
            columns["top5_class"], columns["top5_logit"] = np.array(columns["top5_class"]), np.array(columns["top5_logit"])
            write_parquet_atomic(to_table("tokens", columns), table_file(root, "tokens", variant, "baseline", "toy-000000"))
        tables = [("explain", EXPERIMENT, explain_rows(variant)),
                  ("perturbation_curves", EXPERIMENT, curve_rows(variant)),
                  ("perturbation_curves", "probe", curve_rows(variant, "probe"))]
        for table, experiment, rows in tables:
            if rows:
                write_parquet_atomic(to_table(table, _columns(rows)),
                                     table_file(root, table, variant, experiment, "toy-000000"))
    return root


@pytest.fixture(scope="module")
def explain_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_explain_results(tmp_path_factory.mktemp("explain_results"))


def query_rows(results: Path, name: str) -> list[dict]:
    return run_query(open_results(results), find_query(name)).to_pylist()


def accuracy_curve(variant: str, method: str, test: str, orders: tuple[int, ...] | None = None
                   ) -> list[tuple[float, float]]:
    """(kept fraction, accuracy in [0, 1]) per kept count, by loops over the method's orders
    (default: all; the mean of the per-order accuracies) and images."""
    orders = tuple(range(ORDERS.get(method, 1))) if orders is None else orders
    points = []
    for n in KEPT:
        per_order = []
        for order in orders:
            flags = [correct(variant, method, test, i, n, order) for i in range(len(IMAGES))]
            per_order.append(sum(flags) / len(flags))
        points.append((n / N, sum(per_order) / len(per_order)))
    return points


def trapezoid(points: list[tuple[float, float]]) -> float:
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def reference(points: list[tuple[float, float]]) -> float:
    """METHOD §6 on the written points: mean acc over 1 <= n <= N-1, times (N-1)/N, over max acc."""
    peak = max(y for _, y in points)
    inside = [y for x, y in points if 1 <= round(x * N) <= N - 1]
    return sum(inside) / len(inside) * (N - 1) / N / peak if peak > 0 and inside else 0.0


def test_deletion_curves(explain_results: Path):
    got = query_rows(explain_results, "explain_deletion_curves")
    keys = [(r["variant"], r["method"], r["test"], r["kept_tokens"]) for r in got]
    want = sorted((v, m, t, n) for v in DEPTHS for m in METHODS[v] for t in TESTS for n in KEPT)
    assert keys == want  # one row each, ordered by variant, method, test, kept_tokens
    for row in got:
        flags = [correct(row["variant"], row["method"], row["test"], i, row["kept_tokens"]) for i in range(len(IMAGES))]
        assert row["images"] == len(IMAGES)
        assert row["kept_fraction"] == pytest.approx(row["kept_tokens"] / N)
        curve = dict(accuracy_curve(row["variant"], row["method"], row["test"]))
        assert row["accuracy_pct"] == pytest.approx(100 * curve[row["kept_tokens"] / N])
        if row["method"] != "random":
            assert row["accuracy_pct"] == pytest.approx(100 * sum(flags) / len(flags))
    by_hand = [r["accuracy_pct"] for r in got if (r["variant"], r["method"], r["test"]) == ("toy", "ours", "negative")]
    assert by_hand == pytest.approx([0.0, 200 / 3, 100.0, 100.0])
    # `toy`'s random, negative test: order 0 has 1, 1, 0, 1 and order 1 has 1, 2, 3, 1 of 3 correct
    random = [r["accuracy_pct"] for r in got if (r["variant"], r["method"], r["test"]) == ("toy", "random", "negative")]
    assert random == pytest.approx([100 / 3, 50.0, 50.0, 100 / 3])
    assert {r["method"] for r in got if r["variant"] == "toy"} >= {"linear_probe"}  # experiment 'probe'


def test_auc_trapezoid_reference_and_random(explain_results: Path):
    got = query_rows(explain_results, "explain_auc")
    keys = [(r["variant"], r["test"], r["method"]) for r in got]
    assert keys == sorted((v, t, m) for v in DEPTHS for m in METHODS[v] for t in TESTS)
    for row in got:
        points = accuracy_curve(row["variant"], row["method"], row["test"])
        assert (row["images"], row["points"]) == (len(IMAGES), len(KEPT))
        assert row["orders"] == ORDERS.get(row["method"], 1)
        assert row["auc"] == pytest.approx(trapezoid(points))
        assert row["reference_auc"] == pytest.approx(reference(points))
        if "random" in METHODS[row["variant"]]:
            assert row["random_auc"] == pytest.approx(trapezoid(accuracy_curve(row["variant"], "random", row["test"])))
        else:
            assert row["random_auc"] is None
    auc = {(r["variant"], r["method"], r["test"]): r for r in got}
    # By hand: fractions 0, .25, .75, 1 and accuracy 0, 2/3, 1, 1 ->
    # .25 * (0 + 2/3) / 2 + .5 * (2/3 + 1) / 2 + .25 * (1 + 1) / 2 = 1/12 + 5/12 + 3/12 = 0.75
    # (even spacing 0, 1/3, 2/3, 1 would give 13/18); reference: the interior points n = 1, 3
    # -> mean(2/3, 1) * (N - 1) / N / max = 5/6 * 3/4 / 1 = 5/8 (the old sum / (K max) gave 2/3).
    assert auc[("toy", "ours", "negative")]["auc"] == pytest.approx(0.75)
    assert auc[("toy", "ours", "negative")]["reference_auc"] == pytest.approx(5 / 8)
    assert auc[("small", "chefer", "positive")]["auc"] == 0 and auc[("small", "chefer", "positive")]["reference_auc"] == 0
    # `toy`'s random, negative test, (img * (n + 1) + 2 + 3 * order) % 4 < 2: order 0 has 1, 1, 0, 1
    # of 3 images correct (AUC 5/24), order 1 has 1, 2, 3, 1 (AUC 1/8 + 5/12 + 1/6 = 17/24). The
    # mean curve 1/3, 1/2, 1/2, 1/3 -> .25 * (5/6) / 2 + .5 * 1 / 2 + .25 * (5/6) / 2 = 11/24, the
    # mean of the two orders' AUCs; reference: mean(1/2, 1/2) * 3/4 / (1/2) = .75.
    assert auc[("toy", "random", "negative")]["auc"] == pytest.approx(11 / 24)
    assert auc[("toy", "random", "negative")]["auc"] == pytest.approx(
        (trapezoid(accuracy_curve("toy", "random", "negative", (0,)))
         + trapezoid(accuracy_curve("toy", "random", "negative", (1,)))) / 2)
    assert auc[("toy", "random", "negative")]["reference_auc"] == pytest.approx(0.75)
    assert auc[("toy", "ours", "negative")]["random_auc"] == pytest.approx(11 / 24)
    assert auc[("toy", "linear_probe", "negative")]["random_auc"] == pytest.approx(11 / 24)


def test_importance_by_block(explain_results: Path):
    importance = defaultdict(list)  # (variant, block, label) -> importances
    per_image = defaultdict(list)  # (variant, block, image, label) -> importances
    for variant in DEPTHS:
        for row in explain_rows(variant):
            if row["method"] == "ours" and row["label"] in ("class", "context"):
                importance[(variant, row["block"], row["label"])].append(row["importance"])
                per_image[(variant, row["block"], row["image_key"], row["label"])].append(row["importance"])
    got = query_rows(explain_results, "explain_importance_by_block")
    assert [(r["variant"], r["label"], r["block"]) for r in got] == sorted((v, lab, b) for v, b, lab in importance)
    for row in got:
        variant, block = row["variant"], row["block"]
        values = importance[(variant, block, row["label"])]
        assert row["normalised_block"] == pytest.approx(block / DEPTHS[variant])
        assert row["tokens"] == len(values)
        assert row["mean_importance"] == pytest.approx(sum(values) / len(values))
        wins = []
        for image_key in IMAGES:
            cls, ctx = (per_image.get((variant, block, image_key, lab)) for lab in ("class", "context"))
            if cls and ctx:
                wins.append(sum(cls) / len(cls) > sum(ctx) / len(ctx))
        assert row["images"] == len(wins) == 2  # img2 has no class-labelled token
        assert row["object_rank_pct"] == pytest.approx(100 * sum(wins) / len(wins))
    # By hand, `toy` block 1 (v = 0): heads ((7i + 3 + 5t) % 11) / 4 - 1 and ((2i + t) % 5) / 4 - .5.
    # img0: class tokens 1, 2 -> 1 - .25, -.5 + 0 -> mean .125; context token 3 -> .75 + .25 = 1 -> context wins.
    # img1: class token 1 -> 0 + .25; context 2..4 -> 1.75, -.75, .75 -> mean 7/12 -> context wins -> 0 %.
    # Block 2: img0 -.125 vs 1.25, img1 1.25 vs -7/12 -> 50 %.
    rank = {(r["variant"], r["block"], r["label"]): r for r in got}
    assert rank[("toy", 1, "class")]["object_rank_pct"] == rank[("toy", 1, "context")]["object_rank_pct"] == 0
    assert rank[("toy", 1, "class")]["mean_importance"] == pytest.approx((0.75 - 0.5 + 0.25) / 3)
    assert rank[("toy", 2, "class")]["object_rank_pct"] == pytest.approx(50.0)


def test_explain_queries_on_a_result_set_without_explain_tables(tmp_path: Path):
    results = write_toy_results(tmp_path / "results")  # tokens, images, params only
    for name, columns in EXPLAIN_QUERIES.items():
        table = run_query(open_results(results), find_query(name))
        assert table.num_rows == 0 and table.column_names == columns, name


def test_explain_queries_return_their_documented_columns(explain_results: Path):
    for name, columns in EXPLAIN_QUERIES.items():
        table = run_query(open_results(explain_results), find_query(name))
        assert table.column_names == columns, name
        header = find_query(name).header
        assert all(re.search(rf"\b{column}\b", header) for column in columns), name


def _drawn(spec: FigureSpec, results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Draw `spec` from its query on `results`, returning the matplotlib figure (kept open)."""
    kept = []
    monkeypatch.setattr(figures.plt, "close", kept.append)
    draw_figure(spec, run_query(open_results(results), find_query(spec.query)), tmp_path / f"{spec.name}.png")
    assert (tmp_path / f"{spec.name}.png").read_bytes().startswith(PNG_MAGIC)
    return kept[0]


def test_deletion_curve_figure_has_one_line_per_method(explain_results: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    spec = next(f for f in FIGURES if f.query == "explain_deletion_curves")
    assert (spec.line_by, spec.x, spec.panel_by) == ("method", "kept_fraction", ("variant", "test"))
    fig = _drawn(spec, explain_results, tmp_path, monkeypatch)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"{v}, {t}" for v in sorted(DEPTHS) for t in TESTS]
    colours = {}
    for ax in panels:
        variant, test = ax.get_title().split(", ")
        lines = ax.get_lines()
        assert sorted(line.get_label() for line in lines) == sorted(METHODS[variant])
        for line in lines:
            assert line.get_linestyle() == "-"
            assert list(line.get_xdata()) == pytest.approx([n / N for n in KEPT])
            ys = [100 * y for _, y in accuracy_curve(variant, line.get_label(), test)]
            assert list(line.get_ydata()) == pytest.approx(ys)
            colours.setdefault(line.get_label(), set()).add(tuple(line.get_color()))
    assert all(len(c) == 1 for c in colours.values())  # one colour per method in every panel
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # and distinct methods differ


def test_line_by_variant_keeps_the_dashed_random_twin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    results = write_toy_results(tmp_path / "results")  # variants toy and toy@random
    spec = next(f for f in FIGURES if f.query == "fig4b_key_value_agreement")
    assert spec.line_by == "variant"
    fig = _drawn(spec, results, tmp_path, monkeypatch)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"toy", "toy@random"}
    assert (lines["toy"].get_linestyle(), lines["toy@random"].get_linestyle()) == ("-", "--")
    assert tuple(lines["toy"].get_color()) == tuple(lines["toy@random"].get_color())


def test_importance_figure_has_one_line_per_variant(explain_results: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    spec = next(f for f in FIGURES if f.query == "explain_importance_by_block")
    fig = _drawn(spec, explain_results, tmp_path, monkeypatch)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["class", "context"]
    for ax in panels:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == set(DEPTHS)
        for variant, line in lines.items():
            assert list(line.get_xdata()) == pytest.approx([b / DEPTHS[variant] for b in range(1, DEPTHS[variant] + 1)])


@pytest.mark.parametrize("with_lens_tables", [True, False])
def test_report_draws_the_explain_figures(tmp_path: Path, with_lens_tables: bool):
    results = tmp_path / "results"
    if with_lens_tables:
        write_toy_results(results)
    write_explain_results(results, tokens=not with_lens_tables)
    out = tmp_path / "report"
    assert cli_main(["report", "--results", str(results), "--out", str(out), "--no-progress"]) == 0
    for name in ("explain_deletion_curves", "explain_importance_by_block"):
        data = (out / "figures" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert {p.stem for p in (out / "figures").glob("*.png")} == {f.name for f in FIGURES} | {h.name for h in HEATMAPS}
    page = (out / "index.html").read_text()
    assert "figures/explain_deletion_curves.png" in page and "tables/explain_auc.csv" in page
    # the §7 entries come after the lens results, in REPORT_ORDER
    assert page.index("tables/compositionality.csv") < page.index("tables/explain_importance_by_block.csv") \
        < page.index("tables/explain_deletion_curves.csv") < page.index("tables/explain_auc.csv")
