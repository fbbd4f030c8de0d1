"""The Ray actor: one model variant on one device, loaded once, fed whole shards.

The actor only wraps `ShardProcessor` (which reads, analyses and writes a shard without
knowing about Ray); restarts and retries are Ray's, scheduling is the driver's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray

from vitlens.errors import UserError, one_line_reason
from vitlens.runner.spec import JobSpec

#: Test hook: path of a flag file. The first actor that finishes a batch while the file
#: does not exist creates it and dies on the spot (os._exit), simulating a lost node.
INJECT_DEATH_ENV = "VITLENS_INJECT_ACTOR_DEATH"
#: Test hook: path of a flag file. The first actor that has committed a shard's data files
#: while the file does not exist creates it and dies before writing the shard's done-marker.
INJECT_DEATH_BEFORE_MARKER_ENV = "VITLENS_INJECT_DEATH_BEFORE_MARKER"
#: Test hook: a shard stem whose analysis always raises, simulating a bug hit by one shard.
INJECT_SHARD_ERROR_ENV = "VITLENS_INJECT_SHARD_ERROR"
#: Test hook: seconds each shard takes at least, so a test can kill the driver between shards.
INJECT_SHARD_DELAY_ENV = "VITLENS_INJECT_SHARD_DELAY"


class ShardActor:
    """Holds one loaded variant; `process(shard)` analyses one shard with every experiment."""

    def __init__(self, variant: str, job: JobSpec, device: str, num_threads: int) -> None:
        import torch

        from vitlens.runner.shard_job import ShardProcessor

        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        started = time.perf_counter()
        self.processor = ShardProcessor(variant=variant, job=job, device=device)
        self.load_seconds = time.perf_counter() - started

    def info(self) -> dict[str, Any]:
        """Where the actor runs and how long loading its variant took."""
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "load_seconds": self.load_seconds}

    def process(
        self,
        shard_url: str,
        stem: str,
        experiments: tuple[str, ...] | None = None,
        expected_samples: int | None = None,
        expected_sha256: str | None = None,
        fresh: bool = False,
    ) -> dict[str, Any]:
        """Analyse one shard with `experiments` (default: all of the job's); returns its statistics,
        or `{"failed": True, "stage": "read" | "analysis", "reason": one line, "retry": bool}`.

        `retry` is False for a damaged shard (`read`) and for a `UserError` (a problem of the
        data or the job, e.g. training images among the analysed ones: every attempt would
        fail alike); True for any other error (a bug hit by this shard, a lost resource).
        Errors come back as values, not exceptions, so the driver never unpickles an
        exception class of the science code (which would import torch there).
        """
        from vitlens.data.reader import ShardReadError

        try:
            if os.environ.get(INJECT_SHARD_ERROR_ENV) == stem:
                raise RuntimeError(f"injected analysis error for shard {stem}")
            time.sleep(float(os.environ.get(INJECT_SHARD_DELAY_ENV, "0")))
            return self.processor.process(shard_url, stem, on_batch=_maybe_die, experiments=experiments,
                                          expected_samples=expected_samples, expected_sha256=expected_sha256,
                                          fresh=fresh, before_marker=_maybe_die_before_marker)
        except ShardReadError as err:
            return {"failed": True, "stage": "read", "reason": one_line_reason(err.reason), "retry": False}
        except UserError as err:  # deterministic: reported once, never retried
            return {"failed": True, "stage": "analysis", "reason": one_line_reason(str(err)), "retry": False}
        except Exception as err:  # a bug hit by this shard: reported, retried by the driver
            return {"failed": True, "stage": "analysis", "reason": one_line_reason(err), "retry": True}


def _maybe_die_before_marker() -> None:
    flag = os.environ.get(INJECT_DEATH_BEFORE_MARKER_ENV)
    if flag and not Path(flag).exists():
        Path(flag).write_text(str(os.getpid()))
        os._exit(1)


def _maybe_die(batch_index: int) -> None:
    flag = os.environ.get(INJECT_DEATH_ENV)
    if flag and batch_index >= 1 and not Path(flag).exists():
        Path(flag).write_text(str(os.getpid()))
        os._exit(1)


def actor_class(max_restarts: int) -> Any:
    """The Ray actor class with the job's restarts. Ray retries no task itself: the driver
    counts every attempt of a shard (`max_task_retries`) and prints one line per failure."""
    return ray.remote(max_restarts=max_restarts, max_task_retries=0)(ShardActor)
