"""The job's `explain` experiment: exact row counts of `explain` and `perturbation_curves`,
their values against independent computations (a timm forward on the truly shortened token
sequence, the plain model's correctness from the lens), and a GAP model skipped.

Runs `ShardProcessor` directly (the Ray layer is tested in test_runner_job.py).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from vitlens.cli import main as cli_main
from vitlens.data.geometry import EvalGeometry
from vitlens.data.reader import iter_shard_batches
from vitlens.explain.gradients import block_head_importance
from vitlens.models.registry import load_variant
from vitlens.runner.shard_job import ShardProcessor
from vitlens.runner.spec import DataSpec, ExplainSpec, JobSpec, ResourceSpec
from vitlens.store.layout import shard_stem

VARIANT = "shapes_vit_p16"  # L = 6 blocks, H = 3 heads, N = 16 image tokens, 1 CLS
GAP = "shapes_vit_gap_p8"
METHODS = {"ours", "chefer", "attention", "rollout", "random"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    code = cli_main(["shards", "shapes", "--classes", "20", "--per-class", "1", "--size", "64",
                     "--shard-size", "10", "--seed", "5", "--out", str(out)])
    assert code == 0
    return out


def run_shards(shards: Path, output: Path, variants: tuple[str, ...], explain: ExplainSpec) -> JobSpec:
    """Process every shard of `shards` with every variant, no Ray."""
    job = JobSpec(name="t", output=str(output), variants=variants,
                  data=DataSpec(manifest=str(shards / "manifest.json")),
                  experiments=("baseline", "explain"), batch_size=8,
                  resources=ResourceSpec(device="cpu"), explain=explain)
    for variant in variants:
        processor = ShardProcessor(variant, job)
        for shard in sorted(shards.glob("*.tar")):
            processor.process(str(shard), shard_stem(str(shard)))
    return job


@pytest.fixture(scope="module")
def results(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    run_shards(shards, out, (VARIANT, GAP), ExplainSpec())
    return out


def query(results: Path, sql: str) -> list[tuple]:
    con = duckdb.connect()
    for table in ("explain", "perturbation_curves", "images"):
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet("
                    f"'{results}/table={table}/*/*/*.parquet', hive_partitioning = true)")
    return con.execute(sql).fetchall()


def test_row_counts_are_exact(results: Path) -> None:
    images, blocks, tokens = 20, 6, 16
    counts = dict(query(results, "SELECT method, count(*) FROM explain GROUP BY method"))
    assert counts == {"ours": images * blocks * tokens, **{m: images * tokens for m in METHODS - {"ours"}}}
    points, orders = tokens + 1, ExplainSpec().random_orders  # random: every order's curve, stored for both tests
    assert query(results, "SELECT count(*) FROM perturbation_curves") == [
        (images * (len(METHODS) - 1 + orders) * 2 * points,)]
    assert query(results, "SELECT count(DISTINCT \"order\") FROM perturbation_curves WHERE method = 'random'") == [
        (orders,)]
    assert query(results, "SELECT min(token), max(token), min(block), max(block), count(DISTINCT image_key) "
                          "FROM explain WHERE method = 'ours'") == [(1, 16, 1, 6, 20)]
    assert query(results, "SELECT count(*) FROM explain WHERE method <> 'ours' AND block IS NOT NULL") == [(0,)]


def test_gap_model_writes_no_explain_rows(results: Path) -> None:
    assert not (results / "table=explain" / f"variant={GAP}").exists()
    assert (results / "table=tokens" / f"variant={GAP}" / "experiment=baseline").is_dir()
    assert query(results, "SELECT DISTINCT variant FROM perturbation_curves") == [(VARIANT,)]


def first_batch(shards: Path) -> tuple[torch.nn.Module, object]:
    loaded = load_variant(VARIANT)
    geometry = EvalGeometry.from_data_config(loaded.data_config)
    shard = sorted(shards.glob("*.tar"))[0]
    batch = next(iter(iter_shard_batches(str(shard), geometry, 8, 16, 1)))
    return loaded.model, batch


def test_ours_rows_hold_each_block_and_head(results: Path, shards: Path) -> None:
    model, batch = first_batch(shards)
    importance = block_head_importance(model, batch.images, batch.class_index)  # [B, L, H, N]
    rows = query(results, "SELECT image_key, block, token, importance, head_importance, class_of_interest "
                          "FROM explain WHERE method = 'ours'")
    stored = {(key, block, token): (value, heads, c) for key, block, token, value, heads, c in rows}
    for i, key in enumerate(batch.keys):
        for block in (1, 4, 6):
            for token in (1, 7, 16):
                value, heads, c = stored[key, block, token]
                expected = importance[i, block - 1, :, token - 1]
                assert np.allclose(heads, expected.numpy(), atol=1e-6)
                assert value == pytest.approx(float(expected.sum()), abs=1e-5)
                assert c == int(batch.class_index[i])


def shortened_prediction(model: torch.nn.Module, image: torch.Tensor, kept_image_tokens: list[int]) -> int:
    """timm's own modules on the truly shortened sequence: CLS + the kept patch tokens only."""
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(image[None]))  # [1, 1 + N, d]
        x = x[:, [0] + [t for t in kept_image_tokens]]
        x = model.norm(model.blocks(model.norm_pre(x)))
        return int(model.forward_head(x).argmax(dim=1))


