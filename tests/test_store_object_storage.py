"""Results (and shards) on object storage, against a real S3-protocol server on the loopback
(moto's stand-alone server, `tests/s3_server.py`), and results that can be verified.

One Ray session and one local reference run for the module. The S3 run reads its shards
and manifest from the bucket, loses a writer between its data objects and its done-marker,
and must still give tables equal to the local run's; two runs race for the lock; a flipped
byte and a cut file are found by `vitlens verify` and redone by a re-run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import ray

from tests.s3_server import free_port, s3_server
from vitlens.cli import main as cli_main
from vitlens.data.manifest import verify_shards
from vitlens.errors import UserError
from vitlens.report.results import open_results
from vitlens.runner.actors import INJECT_DEATH_BEFORE_MARKER_ENV
from vitlens.runner.driver import run_job
from vitlens.runner.spec import load_job_spec
from vitlens.store.committed import committed_files
from vitlens.store.lock import LOCK_NAME, OutputLock, read_lock
from vitlens.store.storage import Storage, open_storage

pytestmark = pytest.mark.slow
VARIANT = "shapes_vit_p16"
BUCKET = "vitlens-test"
TABLES = {  # table -> its rows, in one order (every column but none that differs between runs)
    "images": "SELECT * EXCLUDE (variant) FROM images ORDER BY ALL",
    "tokens": "SELECT * EXCLUDE (variant) FROM tokens ORDER BY ALL",
    "rejects": "SELECT shard, image_key, stage, reason FROM rejects ORDER BY ALL",
}


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """The S3 server's environment, set for this process and for the Ray workers it starts."""
    with s3_server(BUCKET) as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield env
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert cli_main(["shards", "shapes", "--classes", "20", "--per-class", "1", "--size", "64",
                     "--shard-size", "10", "--seed", "5", "--out", str(out)]) == 0
    return out


