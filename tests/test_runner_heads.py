"""The `heads` (METHOD §3b) and `tuned` (METHOD §7b) experiments in a job: their rows against
hand counts, the tiers against each other, the source split against the heads' DLA, the
tuned lens's last block against the logit lens, the queries and the report's figures.

One shard of the smallest zoo model (20 images, 6 blocks, 17 tokens), analysed once per tier
by `ShardProcessor` (no Ray).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vitlens.cli import main as cli_main
from vitlens.report.build import build_report
from vitlens.report.queries import find_query, run_query
from vitlens.report.results import open_results
from vitlens.runner.shard_job import ShardProcessor
from vitlens.runner.spec import DataSpec, JobSpec, ProbeSpec

VARIANT = "shapes_vit_p16"
DEPTH, TOKENS, IMAGES = 6, 17, 20
STEM = "shapes-validation-000000"


def _shapes(out: Path, split: str, per_class: int) -> Path:
    assert cli_main(["shards", "shapes", "--classes", "20", "--per-class", str(per_class), "--size", "64",
                     "--shard-size", "20", "--seed", "0", "--split", split, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The validation shard analysed with baseline, heads and tuned (tokens tier) and with
    heads (summary tier)."""
    root = tmp_path_factory.mktemp("heads")
    training, analysed = _shapes(root / "train", "train", 2), _shapes(root / "validation", "validation", 1)
    out = {}
    for detail, experiments in (("tokens", ("baseline", "heads", "tuned")), ("summary", ("heads",))):
        job = JobSpec(name=f"heads-{detail}", output=str(root / detail), variants=(VARIANT,),
                      data=DataSpec(manifest=str(analysed / "manifest.json")), experiments=experiments,
                      batch_size=10, detail=detail,
                      probe=ProbeSpec(manifest=str(training / "manifest.json"), shots=2)
                      if "tuned" in experiments else ProbeSpec())
        ShardProcessor(VARIANT, job).process(str(analysed / f"{STEM}.tar"), STEM)
        out[detail] = root / detail
    return out


def _heads_count(results: dict[str, Path]) -> int:
    con = open_results(results["tokens"])
    return con.execute("SELECT count(DISTINCT head) FROM heads").fetchone()[0]


def test_heads_rows_match_hand_counts(results) -> None:
    con = open_results(results["tokens"])
    heads = _heads_count(results)
    assert heads >= 1
    (rows, blocks, tokens) = con.execute("SELECT count(*), count(DISTINCT block), count(DISTINCT token) "
                                         "FROM heads").fetchone()
    assert (rows, blocks, tokens) == (IMAGES * DEPTH * heads * TOKENS, DEPTH, TOKENS)
    # the CLS's DLA is the sum of its source terms over every token it reads
    worst = con.execute("""
        SELECT max(abs(d.dla - s.total)) FROM heads d
        JOIN (SELECT image_key, block, head, sum(cls_source_dla) AS total FROM heads GROUP BY ALL) s
          USING (image_key, block, head)
        WHERE d.token = 0""").fetchone()[0]
    assert worst < 1e-3
    # head_sources: the source labels' sums are the targets' summed DLA, group by group
    worst = con.execute("""
        SELECT max(abs(h.dla_sum - s.total)) FROM head_summary h
        JOIN (SELECT image_key, block, head, target_kind, target_label, sum(dla_sum) AS total
              FROM head_sources GROUP BY ALL) s
          ON s.image_key = h.image_key AND s.block = h.block AND s.head = h.head
         AND s.target_kind = h.token_kind AND s.target_label = h.label""").fetchone()[0]
    assert worst < 1e-3


def test_summary_tier_holds_the_same_sums(results) -> None:
    query = ("SELECT image_key, block, head, token_kind, label, tokens, dla_sum FROM head_summary "
             "WHERE experiment = 'heads' ORDER BY ALL")
    derived = open_results(results["tokens"]).execute(query).fetchall()
    stored = open_results(results["summary"]).execute(query).fetchall()
    assert len(derived) == len(stored) > 0
    assert all(a[:6] == b[:6] and abs(a[6] - b[6]) < 1e-3 * max(1.0, abs(b[6])) for a, b in zip(derived, stored))
    assert not list(results["summary"].glob("table=heads/**/*.parquet"))


