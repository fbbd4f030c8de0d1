"""The driver of `vitlens run`: check, lock, start or join Ray, place actors, feed shards, resume.

The driver only schedules: it never loads a model, computes a metric or imports torch.
Before Ray starts it checks what it can alone (`vitlens.runner.preflight`: the shards and
their ids, local files, a writable output) and takes the output's lock; the variants are
then checked by one Ray task that builds each on the meta device. Each actor slot serves
one variant at a time (one GPU per actor when the cluster has GPUs, otherwise CPU actors
with explicit `num_cpus`); an idle slot moves to the variant with the most pending shards.
Shards whose done-marker lists an experiment skip it, so a re-run after a killed driver
only does what is missing. A shard that keeps failing, or does not read as its manifest
says, is reported (exit 3) and redone by the next run, never marked done.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from vitlens.errors import UserError, one_line_reason
from vitlens.runner.bookkeeping import (
    JobReport,
    ShardFailure,
    mark_run_killed,
    new_run_id,
    write_failed_shards,
    write_run_record,
)
from vitlens.runner.plan import WorkItem, WorkQueue
from vitlens.runner.preflight import check_checkpoint_files, check_probe_disjoint, job_shards, probe_shards
from vitlens.runner.spec import JobSpec
from vitlens.store.committed import committed_files, damaged_shards, verify
from vitlens.store.layout import clean_temporaries, partition_value
from vitlens.store.lock import OutputLock
from vitlens.store.storage import Storage, open_storage

__all__ = ["JobReport", "ShardFailure", "run_job"]


@dataclass
class _Slot:
    variant: str
    actor: Any
    item: WorkItem | None = None
    ref: Any = None


def _quiet_worker_deaths() -> None:
    """Drop Ray's multi-line "(raylet) A worker died ..." notices from the driver's output: the
    driver prints one line per event itself (variant, shard, attempt). Ray has no switch for
    this, so its printer is wrapped; every other message passes unchanged."""
    import ray._private.worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_vitlens_quiet", False):
        return

    def print_to_stdstream(data: dict, *args: Any, **kwargs: Any) -> None:
        if data.get("pid") == "raylet" and any("A worker died or was killed" in line for line in data.get("lines", ())):
            return
        printer(data, *args, **kwargs)

    print_to_stdstream._vitlens_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def _connect(address: str | None, local_cpus: int) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one (quietly)."""
    import ray

    _quiet_worker_deaths()
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
    else:
        # Explicit num_cpus: on small machines Ray would otherwise let actors claim every CPU.
        # address="local": always a new cluster of our own, even when `ray start` runs one here
        # (ray.init would try to join it and refuse the num_cpus); join one with --address.
        ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, **quiet)


