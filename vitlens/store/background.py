"""A background writer: builds and writes rows in a thread while the actor runs the device.

`BackgroundWriter.submit(task)` queues a callable (typically: turn one batch's device
tensors into Arrow rows and append them to staged Parquet files) and returns at once; one
thread runs the tasks in submission order, so files receive rows in the same order as a
synchronous writer. Arrow, Parquet and torch release the GIL for their heavy work, so the
thread overlaps with the next batch's forward pass. The queue is bounded (`depth` tasks):
a device that outpaces the writer waits instead of holding unbounded batches in memory.

A task that raises stops the writer; the error is raised in the actor by the next
`submit` or by `close()`, so the shard fails and its staged files are aborted (nothing of
it is committed or marked done).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

_STOP = object()


class BackgroundWriter:
    """Runs submitted tasks in one thread, in order; use as a context manager or call `close`."""

    def __init__(self, depth: int = 4) -> None:
        self._tasks: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vitlens-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is _STOP:
                    return
                if self._error is None:  # after a failure the rest is dropped, never half-written
                    task()
            except BaseException as err:  # re-raised in the submitting thread
                self._error = err
            finally:
                self._tasks.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, task: Callable[[], None]) -> None:
        """Queue `task` (blocks while `depth` tasks are waiting); raises an earlier task's error."""
        self._raise_if_failed()
        self._tasks.put(task)

    def flush(self) -> None:
        """Wait until every submitted task ran; raises the first task error."""
        self._tasks.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Run what is queued, stop the thread, and raise the first task error."""
        if self._thread.is_alive():
            self._tasks.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # the caller failed: stop without raising over its error
            try:
                self.close()
            except BaseException:
                pass
