"""`ray job submit` of a vitlens job to a Ray cluster started with `ray start --head`,
the way users submit the paper job (token authentication on, as Ray 2.60 defaults).

The test makes its own token inside its tmp dir and runs every Ray command under an empty
HOME, so it needs nothing a previous Ray run left behind (`~/.ray/auth_token`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
         "--dashboard-port", str(dashboard), "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
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
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    count = duckdb.connect().execute(
        f"SELECT count(DISTINCT image_key) FROM read_parquet('{tmp_path}/results/table=images/*/*/*.parquet')"
    ).fetchone()[0]
    assert count == 20
