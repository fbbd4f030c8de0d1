"""One run at a time per output: `ROOT/_lock.json` names the run that holds it.

The lock is created with a conditional create (O_EXCL on a local folder, `If-None-Match: *`
on S3 and the other object stores fsspec writes conditionally) and holds `{pid, host,
started_at, run_id}`. A second run into the same output is refused with a one-line message
naming the holder. A lock left by a process that no longer exists on this host is stale and
taken over (its run id is returned, so the caller can mark that run as killed); a lock held
from another host is never taken over, since this host cannot tell whether that process
still runs: remove it by hand once you know it does not.
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
from vitlens.store.storage import Storage, open_storage

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


def read_lock(root: str | Path | Storage) -> LockHolder | None:
    """The holder named by `root`'s lock file, or None without one (or an unreadable one)."""
    storage = root if isinstance(root, Storage) else open_storage(root)
    try:
        payload = json.loads(storage.read_bytes(LOCK_NAME))
        return LockHolder(int(payload["pid"]), str(payload["host"]), str(payload["started_at"]), str(payload["run_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class OutputLock:
    """`with OutputLock(root, run_id) as lock:` — hold `root` for one run.

    `lock.taken_over` is the stale holder whose lock was taken over, else None.
    Raises UserError when another live process (or another host) holds the folder.
    """

    def __init__(self, root: str | Path | Storage, run_id: str) -> None:
        self.storage = root if isinstance(root, Storage) else open_storage(root)
        self.path = self.storage.url(LOCK_NAME)
        self.holder = LockHolder(
            os.getpid(), socket.gethostname(),
            datetime.now(timezone.utc).replace(microsecond=0).isoformat(), run_id,
        )
        self.taken_over: LockHolder | None = None

    def _create(self) -> bool:
        return self.storage.create_exclusive(json.dumps(asdict(self.holder), sort_keys=True).encode(), LOCK_NAME)

    def acquire(self) -> "OutputLock":
        """Take the lock (or a stale one), else raise UserError naming its holder."""
        where = self.storage.root
        for _ in range(3):
            if self._create():
                return self
            holder = read_lock(self.storage)
            if holder is None:  # half-written or garbage: only a crashed writer leaves that
                self._discard()
                continue
            if holder.host != self.holder.host:
                raise UserError(
                    f"output {where} is locked by {holder.describe()}; if that run is over, "
                    f"delete {self.path}"
                )
            if _process_exists(holder.pid):
                raise UserError(
                    f"output {where} is in use by {holder.describe()}; wait for it or use another output"
                )
            self.taken_over = holder
            self._discard()
        raise UserError(f"output {where}: could not take the lock {self.path}")

    def _discard(self) -> None:
        """Remove the current lock: locally by renaming it away first (two takers cannot both
        win); on an object store by deleting it (the conditional create decides the winner)."""
        if not self.storage.renames:
            self.storage.delete(LOCK_NAME)
            return
        path = self.storage.local_path(LOCK_NAME)
        grave = path.with_name(f".{LOCK_NAME}.{uuid.uuid4().hex}.stale")
        try:
            os.replace(path, grave)
        except FileNotFoundError:
            return
        grave.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if read_lock(self.storage) == self.holder:
            self.storage.delete(LOCK_NAME)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