def _placement(job: JobSpec) -> tuple[str, int, dict[str, float]]:
    """(device, number of actor slots, per-actor resource request) for this cluster."""
    import ray

    res = job.resources
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if res.device == "cuda" and gpus == 0:
        raise UserError("resources.device = 'cuda' but the Ray cluster has no GPU")
    if gpus > 0 and res.device != "cpu":
        return "cuda", gpus, {"num_gpus": 1, "num_cpus": res.cpus_per_actor}
    cpus = ray.cluster_resources().get("CPU", 1)
    slots = max(1, min(res.max_actors, int(cpus // res.cpus_per_actor)))
    return "cpu", slots, {"num_cpus": res.cpus_per_actor}


def _check_variants_on_cluster(job: JobSpec) -> None:
    """Build every variant on the meta device in one Ray task (torch stays out of the driver)."""
    import ray

    from vitlens.runner.variant_check import variant_problems

    problems = ray.get(ray.remote(num_cpus=0, max_retries=0)(variant_problems).remote(job))
    if problems:
        raise UserError("; ".join(problems))


def run_job(job: JobSpec, address: str | None = None, progress: bool = True) -> JobReport:
    """Run (or resume) a job to completion and return its report.

    Raises UserError (before any work, and before Ray starts where the check allows) for
    bad shards, outputs, weight files and variants, and when another run holds the output.
    """
    started = time.perf_counter()
    shards = job_shards(job)
    check_probe_disjoint(shards, probe_shards(job))
    check_checkpoint_files(job)
    storage = open_storage(job.output)
    storage.check_writable()
    report = JobReport(shards_total=len(shards) * len(job.variants), shards_skipped=0, run_id=new_run_id())
    with OutputLock(storage, report.run_id) as lock:
        if lock.taken_over is not None:
            mark_run_killed(storage, lock.taken_over.run_id)
        clean_temporaries(storage)  # a killed earlier run's half-written files
        queue = WorkQueue.build(storage, job.variants, [s.url for s in shards], job.experiments,
                                max_attempts=1 + job.resources.max_task_retries,
                                expected=[(s.samples, s.sha256) for s in shards],
                                damaged=_damaged_results(storage, job, progress))
        report.shards_skipped = len(queue.skipped)
        status = "interrupted"
        recorded = False
        try:
            if queue.total() > 0:
                local_cpus = max(2, int(job.resources.max_actors * job.resources.cpus_per_actor), os.cpu_count() or 1)
                _connect(address, local_cpus)
                placement = _placement(job)  # UserError (e.g. cuda without a GPU) before any row
                _check_variants_on_cluster(job)
            write_run_record(job, report, "running")
            recorded = True
            if queue.total() > 0:
                _schedule(job, queue, report, placement, progress)
            status = "partial" if report.failures else "done"
            write_failed_shards(job, report.failures)
        finally:
            clean_temporaries(storage)  # left by actors that died mid-shard (their shards were redone)
            report.wall_seconds = time.perf_counter() - started
            if recorded:
                write_run_record(job, report, status)
    return report


def _damaged_results(storage: Storage, job: JobSpec, progress: bool) -> set[tuple[str, str]]:
    """The (variant, shard id)s of this job whose committed files are not what their markers
    recorded (size always; sha256 too unless `[data] verify = false` / `--no-verify`): one line
    each, and the shard is redone."""
    result = committed_files(storage)
    if not result.markers:
        return set()
    total = sum(r.size for r in result.files.values() if r is not None) if job.data.verify else 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{job.name}: verifying results",
              disable=not progress or total == 0, file=sys.stderr) as bar:
        damage = verify(result, checksums=job.data.verify, progress=bar.update)
    for item in damage:
        _say(item.line(storage) + "; its shard is redone")
    folders = {f"variant={partition_value(v)}": v for v in job.variants}
    return {(folders[folder], stem) for folder, stem in damaged_shards(damage, result) if folder in folders}


def _say(message: str) -> None:
    """One line on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


def _schedule(job: JobSpec, queue: WorkQueue, report: JobReport,
              placement: tuple[str, int, dict[str, float]], progress: bool) -> None:
    """Feed every pending (variant, shard) to actors until the queue is empty."""
    import ray

    from vitlens.runner.actors import actor_class

    device, n_slots, request = placement
    report.device, report.actors = device, n_slots
    env = {k: v for k, v in os.environ.items() if k.startswith("VITLENS_")}  # incl. the test hooks
    Actor = actor_class(job.resources.max_actor_restarts)
    threads = max(1, int(job.resources.cpus_per_actor))

    def new_actor(variant: str) -> Any:
        return Actor.options(**request, runtime_env={"env_vars": env}).remote(variant, job, device, threads)

    slots: list[_Slot] = []
    bar = tqdm(total=report.shards_total, initial=report.shards_skipped, desc=f"{job.name}: shards × variants",
               unit="shard", disable=not progress, file=sys.stderr)
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
                    slot.item = item
                    slot.ref = slot.actor.process.remote(item.shard_url, item.stem, item.experiments,
                                                         item.expected_samples, item.expected_sha256, item.fresh)
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
                except ray.exceptions.RayActorError as err:  # the actor process died (or never started)
                    ray.kill(slot.actor)
                    slot.actor = new_actor(slot.variant)
                    _retry_or_fail(queue, report, item, "analysis", f"actor died: {_actor_death_reason(err)}", bar)
                    continue
                except ray.exceptions.RayTaskError as err:  # not raised by ShardActor.process itself
                    _retry_or_fail(queue, report, item, "analysis", one_line_reason(str(err)), bar)
                    continue
                if stats.get("failed"):
                    if not stats.get("retry", stats["stage"] != "read"):  # a damaged shard, a UserError: no retry
                        queue.fail(item, stats["reason"])
                        _record_failure(report, item, stats["stage"], stats["reason"], bar)
                    else:
                        _retry_or_fail(queue, report, item, stats["stage"], stats["reason"], bar)
                    continue
                queue.finished(item)
                report.shards_done += 1
                report.shard_stats.append(stats)
                bar.update(1)
    finally:
        bar.close()
        for slot in slots:
            ray.kill(slot.actor)


def _actor_death_reason(err: BaseException) -> str:
    """One deterministic line on why an actor died: its constructor's error when it never
    started (e.g. a weight file it could not read), else that its process exited."""
    lines = [line.strip() for line in str(err).splitlines() if "Error: " in line and "ray." not in line]
    created = [line for line in lines if "UserError: " in line]
    if created:
        return one_line_reason(created[-1].split("UserError: ", 1)[1])
    return "the actor's process exited unexpectedly"


def _retry_or_fail(queue: WorkQueue, report: JobReport, item: WorkItem, stage: str, reason: str, bar: tqdm) -> None:
    if queue.retry_or_fail(item, reason):
        _say(f"{item.variant} {item.stem}: attempt {item.attempt} of {queue.max_attempts} failed ({reason}); retrying")
    else:
        _record_failure(report, item, stage, reason, bar)


def _record_failure(report: JobReport, item: WorkItem, stage: str, reason: str, bar: tqdm) -> None:
    _say(f"{item.variant} {item.stem}: failed at stage {stage} after attempt {item.attempt}: {reason}")
    report.failures.append(ShardFailure(item.variant, item.shard_url, stage, reason))
    bar.update(1)
