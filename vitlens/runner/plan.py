"""What a job still has to do, and which variant an idle actor slot should serve next.

Pure bookkeeping (no Ray, no models): the driver asks this queue for work and reports
results back, so the scheduling policy is testable on its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Collection, Sequence

from vitlens.store.layout import done_experiments, shard_stem
from vitlens.store.storage import Storage


@dataclass(frozen=True)
class WorkItem:
    """One shard to analyse with one variant: the experiments of the job not yet done on it."""

    variant: str
    shard_url: str
    stem: str
    experiments: tuple[str, ...]
    attempt: int = 1
    expected_samples: int | None = None  # from the manifest: a shard with another count is not done
    expected_sha256: str | None = None  # from the manifest when verification is on
    fresh: bool = False  # its earlier files are damaged: redo every experiment, keep nothing of them


@dataclass
class WorkQueue:
    """Per-variant queues of shards, with retry counting and the skip of done shards."""

    max_attempts: int
    pending: dict[str, deque[WorkItem]] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    failed: list[tuple[WorkItem, str]] = field(default_factory=list)
    skipped: list[WorkItem] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        output_root: str | Path | Storage,
        variants: tuple[str, ...],
        shard_urls: Sequence[str],
        experiments: tuple[str, ...],
        max_attempts: int,
        expected: Sequence[tuple[int | None, str | None]] | None = None,
        damaged: Collection[tuple[str, str]] = (),
    ) -> "WorkQueue":
        """Queue every (variant, shard) with the experiments its done-marker does not list;
        remember the (variant, shard)s with nothing left to do as skipped.

        `expected[i]` is shard i's (sample count, sha256) from its manifest, either None.
        `damaged` holds the (variant, shard id)s whose committed files failed verification:
        they are queued with every experiment, `fresh`.
        """
        queue = cls(max_attempts=max_attempts)
        checks = list(expected) if expected is not None else [(None, None)] * len(shard_urls)
        for variant in variants:
            queue.pending[variant] = deque()
            queue.in_flight[variant] = 0
            for url, (samples, sha256) in zip(shard_urls, checks):
                stem = shard_stem(url)
                fresh = (variant, stem) in damaged
                done = frozenset() if fresh else done_experiments(output_root, variant, stem, sha256)
                item = WorkItem(variant, url, stem, tuple(e for e in experiments if e not in done),
                                expected_samples=samples, expected_sha256=sha256, fresh=fresh)
                if item.experiments:
                    queue.pending[variant].append(item)
                else:
                    queue.skipped.append(item)
        return queue

    def total(self) -> int:
        """Items still pending or running."""
        return sum(len(q) for q in self.pending.values()) + sum(self.in_flight.values())

    def next_variant(self, serving: dict[str, int]) -> str | None:
        """The variant a free actor slot should load: most pending shards per actor serving it."""
        best, best_load = None, -1.0
        for variant, items in self.pending.items():
            if not items:
                continue
            load = len(items) / (serving.get(variant, 0) + 1)
            if load > best_load:
                best, best_load = variant, load
        return best

    def take(self, variant: str) -> WorkItem | None:
        """Hand out the next shard of `variant`, or None when it has none left."""
        if not self.pending.get(variant):
            return None
        self.in_flight[variant] += 1
        return self.pending[variant].popleft()

    def finished(self, item: WorkItem) -> None:
        """Record a shard as written (its done-marker exists)."""
        self.in_flight[item.variant] -= 1

    def fail(self, item: WorkItem, reason: str) -> None:
        """Record a shard as failed without a retry (a damaged shard stays damaged)."""
        self.in_flight[item.variant] -= 1
        self.failed.append((item, reason))

    def retry_or_fail(self, item: WorkItem, reason: str) -> bool:
        """Requeue a failed shard until `max_attempts`; returns True when it was requeued."""
        self.in_flight[item.variant] -= 1
        if item.attempt < self.max_attempts:
            retry = replace(item, attempt=item.attempt + 1)
            self.pending[item.variant].appendleft(retry)
            return True
        self.failed.append((item, reason))
        return False