def write_job(folder: Path, output: str, manifest: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(f'name = "store"\noutput = "{output}"\nvariants = ["{VARIANT}"]\nexperiments = ["baseline"]\n'
                    f'batch_size = 5\n[data]\nmanifest = "{manifest}"\n'
                    '[resources]\ndevice = "cpu"\nmax_actors = 1\nmax_task_retries = 2\nmax_actor_restarts = 2\n')
    return path


def rows(results: str | Path) -> dict[str, list[tuple]]:
    con = open_results(results)
    return {table: con.execute(sql).fetchall() for table, sql in TABLES.items()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, shards: Path, s3) -> tuple[Path, dict[str, list[tuple]]]:
    """The reference: the job on a local folder; its results and their rows."""
    folder = tmp_path_factory.mktemp("local")
    job = load_job_spec(write_job(folder, "results", f"{shards}/manifest.json"))
    report = run_job(job, progress=False)
    assert report.shards_done == 2 and not report.failures
    found = rows(job.output)
    assert len(found["images"]) == 20 and found["tokens"]
    return Path(job.output), found


def upload(folder: Path, url: str) -> None:
    fs, path = open_storage(url).fs, url.removeprefix("s3://")
    for file in sorted(folder.iterdir()):
        fs.put_file(str(file), f"{path}/{file.name}")


def test_results_on_s3_equal_a_local_run_with_a_writer_killed_before_its_marker(
        tmp_path: Path, shards: Path, s3, local_run, monkeypatch, capsys) -> None:
    """Shards and manifest from the bucket, results into it; the first actor to commit a
    shard's data objects dies before its marker: the shard is redone under new names, the
    dead writer's objects are never read, and every table equals the local run's."""
    upload(shards, f"s3://{BUCKET}/shards")
    assert verify_shards(f"s3://{BUCKET}/shards") == []  # every shard in the bucket against the manifest
    url = f"s3://{BUCKET}/results/"
    spec = write_job(tmp_path, url, f"s3://{BUCKET}/shards/manifest.json")
    flag = tmp_path / "died"
    monkeypatch.setenv(INJECT_DEATH_BEFORE_MARKER_ENV, str(flag))
    assert cli_main(["run", str(spec), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert flag.is_file(), "no writer was killed"
    assert "2 shard×variant done, 0 skipped (done before), 0 failed" in out
    assert not (tmp_path / "s3:").exists() and not (Path.cwd() / "s3:").exists()

    root = url.rstrip("/")
    assert rows(root) == local_run[1]
    found = committed_files(open_storage(root))
    assert len(found.markers) == 2
    assert found.unreferenced, "the killed writer's data objects should be there, named by no marker"
    assert not set(found.unreferenced) & set(found.files)

    assert cli_main(["query", "fig2_identifiability_by_block", "--results", root, "--format", "csv"]) == 0
    local_csv = capsys.readouterr().out
    assert cli_main(["query", "fig2_identifiability_by_block", "--results", str(local_run[0]), "--format", "csv"]) == 0
    assert local_csv == capsys.readouterr().out and local_csv.count("\n") > 1

    # the report, its gallery drawn from the shards in the bucket
    report = tmp_path / "report"
    assert cli_main(["report", "--results", root, "--out", str(report), "--no-progress"]) == 0
    capsys.readouterr()
    text = (report / "report.md").read_text()
    assert root in text and "not a local file" not in text and "shard gone" not in text
    assert list((report / "gallery").rglob("*.png")), sorted(p.name for p in report.rglob("*"))

    assert cli_main(["verify", root, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ", 0 damaged" in out and f"{len(found.unreferenced)} object(s) named by no marker" in out

    # --clean deletes the dead writer's objects (holding the lock), and nothing a reader reads
    assert cli_main(["verify", root, "--no-progress", "--clean"]) == 0
    assert f"deleted {len(found.unreferenced)} object(s) named by no marker" in capsys.readouterr().out
    cleaned = committed_files(open_storage(root))
    assert cleaned.unreferenced == [] and cleaned.files == found.files
    assert rows(root) == local_run[1]

    # a re-run has nothing to do, and a run whose manifest is gone from the bucket is refused in one line
    assert cli_main(["run", str(spec), "--no-progress"]) == 0
    assert "0 shard×variant done, 2 skipped (done before), 0 failed" in capsys.readouterr().out
    gone = write_job(tmp_path / "gone", url, f"s3://{BUCKET}/no-such-prefix")
    assert cli_main(["run", str(gone), "--no-progress"]) == 2
    assert f"no shard manifest at s3://{BUCKET}/no-such-prefix/manifest.json" in capsys.readouterr().err


def test_two_runs_racing_for_the_lock_on_s3_one_wins(tmp_path: Path, shards: Path, s3, capsys) -> None:
    """The lock is a conditional create: of many simultaneous takers exactly one gets it (also
    of a dead process's lock, which exactly one replaces), and `vitlens run` on a locked output
    is refused (exit 2) without writing anything."""
    root = f"s3://{BUCKET}/raced"
    storage = open_storage(root)
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def take(where: Storage, run_id: str) -> None:
        lock = OutputLock(where, run_id)
        start.wait()
        try:
            lock.acquire()
            outcomes.append(f"won {run_id}")
        except UserError as err:
            outcomes.append(f"lost: {err}")

    def race(where: Storage, prefix: str) -> str:
        """6 runs take the lock at once: exactly one wins; returns its run id."""
        outcomes.clear()
        threads = [threading.Thread(target=take, args=(where, f"{prefix}-{i}")) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [o for o in outcomes if o.startswith("won")]
        assert len(winners) == 1, outcomes
        winner = winners[0].split()[1]
        assert all(f"(run {winner})" in o for o in outcomes if o.startswith("lost")), outcomes
        return winner

    winner = race(storage, "run")
    # a dead process's lock: exactly one of the racers replaces it, nothing else is left there
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_root = open_storage(f"s3://{BUCKET}/stale")
    stale_root.write_bytes(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "run_id": "DEAD",
                                       "started_at": "2026-12-01T00:00:00+00:00"}).encode(), LOCK_NAME)
    replaced = race(stale_root, "stale")
    assert read_lock(stale_root).run_id == replaced and list(stale_root.list_files()) == [LOCK_NAME]

    spec = write_job(tmp_path, root, f"{shards}/manifest.json")
    assert cli_main(["run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"(run {winner})" in err, err
    assert [k for k in storage.list_files() if not k.startswith("_lock")] == []


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_finds_a_flipped_byte_and_a_cut_file_and_a_rerun_redoes_them(
        tmp_path: Path, shards: Path, local_run, capsys) -> None:
    results = tmp_path / "results"
    shutil.copytree(local_run[0], results)
    tokens = sorted(results.glob(f"table=tokens/variant={VARIANT}/experiment=baseline/*.parquet"))
    images = sorted(results.glob(f"table=images/variant={VARIANT}/experiment=baseline/*.parquet"))
    assert len(tokens) == len(images) == 2
    _flip_byte(tokens[0])
    cut = images[1]
    cut.write_bytes(cut.read_bytes()[:-100])

    assert cli_main(["verify", str(results), "--no-progress"]) == 3
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DAMAGED")]
    assert len(lines) == 2, lines
    assert any(str(tokens[0]) in line and "sha256" in line for line in lines), lines
    assert any(str(cut) in line and "size" in line for line in lines), lines
    assert cli_main(["verify", str(results), "--sizes-only"]) == 3  # the cut file only: no byte is read
    assert sum(line.startswith("DAMAGED") for line in capsys.readouterr().out.splitlines()) == 1

    job = load_job_spec(write_job(tmp_path, str(results), f"{shards}/manifest.json"))
    report = run_job(job, progress=False)
    assert report.shards_done == 2 and report.shards_skipped == 0 and not report.failures
    assert cli_main(["verify", str(results), "--no-progress"]) == 0
    assert rows(results) == local_run[1]



def test_an_unreachable_store_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """No endpoint answers: `vitlens query` on results there and `vitlens run` with a manifest
    there fail in one line naming the URL (exit 2), not with a botocore traceback."""
    env = {**os.environ, "HOME": str(tmp_path), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1"}
    spec = write_job(tmp_path, str(tmp_path / "out"), "s3://nobucket/shards")
    for args, says in ((["query", "table1_identifiability", "--results", "s3://nobucket/r"], "s3://nobucket/r: cannot list it"),
                       (["run", str(spec), "--no-progress"], "unreadable shard manifest s3://nobucket/shards/manifest.json")):
        done = subprocess.run([sys.executable, "-m", "vitlens", *args], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
