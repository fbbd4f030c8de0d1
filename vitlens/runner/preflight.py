"""Everything about a job that can be checked before Ray starts or torch is imported:
the shard list and its ids, and the local files it names (the output: `Storage.check_writable`).

Each check raises `vitlens.errors.UserError` with one line naming the file or key.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from vitlens.data.manifest import is_local, local_path, shard_entries
from vitlens.data.sample_format import split_member_name
from vitlens.errors import UserError, one_line_reason
from vitlens.runner.spec import TRAINED_EXPERIMENTS, DataSpec, JobSpec
from vitlens.store.layout import shard_ids


@dataclass(frozen=True)
class JobShard:
    """One shard of a job with what the run checks it against."""

    url: str
    id: str  # unique within the job (vitlens.store.layout.shard_ids)
    samples: int | None  # the manifest's sample count; None for an explicit shard list
    sha256: str | None  # the manifest's checksum when [data] verify is on, else None


def data_shards(data: DataSpec, table: str = "data") -> list[JobShard]:
    """The shards of a [data]-like table in order, with unique ids; local shards must exist."""
    if data.manifest is not None:
        entries = [(e.url, e.samples, e.sha256) for e in shard_entries(data.manifest)]
    else:
        entries = [(url, None, None) for url in data.shards]
    ids = shard_ids([url for url, _, _ in entries])
    where = f"manifest {data.manifest}" if data.manifest is not None else f"{table}.shards"
    for url, _, _ in entries:
        if is_local(url) and not local_path(url).is_file():
            raise UserError(f"{where}: shard {url} does not exist")
    return [
        JobShard(url, shard_id, samples, sha256 if data.verify else None)
        for (url, samples, sha256), shard_id in zip(entries, ids)
    ]


def job_shards(job: JobSpec) -> list[JobShard]:
    """The job's shards in order, with unique ids; local shards must exist."""
    return data_shards(job.data)


def probe_shards(job: JobSpec) -> list[JobShard]:
    """The training shards of the `probe` and `tuned` experiments ([probe]; empty when neither runs)."""
    data = job.probe.data
    trained = any(e in job.experiments for e in TRAINED_EXPERIMENTS)
    return data_shards(data, "probe") if trained and data is not None else []


def sample_keys(path: Path) -> set[str]:
    """The sample keys of a local WebDataset shard, from its tar headers alone (no member is
    read): a member `KEY.image.png` belongs to sample `KEY` (keys hold no '.')."""
    keys: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                try:
                    if member.isfile():
                        keys.add(split_member_name(member.name.rsplit("/", 1)[-1])[0])
                except ValueError:
                    continue  # not a sample member ('<key>.<member>')
        return keys
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"shard {path}: cannot list its samples ({one_line_reason(err)})") from None


def check_probe_disjoint(analysed: list[JobShard], training: list[JobShard]) -> None:
    """Refuse [probe] training shards that share a shard or an image key with the analysed ones
    (METHOD §7: the probes are trained on images disjoint from those they are evaluated on).

    Local shards are compared by their sample keys; remote ones (URLs) by URL only here, and
    by key in the actor, which refuses a batch holding a training key.
    """
    if not training:
        return
    same = sorted({s.url for s in analysed} & {s.url for s in training})
    if same:
        raise UserError(f"[probe] training shard {same[0]} is also an analysed shard ([data]); "
                        "train the probes on disjoint images")
    train_keys: dict[str, str] = {}
    for shard in training:
        if is_local(shard.url):
            train_keys.update(dict.fromkeys(sample_keys(local_path(shard.url)), shard.url))
    for shard in analysed:
        if not is_local(shard.url):
            continue
        overlap = sorted(sample_keys(local_path(shard.url)) & set(train_keys))
        if overlap:
            raise UserError(f"[probe] training shard {train_keys[overlap[0]]} and analysed shard {shard.url} "
                            f"share {len(overlap)} image key(s), e.g. {overlap[0]}; train the probes on disjoint images")


def check_checkpoint_files(job: JobSpec) -> None:
    """Every local weight file the spec names ([checkpoints], [heads]) exists."""
    for table, files in (("checkpoints", job.checkpoints), ("heads", job.heads)):
        for variant, path in files:
            if is_local(path) and not local_path(path).is_file():
                raise UserError(f"{table}.{variant}: {path} does not exist")
