"""`ray job submit` of a vitlens job to a Ray cluster started with `ray start --head`,
the way users submit the paper job (token authentication on, as Ray 2.60 defaults).

The test makes its own token inside its tmp dir and runs every Ray command under an empty
HOME, so it needs nothing a previous Ray run left behind (`~/.ray/auth_token`).

It stops only the cluster it started, never `ray stop` (which stops every Ray on the machine,
other users' and other tests' too): the head runs as `ray start --head --block` in a session
of its own and a temp dir of its own; SIGTERM to that one process makes Ray drain the node and
stop every process it started, and the test checks that none of them (the head's session and
its descendants) is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from vitlens.cli import main as cli_main

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_processes(head_pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process in the head's session (`ray start --block` leads
    it: GCS, raylet, dashboard, agents, workers; workers rename themselves `ray::…`, so their
    command lines name nothing) or descending from the head (a job's driver runs in a session
    of its own). Read from /proc: Linux only, like the rest of the Ray tests."""
    parents: dict[int, int] = {}
    found: set[tuple[int, str]] = set()
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if fields[0] == "Z":  # a zombie has exited already; only its parent's wait is missing
            continue
        stats[int(entry)] = fields
        parents[int(entry)] = int(fields[1])
    for pid, fields in stats.items():
        ancestor, hops = pid, 0
        while ancestor > 1 and ancestor != head_pid and hops < 64:
            ancestor, hops = parents.get(ancestor, 0), hops + 1
        if int(fields[3]) == head_pid or ancestor == head_pid:
            found.add((pid, fields[19]))  # field 22 of stat, the start time: a reused pid is another process
    return found


def stop_cluster(head: subprocess.Popen, timeout: float = 60) -> list[tuple[int, str]]:
    """Stop the cluster `ray start --head --block` (pid `head.pid`) started, and only it:
    SIGTERM to that one process, which drains the node and stops what it started (a SIGTERM
    to the whole group would kill the GCS first and leave the head waiting 30 s for it).
    Returns the cluster's processes still alive `timeout` s later, after SIGKILLing them."""
    started = cluster_processes(head.pid)
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(_alive(started) | cluster_processes(head.pid))  # the session outlives its leader
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid, _ in left:  # only processes of this cluster, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those of `processes` (pid, start time) still running (a pid since reused is not)."""
    alive = set()
    for pid, start in processes:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and fields[19] == start:
            alive.add((pid, start))
    return alive


def wait_for_head(head: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until `ray start --block` has started the head, the moment a plain `ray start`
    returns (it then prints its `--block` notice and blocks)."""
    deadline = time.monotonic() + timeout
    while "This command will now block forever" not in log.read_text(errors="replace"):
        assert head.poll() is None, f"ray start exited with {head.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the head did not start in {timeout} s:\n{log.read_text()}"
        time.sleep(0.5)


def make_token(tmp_path: Path, env: dict[str, str]) -> Path:
    """Generate a token the way the README says (`ray get-auth-token --generate`, which
    writes `$HOME/.ray/auth_token`) under a scratch HOME; return the token file."""
    scratch_home = tmp_path / "token-home"
    scratch_home.mkdir()
    gen = subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env={**env, "HOME": str(scratch_home)}, capture_output=True, text=True, timeout=120,
    )
    assert gen.returncode == 0, gen.stdout + gen.stderr
    token_file = scratch_home / ".ray" / "auth_token"
    assert token_file.read_text().strip() == gen.stdout.strip() != ""
    return token_file


def test_ray_job_submit_runs_the_job_on_a_started_cluster(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    assert cli_main(["shards", "shapes", "--per-class", "1", "--shard-size", "10", "--out", str(shards)]) == 0
    job = tmp_path / "job.toml"
    job.write_text(
        'name = "submitted"\noutput = "results"\nvariants = ["shapes_vit_p16"]\nbatch_size = 10\n'
        f'[data]\nmanifest = "{shards}/manifest.json"\n[resources]\ndevice = "cpu"\nmax_actors = 1\n'
    )
    empty_home = tmp_path / "home"  # no ~/.ray here: the token must come from RAY_AUTH_TOKEN_PATH
    empty_home.mkdir()
    base_env = {**os.environ, "HOME": str(empty_home), "RAY_AUTH_MODE": "token",
                "PATH": f"{BIN}:{os.environ['PATH']}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        base_env.pop(key, None)
    token_file = make_token(tmp_path, base_env)
    env = {**base_env, "RAY_AUTH_TOKEN_PATH": str(token_file)}
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    # A temp dir of its own (short: Ray's socket paths must fit 107 bytes), not the shared /tmp/ray.
    temp_dir = tempfile.mkdtemp(prefix="vitlens-ray-")
    log = tmp_path / "ray-start.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()),
             "--dashboard-port", str(dashboard), "--disable-usage-stats", "--temp-dir", temp_dir],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    left: list[tuple[int, str]] = []
    try:
        wait_for_head(head, log)
        refused = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address],
            env=base_env, capture_output=True, text=True, timeout=120,
        )
        assert refused.returncode != 0, "the cluster answered a client without the token"
        deadline = time.monotonic() + 120
        while True:  # the head's job agent starts after `ray start` returns: wait for it, on a busy machine too
            submit = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address,
                 "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_TOKEN_PATH": str(token_file)}}),
                 "--", sys.executable, "-m", "vitlens", "run", str(job), "--no-progress"],
                env=env, capture_output=True, text=True, timeout=300,
            )
            if "No available agent to submit job" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "succeeded" in submit.stdout + submit.stderr
        # `vitlens run` without --address starts a cluster of its own, even with this one running
        own = tmp_path / "own.toml"
        own.write_text(job.read_text().replace('output = "results"', 'output = "own-results"'))
        local = subprocess.run([sys.executable, "-m", "vitlens", "run", str(own), "--no-progress"],
                               env=env, capture_output=True, text=True, timeout=300)
        assert local.returncode == 0, local.stdout + local.stderr
        assert list((tmp_path / "own-results").glob("table=images/*/*/*.parquet"))
    finally:
        left = stop_cluster(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's cluster outlived it (SIGKILLed now): {left}"
    count = duckdb.connect().execute(
        f"SELECT count(DISTINCT image_key) FROM read_parquet('{tmp_path}/results/table=images/*/*/*.parquet')"
    ).fetchone()[0]
    assert count == 20
