"""The distributed job end to end on a local Ray cluster: exact row counts, an actor killed
mid-shard, a shard with corrupt samples or hostile labels (a killed driver and its resume:
`tests/test_runner_faults.py`).

Uses the smallest embedded zoo model (16 image tokens at 64 px) so each run is seconds.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import duckdb
import pytest
import ray

from vitlens.cli import main as cli_main
from vitlens.data.token_labels import LABEL_CLASS
from vitlens.errors import UserError
from vitlens.report.results import open_results
from vitlens.runner.actors import INJECT_DEATH_ENV, ShardActor
from vitlens.runner.driver import run_job
from vitlens.runner.shard_job import ShardProcessor
from vitlens.runner.spec import load_job_spec

VARIANT = "shapes_vit_p16"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    code = cli_main(["shards", "shapes", "--classes", "20", "--per-class", "2", "--size", "64",
                     "--shard-size", "10", "--seed", "3", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_job(folder: Path, shards: Path, experiments: list[str], max_actors: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(
        f'name = "test"\noutput = "results"\nvariants = ["{VARIANT}"]\n'
        f"experiments = {experiments!r}\nbatch_size = 4\n"
        f'[data]\nmanifest = "{shards}/manifest.json"\n'
        f'[resources]\ndevice = "cpu"\nmax_actors = {max_actors}\nmax_task_retries = 2\nmax_actor_restarts = 2\n'
    )
    return path


def tokens(results: str, experiment: str = "baseline") -> list[tuple]:
    con = duckdb.connect()
    return con.execute(
        "SELECT image_key, block, stream, token, identifiability_rank, "
        "[top5_class_1, top5_class_2, top5_class_3, top5_class_4, top5_class_5] FROM "  # schema 8: one column per rank
        f"read_parquet('{results}/table=tokens/variant={VARIANT}/experiment={experiment}/*.parquet') "
        "ORDER BY ALL"
    ).fetchall()


def test_rows_are_images_x_blocks_x_streams_x_tokens(tmp_path: Path, shards: Path, ray_session) -> None:
    job = load_job_spec(write_job(tmp_path, shards, ["baseline", "remove_class_tokens"], max_actors=2))
    report = run_job(job, progress=False)
    assert report.shards_done == 4 and not report.failures

    processor_model = ShardProcessor(VARIANT, job).model  # the geometry of the model, independent of the store
    blocks = len(processor_model.blocks)
    prefix = processor_model.num_prefix_tokens
    grid = processor_model.patch_embed.grid_size
    num_tokens = prefix + grid[0] * grid[1]
    con = duckdb.connect()
    base = f"{job.output}/table=tokens/variant={VARIANT}"
    n_images = 40
    slots = (blocks + 1) + 2 * blocks  # resid 0..L, attn and mlp 1..L
    assert con.execute(f"SELECT count(*) FROM read_parquet('{base}/experiment=baseline/*.parquet')").fetchone()[0] \
        == n_images * slots * num_tokens
    # every (image, block, stream, token) exactly once
    dupes = con.execute(
        f"SELECT count(*) FROM (SELECT image_key, block, stream, token, count(*) AS n "
        f"FROM read_parquet('{base}/experiment=baseline/*.parquet') GROUP BY ALL HAVING n > 1)"
    ).fetchone()[0]
    assert dupes == 0
    # token removal: each image keeps its prefix plus its non-class tokens, in every slot
    kept = con.execute(
        f"SELECT sum({prefix} + num_image_tokens) FROM "
        f"read_parquet('{job.output}/table=images/variant={VARIANT}/experiment=remove_class_tokens/*.parquet')"
    ).fetchone()[0]
    expected_kept = con.execute(
        f"SELECT sum({num_tokens} - num_class_tokens) FROM "
        f"read_parquet('{job.output}/table=images/variant={VARIANT}/experiment=baseline/*.parquet')"
    ).fetchone()[0]
    assert kept == expected_kept
    removed_rows = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE label = 'class') FROM "
        f"read_parquet('{base}/experiment=remove_class_tokens/*.parquet')"
    ).fetchone()
    assert removed_rows == (expected_kept * slots, 0)
    assert LABEL_CLASS == 1
    # a second run skips everything and adds nothing
    again = run_job(job, progress=False)
    assert again.shards_skipped == 4 and again.shards_done == 0
    assert len(tokens(job.output)) == n_images * slots * num_tokens


def test_actor_killed_mid_shard_loses_and_duplicates_nothing(tmp_path: Path, shards: Path, ray_session, monkeypatch) -> None:
    clean = load_job_spec(write_job(tmp_path / "clean", shards, ["baseline"]))
    run_job(clean, progress=False)
    flag = tmp_path / "died-once"
    monkeypatch.setenv(INJECT_DEATH_ENV, str(flag))
    faulty = load_job_spec(write_job(tmp_path / "faulty", shards, ["baseline"]))
    report = run_job(faulty, progress=False)
    assert flag.exists(), "the injected actor death did not happen"
    assert report.shards_done == 4 and not report.failures
    assert tokens(faulty.output) == tokens(clean.output)
    assert not list(Path(faulty.output).rglob("*.tmp"))


def test_corrupt_samples_are_rejected_and_the_rest_processed(tmp_path: Path, shards: Path) -> None:
    good = sorted(shards.glob("*.tar"))[0]
    bad = tmp_path / "shapes-validation-000099.tar"
    corrupted_key = None
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith("image.png") and corrupted_key is None:
                corrupted_key = member.name.split(".")[0]
                data = b"not a png at all"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    job_path = write_job(tmp_path, shards, ["baseline"])
    job = load_job_spec(job_path)
    stats = ShardProcessor(VARIANT, job).process(str(bad), "shapes-validation-000099")
    assert stats["images"] == 9 and stats["rejects"] == 1
    con = duckdb.connect()
    rejects = con.execute(
        f"SELECT image_key, stage FROM read_parquet('{job.output}/table=rejects/variant={VARIANT}/experiment=none/"
        "shapes-validation-000099.parquet')"
    ).fetchall()
    assert rejects == [(corrupted_key, "decode")]
    keys = {r[0] for r in con.execute(
        f"SELECT image_key FROM read_parquet('{job.output}/table=images/variant={VARIANT}/experiment=baseline/*.parquet')"
    ).fetchall()}
    assert len(keys) == 9 and corrupted_key not in keys


def test_a_shard_that_keeps_failing_is_retried_then_reported(tmp_path: Path, shards: Path, ray_session, monkeypatch) -> None:
    from vitlens.runner.actors import INJECT_SHARD_ERROR_ENV

    monkeypatch.setenv(INJECT_SHARD_ERROR_ENV, "shapes-validation-000002")
    job = load_job_spec(write_job(tmp_path, shards, ["baseline"]))
    report = run_job(job, progress=False)
    assert report.shards_done == 3
    assert [(f.variant, Path(f.shard).name, f.stage) for f in report.failures] == \
        [(VARIANT, "shapes-validation-000002.tar", "analysis")]
    assert report.failures[0].reason == "RuntimeError: injected analysis error for shard shapes-validation-000002"
    rejects = duckdb.connect().execute(
        f"SELECT shard, stage FROM read_parquet('{job.output}/table=rejects/variant={VARIANT}/experiment=none/failed-shards.parquet')"
    ).fetchall()
    assert rejects == [("shapes-validation-000002", "analysis")]  # the shard's id, as in `images.shard`
    done = sorted(p.stem for p in (Path(job.output) / "_done" / f"variant={VARIANT}").iterdir())
    assert done == ["shapes-validation-000000", "shapes-validation-000001", "shapes-validation-000003"]


def _hostile_shard(good: Path, path: Path, labels: dict[int, object]) -> list[str]:
    """A copy of `good` whose n-th sample's meta.json `class_index` is labels[n]; returns the keys, in order."""
    keys: list[str] = []
    with tarfile.open(good) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            key = member.name.split(".")[0]
            if key not in keys:
                keys.append(key)
            if member.name.endswith("meta.json") and len(keys) - 1 in labels:
                meta = json.loads(data)
                meta["class_index"] = labels[len(keys) - 1]
                data = json.dumps(meta).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return keys


