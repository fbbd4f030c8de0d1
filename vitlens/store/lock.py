"""One run at a time per output: `ROOT/_lock.json` names the run that holds it.

The lock is created with a conditional create (O_EXCL on a local folder, `If-None-Match: *`
on S3 and the other object stores fsspec writes conditionally) and holds `{pid, host,
started_at, run_id}`. A second run into the same output is refused with a one-line message
naming the holder. A lock left by a process that no longer exists on this host is stale and
taken over (its run id is returned, so the caller can mark that run as killed) by exactly one
taker, even when several start together (`OutputLock.acquire`); a lock held from another host
is never taken over, since this host cannot tell whether that process still runs: remove it
by hand once you know it does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from vitlens.errors import UserError
from vitlens.store.storage import Storage, open_storage

LOCK_NAME = "_lock.json"
#: How long a taker waits for another taker of the same stale lock before giving up.
_TAKEOVER_WAIT_SECONDS = 30.0


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


def _parse(raw: bytes) -> LockHolder | None:
    """The holder a lock file's bytes name, or None for half-written or garbage bytes."""
    try:
        payload = json.loads(raw)
        return LockHolder(int(payload["pid"]), str(payload["host"]), str(payload["started_at"]), str(payload["run_id"]))
    except (ValueError, KeyError, TypeError):
        return None


def _takeover_key(stale: bytes) -> str:
    """The takeover marker of one stale lock (its bytes' hash: one marker per lock ever written)."""
    return f"_lock.takeover-{hashlib.sha256(stale).hexdigest()[:16]}.json"


def read_lock(root: str | Path | Storage) -> LockHolder | None:
    """The holder named by `root`'s lock file, or None without one (or an unreadable one)."""
    storage = root if isinstance(root, Storage) else open_storage(root)
    try:
        return _parse(storage.read_bytes(LOCK_NAME))
    except OSError:
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

    def _payload(self) -> bytes:
        return json.dumps(asdict(self.holder), sort_keys=True).encode()

    def _create(self) -> bool:
        return self.storage.create_exclusive(self._payload(), LOCK_NAME)

    def acquire(self) -> "OutputLock":
        """Take the lock (or a stale one), else raise UserError naming its holder.

        Creating the lock is a conditional create, so of many takers of a free output one
        wins. A stale lock (a dead process's) is replaced, not removed and created again, and
        only by the taker that wins a second conditional create, `_lock.takeover-<id>.json`
        for that very lock, after reading it again unchanged: the lock never goes missing
        and exactly one taker replaces it. The others find the winner's lock.
        """
        where = self.storage.root
        deadline = time.monotonic() + _TAKEOVER_WAIT_SECONDS
        while True:
            if self._create():
                return self
            try:
                raw = self.storage.read_bytes(LOCK_NAME)
            except FileNotFoundError:
                continue  # released meanwhile: create it again
            holder = _parse(raw)
            if holder is not None and holder.host != self.holder.host:
                raise UserError(
                    f"output {where} is locked by {holder.describe()}; if that run is over, "
                    f"delete {self.path}"
                )
            if holder is not None and _process_exists(holder.pid):
                raise UserError(
                    f"output {where} is in use by {holder.describe()}; wait for it or use another output"
                )
            # stale (a dead process on this host) or half-written (only a crashed writer leaves that)
            if self._take_over(raw):
                self.taken_over = holder
                return self
            if time.monotonic() > deadline:
                marker = self.storage.url(_takeover_key(raw))
                raise UserError(f"output {where}: the stale lock {self.path} is being taken over by another "
                                f"run for over {_TAKEOVER_WAIT_SECONDS:.0f} s; if none runs, delete {marker}")
            time.sleep(0.02)

    def _take_over(self, stale: bytes) -> bool:
        """Replace the stale lock `stale` by ours, in one write, if this taker wins its takeover
        marker and the lock still holds exactly those bytes; False otherwise (another taker
        has the marker, or has replaced the lock already)."""
        marker = _takeover_key(stale)
        ours = self._payload()
        if not self.storage.create_exclusive(ours, marker):
            return False
        try:
            try:
                current = self.storage.read_bytes(LOCK_NAME)
            except FileNotFoundError:
                return False
            if current != stale:
                return False
            self.storage.write_bytes(ours, LOCK_NAME)  # nobody else may touch it while we hold the marker
            return True
        finally:
            self.storage.delete(marker)

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if read_lock(self.storage) == self.holder:
            self.storage.delete(LOCK_NAME)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
