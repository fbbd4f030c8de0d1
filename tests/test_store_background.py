"""The background writer runs tasks in submission order and surfaces a task's error."""

from __future__ import annotations

import threading
import time

import pytest

from vitlens.store.background import BackgroundWriter


def test_tasks_run_in_order_in_another_thread() -> None:
    seen: list[tuple[int, str]] = []
    with BackgroundWriter(depth=2) as writer:
        for i in range(20):
            writer.submit(lambda i=i: (time.sleep(0.001 * (i % 3)), seen.append((i, threading.current_thread().name))))
        writer.flush()
        assert [i for i, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"vitlens-writer"}


def test_a_failing_task_is_raised_and_later_tasks_do_not_run() -> None:
    ran: list[int] = []
    writer = BackgroundWriter(depth=8)
    writer.submit(lambda: ran.append(1))
    writer.submit(lambda: 1 / 0)
    writer.submit(lambda: ran.append(3))
    with pytest.raises(ZeroDivisionError):
        writer.close()
    assert ran == [1]
    with pytest.raises(ZeroDivisionError):
        writer.submit(lambda: ran.append(4))