def test_a_hostile_label_costs_its_sample_not_the_shard(tmp_path: Path, shards: Path, ray_session, capsys) -> None:
    """Labels outside the model's 20 classes are one `label` reject each, in one attempt; the
    rest of the shard is analysed; the summary and `runs` count them; exit 0, and 3 with
    --fail-on-rejects (also on a re-run that has nothing left to analyse)."""
    hostile = tmp_path / "data" / "shapes-validation-000000.tar"
    hostile.parent.mkdir()
    keys = _hostile_shard(sorted(shards.glob("*.tar"))[0], hostile, {2: 999999, 6: -1})
    job = tmp_path / "job.toml"
    job.write_text(f'name = "hostile"\noutput = "results"\nvariants = ["{VARIANT}"]\nbatch_size = 4\n'
                   f'[data]\nshards = ["{hostile}"]\n[resources]\ndevice = "cpu"\nmax_actors = 1\nmax_task_retries = 2\n')
    assert cli_main(["run", str(job), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "attempt 1 of 3 failed" not in err and "FAILED" not in out, out + err
    assert "1 shard×variant done, 0 skipped (done before), 0 failed" in out
    assert "  2 sample(s) rejected and skipped (label 2); the rest of their shards is analysed" in out
    assert f"vitlens query --results {tmp_path / 'results'} --shell" in out
    con = open_results(tmp_path / "results")
    images = [k for (k,) in con.execute("SELECT image_key FROM images ORDER BY image_key").fetchall()]
    assert images == sorted(k for i, k in enumerate(keys) if i not in (2, 6))
    rejects = con.execute("SELECT image_key, stage, reason FROM rejects ORDER BY image_key").fetchall()
    assert [(k, stage) for k, stage, _ in rejects] == [(keys[2], "label"), (keys[6], "label")]
    for (key, _, reason), value in zip(rejects, ("999999", "-1")):
        assert f"sample '{key}': class_index {value} " in reason and "the model has 20 classes" in reason, reason
    [(recorded,)] = con.execute("SELECT samples_rejected FROM runs").fetchall()
    assert json.loads(recorded) == {"label": {VARIANT: 2}}

    assert cli_main(["run", str(job), "--no-progress", "--fail-on-rejects"]) == 3
    out = capsys.readouterr().out
    assert "0 shard×variant done, 1 skipped (done before), 0 failed" in out
    assert "--fail-on-rejects: the results hold 2 rejected sample(s) (label 2): exit 3" in out


def test_a_user_error_comes_back_as_a_failure_without_retry(tmp_path: Path, shards: Path, monkeypatch) -> None:
    """A UserError is deterministic (the data or the job): the driver must not retry it; any
    other error may be transient and is retried."""
    import torch

    job = load_job_spec(write_job(tmp_path, shards, ["baseline"]))
    actor = ShardActor(VARIANT, job, "cpu", torch.get_num_threads())
    for error, retry in ((UserError("analysed shard x holds 1 image(s) of the [probe] training shards"), False),
                         (RuntimeError("CUDA error: an illegal memory access"), True)):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(actor.processor, "process", fail)
        result = actor.process("x.tar", "x")
        assert result == {"failed": True, "stage": "analysis", "reason": result["reason"], "retry": retry}
    assert result["reason"] == "RuntimeError: CUDA error: an illegal memory access"
