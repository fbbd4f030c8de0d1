"""Every job mistake is refused before work starts, with one line and exit 2, and nothing
already written is touched: colliding shard ids, an output that is a file or read-only,
a locked output, a non-ViT variant. The driver never imports torch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vitlens.cli import main as cli_main
from vitlens.errors import UserError
from vitlens.runner.bookkeeping import JobReport, mark_run_killed, run_key, write_run_record
from vitlens.runner.spec import load_job_spec
from vitlens.store.lock import LOCK_NAME, OutputLock, read_lock

VARIANT = "shapes_vit_p16"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert cli_main(["shards", "shapes", "--per-class", "1", "--size", "64", "--shard-size", "10", "--out", str(out)]) == 0
    return out


def write_job(path: Path, data: str, output: str = "results", variants: str = f'["{VARIANT}"]') -> Path:
    path.write_text(
        f'name = "guards"\noutput = "{output}"\nvariants = {variants}\nbatch_size = 10\n{data}\n'
        '[resources]\ndevice = "cpu"\nmax_actors = 1\n'
    )
    return path


def run_cli(args: list[str], timeout: float = 300, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "vitlens", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def only_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_two_shards_with_the_same_name_are_refused(tmp_path: Path, shards: Path, capsys) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x-000000.tar").write_bytes((shards / "shapes-validation-000000.tar").read_bytes())
    job = write_job(tmp_path / "job.toml", '[data]\nshards = ["a/x-000000.tar", "b/x-000000.tar"]')
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    err = only_error_line(capsys)
    assert f"{tmp_path}/a/x-000000.tar and {tmp_path}/b/x-000000.tar have the same shard id 'x-000000'" in err
    assert not (tmp_path / "results").exists()


def test_missing_local_shard_is_refused(tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path / "job.toml", '[data]\nshards = ["nowhere/x-000000.tar"]')
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    assert f"data.shards: shard {tmp_path}/nowhere/x-000000.tar does not exist" in only_error_line(capsys)


def test_missing_head_file_is_refused_before_ray(tmp_path: Path, shards: Path, capsys) -> None:
    job = write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"\n'
                    f'[heads]\n{VARIANT} = "heads/missing.pth"')
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    assert f"heads.{VARIANT}: {tmp_path}/heads/missing.pth does not exist" in only_error_line(capsys)
    assert not (tmp_path / "results").exists()


def test_output_that_is_a_file_is_refused(tmp_path: Path, shards: Path, capsys) -> None:
    (tmp_path / "results").write_text("my notes")
    job = write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"')
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    assert f"output {tmp_path}/results is a file, not a folder" in only_error_line(capsys)
    assert (tmp_path / "results").read_text() == "my notes"
    job = write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"', output="results/sub")
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    assert f"output {tmp_path}/results/sub is not writable" in only_error_line(capsys)


@pytest.fixture
def read_only_mount(tmp_path: Path):
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_read_only_output_is_refused(tmp_path: Path, shards: Path, read_only_mount: Path, capsys) -> None:
    job = write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"', output=str(read_only_mount))
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    assert f"output {read_only_mount} is not writable: Read-only file system" in only_error_line(capsys)
    job = write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"', output=f"{read_only_mount}/x")
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    assert f"output {read_only_mount}/x is not writable: Read-only file system" in only_error_line(capsys)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_lock_is_refused_and_names_its_holder(tmp_path: Path, shards: Path, capsys) -> None:
    job = write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"')
    with OutputLock(tmp_path / "results", "R1"):
        assert cli_main(["run", str(job), "--no-progress"]) == 2
        err = only_error_line(capsys)
        assert f"output {tmp_path}/results is in use by pid {os.getpid()} on host {socket.gethostname()}" in err
        assert "(run R1)" in err
    assert not (tmp_path / "results" / LOCK_NAME).exists()  # released with the block
    (tmp_path / "results" / LOCK_NAME).write_text(json.dumps(
        {"pid": os.getpid(), "host": "gpu-node-7", "started_at": "2026-12-01T00:00:00+00:00", "run_id": "R2"}))
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    err = only_error_line(capsys)
    assert "is locked by pid" in err and "on host gpu-node-7" in err and f"delete {tmp_path}/results/{LOCK_NAME}" in err


def test_a_stale_lock_is_taken_over_and_its_run_marked_killed(tmp_path: Path, shards: Path) -> None:
    job = load_job_spec(write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"'))
    report = JobReport(shards_total=2, shards_skipped=0, run_id="20261201T000000-deadbeef")
    write_run_record(job, report, "running")
    dead = _dead_pid()
    (tmp_path / "results" / LOCK_NAME).write_text(json.dumps(
        {"pid": dead, "host": socket.gethostname(), "started_at": "2026-12-01T00:00:00+00:00", "run_id": report.run_id}))
    with OutputLock(tmp_path / "results", "R3") as lock:
        assert lock.taken_over is not None and lock.taken_over.pid == dead
        assert read_lock(tmp_path / "results").run_id == "R3"
    assert mark_run_killed(job.output, report.run_id)
    row = pq.read_table(Path(job.output) / run_key(report.run_id)).to_pylist()[0]
    assert (row["status"], row["finished_at"], row["shards_total"]) == ("killed", None, 2)
    assert not mark_run_killed(job.output, report.run_id)  # only a running row is rewritten


def test_a_second_lock_on_one_folder_fails_while_the_first_is_held(tmp_path: Path) -> None:
    with OutputLock(tmp_path, "A"):
        with pytest.raises(UserError, match=r"in use by pid \d+ .*\(run A\)"):
            OutputLock(tmp_path, "B").acquire()


@pytest.mark.slow
def test_a_non_vit_variant_is_refused_in_one_line_before_any_actor(tmp_path: Path, shards: Path) -> None:
    job = write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"',
                    variants=f'["{VARIANT}", "timm:resnet18@random"]')
    started = time.perf_counter()
    done = run_cli(["run", str(job), "--no-progress"])
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().startswith(
        "vitlens run: error: variant 'timm:resnet18@random': the lens has no adapter for ResNet"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""
    assert not list((tmp_path / "results").rglob("*.parquet"))  # no actor ran, no run was recorded
    assert not (tmp_path / "results" / LOCK_NAME).exists()
    assert seconds < 60, seconds


@pytest.mark.slow
def test_the_driver_never_imports_torch(tmp_path: Path, shards: Path) -> None:
    job = write_job(tmp_path / "job.toml", f'[data]\nmanifest = "{shards}/manifest.json"')
    probe = (
        "import sys\nfrom vitlens.cli import main\n"
        f"code = main(['run', {str(job)!r}, '--no-progress'])\n"
        "print('exit', code, 'torch' in sys.modules, 'timm' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.stdout.strip().splitlines()[-1] == "exit 0 False False", done.stdout + done.stderr
    # a spec error is printed at once: no torch, no Ray
    (tmp_path / "bad.toml").write_text((tmp_path / "job.toml").read_text().replace("max_actors = 1", "max_actors = 1.5"))
    started = time.perf_counter()
    bad = run_cli(["run", str(tmp_path / "bad.toml")])
    assert bad.returncode == 2 and "'resources.max_actors' must be an integer >= 1, not 1.5" in bad.stderr
    assert time.perf_counter() - started < 8


def test_takers_racing_for_a_stale_lock_one_wins(tmp_path: Path) -> None:
    """Runs started together on an output whose lock a dead process left: exactly one takes it
    over (and only it reports the dead run as taken over); the others are refused, naming it.
    Several rounds of 8 threads, so an unlucky interleaving has many chances to show."""
    dead = _dead_pid()
    for round_ in range(6):
        root = tmp_path / f"round{round_}"
        root.mkdir()
        (root / LOCK_NAME).write_text(json.dumps(
            {"pid": dead, "host": socket.gethostname(), "started_at": "2026-12-01T00:00:00+00:00", "run_id": "DEAD"}))
        start = threading.Barrier(8)
        outcomes: list[tuple[str, str, object]] = []

        def take(run_id: str) -> None:
            lock = OutputLock(root, run_id)
            start.wait()
            try:
                lock.acquire()
                outcomes.append(("won", run_id, lock.taken_over))
            except UserError as err:
                outcomes.append(("lost", run_id, str(err)))

        threads = [threading.Thread(target=take, args=(f"T{i}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [o for o in outcomes if o[0] == "won"]
        assert len(winners) == 1, (round_, outcomes)
        [(_, winner, taken_over)] = winners
        assert read_lock(root).run_id == winner and taken_over is not None and taken_over.run_id == "DEAD"
        assert all(f"(run {winner})" in str(o[2]) for o in outcomes if o[0] == "lost"), outcomes
        assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME], "no takeover marker or temporary left behind"
