"""The driver of `vitlens run`: start or join Ray, place actors, feed shards, resume.

The driver only schedules: it never loads a model or computes a metric. Each actor slot
serves one variant at a time (one GPU per actor when the cluster has GPUs, otherwise
CPU actors with explicit `num_cpus`); an idle slot moves to the variant with the most
pending shards. Shards whose done-marker exists are skipped, so a re-run after a killed
driver only does what is missing; a shard that keeps failing is reported, never dropped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
from tqdm import tqdm

from vitlens.errors import UserError
from vitlens.runner.actors import actor_class
from vitlens.runner.plan import WorkItem, WorkQueue
from vitlens.runner.spec import JobSpec
from vitlens.runner.shard_job import check_variants, resolve_shard_urls, write_failed_shards, write_run_record
from vitlens.store.layout import clean_temporaries


@dataclass
class JobReport:
    """What a run did: shard counts, failures, per-shard statistics, wall time."""

    shards_total: int
    shards_skipped: int
    shards_done: int
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (variant, shard, reason)
    shard_stats: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    actors: int = 0
    device: str = "cpu"
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0))


@dataclass
class _Slot:
    variant: str
    actor: Any
    item: WorkItem | None = None
    ref: Any = None


def _connect(address: str | None, local_cpus: int) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False)
    else:
        # Explicit num_cpus: on small machines Ray would otherwise let actors claim every CPU.
        ray.init(num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)


def _placement(job: JobSpec) -> tuple[str, int, dict[str, float]]:
    """(device, number of actor slots, per-actor resource request) for this cluster."""
    res = job.resources
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if res.device == "cuda" and gpus == 0:
        raise UserError("resources.device = 'cuda' but the Ray cluster has no GPU")
    if gpus > 0 and res.device != "cpu":
        return "cuda", gpus, {"num_gpus": 1, "num_cpus": res.cpus_per_actor}
    cpus = ray.cluster_resources().get("CPU", 1)
    slots = max(1, min(res.max_actors, int(cpus // res.cpus_per_actor)))
    return "cpu", slots, {"num_cpus": res.cpus_per_actor}


def run_job(job: JobSpec, address: str | None = None, progress: bool = True) -> JobReport:
    """Run (or resume) a job to completion and return its report."""
    started = time.perf_counter()
    urls = resolve_shard_urls(job.data)
    check_variants(job)
    if os.path.isdir(job.output):
        clean_temporaries(job.output)  # a killed earlier run's half-written files
    queue = WorkQueue.build(job.output, job.variants, urls, job.experiments,
                            max_attempts=1 + job.resources.max_task_retries)
    report = JobReport(shards_total=len(urls) * len(job.variants), shards_skipped=len(queue.skipped), shards_done=0)
    if queue.total() == 0:
        report.wall_seconds = time.perf_counter() - started
        return report

    local_cpus = max(2, int(job.resources.max_actors * job.resources.cpus_per_actor), os.cpu_count() or 1)
    _connect(address, local_cpus)
    device, n_slots, request = _placement(job)
    report.device, report.actors = device, n_slots
    env = {k: v for k, v in os.environ.items() if k.startswith("VITLENS_")}  # incl. the test hooks
    Actor = actor_class(job.resources.max_actor_restarts, job.resources.max_task_retries)
    threads = max(1, int(job.resources.cpus_per_actor))

    def new_actor(variant: str) -> Any:
        return Actor.options(**request, runtime_env={"env_vars": env}).remote(variant, job, device, threads)

    slots: list[_Slot] = []
    bar = tqdm(total=report.shards_total, initial=report.shards_skipped, desc=f"{job.name}: shards × variants",
               unit="shard", disable=not progress)
    try:
        while queue.total() > 0:
            # Fill free slots and idle actors with work.
            serving: dict[str, int] = {}
            for slot in slots:
                serving[slot.variant] = serving.get(slot.variant, 0) + 1
            while len(slots) < n_slots:
                variant = queue.next_variant(serving)
                if variant is None:
                    break
                slots.append(_Slot(variant=variant, actor=new_actor(variant)))
                serving[variant] = serving.get(variant, 0) + 1
            for slot in list(slots):
                if slot.ref is None:
                    item = queue.take(slot.variant)
                    if item is None:  # this variant is finished: free the slot (and its GPU)
                        ray.kill(slot.actor)
                        slots.remove(slot)
                        continue
                    slot.item, slot.ref = item, slot.actor.process.remote(item.shard_url, item.stem, item.experiments)
            busy = [s for s in slots if s.ref is not None]
            if not busy:
                continue
            ready, _ = ray.wait([s.ref for s in busy], num_returns=1)
            for slot in busy:
                if slot.ref not in ready:
                    continue
                item, ref = slot.item, slot.ref
                slot.item, slot.ref = None, None
                try:
                    stats = ray.get(ref)
                except ray.exceptions.RayActorError as err:  # the actor died beyond its restarts
                    ray.kill(slot.actor)
                    slot.actor = new_actor(slot.variant)
                    _failed(queue, report, item, f"actor died: {err}", bar)
                except ray.exceptions.RayTaskError as err:  # the analysis raised for this shard
                    _failed(queue, report, item, str(err.cause if err.cause else err).splitlines()[0], bar)
                else:
                    queue.finished(item)
                    report.shards_done += 1
                    report.shard_stats.append(stats)
                    bar.update(1)
    finally:
        bar.close()
        for slot in slots:
            ray.kill(slot.actor)
    clean_temporaries(job.output)  # left by actors that died mid-shard (their shards were redone)
    report.wall_seconds = time.perf_counter() - started
    write_failed_shards(job, report.failures)
    write_run_record(job, report)
    return report


def _failed(queue: WorkQueue, report: JobReport, item: WorkItem, reason: str, bar: tqdm) -> None:
    if not queue.retry_or_fail(item, reason):
        report.failures.append((item.variant, item.shard_url, reason))
        bar.update(1)
