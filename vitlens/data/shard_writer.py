"""Write samples into deterministic `{dataset}-{split}-{NNNNNN}.tar` shards plus the manifest.

Members get mtime 0, owner 0/0 with empty names and mode 0644, so the same samples
in the same order give byte-identical shards. A shard is written under a `.partial`
name and renamed when complete; the manifest is written last, so a directory with a
manifest holds only complete shards.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

from tqdm import tqdm

from vitlens.data.manifest import (
    MANIFEST_NAME,
    Reject,
    ShardEntry,
    file_sha256,
    write_manifest,
)
from vitlens.data.sample_format import EncodedSample, shard_name
from vitlens.errors import UserError

DEFAULT_SHARD_SIZE: int = 500


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def prepare_output_dir(out_dir: Path, dataset: str, split: str, overwrite: bool) -> None:
    """Create `out_dir`; refuse (UserError) to mix with an earlier conversion unless `overwrite`.

    With `overwrite`, the earlier manifest and this split's shards are deleted.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(dataset)}-{re.escape(split)}-\d{{6}}\.tar(\.partial)?$")
    earlier = [p for p in out_dir.iterdir() if p.name == MANIFEST_NAME or pattern.match(p.name)]
    if earlier and not overwrite:
        raise UserError(
            f"--out {out_dir} already holds shards or a manifest "
            f"({sorted(p.name for p in earlier)[0]}, ...); pass --overwrite or choose another --out"
        )
    for path in earlier:
        path.unlink()


class ShardWriter:
    """Appends samples to numbered shards of `shard_size` samples each (use as a context manager)."""

    def __init__(self, out_dir: Path, dataset: str, split: str, shard_size: int = DEFAULT_SHARD_SIZE):
        """Write shards named `{dataset}-{split}-{NNNNNN}.tar` into the existing `out_dir`."""
        if shard_size < 1:
            raise UserError(f"--shard-size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.dataset = dataset
        self.split = split
        self.shard_size = shard_size
        self.shards: list[ShardEntry] = []
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._count = 0
        self._keys: set[str] = set()

    def write(self, sample: EncodedSample) -> None:
        """Append one sample; starts a new shard when the current one is full."""
        if sample.key in self._keys:
            raise ValueError(f"duplicate sample key {sample.key!r}")
        self._keys.add(sample.key)
        if self._tar is not None and self._count >= self.shard_size:
            self._finish_shard()
        if self._tar is None:
            name = shard_name(self.dataset, self.split, len(self.shards))
            self._path = self.out_dir / name
            self._tar = tarfile.open(self._partial(self._path), "w", format=tarfile.PAX_FORMAT)
            self._count = 0
        for member_name, data in sample.members():
            self._tar.addfile(_tar_member(member_name, len(data)), io.BytesIO(data))
        self._count += 1

    @staticmethod
    def _partial(path: Path) -> Path:
        return path.with_name(path.name + ".partial")

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        self._partial(self._path).rename(self._path)
        self.shards.append(ShardEntry(self._path.name, self._count, file_sha256(self._path)))
        self._tar = None

    def close(self) -> list[ShardEntry]:
        """Finish the last shard; returns every shard written."""
        if self._tar is not None:
            self._finish_shard()
        return self.shards

    @property
    def num_samples(self) -> int:
        """Samples written so far."""
        return len(self._keys)

    def write_manifest(
        self, class_names: list[str], rejects: list[Reject], created_by: dict[str, Any]
    ) -> Path:
        """Close the writer and write `manifest.json` beside the shards."""
        shards = self.close()
        return write_manifest(
            self.out_dir, self.dataset, self.split, class_names, shards, rejects, created_by
        )

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()


@dataclass(frozen=True)
class ShardSummary:
    """What `write_shards` wrote."""

    manifest: Path
    samples: int
    shards: int
    classes: int
    rejects: list[Reject]


def write_shards(
    results: Iterable[EncodedSample | Reject],
    out_dir: Path,
    dataset: str,
    split: str,
    class_names: list[str],
    created_by: dict[str, Any],
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    expected_samples: int | None = None,
    progress: bool = True,
) -> ShardSummary:
    """Write converted samples into shards and the manifest (with the rejects), showing progress
    (a bar on stderr unless `progress` is False)."""
    prepare_output_dir(Path(out_dir), dataset, split, overwrite)
    rejects: list[Reject] = []
    classes: set[int] = set()
    with ShardWriter(Path(out_dir), dataset, split, shard_size) as writer, tqdm(
        total=expected_samples, desc=f"{dataset}-{split}", unit="sample", disable=not progress
    ) as bar:
        for result in results:
            if isinstance(result, Reject):
                rejects.append(result)
                bar.set_postfix(rejects=len(rejects))
                continue
            writer.write(result)
            classes.add(result.meta.class_index)
            bar.update(1)
        manifest = writer.write_manifest(class_names, rejects, created_by)
    return ShardSummary(manifest, writer.num_samples, len(writer.shards), len(classes), rejects)
