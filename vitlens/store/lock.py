"""One run at a time per output folder: `ROOT/_lock.json` names the run that holds it.

The lock file is created with O_EXCL and holds `{pid, host, started_at, run_id}`. A second
run into the same output is refused with a one-line message naming the holder. A lock
left by a process that no longer exists on this host is stale and taken over (its run id
is returned, so the caller can mark that run as killed); a lock held from another host is
never taken over, since this host cannot tell whether that process still runs: remove the
file by hand once you know it does not.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from vitlens.errors import UserError

LOCK_NAME = "_lock.json"


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output folder."""

    pid: int
    host: str
    started_at: str  # ISO 8601, UTC
    run_id: str

    def describe(self) -> str:
        """`pid 123 on host h since 2026-12-01T22:00:00+00:00 (run R)`."""
        return f"pid {self.pid} on host {self.host} since {self.started_at} (run {self.run_id})"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(root: str | Path) -> LockHolder | None:
    """The holder named by `root`'s lock file, or None without one (or an unreadable one)."""
    try:
        payload = json.loads((Path(root) / LOCK_NAME).read_text())
        return LockHolder(int(payload["pid"]), str(payload["host"]), str(payload["started_at"]), str(payload["run_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class OutputLock:
    """`with OutputLock(root, run_id) as lock:` — hold `root` for one run.

    `lock.taken_over` is the stale holder whose lock was taken over, else None.
    Raises UserError when another live process (or another host) holds the folder.
    """

    def __init__(self, root: str | Path, run_id: str) -> None:
        self.path = Path(root) / LOCK_NAME
        self.holder = LockHolder(
            os.getpid(), socket.gethostname(),
            datetime.now(timezone.utc).replace(microsecond=0).isoformat(), run_id,
        )
        self.taken_over: LockHolder | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self.holder), handle, sort_keys=True)
        return True

    def acquire(self) -> "OutputLock":
        """Take the lock (or a stale one), else raise UserError naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                return self
            holder = read_lock(self.path.parent)
            if holder is None:  # half-written or garbage: only a crashed writer leaves that
                self._discard()
                continue
            if holder.host != self.holder.host:
                raise UserError(
                    f"output {self.path.parent} is locked by {holder.describe()}; if that run is over, "
                    f"delete {self.path}"
                )
            if _process_exists(holder.pid):
                raise UserError(
                    f"output {self.path.parent} is in use by {holder.describe()}; wait for it or use another output"
                )
            self.taken_over = holder
            self._discard()
        raise UserError(f"output {self.path.parent}: could not take the lock {self.path}")

    def _discard(self) -> None:
        """Remove the current lock file by renaming it away first (two takers cannot both win)."""
        grave = self.path.with_name(f".{LOCK_NAME}.{uuid.uuid4().hex}.stale")
        try:
            os.replace(self.path, grave)
        except FileNotFoundError:
            return
        grave.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if read_lock(self.path.parent) == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