def test_deletion_points_match_a_forward_on_the_shortened_sequence(results: Path, shards: Path) -> None:
    """Baselines have one stored value per token (exactly what was ranked): re-rank them here,
    keep the n first, and run timm on the sequence without the other tokens."""
    model, batch = first_batch(shards)
    for method in ("attention", "rollout"):
        rows = query(results, f"SELECT image_key, token, importance FROM explain WHERE method = '{method}'")
        per_token: dict[str, dict[int, float]] = {}
        for key, token, value in rows:
            per_token.setdefault(key, {})[token] = value
        for i, key in enumerate(batch.keys[:4]):
            values = per_token[key]
            orders = {"negative": sorted(values, key=lambda t: (-values[t], t)),  # ties: lower position first
                      "positive": sorted(values, key=lambda t: (values[t], t))}
            for test, order in orders.items():
                for n in (1, 3, 8):
                    stored = query(results, f"SELECT prediction FROM perturbation_curves WHERE image_key = '{key}' "
                                            f"AND method = '{method}' AND test = '{test}' AND kept_tokens = {n}")
                    assert stored == [(shortened_prediction(model, batch.images[i], sorted(order[:n])),)], (method, test, n)


def test_curve_end_points(results: Path) -> None:
    """n = N is the plain model (the lens's `correct`); n = 0 is the prefix alone, whatever the method."""
    mismatched = query(results, """
        SELECT count(*) FROM perturbation_curves p JOIN images i
          ON p.image_key = i.image_key AND i.variant = p.variant AND i.experiment = 'baseline'
        WHERE p.kept_tokens = 16 AND p.correct <> i.correct""")
    assert mismatched == [(0,)]
    assert query(results, "SELECT count(DISTINCT (image_key, prediction)) FROM perturbation_curves "
                          "WHERE kept_tokens = 0") == [(20,)]
    assert query(results, "SELECT min(kept_fraction), max(kept_fraction) FROM perturbation_curves") == [(0.0, 1.0)]


def test_curve_points_and_predicted_target(shards: Path, tmp_path: Path) -> None:
    job = run_shards(shards, tmp_path, (VARIANT,), ExplainSpec(target="predicted", curve_points=5))
    results = Path(job.output)
    assert query(results, "SELECT DISTINCT kept_tokens FROM perturbation_curves ORDER BY 1") == [
        (0,), (4,), (8,), (12,), (16,)]
    model, batch = first_batch(shards)
    with torch.no_grad():
        predicted = model(batch.images).argmax(dim=1)
    stored = dict(query(results, "SELECT DISTINCT image_key, class_of_interest FROM explain"))
    assert [stored[k] for k in batch.keys] == predicted.tolist()


def test_an_explain_only_result_set_opens_and_answers_the_auc_query(results: Path, tmp_path: Path) -> None:
    import shutil

    from vitlens.report.queries import find_query, run_query
    from vitlens.report.results import open_results

    for table in ("explain", "perturbation_curves"):
        shutil.copytree(results / f"table={table}", tmp_path / f"table={table}")
    auc = run_query(open_results(tmp_path), find_query("explain_auc")).to_pylist()
    assert {(row["method"], row["test"]) for row in auc} == {(m, t) for m in METHODS for t in ("negative", "positive")}
    assert all(row["images"] == 20 and row["points"] == 17 for row in auc)


def test_adding_explain_to_a_finished_job_runs_only_explain(shards: Path, tmp_path: Path) -> None:
    import hashlib
    import json

    from vitlens.runner.plan import WorkQueue
    from vitlens.store.layout import done_marker

    urls = [str(s) for s in sorted(shards.glob("*.tar"))]
    first = JobSpec(name="t", output=str(tmp_path), variants=(VARIANT, GAP),
                    data=DataSpec(manifest=str(shards / "manifest.json")), experiments=("baseline",),
                    batch_size=8, resources=ResourceSpec(device="cpu"))
    for variant in first.variants:
        processor = ShardProcessor(variant, first)
        for url in urls:
            processor.process(url, shard_stem(url))
    tokens_files = sorted(tmp_path.glob("table=tokens/*/*/*.parquet"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tokens_files}
    legacy = done_marker(tmp_path, VARIANT, shard_stem(urls[0]))  # as vitlens 0.1 wrote it: no `files`
    legacy.write_text(json.dumps({k: v for k, v in json.loads(legacy.read_text()).items() if k != "files"}))

    second = JobSpec(name="t", output=str(tmp_path), variants=first.variants, data=first.data,
                     experiments=("baseline", "explain"), batch_size=8, resources=first.resources)
    queue = WorkQueue.build(second.output, second.variants, urls, second.experiments, max_attempts=1)
    assert {item.experiments for items in queue.pending.values() for item in items} == {("explain",)}
    for variant in second.variants:
        processor = ShardProcessor(variant, second)
        while (item := queue.take(variant)) is not None:
            processor.process(item.shard_url, item.stem, experiments=item.experiments)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tokens_files} == before
    assert query(tmp_path, "SELECT count(DISTINCT image_key) FROM perturbation_curves") == [(20,)]
    for variant in second.variants:  # GAP: explain does not apply, and counts as done
        marker = json.loads(done_marker(tmp_path, variant, shard_stem(urls[0])).read_text())
        assert marker["experiments"] == ["baseline", "explain"]
        # every file of the shard is named with its size and sha256, the old marker's kept ones too
        folder = f"variant={variant}"
        on_disk = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob(f"table=*/{folder}/*/{shard_stem(urls[0])}.parquet"))
        assert sorted(marker["files"]) == on_disk and any("experiment=baseline" in k for k in on_disk)
        for key, entry in marker["files"].items():
            data = (tmp_path / key).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, key
    again = WorkQueue.build(second.output, second.variants, urls, second.experiments, max_attempts=1)
    assert again.total() == 0
