"""Faults in one job lose and duplicate nothing: an actor killed mid-shard, the driver killed
mid-job and a damaged shard, then the repair; the final `images` and `tokens` equal a
clean run's, file for file and byte for byte. Damaged or mismatching shards are never marked done (exit 3, redone next run),
and every run leaves one `runs` row."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pytest

from vitlens.cli import main as cli_main
from vitlens.runner.actors import INJECT_DEATH_ENV, INJECT_SHARD_DELAY_ENV

VARIANT = "shapes_vit_p16"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert cli_main(["shards", "shapes", "--classes", "20", "--per-class", "2", "--size", "64",
                     "--shard-size", "10", "--seed", "5", "--out", str(out)]) == 0
    return out


def copy_shards(shards: Path, folder: Path) -> Path:
    shutil.copytree(shards, folder)
    return folder


def write_job(folder: Path, shards: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(
        f'name = "faults"\noutput = "results"\nvariants = ["{VARIANT}"]\nexperiments = ["baseline"]\nbatch_size = 4\n'
        f'[data]\nmanifest = "{shards}/manifest.json"\n'
        '[resources]\ndevice = "cpu"\nmax_actors = 1\nmax_task_retries = 2\n'
    )
    return path


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("VITLENS_INJECT")}
    return {**base, **extra}


def run(job: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitlens", "run", str(job), "--no-progress", *args],
                          env=env(**extra), capture_output=True, text=True, timeout=300)


def contents(results: Path) -> tuple[list[tuple], list[tuple]]:
    con = duckdb.connect()
    images = con.execute(f"SELECT * FROM read_parquet('{results}/table=images/*/*/*.parquet') ORDER BY image_key").fetchall()
    tokens = con.execute(f"SELECT * FROM read_parquet('{results}/table=tokens/*/*/*.parquet') ORDER BY ALL").fetchall()
    return images, tokens


def rejects(results: Path) -> list[tuple]:
    return duckdb.connect().execute(
        f"SELECT shard, stage, reason FROM read_parquet('{results}/table=rejects/*/*/*.parquet') ORDER BY ALL"
    ).fetchall()


def done_ids(results: Path) -> list[str]:
    folder = results / "_done" / f"variant={VARIANT}"
    return sorted(p.stem for p in folder.iterdir()) if folder.is_dir() else []


def statuses(results: Path) -> list[str]:
    return [r[0] for r in duckdb.connect().execute(
        f"SELECT status FROM read_parquet('{results}/table=runs/*/*/*.parquet') ORDER BY started_at, run_id").fetchall()]


def test_actor_kill_driver_kill_and_damaged_shard_end_equal_to_a_clean_run(tmp_path: Path, shards: Path) -> None:
    clean = write_job(tmp_path / "clean", shards)
    done = run(clean)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = contents(tmp_path / "clean" / "results")
    assert len(reference[0]) == 40

    data = copy_shards(shards, tmp_path / "data")
    damaged = data / "shapes-validation-000002.tar"
    good_bytes = damaged.read_bytes()
    damaged.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated mid-shard
    job = write_job(tmp_path / "faulty", data)
    results = tmp_path / "faulty" / "results"

    # 1. the first actor dies mid-shard, then the driver is killed between shards
    flag = tmp_path / "actor-died"
    proc = subprocess.Popen([sys.executable, "-m", "vitlens", "run", str(job), "--no-progress"],
                            env=env(**{INJECT_DEATH_ENV: str(flag), INJECT_SHARD_DELAY_ENV: "3"}),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not done_ids(results):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    first_output = proc.communicate()[0]
    time.sleep(4)  # an orphaned actor may still finish the shard it had
    assert flag.exists(), "the injected actor death did not happen"
    death_lines = [line for line in first_output.splitlines() if "actor died" in line]
    assert len(death_lines) == 1, first_output
    assert death_lines[0].startswith(f"{VARIANT} shapes-validation-00000") and "attempt 1 of 3 failed" in death_lines[0]
    assert "Traceback" not in first_output and "\x1b[" not in first_output, first_output
    assert 1 <= len(done_ids(results)) < 4
    assert statuses(results) == ["running"]

    # 2. re-run: the rest is done, the damaged shard is reported and not marked done
    rerun = run(job)
    assert rerun.returncode == 3, rerun.stdout + rerun.stderr
    assert f"FAILED {VARIANT} {damaged} (read): shard truncated after" in rerun.stdout
    assert done_ids(results) == ["shapes-validation-000000", "shapes-validation-000001", "shapes-validation-000003"]
    [(shard, stage, reason)] = rejects(results)
    assert (shard, stage) == ("shapes-validation-000002", "read") and reason.startswith("shard truncated after")
    assert statuses(results) == ["killed", "partial"]

    # 3. repaired: only the damaged shard is redone; the end equals the clean run
    damaged.write_bytes(good_bytes)
    final = run(job)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "1 shard×variant done, 3 skipped" in final.stdout
    assert contents(results) == reference
    clean_files = sorted(f for t in ("images", "tokens") for f in (tmp_path / "clean" / "results").glob(f"table={t}/**/*.parquet"))
    final_files = sorted(f for t in ("images", "tokens") for f in results.glob(f"table={t}/**/*.parquet"))
    assert [f.relative_to(tmp_path / "clean") for f in clean_files] == [f.relative_to(tmp_path / "faulty") for f in final_files]
    for a, b in zip(clean_files, final_files):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs byte-wise from the clean run's"
    assert rejects(results) == []
    assert statuses(results) == ["killed", "partial", "done"]

    # 4. nothing left to do still leaves a row
    assert run(job).returncode == 0
    assert statuses(results) == ["killed", "partial", "done", "done"]


def test_manifest_checksum_and_count_are_checked_unless_no_verify(tmp_path: Path, shards: Path) -> None:
    data = copy_shards(shards, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    manifest["shards"][3]["samples"] = 11
    (data / "manifest.json").write_text(json.dumps(manifest))
    job = write_job(tmp_path / "job", data)
    results = tmp_path / "job" / "results"
    done = run(job)
    assert done.returncode == 3, done.stdout + done.stderr
    assert [(s, stage) for s, stage, _ in rejects(results)] == \
        [("shapes-validation-000001", "read"), ("shapes-validation-000003", "read")]
    reasons = [reason for _, _, reason in rejects(results)]
    assert reasons[0].startswith("sha256 mismatch") and reasons[1] == "shard has 10 samples, manifest says 11"
    assert done_ids(results) == ["shapes-validation-000000", "shapes-validation-000002"]
    # --no-verify skips the checksum, never the sample count
    again = run(job, "--no-verify")
    assert again.returncode == 3, again.stdout + again.stderr
    assert [(s, stage) for s, stage, _ in rejects(results)] == [("shapes-validation-000003", "read")]
    assert done_ids(results) == ["shapes-validation-000000", "shapes-validation-000001", "shapes-validation-000002"]


def test_a_shard_replaced_under_its_name_is_redone(tmp_path: Path, shards: Path) -> None:
    data = copy_shards(shards, tmp_path / "data")
    job = write_job(tmp_path / "job", data)
    results = tmp_path / "job" / "results"
    assert run(job).returncode == 0
    # other data under the same names: shards 0 and 2 swap bytes, the manifest follows
    first, third = data / "shapes-validation-000000.tar", data / "shapes-validation-000002.tar"
    a, b = first.read_bytes(), third.read_bytes()
    first.write_bytes(b)
    third.write_bytes(a)
    manifest = json.loads((data / "manifest.json").read_text())
    entries = manifest["shards"]
    entries[0]["sha256"], entries[2]["sha256"] = entries[2]["sha256"], entries[0]["sha256"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    again = run(job)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 shard×variant done, 2 skipped" in again.stdout
    keys = duckdb.connect().execute(
        f"SELECT DISTINCT image_key FROM read_parquet('{results}/table=images/*/*/shapes-validation-000000.parquet')"
    ).fetchall()
    inside = {name.split(".")[0] for name in tarfile.open(first).getnames()}
    assert {k for (k,) in keys} == inside
