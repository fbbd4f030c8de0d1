"""The distributed job end to end on a local Ray cluster: exact row counts, resume after a
killed driver, an actor killed mid-shard, and a shard with corrupt samples.

Uses the smallest embedded zoo model (16 image tokens at 64 px) so each run is seconds.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import ray

from vitlens.cli import main as cli_main
from vitlens.data.token_labels import LABEL_CLASS
from vitlens.runner.actors import INJECT_DEATH_ENV
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
        f"SELECT image_key, block, stream, token, identifiability_rank, top5_class FROM "
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


def _run_cli(job: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vitlens", "run", str(job), "--no-progress"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_rerun_after_killed_driver_skips_done_and_matches_clean_run(tmp_path: Path, shards: Path) -> None:
    from vitlens.runner.actors import INJECT_SHARD_DELAY_ENV

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own, started by the driver
    clean_job = write_job(tmp_path / "clean", shards, ["baseline"])
    proc = _run_cli(clean_job, env)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    job = write_job(tmp_path / "killed", shards, ["baseline"])
    proc = _run_cli(job, {**env, INJECT_SHARD_DELAY_ENV: "3"})  # >= 3 s between done-markers
    done = tmp_path / "killed" / "results" / "_done" / f"variant={VARIANT}"
    deadline = time.time() + 240
    while time.time() < deadline and not (done.is_dir() and any(done.iterdir())):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
    proc.wait()
    time.sleep(4)  # an orphaned actor may still finish the shard it had; let it
    finished_before = len(list(done.iterdir()))
    assert 1 <= finished_before < 4, "kill the driver mid-job"

    proc = _run_cli(job, env)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert f"{finished_before} skipped" in output
    clean_files = sorted((tmp_path / "clean" / "results").glob("table=tokens/**/*.parquet"))
    resumed_files = sorted((tmp_path / "killed" / "results").glob("table=tokens/**/*.parquet"))
    assert [f.name for f in clean_files] == [f.name for f in resumed_files]
    for a, b in zip(clean_files, resumed_files):
        assert pq.read_table(a).equals(pq.read_table(b)), a.name
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs byte-wise"


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
