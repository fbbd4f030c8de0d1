"""Everything about a job that can be checked before Ray starts or torch is imported:
the shard list and its ids, the local files it names, and a writable output folder.

Each check raises `vitlens.errors.UserError` with one line naming the file or key.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from vitlens.data.manifest import shard_entries
from vitlens.errors import UserError
from vitlens.runner.spec import JobSpec
from vitlens.store.layout import shard_ids


@dataclass(frozen=True)
class JobShard:
    """One shard of a job with what the run checks it against."""

    url: str
    id: str  # unique within the job (vitlens.store.layout.shard_ids)
    samples: int | None  # the manifest's sample count; None for an explicit shard list
    sha256: str | None  # the manifest's checksum when [data] verify is on, else None


def is_local(url: str) -> bool:
    """True for a plain path or a `file:` URL (not http(s)://, pipe:, gs://, ...)."""
    return url.startswith("file:") or "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> Path:
    """The file of a local shard URL."""
    return Path(url[len("file://"):] if url.startswith("file://") else url.removeprefix("file:"))


def job_shards(job: JobSpec) -> list[JobShard]:
    """The job's shards in order, with unique ids; local shards must exist."""
    if job.data.manifest is not None:
        entries = [(e.url, e.samples, e.sha256) for e in shard_entries(job.data.manifest)]
    else:
        entries = [(url, None, None) for url in job.data.shards]
    ids = shard_ids([url for url, _, _ in entries])
    where = f"manifest {job.data.manifest}" if job.data.manifest is not None else "data.shards"
    for url, _, _ in entries:
        if is_local(url) and not local_path(url).is_file():
            raise UserError(f"{where}: shard {url} does not exist")
    return [
        JobShard(url, shard_id, samples, sha256 if job.data.verify else None)
        for (url, samples, sha256), shard_id in zip(entries, ids)
    ]


def check_output(output: str) -> None:
    """The output folder exists or can be made, and a file can be written and removed there."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".vitlens-write-probe-{uuid.uuid4().hex}.tmp"
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as err:
        raise UserError(f"output {path} is not writable: {err.strerror or err}") from None


def check_checkpoint_files(job: JobSpec) -> None:
    """Every local weight file the spec names ([checkpoints], [heads]) exists."""
    for table, files in (("checkpoints", job.checkpoints), ("heads", job.heads)):
        for variant, path in files:
            if is_local(path) and not local_path(path).is_file():
                raise UserError(f"{table}.{variant}: {path} does not exist")