def test_tuned_rows_and_the_identity_at_the_last_block(results) -> None:
    con = open_results(results["tokens"])
    (rows,) = con.execute("SELECT count(*) FROM tuned").fetchone()
    assert rows == IMAGES * (DEPTH + 1) * TOKENS
    # block L's map is the identity: its ranks are the logit lens's residual ranks, token by token
    differ = con.execute(f"""
        SELECT count(*) FROM tuned t JOIN tokens l
          ON l.image_key = t.image_key AND l.token = t.token AND l.block = t.block AND l.stream = 'resid'
        WHERE t.block = {DEPTH} AND l.experiment = 'baseline'
          AND (t.identifiability_rank <> l.identifiability_rank
               OR abs(t.correct_logit - l.correct_logit) > 1e-4 * greatest(1, abs(l.correct_logit)))""").fetchone()
    assert differ == (0,)


def test_queries_and_report_sections(results, tmp_path: Path) -> None:
    con = open_results(results["tokens"])
    heatmap = run_query(con, find_query("heads_by_block"))
    assert heatmap.num_rows == DEPTH * _heads_count(results) * 2  # cls and image
    shares = run_query(con, find_query("head_source_shares")).to_pylist()
    for kind in ("cls", "image"):
        per_block = {}
        for row in shares:
            if row["target_kind"] == kind:
                per_block[row["block"]] = per_block.get(row["block"], 0.0) + row["abs_share_pct"]
        assert len(per_block) == DEPTH and all(abs(v - 100) < 1e-6 for v in per_block.values())
    top = run_query(con, find_query("heads_top_by_class")).to_pylist()
    assert {row["class_index"] for row in top} == set(range(20))
    assert all(sum(r["images_top"] for r in top if r["class_index"] == c) <= 1 for c in range(20))  # 1 image each
    tuned = run_query(con, find_query("tuned_vs_logit_by_block")).to_pylist()
    last = [r for r in tuned if r["block"] == DEPTH]
    assert last and all(r["tuned_id_rate_pct"] == r["lens_id_rate_pct"] for r in last)
    report = build_report(results["tokens"], tmp_path / "report")
    for figure in ("heads_by_block", "tuned_vs_logit_by_block"):
        assert (tmp_path / "report" / "figures" / f"{figure}.png").stat().st_size > 1000
    assert "head_source_shares" in (tmp_path / "report" / "index.html").read_text()
    assert report is not None


def test_gallery_and_show_draw_where_the_cls_reads_from(results, tmp_path: Path, capsys) -> None:
    """`<key>-sources.png` from the `heads` rows: the maps are the per-token sums over heads of
    `cls_source_dla` (recomputed here with pyarrow), and `vitlens show` writes the figure."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from vitlens.report.gallery import ResultSet, write_image_figures

    table = ds.dataset(str(results["tokens"] / "table=heads"), format="parquet", partitioning="hive").to_table()
    key = sorted(set(table.column("image_key").to_pylist()))[0]
    rows = table.filter(pc.equal(table.column("image_key"), key)).to_pylist()
    expected = np.zeros((DEPTH, TOKENS))
    for row in rows:
        expected[row["block"] - 1, row["token"]] += row["cls_source_dla"]
    found = ResultSet(results["tokens"])
    try:
        variant = found.variant(VARIANT)
        info = next(i for i in found.images(VARIANT, "baseline") if i.image_key == key)
        maps = found.source_maps(variant, info)
    finally:
        found.close()
    assert sorted(maps.blocks) == list(range(1, DEPTH + 1))
    assert np.allclose(np.stack([maps.blocks[b] for b in range(1, DEPTH + 1)]), expected, atol=1e-4)
    figures = write_image_figures(results["tokens"], VARIANT, key, tmp_path / "show")
    sources = [f for f in figures if f.path and f.path.endswith("-sources.png")]
    assert len(sources) == 1 and "where the CLS reads" in sources[0].caption
    assert (tmp_path / "show" / sources[0].path).stat().st_size > 5000
    assert cli_main(["show", key, "--results", str(results["tokens"]), "--variant", VARIANT,
                     "--out", str(tmp_path / "cli")]) == 0
    assert "-sources.png" in capsys.readouterr().out
