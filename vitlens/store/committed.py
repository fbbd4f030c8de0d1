"""What a result set has committed, and whether those files are still what was committed.

`committed_files(storage)` lists the result root once and reads every done-marker, and gives
the files a reader may read:

- the per-variant and per-run tables (`params`, `variants`, `runs`, and the `rejects` file
  `failed-shards`), each written whole in one piece;
- every file a done-marker names, with the size and sha256 it had when it was committed;
- on a local folder also the files under their stable names that no marker names (result sets
  written before markers named their files, and hand-made result sets): locally those names
  are only ever written whole, by rename.

On an object store a file no marker names (a writer killed between its data objects and its
marker, an attempt that was retried) is never read: it is counted as `unreferenced`.

`verify(files)` checks every recorded size and sha256: the damage `vitlens verify` reports
and a re-run redoes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote

from vitlens.store.layout import marker_files, partition_value, table_key
from vitlens.store.storage import FileRecord, Storage

#: Tables written whole per variant or per run (not per shard); readers take every file of them.
WHOLE_TABLES: tuple[str, ...] = ("params", "variants", "runs")
#: The `rejects` file of the shards a run could not complete (one per variant, written whole).
FAILED_SHARDS = "failed-shards"
#: Where the done-markers live.
MARKERS_PREFIX = "_done/"


def _is_whole(key: str) -> bool:
    table = key.split("/", 1)[0].removeprefix("table=")
    return table in WHOLE_TABLES or key.endswith(f"/{FAILED_SHARDS}.parquet") and table == "rejects"


def _is_data(key: str) -> bool:
    """A Parquet file under `table=*/variant=*/experiment=*/` (not a temporary)."""
    parts = key.split("/")
    return (len(parts) == 4 and parts[0].startswith("table=") and parts[1].startswith("variant=")
            and parts[2].startswith("experiment=") and parts[3].endswith(".parquet")
            and not parts[3].startswith("."))


@dataclass
class ResultFiles:
    """The files a result set commits, found by one listing and its markers."""

    storage: Storage
    files: dict[str, FileRecord | None]  # key -> record (None: no checksum recorded)
    listing: dict[str, int]  # every object / file under the root -> size
    markers: dict[tuple[str, str], dict] = field(default_factory=dict)  # (variant folder, stem) -> marker
    unreferenced: list[str] = field(default_factory=list)  # data objects no marker names (object stores)

    def of_table(self, table: str) -> list[str]:
        """The committed keys of one table, sorted."""
        prefix = f"table={table}/"
        return sorted(k for k in self.files if k.startswith(prefix))

    def shard_file(self, table: str, variant: str, experiment: str, stem: str) -> str | None:
        """The committed key of one (table, variant, experiment, shard) file, or None."""
        stable = table_key(table, variant, experiment, stem)
        if stable in self.files:
            return stable
        folder = stable.rsplit("/", 1)[0] + "/"
        marker = self.markers.get((f"variant={partition_value(variant)}", stem))
        named = (marker_files(marker) or {}) if marker is not None else {}
        return next((key for key in sorted(named) if key.startswith(folder)), None)

    def partitions(self) -> dict[tuple[str, str], list[str]]:
        """(variant, experiment) -> the tables with committed files there (decoded names)."""
        found: dict[tuple[str, str], set[str]] = {}
        for key in self.files:
            table, variant, experiment = (part.split("=", 1)[1] for part in key.split("/")[:3])
            found.setdefault((unquote(variant), unquote(experiment)), set()).add(table)
        return {k: sorted(v) for k, v in sorted(found.items())}


def committed_files(storage: Storage) -> ResultFiles:
    """The files of the result set at `storage` that readers read (module docstring)."""
    listing = storage.list_files()
    marker_keys = [k for k in listing if k.startswith(MARKERS_PREFIX) and k.endswith(".json")]
    payloads = storage.read_many(marker_keys)
    files: dict[str, FileRecord | None] = {}
    markers: dict[tuple[str, str], dict] = {}
    for key, raw in payloads.items():
        try:
            payload = json.loads(raw) if raw is not None else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            continue  # unreadable marker: its shard is not done
        variant_folder, name = key[len(MARKERS_PREFIX):].split("/", 1)
        markers[(variant_folder, name.removesuffix(".json"))] = payload
        named = marker_files(payload)
        if named:
            files.update(named)
    unreferenced = []
    for key in sorted(listing):
        if not _is_data(key) or key in files:
            continue
        if _is_whole(key) or storage.renames:
            files[key] = None
        else:
            unreferenced.append(key)
    return ResultFiles(storage, dict(sorted(files.items())), listing, markers, unreferenced)


@dataclass(frozen=True)
class Damage:
    """A committed file that is not what its marker recorded."""

    key: str
    problem: str  # "missing", "size 10 bytes, committed 12", "sha256 differs from the committed one"

    def line(self, storage: Storage) -> str:
        """One line for the user."""
        return f"DAMAGED {storage.url(self.key)}: {self.problem}"


def damaged_shards(damage: list[Damage], result: ResultFiles) -> set[tuple[str, str]]:
    """The (variant folder, shard stem)s whose marker names a damaged file."""
    bad = {d.key for d in damage}
    found = set()
    for (variant, stem), payload in result.markers.items():
        named = marker_files(payload) or {}
        if bad & set(named):
            found.add((variant, stem))
    return found


def verify(result: ResultFiles, checksums: bool = True,
           progress: Callable[[int], None] | None = None, threads: int = 4) -> list[Damage]:
    """Check every committed file that has a record: exists, same size, and (with `checksums`)
    the same sha256. `progress(bytes)` is called after each file hashed."""
    damage: list[Damage] = []
    to_hash: list[FileRecord] = []
    for key, record in result.files.items():
        if record is None:
            continue
        size = result.listing.get(key)
        if size is None:
            damage.append(Damage(key, "missing"))
        elif size != record.size:
            damage.append(Damage(key, f"size {size} bytes, committed {record.size}"))
        elif checksums:
            to_hash.append(record)

    def check(record: FileRecord) -> Damage | None:
        try:
            digest = result.storage.sha256(record.key)
        except OSError as err:
            return Damage(record.key, f"unreadable ({err})")
        finally:
            if progress is not None:
                progress(record.size)
        return None if digest == record.sha256 else Damage(record.key, "sha256 differs from the committed one")

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        damage += [d for d in pool.map(check, to_hash) if d is not None]
    return sorted(damage, key=lambda d: d.key)
