"""The driver's work queue: skips done shards, balances slots, retries then fails."""

from pathlib import Path

from vitlens.runner.plan import WorkQueue
from vitlens.store.layout import done_marker, write_json_atomic


EXPERIMENTS = ("baseline", "explain")


def test_skips_done_and_counts(tmp_path: Path) -> None:
    write_json_atomic({"experiments": ["baseline", "explain"]}, done_marker(tmp_path, "a", "s-000001"))
    urls = ["/d/s-000000.tar", "/d/s-000001.tar", "/d/s-000002.tar"]
    queue = WorkQueue.build(str(tmp_path), ("a", "b"), urls, EXPERIMENTS, max_attempts=2)
    assert [i.stem for i in queue.skipped] == ["s-000001"]
    assert queue.total() == 5
    assert [i.stem for i in queue.pending["a"]] == ["s-000000", "s-000002"]
    assert {i.experiments for i in queue.pending["b"]} == {EXPERIMENTS}


def test_queues_only_the_experiments_a_marker_lacks(tmp_path: Path) -> None:
    write_json_atomic({"experiments": ["baseline"]}, done_marker(tmp_path, "a", "s-000000"))
    write_json_atomic({"rows": 3}, done_marker(tmp_path, "a", "s-000001"))  # lists none: redo all
    (done_marker(tmp_path, "a", "s-000002")).write_text("{not json")  # unreadable: redo all
    urls = ["/d/s-000000.tar", "/d/s-000001.tar", "/d/s-000002.tar"]
    queue = WorkQueue.build(str(tmp_path), ("a",), urls, EXPERIMENTS, max_attempts=2)
    assert [(i.stem, i.experiments) for i in queue.pending["a"]] == [
        ("s-000000", ("explain",)), ("s-000001", EXPERIMENTS), ("s-000002", EXPERIMENTS)]
    only_baseline = WorkQueue.build(str(tmp_path), ("a",), urls[:1], ("baseline",), max_attempts=2)
    assert only_baseline.total() == 0 and len(only_baseline.skipped) == 1


def test_next_variant_prefers_most_pending_per_actor(tmp_path: Path) -> None:
    urls = [f"/d/s-{i:06d}.tar" for i in range(4)]
    queue = WorkQueue.build(str(tmp_path), ("a", "b"), urls, EXPERIMENTS, max_attempts=1)
    queue.take("b")
    assert queue.next_variant({}) == "a"  # a: 4 pending, b: 3
    assert queue.next_variant({"a": 1}) == "b"  # a: 4/2 = 2 per actor, b: 3/1
    while queue.take("a"):
        pass
    assert queue.next_variant({"b": 1}) == "b"


def test_retry_until_max_attempts_then_fail(tmp_path: Path) -> None:
    queue = WorkQueue.build(str(tmp_path), ("a",), ["/d/s-000000.tar"], EXPERIMENTS, max_attempts=2)
    first = queue.take("a")
    assert queue.retry_or_fail(first, "boom") is True
    second = queue.take("a")
    assert second.attempt == 2 and queue.total() == 1 and second.experiments == EXPERIMENTS
    assert queue.retry_or_fail(second, "boom again") is False
    assert queue.total() == 0
    assert queue.failed[0][1] == "boom again"
