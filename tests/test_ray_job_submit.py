"""`ray job submit` of a vitlens job to a Ray cluster started with `ray start --head`,
the way users submit the paper job (token authentication on, as Ray 2.60 defaults)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from vitlens.cli import main as cli_main

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_job_submit_runs_the_job_on_a_started_cluster(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    assert cli_main(["shards", "shapes", "--per-class", "1", "--shard-size", "10", "--out", str(shards)]) == 0
    job = tmp_path / "job.toml"
    job.write_text(
        'name = "submitted"\noutput = "results"\nvariants = ["shapes_vit_p16"]\nbatch_size = 10\n'
        f'[data]\nmanifest = "{shards}/manifest.json"\n[resources]\ndevice = "cpu"\nmax_actors = 1\n'
    )
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
         "--dashboard-port", str(dashboard), "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
             sys.executable, "-m", "vitlens", "run", str(job), "--no-progress"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "succeeded" in submit.stdout + submit.stderr
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    count = duckdb.connect().execute(
        f"SELECT count(DISTINCT image_key) FROM read_parquet('{tmp_path}/results/table=images/*/*/*.parquet')"
    ).fetchone()[0]
    assert count == 20
