"""A lost node, as a test: a two-node Ray cluster on this one machine (Ray's own harness,
`ray.cluster_utils.Cluster`: a head and one worker node, one CPU each, so the job's two CPU
actors land one on each node), a job running, and the worker node removed mid-job (its
raylet and its actor killed) once a shard is done and others are in flight.

The job must finish on the node that is left, with no failure, and its `images` and
`tokens` tables must equal a clean run's on the same shards, row for row.

The module starts one cluster of its own and shuts it down (`ray.shutdown()`,
`cluster.shutdown()`), never `ray stop`, so no other Ray on the machine is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
from ray._common.utils import get_ray_address_file
from ray.cluster_utils import Cluster

from vitlens.cli import main as cli_main
from vitlens.report.results import open_results
from vitlens.runner.actors import INJECT_SHARD_DELAY_ENV
from vitlens.runner.driver import run_job
from vitlens.runner.spec import load_job_spec

VARIANT = "shapes_vit_p16"
SHARDS = 4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    code = cli_main(["shards", "shapes", "--classes", "20", "--per-class", "2", "--size", "64",
                     "--shard-size", "10", "--seed", "5", "--out", str(out)])
    assert code == 0
    assert len(list(out.glob("*.tar"))) == SHARDS
    return out


@pytest.fixture(scope="module")
def two_nodes():
    """(cluster, worker node): a head and a worker node of one CPU each, the driver on the head.

    Both nodes keep their sockets and logs in a temp dir of their own, not the shared /tmp/ray.
    The harness writes its head's address to /tmp/ray/ray_current_cluster (what
    `ray.init(address="auto")` reads) and deletes that file on shutdown: an address another
    Ray on the machine kept there is put back."""
    saved_env = os.environ.pop("RAY_ADDRESS", None)
    address_file = Path(get_ray_address_file(None))
    saved_address = address_file.read_text() if address_file.is_file() else None
    temp_dir = tempfile.mkdtemp(prefix="vitlens-nodes-")  # short: socket paths must fit 107 bytes
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir})
    try:
        # Connect before the worker node exists: the driver must sit on the head, which stays.
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        worker = cluster.add_node(num_cpus=1, temp_dir=temp_dir)
        cluster.wait_for_nodes()
        assert ray.cluster_resources().get("CPU") == 2
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved_address is not None and not address_file.exists():
            address_file.write_text(saved_address)
        if saved_env is not None:
            os.environ["RAY_ADDRESS"] = saved_env
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_job(folder: Path, shards: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(
        f'name = "node-loss"\noutput = "results"\nvariants = ["{VARIANT}"]\n'
        'experiments = ["baseline"]\nbatch_size = 5\n'
        f'[data]\nmanifest = "{shards}/manifest.json"\n'
        '[resources]\ndevice = "cpu"\ncpus_per_actor = 1\nmax_actors = 2\n'
        "max_task_retries = 2\nmax_actor_restarts = 2\n"
    )
    return path


def rows(output: str, table: str) -> list[tuple]:
    return open_results(output).execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()


def shard_actors_on(cluster: Cluster, node_id: str) -> list[dict]:
    """The live ShardActors the GCS places on `node_id`."""
    alive = cluster.global_state.actor_table(None, actor_state_name="ALIVE").values()
    return [a for a in alive if a["ActorClassName"] == "ShardActor" and a["Address"]["NodeID"] == node_id]


@pytest.mark.timeout(400)
def test_a_node_lost_mid_job_costs_nothing(tmp_path: Path, shards: Path, two_nodes, monkeypatch, capsys) -> None:
    cluster, worker = two_nodes
    clean = load_job_spec(write_job(tmp_path / "clean", shards))
    report = run_job(clean, address=cluster.address, progress=False)
    assert report.shards_done == SHARDS and not report.failures and report.actors == 2

    monkeypatch.setenv(INJECT_SHARD_DELAY_ENV, "2")  # >= 2 s a shard: the removal lands mid-shard
    job = load_job_spec(write_job(tmp_path / "lossy", shards))
    done = Path(job.output) / "_done" / f"variant={VARIANT}"
    seen: dict = {}
    job_over = threading.Event()

    def remove_worker_mid_job() -> None:
        try:
            while not (done.is_dir() and any(done.iterdir())):
                if job_over.wait(0.05):
                    return
            seen["done_at_removal"] = sorted(p.stem for p in done.iterdir()) if done.is_dir() else []
            seen["actors_on_worker"] = shard_actors_on(cluster, worker.node_id)
            cluster.remove_node(worker)  # its raylet and every worker process of it, the actor's included
            seen["removed"] = True
        except BaseException as err:  # reported by the test thread below
            seen["error"] = err

    remover = threading.Thread(target=remove_worker_mid_job, daemon=True)
    remover.start()
    try:
        report = run_job(job, address=cluster.address, progress=False)
    finally:
        job_over.set()
        remover.join(timeout=60)
    assert "error" not in seen, repr(seen.get("error"))
    assert seen.get("removed"), "the worker node was not removed"

    # The loss was real: the removed node held an actor, and the job was not done yet.
    assert len(seen["actors_on_worker"]) == 1, "no ShardActor on the worker node when it was removed"
    assert 1 <= len(seen["done_at_removal"]) < SHARDS, seen["done_at_removal"]
    assert worker.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # ... and its in-flight shard failed with it, was not done then, and was redone on the head.
    err = capsys.readouterr().err
    retried = [line.split()[1].rstrip(":") for line in err.splitlines() if "failed (actor died" in line and "retrying" in line]
    assert len(retried) == 1, err
    assert retried[0] not in seen["done_at_removal"], err
    assert f"{VARIANT} {retried[0]}: attempt 1 of 3 failed (actor died: " in err

    assert not report.failures, report.failures
    assert report.shards_done == SHARDS and report.shards_skipped == 0
    assert sorted(p.stem for p in done.iterdir()) == sorted(p.stem for p in shards.glob("*.tar"))
    assert not list(Path(job.output).rglob("*.tmp"))
    for table in ("images", "tokens"):
        lossy, reference = rows(job.output, table), rows(clean.output, table)
        assert len(lossy) == len(reference) > 0, table
        assert lossy == reference, f"{table} differs from the clean run's"
