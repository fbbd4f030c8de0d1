"""Every query of queries/ on a tiny hand-built result set, checked against brute-force Python.

The result set has the real schema and layout (vitlens.store): variants `toy` and its twin
`toy@random` (L = 2 blocks, C = 4 classes), 2 images each, 1 CLS + 3 image tokens, every
experiment. Values follow simple rules of (variant, image, block, stream, token), and each
test recomputes its query's answer from the Python rows with plain loops (no SQL).
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from vitlens.cli import main as cli_main
from vitlens.report.queries import QUERIES_DIR, find_query, list_queries, run_query
from vitlens.report.results import open_results
from vitlens.store.layout import table_file, write_parquet_atomic
from vitlens.store.schema import to_table

DEPTH = 2
NUM_CLASSES = 4
VARIANTS = ("toy", "toy@random")
IMAGES = {  # image_key -> (class_index, labels of the image tokens 1..3)
    "img0": (0, ("class", "context", "ignore")),
    "img1": (1, ("class", "class", "context")),
}
CORRECT = {("toy", "img0"): True, ("toy", "img1"): False, ("toy@random", "img0"): False, ("toy@random", "img1"): False}
EXPERIMENTS = ("baseline", "attn_self_only", "attn_no_cls", "remove_class_tokens", "remove_context_tokens")
STREAM_IDS = {"resid": 0, "attn": 1, "mlp": 2}
EXPERIMENT_IDS = {name: i for i, name in enumerate(EXPERIMENTS)}


def token_rows(variant: str, experiment: str) -> list[dict]:
    """The tokens rows of one (variant, experiment), from fixed rules."""
    v = VARIANTS.index(variant)
    e = EXPERIMENT_IDS[experiment]
    rows = []
    for i, (image_key, (class_index, labels)) in enumerate(IMAGES.items()):
        for stream, s in STREAM_IDS.items():
            for block in range(0 if stream == "resid" else 1, DEPTH + 1):
                for token in range(4):
                    label = "prefix" if token == 0 else labels[token - 1]
                    if experiment == "remove_class_tokens" and label == "class":
                        continue
                    if experiment == "remove_context_tokens" and label == "context":
                        continue
                    top1 = (i + token * block + s + v) % 3
                    sub = stream != "resid"
                    rows.append({
                        "image_key": image_key, "block": block, "stream": stream, "token": token,
                        "token_kind": "cls" if token == 0 else "image", "label": label,
                        "fg_fraction": None if token == 0 else 0.5,
                        "identifiability_rank": (v * 7 + i * 5 + block * 3 + s * 2 + token + e) % 3,
                        "correct_logit": float((block * token + i + v) % 4),
                        "top5_class": [top1, 3, 4, 5, 6],
                        "top5_logit": [1.0, 0.5, 0.25, 0.0, -1.0],
                        "sublayer_input_correct_logit": 1.5 if sub else None,
                        "key_value_agreement": ((i + block + token + s + v) % 2 == 0) if sub else None,
                        "non_compositional": ((token * block + i + s) % 3 == 0) if sub else None,
                    })
    return rows


def image_rows(variant: str, experiment: str) -> list[dict]:
    """The images rows of one (variant, experiment)."""
    rows = []
    for image_key, (class_index, labels) in IMAGES.items():
        correct = CORRECT[(variant, image_key)]
        removed = {"remove_class_tokens": "class", "remove_context_tokens": "context"}.get(experiment)
        rows.append({
            "image_key": image_key, "shard": "toy-000000", "class_index": class_index,
            "class_name": f"c{class_index}", "prediction": class_index if correct else 3, "correct": correct,
            "num_image_tokens": sum(label != removed for label in labels),
            "num_class_tokens": labels.count("class"), "num_context_tokens": labels.count("context"),
        })
    return rows


def agreement(variant: str, block: int, sublayer: str, class_index: int) -> float:
    """Class-value agreement: the trained model beats its twin for every class."""
    base = 0.2 + 0.05 * class_index + 0.1 * block + (0.05 if sublayer == "mlp" else 0.0)
    return base + (0.3 if variant == "toy" else 0.0)


def _columns(rows: list[dict]) -> dict:
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    for name in ("top5_class", "top5_logit"):
        if name in columns:
            columns[name] = np.array(columns[name])
    return columns


def write_toy_results(root: Path) -> Path:
    """Write the toy result set (tokens, images, params) under `root`; returns `root`."""
    for variant in VARIANTS:
        for experiment in EXPERIMENTS:
            for table, rows in (("tokens", token_rows(variant, experiment)), ("images", image_rows(variant, experiment))):
                write_parquet_atomic(to_table(table, _columns(rows)),
                                     table_file(root, table, variant, experiment, "toy-000000"))
        params = [{"block": b, "sublayer": sub, "class_index": c, "class_value_agreement": agreement(variant, b, sub, c)}
                  for b in range(1, DEPTH + 1) for sub in ("attn", "mlp") for c in range(NUM_CLASSES)]
        write_parquet_atomic(to_table("params", _columns(params)), table_file(root, "params", variant, "none", "params"))
    return root


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_results(tmp_path_factory.mktemp("toy_results"))


def query_rows(results: Path, name: str) -> list[dict]:
    return run_query(open_results(results), find_query(name)).to_pylist()


def all_tokens(experiment: str = "baseline") -> list[dict]:
    return [dict(row, variant=v) for v in VARIANTS for row in token_rows(v, experiment)]


def rate(flags: list[bool]) -> float:
    return 100 * sum(flags) / len(flags)


def test_every_query_has_a_title_and_header_naming_its_columns():
    queries = list_queries() + list_queries("stats")
    assert len(queries) == 24  # 12 lens + 3 explainability (test_queries_explain) + 2 probe results, 3 stats inputs,
    # 4 beyond the paper: heads (3, test_runner_heads) and the tuned lens
    for query in queries:
        assert query.title != query.path.stem, query.path
        assert "Columns" in query.header and "Paper" in query.header, query.path


def test_table1_identifiability(toy_results: Path):
    got = {r["variant"]: r for r in query_rows(toy_results, "table1_identifiability")}
    assert set(got) == set(VARIANTS)
    for variant in VARIANTS:
        last = [r for r in token_rows(variant, "baseline")
                if r["stream"] == "resid" and r["block"] == DEPTH and r["token_kind"] == "image"]
        per_image = [rate([r["identifiability_rank"] == 0 for r in last if r["image_key"] == k]) for k in IMAGES]
        assert got[variant]["depth"] == DEPTH and got[variant]["images"] == 2 and got[variant]["image_tokens"] == 6
        assert got[variant]["id_rate_pct"] == pytest.approx(rate([r["identifiability_rank"] == 0 for r in last]))
        assert got[variant]["id_rate_per_image_pct"] == pytest.approx(np.mean(per_image))
    # By hand for `toy` (v=0, e=0, block 2, resid): rank = (5i + 6 + t) % 3 -> img0 tokens 1..3: 1,2,0;
    # img1: 0,1,2 -> 2 of 6 identifiable.
    assert got["toy"]["id_rate_pct"] == pytest.approx(100 * 2 / 6)


def test_images_with_identifiable_token_vs_accuracy_and_twin(toy_results: Path):
    rows = query_rows(toy_results, "images_with_identifiable_token")
    assert [r["variant"] for r in rows] == ["toy"]

    def with_token(variant: str) -> float:
        last = [r for r in token_rows(variant, "baseline")
                if r["stream"] == "resid" and r["block"] == DEPTH and r["token_kind"] == "image"]
        return rate([any(r["identifiability_rank"] == 0 for r in last if r["image_key"] == k) for k in IMAGES])

    row = rows[0]
    assert row["images_with_id_token_pct"] == pytest.approx(with_token("toy"))
    assert row["random_images_with_id_token_pct"] == pytest.approx(with_token("toy@random"))
    assert row["top1_pct"] == pytest.approx(50.0) and row["random_top1_pct"] == pytest.approx(0.0)


@pytest.mark.parametrize("name, group_key, kinds", [
    ("fig2_identifiability_by_block", "token_kind", ("cls", "image")),
    ("fig3a_class_context_by_block", "label", ("class", "context")),
])
def test_identifiability_by_block(toy_results: Path, name: str, group_key: str, kinds: tuple[str, ...]):
    expected = defaultdict(list)
    for r in all_tokens():
        if r["stream"] == "resid" and r[group_key] in kinds and (group_key == "token_kind" or r["token_kind"] == "image"):
            expected[(r["variant"], r["block"], r[group_key])].append(r["identifiability_rank"])
    got = query_rows(toy_results, name)
    assert len(got) == len(expected)
    for row in got:
        ranks = expected[(row["variant"], row["block"], row[group_key])]
        assert row["normalised_block"] == pytest.approx(row["block"] / DEPTH)
        assert row["tokens"] == len(ranks)
        assert row["mean_score"] == pytest.approx(np.mean([1 - k / NUM_CLASSES for k in ranks]))
        assert row["id_rate_pct"] == pytest.approx(rate([k == 0 for k in ranks]))


def last_block_rate(variant: str, experiment: str, keep=lambda r: True) -> float:
    rows = [r for r in token_rows(variant, experiment)
            if r["stream"] == "resid" and r["block"] == DEPTH and r["token_kind"] == "image" and keep(r)]
    return rate([r["identifiability_rank"] == 0 for r in rows])


def test_perturbation_attention(toy_results: Path):
    got = {r["variant"]: r for r in query_rows(toy_results, "perturbation_attention")}
    for variant in VARIANTS:
        assert got[variant]["baseline_pct"] == pytest.approx(last_block_rate(variant, "baseline"))
        assert got[variant]["self_only_pct"] == pytest.approx(last_block_rate(variant, "attn_self_only"))
        assert got[variant]["no_cls_pct"] == pytest.approx(last_block_rate(variant, "attn_no_cls"))


def test_token_removal_compares_the_same_remaining_tokens(toy_results: Path):
    got = {(r["variant"], r["removed"]): r for r in query_rows(toy_results, "perturbation_token_removal")}
    assert len(got) == 4
    for variant in VARIANTS:
        for removed in ("class", "context"):
            row = got[(variant, removed)]
            # img0 keeps 2 of 3 image tokens either way; img1 keeps 1 (class removed) or 2 (context removed)
            assert row["baseline_tokens"] == row["remaining_tokens"] == (3 if removed == "class" else 4)
            assert row["baseline_pct"] == pytest.approx(
                last_block_rate(variant, "baseline", lambda r: r["label"] != removed))
            assert row["removed_pct"] == pytest.approx(last_block_rate(variant, f"remove_{removed}_tokens"))


def test_class_similarity_change_rate(toy_results: Path):
    expected = defaultdict(list)
    for r in all_tokens():
        if r["stream"] != "resid":
            expected[(r["variant"], r["block"], r["stream"], r["token_kind"])].append(
                r["correct_logit"] > r["sublayer_input_correct_logit"])
    got = query_rows(toy_results, "fig3b_class_similarity_change")
    assert len(got) == len(expected) == 2 * DEPTH * 2 * 2
    for row in got:
        flags = expected[(row["variant"], row["block"], row["sublayer"], row["token_kind"])]
        assert row["change_rate_pct"] == pytest.approx(rate(flags)) and row["tokens"] == len(flags)


def test_residual_top1_match(toy_results: Path):
    top1 = {(r["variant"], r["image_key"], r["token"], r["block"], r["stream"]): r["top5_class"][0] for r in all_tokens()}
    expected = defaultdict(list)
    for (variant, image_key, token, block, stream), value in top1.items():
        if stream == "resid" and block >= 1:
            matches = [value == top1[(variant, image_key, token, block, "attn")],
                       value == top1[(variant, image_key, token, block, "mlp")],
                       value == top1[(variant, image_key, token, block - 1, "resid")]]
            kind = "cls" if token == 0 else "image"
            expected[(variant, block, kind)].append(matches + [not any(matches)])
    got = query_rows(toy_results, "fig3c_residual_top1_match")
    assert len(got) == len(expected)
    for row in got:
        flags = np.array(expected[(row["variant"], row["block"], row["token_kind"])])
        want = 100 * flags.mean(axis=0)
        assert [row["attn_pct"], row["mlp_pct"], row["previous_resid_pct"], row["composite_pct"]] == pytest.approx(want)


def test_class_value_agreement_vs_twin(toy_results: Path):
    got = query_rows(toy_results, "fig4a_class_value_agreement")
    assert len(got) == DEPTH * 2 and {r["variant"] for r in got} == {"toy"}
    for row in got:
        trained = [agreement("toy", row["block"], row["sublayer"], c) for c in range(NUM_CLASSES)]
        random = [agreement("toy@random", row["block"], row["sublayer"], c) for c in range(NUM_CLASSES)]
        assert row["classes"] == NUM_CLASSES and row["normalised_block"] == pytest.approx(row["block"] / DEPTH)
        assert row["mean_agreement"] == pytest.approx(np.mean(trained), abs=1e-6)
        assert row["random_mean_agreement"] == pytest.approx(np.mean(random), abs=1e-6)
    pairs = query_rows(toy_results, "stats/class_value_agreement_pairs")
    assert len(pairs) == DEPTH * 2 * NUM_CLASSES
    assert all(p["agreement"] - p["random_agreement"] == pytest.approx(0.3, abs=1e-6) for p in pairs)


@pytest.mark.parametrize("name, column, flag", [
    ("fig4b_key_value_agreement", "kv_agreement_pct", lambda r: r["key_value_agreement"]),
    ("compositionality", "compositional_pct", lambda r: not r["non_compositional"]),
])
def test_sublayer_token_rates(toy_results: Path, name: str, column: str, flag):
    expected = defaultdict(list)
    for r in all_tokens():
        if r["stream"] != "resid":
            expected[(r["variant"], r["block"], r["stream"])].append(flag(r))
    got = query_rows(toy_results, name)
    assert len(got) == len(expected)
    for row in got:
        flags = expected[(row["variant"], row["block"], row["sublayer"])]
        assert row[column] == pytest.approx(rate(flags)) and row["tokens"] == len(flags)


def test_kv_agreement_correct_vs_misclassified(toy_results: Path):
    got = {(r["variant"], r["block"], r["sublayer"]): r for r in query_rows(toy_results, "kv_agreement_correct_vs_misclassified")}
    per_image = {(r["variant"], r["block"], r["sublayer"], r["image_key"]): r
                 for r in query_rows(toy_results, "stats/kv_agreement_per_image")}
    for variant in VARIANTS:
        for block in range(1, DEPTH + 1):
            for sublayer in ("attn", "mlp"):
                row = got[(variant, block, sublayer)]
                flags = {k: [r["key_value_agreement"] for r in all_tokens() if r["variant"] == variant
                             and r["block"] == block and r["stream"] == sublayer and r["image_key"] == k] for k in IMAGES}
                correct = [k for k in IMAGES if CORRECT[(variant, k)]]
                wrong = [k for k in IMAGES if not CORRECT[(variant, k)]]
                assert (row["correct_images"], row["misclassified_images"]) == (len(correct), len(wrong))
                if correct:
                    assert row["correct_pct"] == pytest.approx(rate(sum((flags[k] for k in correct), [])))
                else:
                    assert row["correct_pct"] is None
                assert row["misclassified_pct"] == pytest.approx(rate(sum((flags[k] for k in wrong), [])))
                for k in IMAGES:
                    image = per_image[(variant, block, sublayer, k)]
                    assert (image["agreeing"], image["tokens"], image["correct"]) == (sum(flags[k]), 4, CORRECT[(variant, k)])


def test_class_context_stats_input(toy_results: Path):
    got = query_rows(toy_results, "stats/class_context_last_block")
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in all_tokens():
        if r["stream"] == "resid" and r["block"] == DEPTH and r["label"] in ("class", "context"):
            counts[r["variant"], r["label"]][0] += int(r["identifiability_rank"] == 0)
            counts[r["variant"], r["label"]][1] += 1
    assert sorted((r["variant"], r["label"], r["identifiable"], r["tokens"]) for r in got) == sorted(
        (variant, label, hits, tokens) for (variant, label), (hits, tokens) in counts.items())


def test_query_cli_formats_and_errors(toy_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert cli_main(["query", "table1_identifiability", "--results", str(toy_results), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('"variant","depth"') and len(lines) == 3
    own = tmp_path / "mine.sql"
    own.write_text("SELECT count(*) AS n FROM images WHERE experiment = 'baseline'")
    out = tmp_path / "n.parquet"
    assert cli_main(["query", str(own), "--results", str(toy_results), "--format", "parquet", "--output", str(out)]) == 0
    import pyarrow.parquet as pq
    assert pq.read_table(out).to_pylist() == [{"n": 4}]
    assert cli_main(["query", "no_such_query", "--results", str(toy_results)]) == 2
    assert "no_such_query" in capsys.readouterr().err
    bad = tmp_path / "bad.sql"
    bad.write_text("SELECT nope FROM tokens")
    assert cli_main(["query", str(bad), "--results", str(toy_results)]) == 2
    assert "bad.sql" in capsys.readouterr().err
    assert cli_main(["query", "table1_identifiability", "--results", str(tmp_path)]) == 2


def test_shell_reads_stdin_and_has_the_views(toy_results: Path):
    script = "print(sql('SELECT count(*) AS n FROM params')['n'][0]); print(query('table1_identifiability').height)\n"
    done = subprocess.run([sys.executable, "-m", "vitlens", "query", "--shell", "--results", str(toy_results)],
                          input=script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "32" in done.stdout.split() or "32" in done.stdout  # 2 variants x 2 blocks x 2 sub-layers x 4 classes
    assert "\n2\n" in done.stdout.replace(">>> ", "\n")


def test_empty_tables_are_empty_views(toy_results: Path):
    con = open_results(toy_results)  # the toy set has no runs or rejects files
    assert con.execute("SELECT count(*) FROM rejects").fetchone() == (0,)
    assert "variant" in [d[0] for d in con.execute("SELECT * FROM runs").description]
    assert QUERIES_DIR.is_dir()
